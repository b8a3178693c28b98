"""One source, read into validated rows: reader -> id selection -> field mapping -> adapter -> layout checks ->
duplicate ids. Returns the rows, the rejects (row number + reason) and what provenance needs. Importable without torch."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, RowError
from ..formats import detect_format, normalise
from ..rejects import reject as reject_record
from ..schema import did_you_mean
from ..spec import Location, Source, resolve_path
from .adapters import ADAPTERS
from .readers import Opened, open_hub, open_path


@dataclass
class Loaded:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    not_selected: int = 0  # rows left out by include_ids / exclude_ids (a choice, not a fault)
    info: dict[str, Any] = field(default_factory=dict)


def id_set(base_dir: Path, p: str, key: str) -> set[str]:
    path = resolve_path(base_dir, p)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{key}: {path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{key}: {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, (dict, list)):
        raise DataError(f"{key}: {path}: expected a JSON object (its keys are the ids) or a list of ids")
    return {str(k) for k in data}


def _check_mapping(src: Source, columns: list[str], where: str) -> None:
    for ours, theirs in src.fields.items():
        if theirs not in columns:
            close = did_you_mean(theirs, columns)
            hint = f"did you mean '{close}'?" if close else f"columns: {', '.join(columns[:20])}"
            raise DataError(f"{where}: fields.{ours} names column '{theirs}', which the data does not have; {hint}")


def _check_layout(src: Source, row: dict[str, Any], where: str) -> None:
    """The first row decides whether the mapping makes sense at all: a source whose rows have no instruction/output
    (or messages, or text) is a missing mapping, not thousands of bad rows."""
    if src.adapter is not None:
        return
    fmt = detect_format(row) if src.format == "auto" else src.format
    needed = {"alpaca": ("instruction", "output"), "messages": ("messages",), "text": ("text",),
              "pairs": ("prompt", "chosen", "rejected")}[fmt]
    missing = [k for k in needed if k not in row]
    if missing:
        cols = ", ".join(k for k in row if k != "id")
        raise DataError(
            f"{where}: rows have columns [{cols}] but no {' or '.join(repr(m) for m in missing)}; map them with "
            "`fields: {instruction: <column>, output: <column>}` or use an `adapter:`"
        )


def open_source(src: Location, base_dir: Path) -> Opened:
    if src.hub is not None:
        return open_hub(src.hub, src.config, src.split, src.revision)
    name = getattr(src, "adapter", None)  # eval tasks are Locations without an adapter
    adapter = ADAPTERS.get(name) if name else None
    return open_path(resolve_path(base_dir, src.path), src.reader, src.columns, src.split, adapter.columns if adapter else None)


def adapter_fn(src: Source, base_dir: Path):
    if src.adapter is None:
        return None
    opts = {k: (str(resolve_path(base_dir, v)) if k.endswith("_file") and isinstance(v, str) else v) for k, v in src.options.items()}
    return functools.partial(ADAPTERS[src.adapter].fn, **opts)


def shown_path(path: str, base_dir: Path) -> str:
    """A source's path as provenance, data cards and run.lock.json show it: relative to the recipe or spec file, never
    an absolute path of this machine (those files are published)."""
    p = Path(path).expanduser()
    return os.path.relpath(p, base_dir) if p.is_absolute() else path


def id_selector(loc, base_dir: Path, where: str):
    """`include_ids` / `exclude_ids` of a location as one predicate on a mapped row (None when the location selects
    nothing): the one rule for training sources and eval tasks alike."""
    if not loc.include_ids and not loc.exclude_ids:
        return None
    include = id_set(base_dir, loc.include_ids, "include_ids") if loc.include_ids else None
    exclude = id_set(base_dir, loc.exclude_ids, "exclude_ids") if loc.exclude_ids else set()

    def selected(row: dict[str, Any], n: int) -> bool:
        rid = row.get("id")
        if rid is None:
            raise DataError(f"{where}: include_ids/exclude_ids need an `id` in every row (row {n} has none; map one with fields: {{id: <column>}})")
        return (include is None or str(rid) in include) and str(rid) not in exclude

    return selected


def load_source(src: Source, base_dir: Path, progress: bool = False) -> Loaded:
    where = src.origin
    opened = open_source(src, base_dir)
    out = Loaded(info={("hub" if src.hub else "path"): src.hub or shown_path(src.path, base_dir), **opened.info, "license": src.license,
                       **({"adapter": src.adapter, "options": src.options} if src.adapter else {})})
    if opened.columns is not None:
        _check_mapping(src, opened.columns, where)
    selected = id_selector(src, base_dir, where)
    convert = adapter_fn(src, base_dir)
    seen_ids: dict[str, int] = {}
    checked = False
    rows = opened.rows
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, total=opened.info.get("rows_in_file"), desc=f"read {Path(where).name}", unit=" rows", leave=False)

    def reject(n: int, reason: str, kind: str = "invalid") -> None:
        out.rejects.append(reject_record(where, n, kind, reason))

    for n, raw in rows:
        if src.limit is not None and out.read >= src.limit:
            break
        out.read += 1
        if isinstance(raw, RowError):
            reject(n, str(raw))
            continue
        if not isinstance(raw, dict):
            reject(n, f"row is {type(raw).__name__}, not an object")
            continue
        row = dict(raw)
        if src.fields:
            if not checked and opened.columns is None:
                _check_mapping(src, list(row), where)
            for ours, theirs in src.fields.items():
                row[ours] = raw.get(theirs)
        if selected is not None and not selected(row, n):
            out.not_selected += 1
            continue
        try:
            if convert is not None:
                adapted = convert(row)
                if "id" in row and "id" not in adapted:
                    adapted["id"] = row["id"]
                row = adapted
            if not checked:
                _check_layout(src, row, where)
            checked = True
            clean = normalise(row, src.format)
        except RowError as e:
            reject(n, str(e))
            continue
        rid = clean.get("id")
        if rid is not None:
            if rid in seen_ids:
                reject(n, f"duplicate id {rid!r} (first at row {seen_ids[rid]})")
                continue
            seen_ids[rid] = n
        clean["_source"], clean["_row"] = where, n
        out.rows.append(clean)
    if out.read == 0:
        raise DataError(f"{where}: empty source (no rows)")
    return out
