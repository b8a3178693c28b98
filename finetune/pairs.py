"""Preference pairs and GRPO prompts, built by the prepare stage beside the instruction set.

Pairs ({prompt, chosen, rejected}, `preference.sources`) go through the same data_prep build as instructions: read
through adapters, validated (chosen equal to rejected is a reject), deduplicated, decontaminated against the recipe's
eval tasks, PII-scanned, split by content hash. Each pair is then encoded with the recipe's template exactly as SFT
encodes a row (templates.encode: prompt and answer as separate segments, one BOS, EOS supervised at the end), once
with each answer; the two prompts must come out as the same tokens, so the preference stages compare the answers
and nothing else. trl would tokenize prompt + answer as one string instead, which can merge tokens across the
boundary and differs from what SFT trained and what inference sends.

GRPO prompts are the SFT rows whose reference answer the eval harness can extract (answers.extract): the prompt text
as the template renders it, and that answer, for the reward functions (rewards.py).

Writes data/pairs_{train,val}.jsonl and data/grpo_{train,val}.jsonl; provenance.json gets a `preference` or `grpo`
section, datacard.md its lines.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from data_prep.build import RejectRateExceeded, collect, public
from data_prep.datacard import lengths
from data_prep.errors import DataError, RowError
from data_prep.rejects import reject_row
from data_prep.split import split_by_hash

from .errors import UserError
from .recipe import Recipe
from .templates import TemplateError, TokenizerUnfit, encode


def answer_row(pair: dict[str, Any], answer: str, template: str) -> dict[str, Any]:
    """The SFT row a pair's prompt and one of its answers make: a conversation, or for the alpaca template an
    instruction (which has room for one user turn only)."""
    if template == "alpaca":
        if len(pair["prompt"]) != 1:
            raise RowError("the alpaca template renders a single user prompt; this pair's prompt is a conversation (use data.template: chat)")
        return {"instruction": pair["prompt"][0]["content"], "input": "", "output": answer}
    return {"messages": pair["prompt"] + [{"role": "assistant", "content": answer}]}


def _split_last_answer(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt and answer tokens of an encoded row: the answer is the last supervised span (earlier assistant turns of
    a conversation are context here, not what is compared)."""
    cut = max(i for i, x in enumerate(labels) if x == -100) + 1
    return ids[:cut], ids[cut:]


def encode_pair(tok, pair: dict[str, Any], template: str, system_prompt: str | None) -> dict[str, list[int]]:
    """{prompt_ids, chosen_ids, rejected_ids}: each answer ends with the EOS, the prompt is shared token for token."""
    try:
        chosen = encode(tok, answer_row(pair, pair["chosen"], template), template, system_prompt)
        rejected = encode(tok, answer_row(pair, pair["rejected"], template), template, system_prompt)
    except TokenizerUnfit as e:
        raise DataError(f"data.template: {e}") from None
    except TemplateError as e:
        raise RowError(str(e)) from None
    prompt, chosen_ids = _split_last_answer(chosen.input_ids, chosen.labels)
    prompt_r, rejected_ids = _split_last_answer(rejected.input_ids, rejected.labels)
    if prompt != prompt_r:
        raise RowError("the prompt encodes to different tokens before each answer (the template depends on the answer)")
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected encode to the same tokens")
    return {"prompt_ids": prompt, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def _encode_all(rows: list[dict], tok, recipe: Recipe, rejects: list[dict]) -> list[dict]:
    d, out = recipe.data, []
    for r in rows:
        try:
            e = encode_pair(tok, r, d.template, d.system_prompt)
        except RowError as err:
            rejects.append(reject_row(r, "invalid", str(err)))
            continue
        n = len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
        if n > d.max_length:
            rejects.append(reject_row(r, "overlong", f"{n} tokens (prompt + longer answer) > max_length {d.max_length}"))
            continue
        out.append({**public(r), **e})
    return out


def build_pairs(recipe: Recipe, recipe_dir: Path, tok, eval_sets, tokenizer_name: str) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Train and validation pairs, their rejects, and provenance's `preference` section."""
    p = recipe.preference
    spec = recipe.data.model_copy(update={"sources": p.sources, "min_rows": 1})
    try:
        got = collect(spec, recipe_dir, eval_sets=eval_sets)
    except RejectRateExceeded as e:
        raise DataError(f"preference.sources: {e}") from None
    if not got.rows:
        raise DataError(f"preference.sources: no usable pairs ({len(got.rejects)} rejected; first: "
                        f"{got.rejects[0]['reason'] if got.rejects else 'nothing read'})")
    train_rows, val_rows = split_by_hash(got.rows, p.val_fraction, p.val_max)
    rejects = list(got.rejects)
    train, val = _encode_all(train_rows, tok, recipe, rejects), _encode_all(val_rows, tok, recipe, rejects)
    if not train:
        raise UserError(f"preference.sources: no training pair fits (of {len(got.rows)} kept, {len(rejects)} rejected in all; first: "
                        f"{rejects[0]['reason'] if rejects else '-'})")
    both = train + val
    section = {
        "sources": got.sources, "quality": got.quality, "rejected": len(rejects), "tokenizer": tokenizer_name,
        "pairs": {"train": len(train), "val": len(val)},
        "lengths": {k: {kk: vv for kk, vv in lengths([len(e[f"{k}_ids"]) for e in both]).items() if kk != "values"}
                    for k in ("prompt", "chosen", "rejected")},
        "chosen_longer": sum(len(e["chosen_ids"]) > len(e["rejected_ids"]) for e in both),
    }
    return train, val, rejects, section


def grpo_rows(recipe: Recipe, train: list[dict], val: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """GRPO prompts from the encoded SFT rows: the prompt text and the reference answer the eval harness extracts
    from the row's completion; rows with no extractable answer are counted and left out."""
    from .answers import extract

    g = recipe.grpo

    def usable(rows: list[dict]) -> tuple[list[dict], int]:
        out, missing = [], 0
        for r in rows:
            answer = extract(r["completion"])
            if answer is None or not str(answer).strip():
                missing += 1
                continue
            out.append({"id": r.get("id"), "prompt": r["prompt"], "answer": str(answer)})
        return out, missing

    tr, miss_tr = usable(train)
    va, miss_va = usable(val)
    if g.max_prompts is not None and len(tr) > g.max_prompts:
        tr = random.Random(recipe.training.seed).sample(tr, g.max_prompts)
    va = va[: g.val_prompts]
    if not tr:
        raise UserError(f"grpo: none of the {len(train)} training rows has a reference answer the eval harness can extract "
                        "(a \\boxed{} value, `#### x`, `the answer is x`, or a final number); GRPO's correctness reward needs one")
    return tr, va, {"prompts": {"train": len(tr), "val": len(va)}, "without_answer": miss_tr + miss_va}


def datacard_lines(prov: dict[str, Any]) -> list[str]:
    """The data card's sections for the preference pairs and the GRPO prompts."""
    from data_prep.datacard import pii_lines, source_name

    lines: list[str] = []
    p = prov.get("preference")
    if p:
        n = p["pairs"]["train"] + p["pairs"]["val"]
        lines += ["## Preference pairs", "", f"{p['pairs']['train']} training and {p['pairs']['val']} held-out pairs; "
                  f"{p['rejected']} rejected (rejects.jsonl). Lengths in tokens of `{p['tokenizer']}`, the answers with their EOS.", "",
                  "| source | licence | read | kept | invalid | duplicate | near duplicate | contaminated | PII rows |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in p["sources"]:
            r = s["removed"]
            lines.append(f"| {source_name(s)} | {s.get('license') or 'unknown'} | {s['rows_read']} | {s['rows_kept']} | {r['invalid']} | "
                         f"{r['exact_duplicate']} | {r['near_duplicate']} | {r['contaminated']} | {s.get('pii_rows', 0)} |")
        lines += ["", "| part | mean | median | p95 | max |", "|---|---|---|---|---|"]
        for k, s in p["lengths"].items():
            lines.append(f"| {k} | {s.get('mean', '')} | {s.get('median', '')} | {s.get('p95', '')} | {s.get('max', '')} |")
        lines += ["", f"The chosen answer is the longer one in {p['chosen_longer']} of {n} pairs (a preference for length is "
                  "learned as easily as one for quality)."]
        d = p["quality"].get("decontamination")
        if d:
            lines.append(f"- Decontamination: {d['overlapping_rows']} pairs overlapped the eval sets, action: {d['action']}")
        lines += pii_lines(p["quality"].get("pii")) + [""]
    g = prov.get("grpo")
    if g:
        lines += ["## GRPO prompts", "", f"{g['prompts']['train']} training and {g['prompts']['val']} held-out prompts from the instruction "
                  f"set, each with the reference answer the eval harness extracts; {g['without_answer']} rows had none and are left out.", ""]
    return lines
