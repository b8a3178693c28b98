"""One rejected row, as rejects.jsonl records it: where it came from, which filter took it out, and why.

The one writer of the record every stage of the build (and `finetune prepare`, `finetune data validate`) appends;
readers (the data card, the tests) rely on exactly these four keys.
"""

from __future__ import annotations

from typing import Any

# The filters a row can fail, in the order the build applies them; provenance counts each per source.
FILTERS = ("invalid", "overlong", "exact_duplicate", "near_duplicate", "contaminated", "pii")


def reject(source: str, row: int, filter: str, reason: str) -> dict[str, Any]:
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}: one of {', '.join(FILTERS)}")
    return {"source": source, "row": row, "filter": filter, "reason": reason}


def reject_row(r: dict[str, Any], filter: str, reason: str) -> dict[str, Any]:
    """The record of a loaded row (one carrying its `_source` and `_row`)."""
    return reject(r["_source"], r["_row"], filter, reason)
