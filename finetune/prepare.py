"""Stage 1, prepare: sources -> validated rows -> train/val split -> rendered and tokenised examples.

Writes RUN/data/{train,val,rejects}.jsonl, provenance.json and datacard.md. Every row read is accounted for:
kept, or in rejects.jsonl with its source, row number and reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data_prep.formats import DataError, ReadResult, iter_file, read_rows, split_by_hash

from .errors import UserError
from .recipe import Recipe, Source, resolve_path
from .run import RunDir, sha256_file
from .templates import TemplateError, encode, truncate

log = logging.getLogger("finetune")


def _read_source(src: Source, recipe_dir: Path) -> tuple[ReadResult, dict[str, Any]]:
    if src.path is not None:
        path = resolve_path(recipe_dir, src.path)
        try:
            res = read_rows(iter_file(path), src.format, src.fields, src.path)
        except DataError as e:
            raise UserError(str(e)) from None
        return res, {"path": src.path, "sha256": sha256_file(path), "license": src.license}
    try:
        import datasets

        ds = datasets.load_dataset(src.hub, src.config, split=src.split, revision=src.revision)
    except Exception as e:  # network, missing dataset, bad config: all user-facing
        raise UserError(f"data.sources hub {src.hub!r}: cannot load ({type(e).__name__}: {e})") from None
    res = read_rows(enumerate(ds, start=1), src.format, src.fields, src.hub)
    return res, {"hub": src.hub, "config": src.config, "split": src.split, "revision": src.revision,
                 "fingerprint": getattr(ds, "_fingerprint", None), "license": src.license}


def load_rows(recipe: Recipe, recipe_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Read every source; returns (rows, rejects, provenance) with exact duplicates across sources rejected."""
    rows, rejects, provenance = [], [], []
    first_seen: dict[str, tuple[str, int]] = {}
    for src in recipe.data.sources:
        res, prov = _read_source(src, recipe_dir)
        kept = 0
        for r in res.rows:
            if r["_hash"] in first_seen:
                s, n = first_seen[r["_hash"]]
                rejects.append({"source": r["_source"], "row": r["_row"], "reason": f"exact duplicate of {s} row {n}"})
                continue
            first_seen[r["_hash"]] = (r["_source"], r["_row"])
            rows.append(r)
            kept += 1
        rejects.extend(res.rejects)
        provenance.append({**prov, "rows_read": res.read, "rows_kept": kept, "rows_rejected": res.read - kept})
    return rows, rejects, provenance


def encode_rows(rows: list[dict], tok, recipe: Recipe, split: str, rejects: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Render and tokenise; apply the overlong policy. Returns examples and counts."""
    d = recipe.data
    out, counts = [], {"overlong_dropped": 0, "overlong_truncated": 0, "template_rejected": 0}
    for r in rows:
        where = f"{r['_source']} row {r['_row']}"
        try:
            enc = encode(tok, r, d.template, d.system_prompt)
        except TemplateError as e:
            if split == "train" and d.template == "chat" and "no chat template" in str(e):
                raise UserError(f"data.template: {e}") from None
            rejects.append({"source": r["_source"], "row": r["_row"], "reason": str(e)})
            counts["template_rejected"] += 1
            continue
        if len(enc.input_ids) > d.max_length:
            if d.overlong == "error":
                raise UserError(f"{where}: {len(enc.input_ids)} tokens > data.max_length {d.max_length} (data.overlong: error)")
            if d.overlong == "truncate":
                cut = truncate(enc, d.max_length, tok.eos_token_id)
                if cut is not None:
                    enc = cut
                    counts["overlong_truncated"] += 1
                else:
                    enc = None
            else:
                enc = None
            if enc is None:
                rejects.append({"source": r["_source"], "row": r["_row"], "reason": f"overlong: prompt does not fit in {d.max_length} tokens" if d.overlong == "truncate" else f"overlong: more than {d.max_length} tokens"})
                counts["overlong_dropped"] += 1
                continue
        out.append({"id": r["id"], "source": r["_source"], "row": r["_row"], "prompt": enc.prompt, "completion": enc.completion,
                    "input_ids": enc.input_ids, "labels": enc.labels})
    return out, counts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _length_stats(examples: list[dict]) -> dict[str, Any]:
    if not examples:
        return {"n": 0}
    lens = sorted(len(e["input_ids"]) for e in examples)
    sup = sum(sum(1 for x in e["labels"] if x != -100) for e in examples)
    return {"n": len(lens), "tokens": sum(lens), "supervised_tokens": sup, "min": lens[0], "median": lens[len(lens) // 2],
            "p95": lens[min(len(lens) - 1, int(0.95 * len(lens)))], "max": lens[-1]}


def prepare(recipe: Recipe, recipe_dir: Path, run: RunDir, tok) -> dict[str, Any]:
    rows, rejects, provenance = load_rows(recipe, recipe_dir)
    if not rows:
        raise UserError(f"data.sources: no usable rows ({len(rejects)} rejected; first: {rejects[0]['reason'] if rejects else 'files are empty'})")
    train_rows, val_rows = split_by_hash(rows, recipe.data.val_fraction, recipe.data.val_max)
    train, c_train = encode_rows(train_rows, tok, recipe, "train", rejects)
    val, c_val = encode_rows(val_rows, tok, recipe, "val", rejects)
    if len(train) < recipe.data.min_rows:
        raise UserError(
            f"data: {len(train)} usable training rows, fewer than data.min_rows={recipe.data.min_rows} "
            f"({len(rejects)} rejected; see the reasons with --set data.overlong=error or in rejects)"
        )
    counts = {k: c_train[k] + c_val[k] for k in c_train}
    stats = {"rows_read": sum(p["rows_read"] for p in provenance), "train": _length_stats(train), "val": _length_stats(val),
             "rejected": len(rejects), **counts, "template": recipe.data.template, "max_length": recipe.data.max_length}
    with run.staged("data") as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "val.jsonl", val)
        _write_jsonl(tmp / "rejects.jsonl", rejects)
        (tmp / "provenance.json").write_text(json.dumps({"sources": provenance, "stats": stats}, indent=2) + "\n")
        (tmp / "datacard.md").write_text(_datacard(recipe, provenance, stats))
    log.info("prepare: %d train, %d val, %d rejected", len(train), len(val), len(rejects))
    return stats


def _datacard(recipe: Recipe, provenance: list[dict], stats: dict[str, Any]) -> str:
    lines = [f"# Data card: {recipe.name}", "", "| source | licence | read | kept | rejected |", "|---|---|---|---|---|"]
    for p in provenance:
        name = p.get("path") or p.get("hub")
        lines.append(f"| {name} | {p.get('license') or 'unknown'} | {p['rows_read']} | {p['rows_kept']} | {p['rows_rejected']} |")
    t, v = stats["train"], stats["val"]
    lines += ["", f"Template: `{stats['template']}`, max_length {stats['max_length']} tokens.", "",
              "| split | rows | tokens | supervised | min | median | p95 | max |", "|---|---|---|---|---|---|---|---|"]
    for name, s in (("train", t), ("val", v)):
        if s["n"]:
            lines.append(f"| {name} | {s['n']} | {s['tokens']} | {s['supervised_tokens']} | {s['min']} | {s['median']} | {s['p95']} | {s['max']} |")
    lines += ["", f"Rejected rows: {stats['rejected']} (reasons in rejects.jsonl); overlong dropped {stats['overlong_dropped']}, "
              f"truncated {stats['overlong_truncated']}.", ""]
    return "\n".join(lines)
