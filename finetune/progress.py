"""Progress you can see: a live line on a terminal, a one-line summary every so often in logs (SLURM, CI, `nohup`).

A 7B run is hours: between "preflight passed" and the end, training says its step, loss, tokens/s and ETA, and
evaluation its items done and ETA. On a terminal the line is redrawn in place (stderr); elsewhere a summary line goes
to the log (RUN/logs/run.log and stderr) every `every` steps for training and every `seconds` for evaluation, so a
log file stays short. Importing this module must not import torch.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("finetune")


def duration(s: float) -> str:
    s = max(0, int(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """`update(done, **shown)`; `close()` ends a terminal line. `every`: units between log lines off a terminal;
    `seconds`: or at most one line per this many seconds (whichever is set)."""

    def __init__(self, what: str, total: int, unit: str, every: int | None = None, seconds: float | None = None,
                 stream: TextIO | None = None, start: int = 0):
        self.what, self.total, self.unit, self.every, self.seconds = what, max(total, 1), unit, every, seconds
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start, self.t0, self.last_line = start, time.time(), 0.0
        self.drawn = False

    def text(self, done: int, shown: dict[str, str]) -> str:
        elapsed = time.time() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        parts = [f"{self.what}: {self.unit} {done}/{self.total} ({100 * done / self.total:.0f}%)", *[f"{k} {v}" for k, v in shown.items()],
                 f"{duration(elapsed)} elapsed", f"ETA {duration(eta)}" if eta is not None else "ETA ?"]
        return ", ".join(parts)

    def update(self, done: int, **shown: str) -> None:
        line = self.text(done, shown)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.drawn = True
            return
        now = time.time()
        due = (self.every is not None and (done % self.every == 0 or done == self.total)) or \
              (self.seconds is not None and (now - self.last_line >= self.seconds or done == self.total))
        if due:
            self.last_line = now
            log.info(line)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
