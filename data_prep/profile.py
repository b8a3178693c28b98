"""What a file holds before anyone knows its mapping: rows, columns with their types and fill rates, length statistics
of the text columns (`finetune data stats FILE`), and where personal data sits, by kind, column and row number
(`finetune data scan FILE`). Values are never shown: a column's values appear only when it has a handful of short
ones (a label column) and none of them is personal data.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator

from .datacard import lengths
from .errors import RowError
from .sources.readers import Opened

# A column whose values are few and short is a label column: its values are shown (after a PII check).
LABEL_MAX_DISTINCT = 12
LABEL_MAX_CHARS = 30
# How many row numbers a scan lists per kind (the count is always complete).
ROWS_SHOWN = 20

# Column sets that name a layout or an adapter, as the hint `stats` prints.
HINTS = [
    ({"instruction", "output"}, "alpaca layout: read as is"),
    ({"messages"}, "messages layout: read as is"),
    ({"text", "label"}, "LegalBench: --adapter legalbench --option instruction=... (a text column alone reads as pretraining text)"),
    ({"text"}, "text layout (continued pretraining): read as is"),
    ({"conversations"}, "ShareGPT: --adapter sharegpt"),
    ({"question", "answer"}, "GSM8K-style: --adapter gsm8k, or --field instruction=question --field output=answer"),
    ({"QUESTION", "CONTEXTS", "final_decision"}, "PubMedQA: --adapter pubmedqa"),
    ({"question", "A", "B", "C", "D", "answer"}, "MMLU: --adapter mmlu"),
]


def _type(v: Any) -> str:
    if v is None:
        return "null"
    return {str: "str", bool: "bool", int: "int", float: "float", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _filled(v: Any) -> bool:
    return not (v is None or (isinstance(v, (str, list, dict)) and not (v.strip() if isinstance(v, str) else v)))


def strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string inside a value, with its place (messages[2].content): what a scan without a mapping reads."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(v, f"{where}.{k}" if where else str(k))


def _column(where: str) -> str:
    """A string's place reduced to its column (messages[2].content -> messages[].content)."""
    out, depth = [], 0
    for c in where:
        if c == "[":
            depth += 1
            out.append("[]")
        elif c == "]":
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def profile(opened: Opened) -> dict[str, Any]:
    """Rows, invalid rows, and per column: types, fill rate, and for text columns lengths in characters and words."""
    rows = invalid = 0
    types: dict[str, Counter] = defaultdict(Counter)
    filled: Counter = Counter()
    chars: dict[str, list[int]] = defaultdict(list)
    words: dict[str, list[int]] = defaultdict(list)
    distinct: dict[str, Counter] = defaultdict(Counter)
    keys_of: dict[str, Counter] = defaultdict(Counter)
    order: dict[str, None] = dict.fromkeys(opened.columns or [])
    for _, raw in opened.rows:
        if isinstance(raw, RowError) or not isinstance(raw, dict):
            invalid += 1
            continue
        rows += 1
        for k, v in raw.items():
            order.setdefault(k)
            types[k][_type(v)] += 1
            filled[k] += _filled(v)
            if isinstance(v, str):
                chars[k].append(len(v))
                words[k].append(len(v.split()))
                if len(distinct[k]) <= LABEL_MAX_DISTINCT:
                    distinct[k][v] += 1
            elif isinstance(v, list):
                for item in v:
                    if isinstance(item, dict):
                        keys_of[k].update(item.keys())
            elif isinstance(v, dict):
                keys_of[k].update(v.keys())
    from .quality.pii import scan

    cols = {}
    for k in order:
        info: dict[str, Any] = {"types": dict(types[k].most_common()), "fill_rate": round(filled[k] / rows, 4) if rows else 0.0}
        if chars[k]:
            info["chars"] = {kk: vv for kk, vv in lengths(chars[k]).items() if kk not in ("values", "total")}
            info["words"] = {kk: vv for kk, vv in lengths(words[k]).items() if kk not in ("values", "total")}
            d = distinct[k]
            if len(d) <= LABEL_MAX_DISTINCT and all(len(v) <= LABEL_MAX_CHARS for v in d) and not any(scan(v)[1] for v in d):
                info["values"] = dict(d.most_common())
            else:
                info["distinct"] = f">{LABEL_MAX_DISTINCT}" if len(d) > LABEL_MAX_DISTINCT else len(d)
        if keys_of[k]:
            info["keys"] = [kk for kk, _ in keys_of[k].most_common(10)]
        cols[k] = info
    present = set(order)
    hints = [h for need, h in HINTS if need <= present]
    return {"rows": rows, "invalid": invalid, "columns": cols, "hints": hints}


def scan_rows(rows: Iterable[tuple[int, list[tuple[str, str]]]], scanner) -> dict[str, Any]:
    """Each row's strings (place, text), scanned together as the build scans a row's fields (a name found in one
    column is looked for in the others): per kind the count, the columns and the row numbers (never the values)."""
    counts: Counter = Counter()
    rows_of: dict[str, list[int]] = defaultdict(list)
    n_rows_of: Counter = Counter()
    columns_of: dict[str, Counter] = defaultdict(Counter)
    n_rows = altered = 0
    batch: list[tuple[int, list[tuple[str, str]]]] = []

    def flush():
        nonlocal altered
        texts = [t for _, items in batch for _, t in items]
        results = iter(scanner.scan_texts(texts, [len(items) for _, items in batch]))
        for n, items in batch:
            kinds_here: set[str] = set()
            for where, _ in items:
                _, found = next(results)
                for kind, c in found.items():
                    counts[kind] += c
                    columns_of[kind][_column(where)] += c
                    kinds_here.add(kind)
            for kind in kinds_here:
                n_rows_of[kind] += 1
                if len(rows_of[kind]) < ROWS_SHOWN:
                    rows_of[kind].append(n)
            altered += bool(kinds_here)
        batch.clear()

    for n, items in rows:
        n_rows += 1
        batch.append((n, items))
        if len(batch) >= 256:
            flush()
    flush()
    kinds = {k: {"findings": counts[k], "rows": n_rows_of[k], "columns": dict(columns_of[k].most_common()), "row_numbers": rows_of[k]}
             for k in sorted(counts, key=lambda k: -counts[k])}
    return {"rows": n_rows, "rows_with_findings": altered, "kinds": kinds}


def scan_raw(opened: Opened, scanner) -> dict[str, Any]:
    """Every string of every row of a file read without a mapping (ids and nested lists included)."""
    invalid = 0

    def rows():
        nonlocal invalid
        for n, raw in opened.rows:
            if isinstance(raw, RowError):
                invalid += 1
            else:
                yield n, list(strings(raw))

    out = scan_rows(rows(), scanner)
    return {**out, "invalid": invalid}
