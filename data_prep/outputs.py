"""Output folders finetune may write into, and how it marks the ones it made.

Rule (every `--out`, `--run-dir` and the default run folder): a folder finetune writes must be absent, empty, or one it
wrote itself, known by the marker file `.finetune.json` ({"kind": ...}). Anything else is refused before a byte is
written, naming what is there: a user's `--out .` or `--run-dir .` must never replace their recipe, data or notes.
Output folders are replaced only through a staging folder that finetune created next to them with a unique name, so a
sibling the user owns (`out.tmp`, `out.old`) is never touched either.

Importing this module must not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DataError

MARKER = ".finetune.json"
LOCK = ".finetune.lock"  # finetune/runlock.py: taken (and so created) before the folder is claimed


def kind_of(folder: Path) -> str | None:
    """The kind finetune recorded in a folder it wrote (run, data-build, eval, combination), or None."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(folder: Path, kind: str, what: str = "--out", legacy: Callable[[Path], bool] | None = None,
                 error: type[Exception] = DataError) -> None:
    """Refuse (exit 2) to write into `folder` unless it is absent, empty, or a `kind` folder finetune wrote. `legacy`
    recognises folders written before the marker existed."""
    folder = Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            raise error(f"{what} {folder}: a broken symbolic link; give a folder")
        return
    if not folder.is_dir():
        raise error(f"{what} {folder}: is a file, not a folder; give a new or empty folder (nothing was written)")
    try:
        entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
    except PermissionError:
        raise error(f"{what} {folder}: not readable (permission denied); give a folder you can write to") from None
    if not entries:
        return
    found = kind_of(folder)
    if found == kind or (found is None and legacy is not None and legacy(folder)):
        return
    if found is not None:
        raise error(f"{what} {folder}: holds a finetune {found}, not a {kind}; give another folder (nothing was written)")
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    raise error(f"{what} {folder}: holds files finetune did not write ({shown}); give a new or empty folder, so that "
                "nothing of yours is replaced (nothing was written)")


def mark(folder: Path, kind: str) -> None:
    """Record that finetune wrote `folder` (creating it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind_of(folder) != kind:
        (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def staging_dir(final: Path) -> Path:
    """A new, uniquely named folder beside `final` (same file system, so it can be renamed into place)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))


def replace_dir(staged: Path, final: Path) -> None:
    """Move a finished staging folder into place; the previous `final` (checked to be ours) is removed after."""
    if not final.exists():
        os.replace(staged, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
