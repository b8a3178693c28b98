"""One writer per run directory: an exclusive lock held by every command that writes a run.

`fcntl.flock` on RUN/.finetune.lock: the kernel releases it when the holder exits in any way (crash, SIGKILL, a
SLURM job killed), so a lock can never outlive its process. The file also records who holds it (pid, host, command,
since). A second command on the same run is refused at once (exit 2) naming the holder: a SLURM requeue while the
old job still lives, or a second terminal, must not train or publish the same run twice. Finding the record of a
holder that is gone (the file is unlocked but not cleared) means that process died; it is named in the log and the
lock taken over.

Under `--gpus N` the launching process holds the lock for its torchrun children (FINETUNE_LOCK_HELD), which do not
take it again. Importing this module must not import torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from .errors import UserError

log = logging.getLogger("finetune")

HELD = "FINETUNE_LOCK_HELD"  # set for child processes of the holder: the run directory they may write without locking


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, `{info.get('command')}`, since {info.get('since')}"


@contextlib.contextmanager
def exclusive(folder: Path, command: str | None = None) -> Iterator[None]:
    """Hold the run directory's lock for the block; refuse (UserError, exit 2) when another process holds it."""
    folder = Path(folder)
    key = str(folder.resolve())
    if os.environ.get(HELD) == key or int(os.environ.get("RANK", "0") or 0) != 0:  # the holder's children, other ranks
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".finetune.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UserError(f"{folder}: another finetune command is writing this run ({_describe(_read(fd))}); wait for it "
                            "to end or stop it. Two commands on one run would train and publish it twice") from None
        stale = _read(fd)
        if stale.get("pid"):
            log.warning("run lock: %s ended without releasing %s (it died or was killed); taking it over", _describe(stale), path)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(["finetune", *sys.argv[1:]])[:300],
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        _write(fd, json.dumps(info))
        os.environ[HELD] = key  # inherited by torchrun's children under --gpus
        try:
            yield
        finally:
            os.environ.pop(HELD, None)
            _write(fd, "")
    finally:
        os.close(fd)  # closing releases the flock


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())


@contextlib.contextmanager
def waiting(folder: Path) -> Iterator[None]:
    """Serialise writers of a shared folder (a file:// publish target): wait for the lock instead of refusing."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
