"""Stage 1, prepare: the recipe's sources through data_prep (read, validate, dedupe, decontaminate against the
recipe's eval sets, PII), then the train/val split, then rendering and tokenising with the recipe's template.

Writes RUN/data/{train,val,rejects}.jsonl, provenance.json, datacard.md and lengths.png. Every row read is
accounted for: kept, or in rejects.jsonl with its source, row number, filter and reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_prep.build import RejectRateExceeded, collect, public, write_jsonl
from data_prep.datacard import datacard, lengths, write_docs
from data_prep.errors import DataError, RowError
from data_prep.rejects import reject_row
from data_prep.split import split_by_hash

from .errors import UserError
from .pairs import build_pairs, datacard_lines, grpo_rows
from .recipe import PREFERENCE_STAGES, Recipe
from .run import RunDir, write_json
from .templates import row_encoder, truncate

log = logging.getLogger("finetune")


def encode_rows(rows: list[dict], enc, recipe: Recipe, rejects: list[dict], eos: int) -> tuple[list[dict], dict[str, int]]:
    """Tokenise; apply the overlong policy (rows over max_length are already gone unless it is `truncate`)."""
    d = recipe.data
    out, counts = [], {"overlong_truncated": 0, "overlong_dropped": 0}
    for r in rows:
        try:
            e = enc(r)
        except RowError as err:
            rejects.append(reject_row(r, "invalid", str(err)))
            continue
        if len(e.input_ids) > d.max_length:
            cut = truncate(e, d.max_length, eos)
            if cut is None:
                rejects.append(reject_row(r, "overlong", f"prompt alone is over max_length {d.max_length} tokens, nothing to truncate"))
                counts["overlong_dropped"] += 1
                continue
            e = cut
            counts["overlong_truncated"] += 1
        out.append({**public(r), "prompt": e.prompt, "completion": e.completion, "input_ids": e.input_ids, "labels": e.labels,
                    **({"truncated": True} if len(e.input_ids) < len(enc(r).input_ids) else {})})
    return out, counts


def decontamination_sets(recipe: Recipe, recipe_dir: Path) -> list[tuple[str, list[str]]]:
    """The recipe's own eval tasks: training on them would make the before/after table a lie."""
    from .tasks import task_texts

    return [(t.name, task_texts(t, recipe_dir)) for t in recipe.eval.tasks]


def prepare(recipe: Recipe, recipe_dir: Path, run: RunDir, tok, tokenizer_name: str | None = None) -> dict[str, Any]:
    d = recipe.data
    eval_sets = decontamination_sets(recipe, recipe_dir)
    cpt = vocabulary = None
    base_tok = tok
    try:
        if "cpt" in recipe.stages:
            from .cpt import build_blocks, collect_documents

            docs = collect_documents(recipe, recipe_dir, eval_sets)
            if recipe.cpt.vocabulary is not None:  # every later tokenisation (CPT blocks, SFT rows, pairs) uses the extended one
                from . import vocab

                tok, vocab_report, new_tokens = vocab.build(recipe, recipe_dir, tok, docs.texts)
                vocabulary = (tok, vocab_report, new_tokens)
            cpt = build_blocks(recipe, docs, tok)
        enc = row_encoder(tok, d.template, d.system_prompt)
        token_len = None if d.overlong == "truncate" else (lambda r: len(enc(r).input_ids))
        got = collect(d, recipe_dir, eval_sets=eval_sets, token_len=token_len)
    except RejectRateExceeded as e:
        run.logs.mkdir(parents=True, exist_ok=True)
        kept = run.logs / "prepare-rejects.jsonl"
        write_jsonl(kept, e.rejects)  # the earlier data/ stays as it was; the reasons are kept here
        raise DataError(f"{e} Rejected rows with reasons: {kept}") from None
    if not got.rows:
        raise DataError(f"data.sources: no usable rows ({len(got.rejects)} rejected; first: "
                        f"{got.rejects[0]['reason'] if got.rejects else 'nothing read'})")
    train_rows, val_rows = split_by_hash(got.rows, d.val_fraction, d.val_max)
    rejects = got.rejects
    train, c_train = encode_rows(train_rows, enc, recipe, rejects, tok.eos_token_id)
    val, c_val = encode_rows(val_rows, enc, recipe, rejects, tok.eos_token_id)
    lost, total = len(train_rows) + len(val_rows) - len(train) - len(val), len(train_rows) + len(val_rows)
    if total and lost / total > d.quality.max_reject_rate:  # `truncate` drops rows only here, after tokenising: same rule as `drop`
        run.logs.mkdir(parents=True, exist_ok=True)
        write_jsonl(run.logs / "prepare-rejects.jsonl", rejects)
        raise DataError(f"data: {lost} of {total} rows could not be encoded within max_length {d.max_length} ({lost / total:.0%} > "
                        f"quality.max_reject_rate {d.quality.max_reject_rate:.0%}; overlong: {d.overlong}). Raise max_length or "
                        f"check the template. Rejected rows with reasons: {run.logs / 'prepare-rejects.jsonl'}")
    if len(train) < d.min_rows:
        removed = {k: sum(s["removed"].get(k, 0) for s in got.sources) for k in ("exact_duplicate", "near_duplicate", "contaminated", "invalid", "overlong")}
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in removed.items() if v) or "nothing removed: the sources are that small"
        raise UserError(f"data: {len(train)} usable training rows, fewer than data.min_rows={d.min_rows} (of "
                        f"{sum(s['rows_read'] for s in got.sources)} read: {why}; {len(val)} went to validation). Add data, or "
                        "lower data.min_rows on purpose")
    stats = {"train": lengths([len(e["input_ids"]) for e in train]), "val": lengths([len(e["input_ids"]) for e in val]),
             "unit": "tokens", "tokenizer": tokenizer_name or recipe.base_model.id, "max_length": d.max_length}
    counts = {k: c_train[k] + c_val[k] for k in c_train}
    # Rows over max_length under `drop` were removed by the build (filter "overlong" in rejects.jsonl): count them too.
    counts["overlong_dropped"] = sum(1 for x in rejects if x["filter"] == "overlong")
    if counts["overlong_dropped"] or counts["overlong_truncated"]:
        log.warning("prepare: rows over data.max_length=%d: %d dropped, %d truncated (their EOS kept)", d.max_length,
                    counts["overlong_dropped"], counts["overlong_truncated"])
    after = recipe.stages[-1]
    pairs = build_pairs(recipe, recipe_dir, tok, eval_sets, tokenizer_name or recipe.base_model.id) if after in PREFERENCE_STAGES else None
    grpo = grpo_rows(recipe, train, val) if after == "grpo" else None
    with run.staged("data") as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "rejects.jsonl", rejects + (pairs[2] if pairs else []))
        prov = write_docs(tmp, recipe.name, got, stats)
        if vocabulary is not None:
            from . import vocab

            vocab.save(tmp / "tokenizer", vocabulary[0], vocabulary[2])
            prov["vocabulary"] = {**vocabulary[1], "tokens_per_byte_sft": {
                "before": round(vocab.tokens_per_byte(base_tok, [r["prompt"] + r["completion"] for r in train]), 4),
                "after": round(vocab.tokens_per_byte(tok, [r["prompt"] + r["completion"] for r in train]), 4)}}
        if cpt is not None:
            train_blocks, val_blocks, prov["cpt"] = cpt
            write_jsonl(tmp / run.rows("cpt", "train").name, [{"input_ids": b} for b in train_blocks])
            write_jsonl(tmp / run.rows("cpt", "val").name, [{"input_ids": b} for b in val_blocks])
        for stage, built in ((after, pairs), ("grpo", grpo)):
            if built is not None:
                write_jsonl(tmp / run.rows(stage, "train").name, built[0])
                write_jsonl(tmp / run.rows(stage, "val").name, built[1])
                prov["preference" if stage != "grpo" else "grpo"] = built[-1]
        if cpt is not None or pairs is not None or grpo is not None or vocabulary is not None:
            write_json(tmp / "provenance.json", prov)
            from .vocab import datacard_lines as vocab_lines

            (tmp / "datacard.md").write_text(datacard(recipe.name, prov) + "\n".join(vocab_lines(prov) + datacard_lines(prov)), encoding="utf-8")
    sup = {k: sum(sum(1 for x in e["labels"] if x != -100) for e in rows) for k, rows in (("train", train), ("val", val))}
    log.info("prepare: %d train, %d val, %d rejected (%.1f s)", len(train), len(val), len(rejects), got.seconds)
    return {"rows_read": sum(s["rows_read"] for s in got.sources), "train": prov["splits"]["train"], "val": prov["splits"]["val"],
            "supervised_tokens": sup, "rejected": len(rejects), **counts, "template": d.template, "max_length": d.max_length,
            **({"cpt_blocks": prov["cpt"]["blocks"]["train"], "cpt_tokens": prov["cpt"]["tokens"]} if cpt is not None else {}),
            **({"pairs": prov["preference"]["pairs"]} if pairs is not None else {}),
            **({"grpo_prompts": prov["grpo"]["prompts"]} if grpo is not None else {})}
