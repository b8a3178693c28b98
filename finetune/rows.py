"""The prepared rows one stage hands to the next (RUN/data/*.jsonl: token ids and labels): read, and turned into the
dataset trl trains on. The one reader of them (training, the preflight, the recipe preflight)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.jsonl import read_jsonl


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a prepared JSONL file; none when it is absent (a run without a validation split)."""
    return read_jsonl(path)


def token_dataset(rows: list[dict[str, Any]]):
    """Tokenised rows; CPT blocks have no labels: every token is supervised."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r.get("labels", r["input_ids"]) for r in rows]})
