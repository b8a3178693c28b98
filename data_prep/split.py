"""Deterministic train/validation split by content hash."""

from __future__ import annotations

from typing import Any


def split_by_hash(rows: list[dict[str, Any]], val_fraction: float, val_max: int | None) -> tuple[list, list]:
    """The rows with the smallest content hashes are held out, so the same rows give the same split in any order,
    on any machine, and a row added later never moves an existing row across the split (only the cut point moves)."""
    if val_fraction <= 0 or len(rows) < 2:
        return rows, []
    n_val = max(1, round(len(rows) * val_fraction))
    if val_max is not None:
        n_val = min(n_val, val_max)
    n_val = min(n_val, len(rows) - 1)
    val_ids = {r["_hash"] for r in sorted(rows, key=lambda r: r["_hash"])[:n_val]}
    return [r for r in rows if r["_hash"] not in val_ids], [r for r in rows if r["_hash"] in val_ids]
