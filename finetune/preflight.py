"""Preflight: before the first optimizer step, look at what the model will really be trained on.

Each check is a way peer tools have trained models that never stop or never learn:
- `bos`: exactly one BOS when the tokenizer uses one (chat template text + add_special_tokens doubled it: trl#1400);
- `eos`: every example's last supervised label is EOS, also in the collated batch when pad == eos (trl#1623);
- `prompt_masked`: every prompt token is labelled -100 and the supervised tokens decode to the response;
- `marker`: the prompt ends with the template's response marker ("### Response:", the chat template's assistant
  header), so the model sees the same cue at inference (trl#1820: a marker that tokenises differently in context
  masked whole examples);
- `truncation`: no example is longer than max_length and none lost its EOS to truncation, in our rows or after trl's
  own processing (LLaMA-Factory#3995);
- `parity`: the training prompt token-equals the generation prompt inference builds: the chat template's
  `add_generation_prompt=True`, or the Alpaca prompt as `finetune generate` and eval render it.

A failure names the check, the source row and shows the offending sample; the text is redacted to token counts
unless `--show-example` (a printed training example of medical or legal data is a leak).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .templates import adds_bos, alpaca_prompt, as_messages, token_ids

log = logging.getLogger("finetune")

CHECKS = ("bos", "eos", "prompt_masked", "marker", "truncation", "parity")
ALPACA_MARKER = "### Response:"


class PreflightError(UserError):
    """The rendered training data would teach the wrong thing: exit code 2, before any step is spent."""


@dataclass
class Problem:
    check: str
    where: str
    detail: str
    ids: list[int]
    labels: list[int]


@dataclass
class Report:
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts = {c: sum(1 for p in self.problems if p.check == c) for c in CHECKS}
        return {"samples": self.samples, "passed": not self.problems, "failures": counts}


def render(tok, ids: list[int], labels: list[int], show: bool) -> str:
    """The sample as the model sees it. Special tokens are always shown; the rest is shown as text only with `show`
    (the supervised part between « »), otherwise as counts of prompt and response tokens."""
    special = set(tok.all_special_ids)
    out, run, run_sup = [], [], None

    def flush():
        if not run:
            return
        if show:
            text = tok.decode(run)
            out.append(f"«{text}»" if run_sup else text)
        else:
            out.append(f"[{len(run)} {'response' if run_sup else 'prompt'} tokens]")

    for i, l in zip(ids, labels):
        sup = l != -100
        if i in special:
            flush()
            run, run_sup = [], None
            out.append(tok.convert_ids_to_tokens(i) + ("(supervised)" if sup and not show else ""))
            continue
        if run and sup != run_sup:
            flush()
            run = []
        run_sup = sup
        run.append(i)
    flush()
    return "".join(out)


def _generation_prompt(tok, row: dict[str, Any], template: str, system_prompt: str | None) -> tuple[list[int], str]:
    """What inference is given for this row's first answer, computed without our encoder: the chat template's own
    tokenisation with add_generation_prompt=True, or the Alpaca prompt as generate/eval tokenise it. Also returns the
    response marker the prompt must end with."""
    if template == "alpaca":
        return token_ids(tok, alpaca_prompt(row["instruction"], row.get("input", ""))), ALPACA_MARKER
    msgs = as_messages(row, system_prompt)
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    gen = tok.apply_chat_template(msgs[:first], add_generation_prompt=True, tokenize=True)
    ids = list(gen["input_ids"] if hasattr(gen, "keys") else gen)
    with_cue = tok.apply_chat_template(msgs[:first], add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(msgs[:first], add_generation_prompt=False, tokenize=False)
    return ids, with_cue[len(without):] if with_cue.startswith(without) else ""


def check_rows(tok, rows: list[dict[str, Any]], template: str, system_prompt: str | None, max_length: int) -> Report:
    """Run the per-example checks on prepared rows (RUN/data/train.jsonl: input_ids, labels, prompt, completion and
    the original fields)."""
    eos, bos = tok.eos_token_id, tok.bos_token_id
    report = Report(samples=len(rows))

    def fail(check, r, detail):
        report.problems.append(Problem(check, f"{r.get('source', '?')} row {r.get('row', '?')}", detail, r["input_ids"], r["labels"]))

    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        sup = [i for i, l in enumerate(labels) if l != -100]
        if bos is not None and adds_bos(tok):
            if ids.count(bos) != 1 or ids[:1] != [bos]:
                fail("bos", r, f"{ids.count(bos)} BOS tokens (first token {tok.convert_ids_to_tokens(ids[0])!r}); expected exactly one, first")
        elif bos is not None and ids[:2] == [bos, bos]:
            fail("bos", r, "starts with two BOS tokens")
        if not sup or labels[sup[-1]] != eos:
            last = tok.convert_ids_to_tokens(labels[sup[-1]]) if sup else None
            fail("eos", r, f"the last supervised token is {last!r}, not EOS {tok.eos_token!r}: the model would never learn to stop")
            continue
        if len(ids) > max_length:
            fail("truncation", r, f"{len(ids)} tokens > max_length {max_length}: the trainer would cut the answer and its EOS")
        k = sup[0]
        gen_ids, marker = _generation_prompt(tok, r, template, system_prompt)
        if ids[: len(gen_ids)] == gen_ids and k != len(gen_ids):
            fail("prompt_masked", r, f"{len(gen_ids) - k} prompt tokens are supervised" if k < len(gen_ids) else
                 f"the first {k - len(gen_ids)} response tokens are masked")
        elif ids[:k] != gen_ids:
            fail("parity", r, f"training prompt ({k} tokens) differs from the generation prompt inference builds ({len(gen_ids)} "
                 f"tokens) from token {next((i for i, (a, b) in enumerate(zip(ids, gen_ids)) if a != b), min(k, len(gen_ids)))}")
        # Compared without whitespace: a SentencePiece tokenizer (Llama 2, Mistral) decodes the `▁` it puts after a special
        # token as a space ("<|im_start|> assistant"); the tokens themselves are the parity check's business.
        prefix = "".join(tok.decode(ids[:k]).split())
        if not marker.strip() or not prefix.endswith("".join(marker.split())):
            fail("marker", r, f"the masked prompt does not end with the response marker {marker.strip()!r}" if marker.strip() else
                 "the chat template adds no assistant header with add_generation_prompt=True: nothing tells the model its turn starts")
        # The first supervised span decodes to the response (up to its EOS): no prompt token supervised, none of the
        # response masked. A row truncated on purpose (overlong: truncate) keeps only the start of its response.
        span = []
        for i in range(k, len(ids)):
            if labels[i] == -100 or ids[i] == eos:
                break
            span.append(labels[i])
        want = r.get("completion", "")
        if tok.eos_token and tok.eos_token in want:
            want = want.split(tok.eos_token)[0]
        got = tok.decode(span)
        if any(labels[i] != -100 and labels[i] != ids[i] for i in range(len(ids))):
            fail("prompt_masked", r, "a supervised label differs from its input token")
        elif not r.get("truncated") and got.strip() != want.strip():
            fail("prompt_masked", r, f"the supervised tokens decode to {len(got)} characters, the response has {len(want.strip())}")
    return report


def check_batch(tok, collator, items: list[dict[str, Any]]) -> list[str]:
    """Collate `items` with the trainer's own collator and check that every supervised EOS in them is still a
    supervised EOS in the batch: pad == eos, padding or packing must never mask it."""
    import torch

    eos = tok.eos_token_id
    want = sum(sum(1 for l in it.get("labels", it["input_ids"]) if l == eos) for it in items)
    batch = collator(items)
    got = int((batch["labels"] == eos).sum())
    problems = []
    if got != want:
        problems.append(f"the collated batch supervises {got} EOS tokens, the examples {want} "
                        f"(pad {'==' if tok.pad_token_id == eos else '!='} eos): the model would not learn to stop")
    if int((batch["labels"] != -100).sum()) == 0:
        problems.append("the collated batch has no supervised token")
    if "attention_mask" in batch and torch.is_tensor(batch["attention_mask"]):
        pad_sup = ((batch["attention_mask"] == 0) & (batch["labels"] != -100)).sum()
        if int(pad_sup):
            problems.append(f"{int(pad_sup)} padding positions are supervised")
    return problems


def count_label(dataset, token: int) -> int:
    """How many labels equal `token` in a tokenised dataset (Arrow, without materialising Python lists)."""
    import pyarrow.compute as pc

    col = "labels" if "labels" in dataset.column_names else "input_ids"
    flat = pc.list_flatten(dataset.data.column(col))
    return int(pc.sum(pc.equal(flat, token)).as_py() or 0)


def raise_on(report: Report, tok, show: bool, batch_problems: list[str] = ()) -> None:
    """One message for every failed check (one example each), or nothing."""
    if not report.problems and not batch_problems:
        return
    lines = [f"preflight failed on {report.samples} rendered training samples:"]
    seen = set()
    for p in report.problems:
        if p.check in seen:
            continue
        seen.add(p.check)
        n = sum(1 for q in report.problems if q.check == p.check)
        lines.append(f"- {p.check} ({n} sample{'s' if n != 1 else ''}), e.g. {p.where}: {p.detail}")
        lines.append(f"  sample{'' if show else ' (redacted; --show-example prints the text)'}: {render(tok, p.ids, p.labels, show)}")
    lines += [f"- collator: {b}" for b in batch_problems]
    raise PreflightError("\n".join(lines))


def preflight(tok, rows: list[dict[str, Any]], template: str, system_prompt: str | None, max_length: int, show: bool,
              samples: int = 64, collator=None, processed=None) -> dict[str, Any]:
    """All the checks, on the first `samples` rows (the EOS count on all of them); raises PreflightError naming each
    failed one. `collator`/`processed` are the trainer's own collator and its processed train dataset (after trl's
    truncation or packing), when there is a trainer."""
    report = check_rows(tok, rows[:samples], template, system_prompt, max_length)
    batch_problems: list[str] = []
    if collator is not None and processed is not None and len(processed):
        items = [processed[i] for i in range(min(len(processed), 8))]
        batch_problems = check_batch(tok, collator, items)
        # Nothing lost between our rows and what the trainer will iterate over (its truncation, its packing).
        ours = sum(r["labels"].count(tok.eos_token_id) for r in rows)
        theirs = count_label(processed, tok.eos_token_id)
        if theirs != ours:
            batch_problems.append(f"the trainer's dataset supervises {theirs} EOS tokens, the prepared rows {ours}")
    raise_on(report, tok, show, batch_problems)
    out = report.as_dict()
    log.info("preflight: %d samples passed (%s)", report.samples, ", ".join(CHECKS))
    return out


def preflight_recipe(recipe, recipe_dir, run, show: bool) -> dict[str, Any]:
    """`finetune validate --preflight`: build a sample of the recipe's training data in `run` (a scratch folder; each
    source read up to a few hundred rows, no decontamination) and check it as training would, with trl's collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from .models import load_tokenizer
    from .prepare import prepare
    from .rows import read_rows, token_dataset

    n = recipe.training.preflight_samples or 64
    d = recipe.data.model_copy(update={"sources": [s.model_copy(update={"limit": s.limit or 4 * n}) for s in recipe.data.sources],
                                       "min_rows": 1})
    sample = recipe.model_copy(update={"data": d, "eval": recipe.eval.model_copy(update={"tasks": []})})
    tok = load_tokenizer(recipe.base_model.id, recipe)
    prepare(sample, recipe_dir, run, tok)
    rows = read_rows(run.data / "train.jsonl") + read_rows(run.data / "val.jsonl")
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=recipe.training.packing)
    return preflight(tok, rows, recipe.data.template, recipe.data.system_prompt, recipe.data.max_length, show, n,
                     collator, token_dataset(rows))


# --------------------------------------------------------------------------------------------------
# Preference pairs: the batches of dpo, kto and orpo, as each trainer's own collator builds them


def _sides(batch: dict[str, Any], stage: str) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(chosen prompt, chosen answer, rejected prompt, rejected answer) token lists per pair of a collated batch."""

    def split(ids, supervised):
        ids, sup = [int(x) for x in ids], [bool(x) for x in supervised]
        first = sup.index(True) if True in sup else len(ids)
        last = len(sup) - sup[::-1].index(True) if True in sup else first
        return ids[:first], ids[first:last]

    out = []
    if stage == "orpo":  # DPODataCollatorWithPadding: chosen_/rejected_ input_ids and labels (prompt -100)
        for i in range(len(batch["chosen_input_ids"])):
            c = split(batch["chosen_input_ids"][i], batch["chosen_labels"][i] != -100)
            r = split(batch["rejected_input_ids"][i], batch["rejected_labels"][i] != -100)
            out.append((c[0], c[1], r[0], r[1]))
        return out
    ids, mask = batch["input_ids"], batch["completion_mask"] * batch["attention_mask"]
    n = len(ids)
    # dpo: chosen rows first, then the rejected rows; kto: our unpaired rows alternate chosen, rejected (preference.unpaired)
    pairs = [(i, i + n // 2) for i in range(n // 2)] if stage == "dpo" else [(i, i + 1) for i in range(0, n - 1, 2)]
    for a, b in pairs:
        c, r = split(ids[a], mask[a]), split(ids[b], mask[b])
        out.append((c[0], c[1], r[0], r[1]))
    return out


def _left_pad(prompt: list[int], pad: int | None) -> list[int]:
    """A prompt without the padding a left-padding collator puts before it."""
    i = 0
    while pad is not None and i < len(prompt) and prompt[i] == pad:
        i += 1
    return prompt[i:]


def preflight_pairs(tok, dataset, collator, samples: int, stage: str) -> dict[str, Any]:
    """Before the first step of dpo, kto or orpo, on batches of the real training data built by the trainer's collator:
    - `prompt_masked`: the prompt is not supervised, in both answers (the loss compares the answers only);
    - `eos`: each answer's last supervised token is EOS, in both (both end as the model should stop);
    - `shared_prompt`: chosen and rejected carry the same prompt tokens, token for token (else the comparison is between
      two prompts, not two answers).
    Raises PreflightError naming the check and the pair; returns the counts."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    n = min(len(dataset), samples * (2 if stage == "kto" else 1))
    problems: list[str] = []
    checked = 0
    for start in range(0, n, 8):
        items = [dataset[i] for i in range(start, min(n, start + 8))]
        if stage == "kto" and len(items) % 2:
            items = items[:-1]
        if not items:
            break
        for k, (cp, ca, rp, ra) in enumerate(_sides(collator(items), stage)):
            where = f"pair {start // (2 if stage == 'kto' else 1) + k + 1}"
            checked += 1
            want = dataset[start + (2 * k if stage == "kto" else k)]["prompt_ids"]
            for side, prompt, answer in (("chosen", cp, ca), ("rejected", rp, ra)):
                if _left_pad(prompt, pad)[-len(want):] != list(want):
                    problems.append(f"prompt_masked: {where}, {side}: the unsupervised prefix is not the prompt ({len(prompt)} tokens, "
                                    f"prompt {len(want)})")
                if not answer or answer[-1] != eos:
                    problems.append(f"eos: {where}, {side}: the answer does not end with EOS (last token {answer[-1] if answer else None})")
            if _left_pad(cp, pad) != _left_pad(rp, pad):
                problems.append(f"shared_prompt: {where}: chosen and rejected prompts differ ({len(cp)} vs {len(rp)} tokens)")
    if problems:
        head = f"preflight ({stage}) failed on {checked} collated pairs:"
        kinds = sorted({p.split(":")[0] for p in problems})
        raise PreflightError("\n".join([head] + [f"- {next(p for p in problems if p.startswith(k))} ({sum(q.startswith(k) for q in problems)} in all)"
                                                 for k in kinds]))
    log.info("preflight (%s): %d pairs passed (prompt_masked, eos, shared_prompt)", stage, checked)
    return {"samples": checked, "passed": True, "checks": ["prompt_masked", "eos", "shared_prompt"]}
