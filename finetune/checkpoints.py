"""Checkpoints that a crash can never make ambiguous.

The Trainer writes `checkpoint-N` wherever it likes (RUN/.trainer-STAGE/); we then move it to RUN/checkpoints/
as `step-NNNNNN.tmp`, check its weights are finite, fsync, write a COMPLETE marker (the list of files and their
sizes) last, and rename it to `step-NNNNNN`. Resume takes the newest folder whose marker is there and whose files
still match it: a half-written `.tmp`, a folder without a marker or with a truncated file is never chosen (HF's own
`get_last_checkpoint` picks the highest number, finished or not). Rotation renames a folder to `.deleting` before
removing it, and only ever after a newer complete checkpoint exists, so a crash at any point leaves at least one.

Importing this module must not import torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
# What HF's Trainer needs to resume exactly: adapter weights, optimizer, scheduler, RNG state and trainer state.
REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# ... and the RNG state: rng_state.pth from one process, rng_state_<rank>.pth from each of several.
# `training_args.bin` is a pickle of the TrainingArguments that resume never reads: not kept (safetensors/JSON only
# for weights and configuration; the optimizer, scheduler and RNG files are read with weights_only=True).
DROP = ("training_args.bin",)
_NAME = re.compile(r"^step-(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def finalize(src: Path, ckpt_dir: Path, step: int, check=None) -> Path:
    """Move the Trainer's `src` folder into `ckpt_dir` as a complete `step-NNNNNN`. `check(folder)` runs on the
    staged copy before the marker is written (the finiteness check); if it raises, the staged copy is removed."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(src, tmp)
    for name in DROP:
        (tmp / name).unlink(missing_ok=True)
    try:
        if check is not None:
            check(tmp)
        missing = [n for n in REQUIRED if not (tmp / n).exists()]
        if not (tmp / "rng_state.pth").exists() and not list(tmp.glob("rng_state_*.pth")):
            missing.append("rng_state.pth")
        if missing:
            raise RuntimeError(f"checkpoint at step {step} lacks {', '.join(missing)}: it could not be resumed exactly")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = tmp / MARKER
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a rerun): the older copy goes
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    return final


def is_complete(folder: Path) -> bool:
    """A finished checkpoint: named step-N (not .tmp), its marker present and every file it lists at its size."""
    if not _NAME.match(folder.name) or not folder.is_dir():
        return False
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return all((folder / rel).stat().st_size == size for rel, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step number, not by name or mtime)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(ckpt_dir: Path) -> Path | None:
    done = complete(ckpt_dir)
    return done[-1] if done else None


def step_of(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


def _remove(folder: Path) -> None:
    """Take a folder out of the resolver's sight first (rename), then delete it: a crash mid-delete leaves a
    `.deleting` folder that is never resumed from and is cleaned up later."""
    doomed = folder.with_name(folder.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(ckpt_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (at least one); sweep leftovers of interrupted writes/deletes."""
    for p in ckpt_dir.glob("*.deleting"):
        shutil.rmtree(p, ignore_errors=True)
    if not keep:
        return
    done = complete(ckpt_dir)
    for old in done[: -max(keep, 1)]:
        _remove(old)


def sweep(ckpt_dir: Path) -> None:
    """Remove what interrupted writes left (`.tmp`, `.deleting`, unmarked folders); complete checkpoints stay."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if p.is_dir() and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
