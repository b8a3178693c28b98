"""`finetune data pairs RUN_DIR`: preference pairs from the run's own SFT model, for a team without preference data.

For each training prompt the SFT model (the base as trained, with RUN/adapter) samples `k` answers. Then:
- `checker` (tasks with a verifiable answer, maths): each answer is checked against the row's reference answer with
  the eval harness's extraction and math-verify equivalence (answers.py); a correct answer is chosen and an incorrect
  one rejected. This is rejection sampling, as maths pipelines build their pairs. A prompt whose k answers are all
  right or all wrong gives no pair (nothing to prefer), unless `gold_if_none` lets the reference solution stand in
  as the chosen answer when none is right.
- `judge` (anything else): the teacher (an OpenAI-compatible endpoint, as for `data synth`) is shown the question,
  the row's reference answer when it has one, and two of the sampled answers, and says which is better. It is asked
  twice with the answers swapped; only a verdict that survives the swap is kept (LLM judges favour a position: the
  MT-Bench paper, Zheng et al. 2023).

The output is a pairs JSONL ({prompt, chosen, rejected} with `origin`), appended prompt by prompt and resumable like
`data synth` (data_prep/synth/journal.py): a rerun continues where the last one stopped. Name it in
`preference.sources` to train on it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from data_prep.errors import DataError
from data_prep.synth.journal import Journal

from .answers import equivalent, extract
from .run import RunDir, read_jsonl
from .stages import digest

log = logging.getLogger("finetune")

JUDGE_PROMPT = """You are judging two answers to the same request. Decide which answer is better: correct, complete,
helpful and safe. {reference_line}
Request:
\"\"\"
{question}
\"\"\"

Answer A:
\"\"\"
{a}
\"\"\"

Answer B:
\"\"\"
{b}
\"\"\"

Reply with one letter only: A or B. If they are equally good, reply TIE."""

REFERENCE_LINE = "A reference answer written by an expert is given; judge each answer against it.\n\nReference answer:\n\"\"\"\n{ref}\n\"\"\"\n"

Sampler = Callable[[str, int, int], list[tuple[str, bool]]]  # (prompt text, k, seed) -> k (answer, cut off at the token cap)


def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """A training row's prompt as messages (a pair's prompt); None for a conversation with earlier answers (the pair
    would compare only its last turn, which its own data already supervises)."""
    if "messages" in row:
        msgs = row["messages"]
        if sum(m["role"] == "assistant" for m in msgs) != 1:
            return None
        return msgs[:-1]
    return [{"role": "user", "content": row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")}]


def checker_pair(samples: list[str], reference: str, gold: str | None, cut: set[str] = frozenset()) -> tuple[dict[str, Any] | None, str]:
    """(chosen, rejected) by the answer checker, and what happened. An answer in `cut` stopped at the token cap: it can
    be rejected, never chosen (the model would learn to stop mid-sentence)."""
    right = [s for s in samples if equivalent(extract(s), reference) and s not in cut]
    wrong = [s for s in samples if not equivalent(extract(s), reference)]
    if right and wrong:
        return {"chosen": right[0], "rejected": wrong[0], "correct_samples": len(right)}, "pair"
    if not right and gold is not None and wrong:
        return {"chosen": gold, "rejected": wrong[0], "correct_samples": 0, "chosen_is_reference": True}, "pair (reference chosen)"
    return None, "all correct" if right else "none correct"


def verdict(text: str) -> str | None:
    """The judge's letter: A, B or TIE; None when the reply is not one of them."""
    m = re.fullmatch(r"\W*(A|B|TIE)\W*", text.strip().upper())
    return m.group(1) if m else None


def judge_pair(teacher, question: str, reference: str | None, a: str, b: str) -> tuple[dict[str, Any] | None, str]:
    """Ask twice, the answers swapped; keep the verdict only when both say the same answer wins."""
    ref = REFERENCE_LINE.format(ref=reference) if reference else ""
    first = verdict(teacher.complete(JUDGE_PROMPT.format(reference_line=ref, question=question, a=a, b=b), max_tokens=4, temperature=0).text)
    second = verdict(teacher.complete(JUDGE_PROMPT.format(reference_line=ref, question=question, a=b, b=a), max_tokens=4, temperature=0).text)
    if first is None or second is None:
        return None, "judge reply unreadable"
    if first == "TIE" or second == "TIE":
        return None, "tie"
    winner_first = a if first == "A" else b
    winner_second = b if second == "A" else a
    if winner_first != winner_second:
        return None, "judge inconsistent when swapped"
    loser = b if winner_first == a else a
    return {"chosen": winner_first, "rejected": loser}, "pair"


def model_sampler(run: RunDir, recipe, max_new_tokens: int, temperature: float, top_p: float) -> Sampler:
    """The SFT model (the base as trained plus RUN/adapter) sampling k answers to one prompt, seeded per prompt so a
    rerun samples the same answers."""
    import torch
    from peft import PeftModel

    from . import runbase
    from .lm import stop_ids
    from .templates import token_ids

    tok = runbase.tokenizer(recipe, run)
    model = PeftModel.from_pretrained(runbase.load(recipe, run, quantized=recipe.quantization.bits != 16)[0], str(run.adapter))
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sample(prompt: str, k: int, seed: int) -> list[str]:
        ids = torch.tensor([token_ids(tok, prompt)], device=model.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids.repeat(k, 1), attention_mask=torch.ones_like(ids).repeat(k, 1), do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=stop_ids(tok) or None)
        eos = set(stop_ids(tok))
        answers = []
        for o in out:
            new = o[ids.shape[1]:].tolist()
            ended = any(t in eos for t in new)
            answers.append((tok.decode(new, skip_special_tokens=True).strip(), not ended and len(new) >= max_new_tokens))
        return answers

    return sample


def make_pairs(run_dir: Path, out: Path, *, k: int = 4, method: str = "auto", teacher=None, split: str = "train", limit: int | None = None,
               max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, gold_if_none: bool = False,
               sampler: Sampler | None = None, progress: bool = False) -> dict[str, Any]:
    run = RunDir(run_dir)
    run.require()
    recipe, _ = run.load_recipe()
    if not (run.adapter / "adapter_config.json").is_file():
        raise DataError(f"{run_dir}: no SFT adapter yet (RUN/adapter); run the sft stage first")
    if k < 2:
        raise DataError("--k must be 2 or more: a pair needs two answers")
    if method == "auto":
        method = "checker" if any(t.type == "exact_match" for t in recipe.eval.tasks) else "judge"
    if method == "judge" and teacher is None:
        raise DataError("--method judge needs --teacher (an OpenAI-compatible endpoint, or local:PATH)")
    rows = read_jsonl(run.rows("sft", split))
    if limit is not None:
        rows = rows[:limit]
    config = {"kind": "pairs", "run": str(run.root.resolve()), "adapter_sha256": digest(run.adapter / "adapter_model.safetensors"),
              "k": k, "method": method, "split": split, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
              "seed": seed, "gold_if_none": gold_if_none, "teacher": getattr(teacher, "name", None)}
    journal = Journal(out, config)
    todo = [r for r in rows if _unit(r) not in journal.done]
    if todo and sampler is None:
        sampler = model_sampler(run, recipe, max_new_tokens, temperature, top_p)
    it = todo
    if progress:
        from tqdm import tqdm

        it = tqdm(todo, total=len(rows), initial=len(rows) - len(todo), desc="pairs", unit=" prompts")
    for r in it:
        unit = _unit(r)
        counts: Counter = Counter(prompts=1)
        msgs = prompt_messages(r)
        if msgs is None:
            counts["skipped: multi-turn"] += 1
            journal.commit(unit, [], counts)
            continue
        samples = sampler(r["prompt"], k, seed + int(unit[:8], 16))
        counts["samples"] += len(samples)
        cut = {text for text, truncated in samples if truncated}
        counts["samples cut at the token cap"] += len(cut)
        distinct = list(dict.fromkeys(text for text, _ in samples if text.strip()))
        if method == "checker":
            reference = extract(r["completion"])
            if reference is None:
                got, what = None, "no reference answer to check against"
            else:
                got, what = checker_pair(distinct, reference, r["completion"] if gold_if_none else None, cut)
        elif len([s for s in distinct if s not in cut]) < 2:
            got, what = None, "fewer than two distinct finished answers"
        else:
            question = "\n\n".join(m["content"] for m in msgs if m["role"] != "system")
            finished = [s for s in distinct if s not in cut]
            got, what = judge_pair(teacher, question, r.get("completion"), finished[0], finished[1])
        counts[what] += 1
        kept = []
        if got is not None:
            origin = {"method": method, "run": recipe.name, "row": r.get("id"), "k": k, **{x: got.pop(x) for x in list(got) if x not in ("chosen", "rejected")}}
            if method == "judge":
                origin["teacher"] = teacher.name
            kept.append({"prompt": msgs, **got, "origin": origin})
        journal.commit(unit, kept, counts)
    return {"out": str(out), "pairs": len(journal.rows), "prompts": len(rows), "method": method, **dict(journal.counts)}


def _unit(row: dict[str, Any]) -> str:
    return hashlib.sha256(f"{row.get('id')}\0{row.get('prompt')}".encode()).hexdigest()[:16]

