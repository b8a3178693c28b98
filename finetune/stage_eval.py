"""What the eval stage adds when a preference or reward stage came after SFT: that stage's own metric, for base, SFT and
the final model, each with its 95% interval.

- Preference stages (dpo, orpo, kto), on the held-out pairs (data/pairs_val.jsonl, never trained on):
  - `preference_accuracy` of each model: the share of pairs where it gives the chosen answer a higher log-likelihood
    than the rejected one (Wilson interval);
  - `reward_accuracy` and `reward_margin` of the final model against the SFT policy, DPO's implicit reward without
    its beta: margin = (log p_final(chosen) - log p_sft(chosen)) - (log p_final(rejected) - log p_sft(rejected)); the
    accuracy is the share of pairs with a positive margin (Wilson), the margin's mean has a bootstrap interval. DPO's
    reward is beta times this margin, so the accuracy is the one trl logs as rewards/accuracies.
- GRPO, on the held-out prompts (data/grpo_val.jsonl): each model answers greedily, and each answer is scored by the
  recipe's reward functions; `mean_reward` (weighted as in training) with a bootstrap interval, and each reward's mean.

Every model is scored on the same items, through the same 4-bit base (the SFT and final adapters switched in turn).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import metrics
from .recipe import PREFERENCE_STAGES, Recipe
from .run import RunDir, read_jsonl

log = logging.getLogger("finetune")

COLUMNS = ("base", "sft", "tuned")


def _switch(model, column: str):
    """A context with the column's weights active: base (adapters off), sft, or tuned (the final adapter, "default")."""
    import contextlib

    if column == "base":
        return model.disable_adapter()
    model.set_adapter("sft" if column == "sft" else "default")
    return contextlib.nullcontext()


def pair_logps(lm, pairs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p of each answer's tokens (EOS included) given the shared prompt: (chosen, rejected)."""
    rows = []
    for p in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            rows.append({"input_ids": p["prompt_ids"] + p[side], "labels": [-100] * len(p["prompt_ids"]) + p[side]})
    nll = np.array([-n for n, _ in lm.nll_encoded(rows)], dtype=float)
    return nll[0::2], nll[1::2]


def preference_metrics(logps: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The report's preference section from each column's (chosen, rejected) log-probabilities."""
    n = len(logps["base"][0])
    out: dict[str, Any] = {"n": n, "preference_accuracy": {}}
    for col, (c, r) in logps.items():
        k = int((c > r).sum())
        out["preference_accuracy"][col] = {"score": k / n, "ci95": metrics.wilson(k, n), "correct": k}
    (fc, fr), (sc, sr) = logps["tuned"], logps["sft"]
    margin = (fc - sc) - (fr - sr)
    k = int((margin > 0).sum())
    out["reward_accuracy"] = {"score": k / n, "ci95": metrics.wilson(k, n), "correct": k}
    out["reward_margin"] = {"score": float(margin.mean()), "ci95": metrics.bootstrap(lambda idx: float(margin[idx].mean()), n)}
    return out


def grpo_metrics(rewards: dict[str, dict[str, list[float]]], weights: list[float]) -> dict[str, Any]:
    """The report's GRPO section from each column's per-reward scores on the held-out prompts."""
    out: dict[str, Any] = {"mean_reward": {}, "rewards": {}}
    for col, by_name in rewards.items():
        total = sum(w * np.array(v, dtype=float) for w, v in zip(weights, by_name.values()))
        n = len(total)
        out["n"] = n
        out["mean_reward"][col] = {"score": float(total.mean()), "ci95": metrics.bootstrap(lambda idx, t=total: float(t[idx].mean()), n)}
        out["rewards"][col] = {name: float(np.mean(v)) for name, v in by_name.items()}
    return out


def after_sft_report(recipe: Recipe, run: RunDir, model, tok) -> dict[str, Any]:
    from .lm import HFLM

    stage = recipe.stages[-1]
    bs = recipe.eval.batch_size
    if stage in PREFERENCE_STAGES:
        pairs = read_jsonl(run.rows(stage, "val"))
        if not pairs:
            return {"preference": None}
        logps = {}
        for col in COLUMNS:
            with _switch(model, col):
                logps[col] = pair_logps(HFLM(model, tok, bs, desc=f"{col} pairs"), pairs)
        model.set_adapter("default")
        out = preference_metrics(logps)
        acc = out["preference_accuracy"]
        log.info("eval %s pairs (n=%d): preference accuracy base %.1f, sft %.1f, %s %.1f; reward accuracy %.1f, margin %.3f", stage,
                 out["n"], 100 * acc["base"]["score"], 100 * acc["sft"]["score"], stage, 100 * acc["tuned"]["score"],
                 100 * out["reward_accuracy"]["score"], out["reward_margin"]["score"])
        return {"preference": {"stage": stage, **out}}
    from .rewards import resolve

    g = recipe.grpo
    prompts = read_jsonl(run.rows("grpo", "val"))
    if not prompts:
        return {"grpo": None}
    fns = {name: resolve(name) for name in g.rewards}
    scores: dict[str, dict[str, list[float]]] = {}
    for col in COLUMNS:
        with _switch(model, col):
            answers = HFLM(model, tok, bs, desc=f"{col} grpo").generate([p["prompt"] for p in prompts], g.max_completion_length, [])
        gold = [p["answer"] for p in prompts]
        scores[col] = {name: list(fn(prompts=[p["prompt"] for p in prompts], completions=answers, answer=gold)) for name, fn in fns.items()}
    model.set_adapter("default")
    out = grpo_metrics(scores, g.reward_weights or [1.0] * len(fns))
    m = out["mean_reward"]
    log.info("eval grpo prompts (n=%d): mean reward base %.3f, sft %.3f, grpo %.3f", out["n"], m["base"]["score"], m["sft"]["score"],
             m["tuned"]["score"])
    return {"grpo": out}
