"""The eval harness: score tasks with any LM (lm.py), then the report (report.json / report.md / report.png).

Importing this module must not import torch: the LM passed in does the model work.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from data_prep.errors import DataError

from . import metrics
from .answers import equivalent, extract
from .tasks import LOWER_IS_BETTER, METRICS, EvalTask, Item, normalise_label, resolved_template, stops

log = logging.getLogger("finetune")

def secondary(task_type: str) -> tuple[str, ...]:
    """Every metric a task type reports beside its primary one: the choices of tasks.METRICS, the one table."""
    return METRICS[task_type][1]


def gold_answers(task: EvalTask, items: list[Item]) -> list[str]:
    """exact_match: the gold answer of each item (read with `gold_extract` when the gold field holds a worked solution)."""
    out = []
    for it in items:
        if task.gold_extract is None:
            out.append(str(it.gold).strip())
            continue
        got = extract(str(it.gold), task.gold_extract)
        if got is None:
            raise DataError(f"task {task.name}: row {it.row}: no gold answer found by {task.gold_extract} in {str(it.gold)[-80:]!r}")
        out.append(got)
    return out


def score_items(lm, task: EvalTask, items: list[Item], recipe_template: str | None = None) -> list[dict[str, Any]]:
    """Per-item results of one model on one task (what metrics.score reads)."""
    if task.type in ("multiple_choice", "classification"):
        reqs = [(it.prompt, c) for it in items for c in it.choices]
        ll = lm.loglikelihood(reqs)
        out, k = [], 0
        for it in items:
            s = ll[k : k + len(it.choices)]
            k += len(it.choices)
            # acc_norm as lm-eval-harness: log-likelihood per byte of the continuation
            norm = [x / max(1, len(c.strip().encode("utf-8"))) for x, c in zip(s, it.choices)]
            pred, pred_norm = max(range(len(s)), key=s.__getitem__), max(range(len(s)), key=norm.__getitem__)
            out.append({"id": it.id, "row": it.row, "pred": normalise_label(it.choices[pred]), "gold": normalise_label(it.choices[it.gold]),
                        "correct": pred == it.gold, "correct_norm": pred_norm == it.gold, "loglik": [round(x, 4) for x in s]})
        return out
    if task.type == "exact_match":
        golds = gold_answers(task, items)
        texts = lm.generate([it.prompt for it in items], task.max_new_tokens, stops(task, resolved_template(task, recipe_template)))
        out = []
        for it, text, gold in zip(items, texts, golds):
            pred = extract(text, task.extract)
            out.append({"id": it.id, "row": it.row, "output": text, "pred": pred, "gold": gold, "correct": equivalent(pred, gold)})
        return out
    if task.type == "perplexity":
        if items and items[0].encoded is not None:
            res = lm.nll_encoded([it.encoded for it in items])
        else:
            res = lm.nll([it.segments for it in items])
        # the scored text's UTF-8 bytes: bits per byte compares models whose tokenizers differ (metrics.bits_per_byte)
        n_bytes = [it.encoded["bytes"] if it.encoded is not None and "bytes" in it.encoded else
                   sum(len(t.encode("utf-8")) for t, scored in (it.segments or []) if scored) for it in items]
        return [{"id": it.id, "row": it.row, "nll": s, "tokens": n, **({"bytes": b} if b else {})} for it, (s, n), b in zip(items, res, n_bytes)]
    raise ValueError(task.type)


def model_scores(task: EvalTask, results: list[dict[str, Any]]) -> dict[str, Any]:
    main = metrics.score(task.metric, results)
    extra = {m: metrics.score(m, results)["score"] for m in secondary(task.type) if m != task.metric}
    return {**main, **({"metrics": extra} if extra else {})}


def task_entry(task: EvalTask, base: list[dict], tuned: list[dict] | None, source: str) -> dict[str, Any]:
    """One task's entry of report.json (docs/architecture.md; plus n per model, secondary metrics and the paired delta CI)."""
    entry: dict[str, Any] = {"name": task.name, "type": task.type, "metric": task.metric, "higher_is_better": task.higher_is_better,
                             "n": len(base), "source": source, "base": model_scores(task, base)}
    if tuned is not None:
        entry["tuned"] = model_scores(task, tuned)
        entry["delta"] = entry["tuned"]["score"] - entry["base"]["score"]
        entry["delta_ci95"] = metrics.paired_delta_ci(task.metric, base, tuned)
    else:
        entry["tuned"] = None
        entry["delta"] = None
    golds = {str(r.get("gold")) for r in base}
    one_class = task.type in ("classification", "multiple_choice") and len(base) > 1 and len(golds) == 1
    if one_class:
        entry["warnings"] = [f"every scored item has the same gold answer ({golds.pop()!r}): a model that always gives it scores "
                             "100, one that never does 0; this score says nothing. Score more items (or the whole task)."]
        log.warning("eval %s: %s", task.name, entry["warnings"][0])
    entry["one_class"] = one_class
    for who in ("base", "tuned"):
        note_degenerate(entry, who)
    return entry


def note_degenerate(entry: dict[str, Any], who: str) -> None:
    """A zero-width interval is never certainty: say why it is degenerate (`ci95_note`, shown instead of the interval)."""
    s = entry.get(who)
    if s and s.get("ci95") and s["ci95"][0] == s["ci95"][1]:
        s["ci95_note"] = ("one gold class in the scored items" if entry.get("one_class") else
                          f"every bootstrap resample of the {entry['n']} items gives the same score")


def _fmt(x: float, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if metric in LOWER_IS_BETTER else f"{100 * x:.1f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The table of report.md and the model card: scores in % (perplexity as is) with their 95% intervals. Columns:
    base; tuned (the adapter as trained on the base as training held it); merged (the published 16-bit model), when
    it was scored; and each one's delta against the base."""
    pair = any(t.get("tuned") for t in report["tasks"])
    merged = any(t.get("merged") for t in report["tasks"])
    sft = any(t.get("sft") for t in report["tasks"])
    final = (report.get("stages") or ["sft"])[-1]
    head = ["task", "metric", "n", "base"]
    if sft:
        head += ["SFT", "delta [95% CI]", f"{final} (adapter)", "delta vs SFT [95% CI]"]
    elif pair:
        head += ["tuned (adapter)" if merged else "tuned", "delta"]
    else:
        head[-1] = "score"
    if merged:
        head += ["merged (published)", "delta [95% CI]" if sft else "delta"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in report["tasks"]:
        m = t["metric"]
        arrow = "↓" if not t.get("higher_is_better", True) else "↑"
        cell = lambda s: ("n/a" if not s else f"{_fmt(s['score'], m)} [no interval: {s['ci95_note']}]" if s.get("ci95_note") else  # noqa: E731
                          f"{_fmt(s['score'], m)} [{_fmt(s['ci95'][0], m)}, {_fmt(s['ci95'][1], m)}]")
        signed = lambda d: "n/a" if d is None else ("+" if d >= 0 else "-") + _fmt(abs(d), m)  # noqa: E731
        row = f"| {t['name']} | {m.replace('_', ' ')} {arrow} | {t['n']} | {cell(t['base'])} |"
        # with an SFT column every delta carries its paired 95% interval (three columns are read as two comparisons)
        ci = lambda key: (f" [{signed(t[key][0])}, {signed(t[key][1])}]" if sft and t.get(key) and None not in t[key] else "")  # noqa: E731
        if sft:
            row += (f" {cell(t.get('sft'))} | {signed(t.get('sft_delta'))}{ci('sft_delta_ci95')} | {cell(t.get('tuned'))} | "
                    f"{signed(t.get('tuned_vs_sft'))}{ci('tuned_vs_sft_ci95')} |")
        elif pair:
            row += f" {cell(t.get('tuned'))} | {signed(t.get('delta'))} |"
        if merged:
            row += f" {cell(t.get('merged'))} | {signed(t.get('merged_delta'))}{ci('merged_delta_ci95')} |"
        lines.append(row)
    lines += stage_lines(report)
    note = ("\nScores in % except perplexity; [95% CI]: Wilson for accuracy, bootstrap otherwise. ↑ higher is better, ↓ lower.\n")
    if merged:
        note += ("tuned (adapter): the base as trained (4-bit when QLoRA) with the LoRA adapter; merged (published): RUN/merged, "
                 "the adapter folded into the 16-bit base, loaded as a plain model. They differ by the base's quantization.\n")
    sampled = [f"{t['name']}: {t['sampling']['scored']} of {t['sampling']['of']} items, {t['sampling']['method']} (seed "
               f"{t['sampling']['seed']})" for t in report["tasks"] if (t.get("sampling") or {}).get("method")]
    if sampled:
        note += "Sampled: " + "; ".join(sampled) + ".\n"
    warned = [f"{t['name']}: {w}" for t in report["tasks"] for w in t.get("warnings", [])]
    if warned:
        note += "".join(f"\n> **Warning** {w}\n" for w in warned)
    return "\n".join(lines) + "\n" + note


def stage_lines(report: dict[str, Any]) -> list[str]:
    """The preference or GRPO stage's own metric for base, SFT and the final model (stage_eval.py)."""
    pct = lambda s: f"{100 * s['score']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"  # noqa: E731
    num = lambda s: f"{s['score']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"  # noqa: E731
    p, g = report.get("preference"), report.get("grpo")
    if p:
        a = p["preference_accuracy"]
        return ["", f"Held-out preference pairs ({p['n']}), {p['stage']} stage:", "",
                "| metric | base | SFT | " + p["stage"] + " |", "|---|---|---|---|",
                f"| preference accuracy ↑ (% of pairs where chosen is likelier) | {pct(a['base'])} | {pct(a['sft'])} | {pct(a['tuned'])} |",
                f"| reward accuracy ↑ (% of pairs with a positive margin over SFT) | | | {pct(p['reward_accuracy'])} |",
                f"| reward margin ↑ (log-ratio to SFT, chosen minus rejected) | | | {num(p['reward_margin'])} |"]
    if g:
        m = g["mean_reward"]
        names = list(g["rewards"]["tuned"])
        return ["", f"Held-out GRPO prompts ({g['n']}), one greedy answer each:", "", "| metric | base | SFT | grpo |", "|---|---|---|---|",
                f"| mean reward ↑ | {num(m['base'])} | {num(m['sft'])} | {num(m['tuned'])} |"] + [
                f"| {n} ↑ | {g['rewards']['base'][n]:.3f} | {g['rewards']['sft'][n]:.3f} | {g['rewards']['tuned'][n]:.3f} |" for n in names]
    return []


def report_png(report: dict[str, Any], path: Path) -> None:
    """Base vs tuned (vs merged) per task, in % like the tables, one panel per task (metrics differ in scale), 95% CI error bars, n under each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(2.4 * max(1, len(tasks)) + 0.6, 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        models = ([("base", t["base"], "#8c8c8c")] + ([("tuned", t["tuned"], "#1f77b4")] if t.get("tuned") else [])
                  + ([("merged", t["merged"], "#2ca02c")] if t.get("merged") else []))
        scale = 100.0 if t.get("higher_is_better", True) else 1.0  # the tables print scores in %: so does the chart
        for i, (label, s, colour) in enumerate(models):
            y = s["score"] * scale
            lo, hi = (x * scale for x in s["ci95"])
            err = [[max(0.0, y - lo)], [max(0.0, hi - y)]] if all(map(math.isfinite, (y, lo, hi))) else None
            ax.bar(i, y if math.isfinite(y) else 0, color=colour, yerr=err, capsize=4, label=label)
        ax.set_xticks(range(len(models)), [m[0] for m in models])
        ax.set_title(t["name"], fontsize=9)
        ax.set_ylabel(t["metric"].replace("_", " ") + (" (%)" if t.get("higher_is_better", True) else " (lower is better)"), fontsize=8)
        ax.set_xlabel(f"n = {t['n']}", fontsize=8)
        if t.get("higher_is_better", True):
            ax.set_ylim(0, 100)
    fig.suptitle("base vs tuned" + (" vs merged" if any(t.get("merged") for t in tasks) else "") + ", 95% confidence intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any], per_item: dict[str, dict[str, list[dict]]]) -> None:
    """report.json, report.md, report.png, and items/<task>.jsonl with every item's prediction (for inspection)."""
    from .artifacts import EvalReport
    from .run import write_json

    EvalReport.model_validate(report)  # typed: a task entry missing a field fails here, in the stage that wrote it
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    report_png(report, out / "report.png")
    (out / "items").mkdir(exist_ok=True)
    for name, by_model in per_item.items():
        with open(out / "items" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            models = list(by_model)
            for rows in zip(*by_model.values()):
                f.write(json.dumps({"id": rows[0]["id"], "row": rows[0]["row"], **{m: {k: v for k, v in r.items() if k not in ("id", "row")}
                                                                                    for m, r in zip(models, rows)}}, ensure_ascii=False) + "\n")


def log_entry(entry: dict[str, Any]) -> None:
    b, t, m = entry["base"], entry.get("tuned"), entry["metric"]
    if t:
        log.info("eval %s: %s base %s -> tuned %s (n=%d)", entry["name"], m, _fmt(b["score"], m), _fmt(t["score"], m), entry["n"])
    else:
        log.info("eval %s: %s %s (n=%d)", entry["name"], m, _fmt(b["score"], m), entry["n"])
