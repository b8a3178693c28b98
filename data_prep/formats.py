"""Reading instruction rows: Alpaca ({instruction, input, output}) and messages ({messages: [{role, content}]}).

Every row read is either kept (normalised) or rejected with its row number and a reason; nothing is dropped
silently. Importable without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ROLES = ("system", "user", "assistant")


class DataError(Exception):
    """A data problem that stops the build (missing file, unreadable file, nothing usable)."""


@dataclass
class ReadResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0


def iter_file(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, parsed row) from a .jsonl (streamed line by line) or .json (a list) file.
    Unparseable JSONL lines are yielded as DataError values so they can be rejected with their line number."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield n, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield n, DataError("invalid UTF-8")
                except json.JSONDecodeError as e:
                    yield n, DataError(f"invalid JSON ({e.msg} at column {e.colno})")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        yield from enumerate(data, start=1)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .json)")


def detect_format(row: Any) -> str:
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    return "alpaca"


def _check_alpaca(row: dict[str, Any]) -> str | None:
    for key in ("instruction", "output"):
        if key not in row:
            return f"missing field '{key}'"
        if not isinstance(row[key], str):
            return f"field '{key}' is {type(row[key]).__name__}, not a string"
        if not row[key].strip():
            return f"empty field '{key}'"
    if "input" in row and row["input"] is not None and not isinstance(row["input"], str):
        return f"field 'input' is {type(row['input']).__name__}, not a string"
    return None


def _check_messages(row: dict[str, Any]) -> str | None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "field 'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{i}] needs 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"messages[{i}].content is empty or not a string"
    if msgs[-1]["role"] != "assistant":
        return "the last message must be the assistant's (it is what the model learns to say)"
    return None


def normalise(row: Any, fmt: str, fields: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """Map a raw row onto our names; returns (row, None) or (None, reason)."""
    if isinstance(row, DataError):
        return None, str(row)
    if not isinstance(row, dict):
        return None, f"row is {type(row).__name__}, not an object"
    if fields:
        row = dict(row)
        for ours, theirs in fields.items():
            if theirs not in row:
                return None, f"missing field '{theirs}' (mapped to '{ours}')"
            row[ours] = row[theirs]
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "messages":
        reason = _check_messages(row)
        if reason:
            return None, reason
        out = {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    else:
        reason = _check_alpaca(row)
        if reason:
            return None, reason
        out = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out, None


def content_hash(row: dict[str, Any]) -> str:
    """Stable hash of a row's content (not its id), used for ids, splits and exact duplicates."""
    payload = row["messages"] if "messages" in row else [row["instruction"], row["input"], row["output"]]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def read_rows(raw: Iterable[tuple[int, Any]], fmt: str, fields: dict[str, str], source: str) -> ReadResult:
    res = ReadResult()
    seen_ids: dict[str, int] = {}
    for n, row in raw:
        res.read += 1
        out, reason = normalise(row, fmt, fields)
        if out is not None and "id" in out:
            if out["id"] in seen_ids:
                out, reason = None, f"duplicate id {out['id']!r} (first seen at row {seen_ids[out['id']]})"
            else:
                seen_ids[out["id"]] = n
        if out is None:
            res.rejects.append({"source": source, "row": n, "reason": reason})
            continue
        h = content_hash(out)
        out.setdefault("id", h[:16])
        out["_hash"] = h
        out["_source"] = source
        out["_row"] = n
        res.rows.append(out)
    return res


def split_by_hash(rows: list[dict[str, Any]], val_fraction: float, val_max: int | None) -> tuple[list, list]:
    """Deterministic train/validation split: the rows with the smallest content hashes are held out, so the same
    rows give the same split in any order, on any machine, and identical rows always land on the same side."""
    if val_fraction <= 0 or len(rows) < 2:
        return rows, []
    ranked = sorted(rows, key=lambda r: r["_hash"])
    n_val = max(1, round(len(rows) * val_fraction))
    if val_max is not None:
        n_val = min(n_val, val_max)
    n_val = min(n_val, len(rows) - 1)
    val_ids = {r["_hash"] for r in ranked[:n_val]}
    return [r for r in rows if r["_hash"] not in val_ids], [r for r in rows if r["_hash"] in val_ids]
