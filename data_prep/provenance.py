"""provenance.json, typed: what a built instruction set was made from. Written by the data build (datacard.py), read
by the model card, the publish gates and run.lock. A missing or renamed field is an error naming the file and field
(`read`), never a "?" in a published card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import DataError
from .rejects import FILTERS


class SourceRecord(BaseModel):
    model_config = ConfigDict(extra="allow")  # a reader's own details (columns, rows_in_file, adapter options ...)

    path: str | None = Field(None, description="A local source, relative to the recipe or spec when it lies under it.")
    hub: str | None = Field(None, description="A Hub dataset id.")
    revision: str | None = None
    sha256: str | None = Field(None, description="Content hash of the file (or folder) read.")
    fingerprint: str | None = Field(None, description="For Hub sources: the datasets library's fingerprint of what was read.")
    license: str | None
    rows_read: int
    rows_kept: int
    not_selected: int = Field(description="Rows left out by include_ids / exclude_ids.")
    removed: dict[str, int] = Field(description="Rows removed per filter: " + ", ".join(FILTERS) + ".")
    pii_rows: int = 0


class Split(BaseModel):
    model_config = ConfigDict(extra="allow")  # the length statistics (total, mean, median, p95 ...)

    n: int


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")  # cpt: the continued-pretraining blocks, when the recipe has that stage

    name: str
    sources: list[SourceRecord]
    quality: dict[str, Any] = Field(description="What each quality step did (dedupe, decontamination, PII), counts only.")
    rejected: int
    splits: dict[str, Split]
    length_unit: str
    tokenizer: str | None
    max_length: int | None
    seconds: float


def check(prov: dict[str, Any]) -> dict[str, Any]:
    """The record as written: validated (a writer that drops or renames a field fails here), returned unchanged."""
    Provenance.model_validate(prov)
    return prov


def read(path: Path) -> dict[str, Any]:
    """provenance.json, validated; DataError naming the file and the field when it is missing or wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the prepare stage)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    try:
        Provenance.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise DataError(f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (written by another version, or edited; "
                        "rerun prepare with --force prepare)") from None
    return data


def all_sources(prov: dict[str, Any]) -> list[dict[str, Any]]:
    """Every source the run trained on: the instruction set's, then the continued-pretraining documents' and the
    preference pairs' when those stages ran (licences and the card's provenance table cover them all)."""
    extra = [s for key in ("cpt", "preference") for s in ((prov.get(key) or {}).get("sources") or [])]
    return list(prov["sources"]) + extra
