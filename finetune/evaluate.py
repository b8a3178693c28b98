"""Stage 3, eval: the base and the tuned model scored side by side on identical inputs.

The base is the model as training saw it (4-bit when QLoRA) with the adapter switched off, the tuned one the
same weights with the adapter on: one load, and the only difference between the two columns is the adapter.
This version scores perplexity (held-out split and perplexity tasks); the task harness builds on it.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from .recipe import Recipe, resolve_path
from .run import RunDir, write_json

log = logging.getLogger("finetune")


def nll_per_example(model, examples: list[dict], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL over supervised tokens, number of supervised tokens) for each example."""
    import torch

    dev = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for j, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[j, :n] = torch.tensor(e["input_ids"])
                labels[j, :n] = torch.tensor(e["labels"])
                attn[j, :n] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(dev)
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(len(batch), -1)
            mask = shift_labels != -100
            for j in range(len(batch)):
                out.append((float(loss[j][mask[j]].sum()), int(mask[j].sum())))
    return out


def perplexity_score(per_example: list[tuple[float, int]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Token-weighted perplexity, with a 95% interval from a bootstrap over examples (seeded: reproducible)."""
    def ppl(items):
        tokens = sum(t for _, t in items)
        return math.exp(sum(s for s, _ in items) / tokens) if tokens else float("nan")

    rng = random.Random(seed)
    boots = sorted(ppl([per_example[rng.randrange(len(per_example))] for _ in per_example]) for _ in range(n_boot))
    tokens = sum(t for _, t in per_example)
    return {"score": ppl(per_example), "ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
            "loss": sum(s for s, _ in per_example) / tokens, "tokens": tokens}


def _task_examples(recipe: Recipe, recipe_dir: Path, tok, task) -> list[dict]:
    from data_prep.sources.load import load_source
    from data_prep.spec import Source

    from .errors import UserError
    from .templates import TemplateError, encode

    res = load_source(Source(path=task.path, limit=task.max_samples), recipe_dir)
    rows = res.rows
    examples = []
    for r in rows:
        try:
            enc = encode(tok, r, recipe.data.template, recipe.data.system_prompt)
        except TemplateError as e:
            raise UserError(f"eval task {task.name}: {task.path} row {r['_row']}: {e}") from None
        examples.append({"input_ids": enc.input_ids[: recipe.data.max_length], "labels": enc.labels[: recipe.data.max_length]})
    if not examples:
        raise UserError(f"eval task {task.name}: {task.path} has no usable rows")
    return examples


def evaluate(recipe: Recipe, recipe_dir: Path, run: RunDir) -> dict[str, Any]:
    import json

    from peft import PeftModel

    from .models import load_model, load_tokenizer

    tok = load_tokenizer(recipe.base_model.id, recipe)
    model = load_model(recipe.base_model.id, recipe, quantized=recipe.quantization.bits != 16)
    model = PeftModel.from_pretrained(model, str(run.adapter))
    suites: list[tuple[str, list[dict]]] = []
    if recipe.eval.heldout:
        val = [json.loads(line) for line in (run.data / "val.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        if val:
            suites.append(("heldout", val))
    for task in recipe.eval.tasks:
        suites.append((task.name, _task_examples(recipe, recipe_dir, tok, task)))
    tasks = []
    for name, examples in suites:
        with model.disable_adapter():
            base = perplexity_score(nll_per_example(model, examples, recipe.eval.batch_size, tok.pad_token_id))
        tuned = perplexity_score(nll_per_example(model, examples, recipe.eval.batch_size, tok.pad_token_id))
        tasks.append({"name": name, "type": "perplexity", "metric": "perplexity", "higher_is_better": False, "n": len(examples),
                      "base": base, "tuned": tuned, "delta": tuned["score"] - base["score"]})
        log.info("eval %s: perplexity base %.3f -> tuned %.3f (n=%d)", name, base["score"], tuned["score"], len(examples))
    report = {"tasks": tasks}
    with run.staged("eval") as tmp:
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = ["| task | metric | n | base | tuned | delta |", "|---|---|---|---|---|---|"]
    for t in report["tasks"]:
        b, u = t["base"], t["tuned"]
        arrow = "lower is better" if not t.get("higher_is_better", True) else "higher is better"
        lines.append(
            f"| {t['name']} | {t['metric']} ({arrow}) | {t['n']} | {b['score']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] "
            f"| {u['score']:.3f} [{u['ci95'][0]:.3f}, {u['ci95'][1]:.3f}] | {t['delta']:+.3f} |"
        )
    return "\n".join(lines) + "\n"
