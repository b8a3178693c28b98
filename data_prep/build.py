"""Building an instruction set: every source read and validated, then cleaned in order (exact dedupe, near
dedupe, decontamination, PII), split by content hash, and documented (provenance.json, datacard.md, lengths.png).

`collect` is what the recipe's prepare stage calls (it tokenises afterwards with the recipe's template);
`build` is `finetune data build`: collect, split, write. Every row read ends up in train, val or rejects.jsonl
(with its source, row number, the filter that removed it and why), or is counted as not selected by
include_ids/exclude_ids. Importable without torch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import DataError, RowError
from .formats import content_hash, content_texts, hashed_id, row_texts
from .outputs import check_output, mark, replace_dir, staging_dir
from .quality import decontam, dedupe
from .rejects import FILTERS, reject_row
from .sources.load import load_source
from .spec import BuildSpec, DataSpec, Source
from .split import split_by_hash

log = logging.getLogger("finetune")

class RejectRateExceeded(DataError):
    """Too many invalid rows in a source; carries the rejects so they can be written before the build stops."""

    def __init__(self, message: str, rejects: list[dict[str, Any]]):
        super().__init__(message)
        self.rejects = rejects


@dataclass
class Collected:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    sources: list[dict[str, Any]]  # provenance, one entry per source
    quality: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def eval_texts(src: Source, base_dir: Path) -> list[str]:
    """The texts of an eval set, read like any source (adapters and mappings included), for decontamination
    (task templates left out: see formats.content_texts)."""
    return content_texts(load_source(src, base_dir).rows)


def _top_reasons(rejects: list[dict[str, Any]], k: int = 3) -> str:
    reasons = Counter(r["reason"].split(" (")[0] for r in rejects)
    return "; ".join(f"{reason} ×{n}" for reason, n in reasons.most_common(k))


class _Ledger:
    """The rows kept so far, the rejects, and each source's counts: what every cleaning step updates."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.sources: list[dict[str, Any]] = []

    def drop(self, pairs: list[tuple[dict[str, Any], str]], kind: str) -> None:
        for r, reason in pairs:
            self.rejects.append(reject_row(r, kind, reason))
            self.sources[r["_origin"]]["removed"][kind] += 1


def _read_source(book: _Ledger, src: Source, spec: DataSpec, base_dir: Path, token_len, progress: bool) -> None:
    """One source read and validated (and, with `token_len`, held to max_length), its counts recorded."""
    q = spec.quality
    loaded = load_source(src, base_dir, progress)
    removed = Counter({k: 0 for k in FILTERS})
    removed["invalid"] = len(loaded.rejects)
    kept = loaded.rows
    if token_len is not None and spec.overlong != "truncate":
        fits = []
        for r in kept:
            try:
                n = token_len(r)
            except RowError as e:  # the template cannot render it
                loaded.rejects.append(reject_row(r, "invalid", str(e)))
                removed["invalid"] += 1
                continue
            if n <= spec.max_length:
                fits.append(r)
                continue
            if spec.overlong == "error":
                raise DataError(f"{r['_source']} row {r['_row']}: {n} tokens > max_length {spec.max_length} (overlong: error)")
            loaded.rejects.append(reject_row(r, "overlong", f"{n} tokens > max_length {spec.max_length}"))
            removed["overlong"] += 1
        kept = fits
    book.rejects.extend(loaded.rejects)
    bad = removed["invalid"] + removed["overlong"]
    if loaded.read and bad / loaded.read > q.max_reject_rate:
        raise RejectRateExceeded(
            f"{src.origin}: {bad} of {loaded.read} rows rejected ({bad / loaded.read:.0%} > quality.max_reject_rate "
            f"{q.max_reject_rate:.0%}): {_top_reasons(loaded.rejects)}. Check the source's fields/adapter.", book.rejects)
    for r in kept:
        r["_origin"] = len(book.sources)
    book.rows.extend(kept)
    book.sources.append({**loaded.info, "rows_read": loaded.read, "not_selected": loaded.not_selected, "removed": removed})


def _dedupe(book: _Ledger, q, progress: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dedupe": q.dedupe}
    if q.dedupe in ("exact", "near"):
        book.rows, gone = dedupe.exact(book.rows)
        book.drop(gone, "exact_duplicate")
    if q.dedupe == "near":
        book.rows, gone = dedupe.near(book.rows, q.near.threshold, q.near.num_perm, q.near.ngram, progress)
        book.drop(gone, "near_duplicate")
        out["near"] = q.near.model_dump()
    return out


def _decontaminate(book: _Ledger, dc, eval_sets, base_dir: Path) -> dict[str, Any]:
    index = decontam.EvalIndex(dc.ngram, dc.min_words)
    names = []
    for name, texts in eval_sets:
        index.add(name, texts)
        names.append(name)
    for src in dc.against:
        index.add(src.origin, eval_texts(src, base_dir))
        names.append(src.origin)
    rows_clean, hits = decontam.decontaminate(book.rows, index)
    by_set = Counter(reason.split("eval set ")[-1].strip("'") for _, reason in hits)
    if dc.action == "remove":
        book.rows = rows_clean
        book.drop(hits, "contaminated")
    return {"ngram": dc.ngram, "action": dc.action, "eval_sets": names, "eval_items": index.items, "overlapping_rows": len(hits),
            "by_eval_set": dict(by_set), "flagged_rows": [hashed_id(r) for r, _ in hits] if dc.action == "flag" else []}


def _scan_pii(book: _Ledger, p) -> dict[str, Any]:
    from .quality.pii import DETECTORS, Scanner
    from .quality.pii.ner import load as load_ner

    t0 = time.perf_counter()
    ner, ner_line = load_ner(p.ner) if "name" in p.kinds else (None, "off (name not among quality.pii.kinds)")
    scanner = Scanner(p.kinds, p.action, ner)
    counts: Counter = Counter()
    affected: list[str] = []
    out = []
    scanned = len(book.rows)
    for s in book.sources:
        s["pii_rows"] = 0
    for r, (red, found) in zip(book.rows, scanner.scan_rows(book.rows)):
        if not found:
            out.append(r)
            continue
        counts.update(found.counts)
        affected.append(hashed_id(r))
        book.sources[r["_origin"]]["pii_rows"] += 1
        if p.action == "drop":
            book.drop([(r, "personal data: " + ", ".join(sorted(found.counts)))], "pii")  # the kinds, never the values
        else:
            out.append(r if p.action == "flag" else red)
    book.rows = out
    if p.rejects == "redacted":
        # A reason can quote a value of the row it rejects (a duplicate id, an unknown label): scanned like the rows.
        for rej, (reason, _) in zip(book.rejects, scanner.scan_texts([rej["reason"] for rej in book.rejects])):
            rej["reason"] = reason
    seconds = time.perf_counter() - t0
    # Counts and hashed row ids only: never the text that was found.
    return {"action": p.action, "kinds": list(p.kinds), "findings": {k: counts[k] for k in p.kinds if counts[k]}, "rows": len(affected),
            "rows_scanned": scanned,
            "row_ids_sha256": affected, "detectors": sum(d.kind in p.kinds for d in DETECTORS), "ner": ner.info if ner else None,
            "names": "titles, labels and role words" + (f"; named-entity recognition: {ner_line}" if ner else f"; no named-entity recognition ({ner_line})"),
            "rejects": p.rejects, "seconds": round(seconds, 3)}


def collect(spec: DataSpec, base_dir: Path, *, eval_sets: list[tuple[str, list[str]]] = (),
            token_len: Callable[[dict[str, Any]], int] | None = None, progress: bool = False) -> Collected:
    """Read, validate and clean every source. `eval_sets`: (name, texts) to decontaminate against, on top of
    `quality.decontaminate.against`. `token_len`: a row's length in the recipe's tokens, to apply `max_length`."""
    t0 = time.perf_counter()
    q = spec.quality
    book = _Ledger()
    for src in spec.sources:
        _read_source(book, src, spec, base_dir, token_len, progress)
    quality = _dedupe(book, q, progress)
    if q.decontaminate.enabled:
        quality["decontamination"] = _decontaminate(book, q.decontaminate, eval_sets, base_dir)
    # recorded when off too, so "not scanned" is visible rather than absent
    quality["pii"] = _scan_pii(book, q.pii) if q.pii.action != "off" else {"action": "off"}
    for r in book.rows:
        r["_hash"] = content_hash(r)
        r.setdefault("id", r["_hash"][:16])
    kept_by_source = Counter(r["_origin"] for r in book.rows)
    for i, s in enumerate(book.sources):
        s["rows_kept"] = kept_by_source.get(i, 0)
        s["removed"] = dict(s["removed"])
    book.rejects.sort(key=lambda r: (r["source"], r["row"]))
    return Collected(book.rows, book.rejects, book.sources, quality, time.perf_counter() - t0)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A row as written to train/val.jsonl: content, id, and where it came from."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["source"], out["row"] = row["_source"], row["_row"]
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


BUILD_FILES = {"train.jsonl", "val.jsonl", "rejects.jsonl", "provenance.json", "datacard.md", "lengths.png"}


def _legacy_build(folder: Path) -> bool:
    """A build folder written before the .finetune.json marker: only the files a build writes."""
    return {p.name for p in folder.iterdir()} <= BUILD_FILES


@dataclass
class Built:
    out: Path
    train: int
    val: int
    rejected: int
    rows_read: int
    seconds: float


def build(spec: BuildSpec, base_dir: Path, out: Path, *, token_len: Callable[[dict[str, Any]], int] | None = None,
          tokenizer_name: str | None = None, progress: bool = False, eval_sets: list[tuple[str, list[str]]] = ()) -> Built:
    """`finetune data build`: collect, split and write into `out` (replaced only when the build succeeds). `eval_sets` as
    in `collect` (a recipe's eval tasks)."""
    from .datacard import lengths, write_docs

    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, "data-build", "--out", legacy=_legacy_build)
    try:
        got = collect(spec, base_dir, eval_sets=eval_sets, token_len=token_len, progress=progress)
    except RejectRateExceeded as e:
        mark(out, "data-build")
        write_jsonl(out / "rejects.jsonl", e.rejects)  # nothing is lost, even when the build stops
        raise DataError(f"{e} Rejected rows with reasons: {out / 'rejects.jsonl'}") from None
    train, val = split_by_hash(got.rows, spec.val_fraction, spec.val_max)
    if len(train) < spec.min_rows:
        raise DataError(f"{spec.name}: {len(train)} training rows after cleaning, fewer than min_rows={spec.min_rows}")
    unit = "tokens" if token_len else "words"
    measure = token_len or (lambda r: sum(len(t.split()) for t in row_texts(r)))
    tmp = staging_dir(out)
    try:
        mark(tmp, "data-build")
        write_jsonl(tmp / "train.jsonl", [public(r) for r in train])
        write_jsonl(tmp / "val.jsonl", [public(r) for r in val])
        write_jsonl(tmp / "rejects.jsonl", got.rejects)
        stats = {"train": lengths([measure(r) for r in train]), "val": lengths([measure(r) for r in val]), "unit": unit,
                 "tokenizer": tokenizer_name, "max_length": spec.max_length if token_len else None}
        write_docs(tmp, spec.name, got, stats)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return Built(out, len(train), len(val), len(got.rejects), sum(s["rows_read"] for s in got.sources), time.perf_counter() - t0)
