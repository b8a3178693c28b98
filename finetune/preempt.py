"""Preemption: SIGTERM (a spot instance or a scheduler reclaiming the GPU) or SIGINT (Ctrl-C).

While an optimizer loop is running, the first signal only sets a flag: the loop finishes the current step, writes a
complete checkpoint and stops (the Trainer callback in train.py reads `requested()`), and the run exits 143 with the
stage marked "preempted" in the manifest. Anywhere else (data preparation, evaluation, merging) nothing is gained by
waiting, so the signal raises `Preempted` at once: the stage's staging folder is removed, its earlier outputs stay
as they were, and a rerun does the stage again. A second signal during training stops at once too (the previous
complete checkpoint is still there).

Importing this module must not import torch.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger("finetune")

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers (Slurm, Kubernetes) expect from a job that stopped on request


class Preempted(Exception):
    """The run was asked to stop and stopped cleanly: exit code 143."""

    exit_code = EXIT_CODE


_state = {"signal": None, "deferring": False}


def requested() -> str | None:
    """Name of the signal received, if any."""
    return _state["signal"]


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    first = _state["signal"] is None
    _state["signal"] = name
    if _state["deferring"] and first:
        log.warning("%s received: finishing the current step, then writing a checkpoint and stopping", name)
        return
    raise Preempted(f"stopped by {name}" + (" (second signal: not waiting for the step to finish)" if not first else ""))


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread only; elsewhere, e.g. in a notebook's worker
    thread, signals are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(signal=None, deferring=False)
    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(signal=None, deferring=False)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside an optimizer loop: a signal sets the flag instead of raising."""
    if _state["signal"] is not None:
        raise Preempted(f"stopped by {_state['signal']}")
    _state["deferring"] = True
    try:
        yield
    finally:
        _state["deferring"] = False
