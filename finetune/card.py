"""The model card: YAML front matter the Hub reads, and a body that tells the truth about the run.

No absolute local paths and no secrets: data sources are shown by file name or hub id, and the card is built
from the run's own records (provenance.json, eval/report.json, merge_check.json, training_summary.json).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from data_prep import licences
from data_prep.licences import is_non_commercial
from data_prep.provenance import all_sources
from data_prep.provenance import read as read_provenance

from .artifacts import EvalReport, MergeCheck, TrainingSummary
from .harness import report_markdown
from .recipe import AFTER_SFT, Recipe
from .run import RunDir, read_json

DISCLAIMERS = {
    "medical": "This model is not a medical device and does not give medical advice. Outputs must be checked by a qualified clinician.",
    "legal": "This model does not give legal advice and is no substitute for a qualified lawyer. Outputs must be checked before use.",
    "math": "Answers can be wrong even when the reasoning looks right; verify results before relying on them.",
}


def _source_name(p: dict[str, Any]) -> str:
    return p.get("hub") or Path(p.get("path", "?")).name


def card_license(recipe: Recipe, provenance: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The card's licence and the warnings that go with it."""
    data_lic = [p.get("license") or "unknown" for p in provenance]
    known = {l for l in [recipe.base_model.license, *data_lic] if l}
    warnings = []
    if any(is_non_commercial(l) for l in known):
        warnings.append("Some training data is licensed for non-commercial use only: so is this model.")
    if "unknown" in data_lic:
        warnings.append("The licence of some training data is unknown: check it before any use.")
    if recipe.publish.license:
        return recipe.publish.license, warnings
    licences = {l for l in known if l != "unknown"}
    if len(licences) == 1:
        return licences.pop(), warnings
    return "other", warnings + [f"Licence `other` (named `{other_name(known)}`): the base model's and the training data's licences "
                                f"all apply: {', '.join(sorted(known))}. Set `publish.license` to state the one you grant."]


def other_name(licences) -> str:
    """The Hub's `license_name` for `license: other`: the licences that apply, joined."""
    return "-and-".join(sorted(licences)) or "unknown"


def licence_conflicts(recipe: Recipe, provenance: list[dict[str, Any]]) -> list[str]:
    """Licence claims the inputs do not allow: a `publish.license` without the non-commercial restriction of some data or
    of the base model, or one that replaces a base model's own licence (Llama, Gemma: derivatives keep it)."""
    claimed = recipe.publish.license
    if not claimed:
        return []
    out = []
    base = recipe.base_model.license
    if base and licences.kind(base) == licences.CUSTOM and licences.normalise(claimed) != licences.normalise(base):
        out.append(f"publish.license {claimed!r} replaces the base model's licence {base!r}, which its derivatives keep")
    if is_non_commercial(claimed):
        return out
    restricted = [f"{_source_name(p)} ({p['license']})" for p in provenance if is_non_commercial(p.get("license"))]
    if is_non_commercial(base):
        restricted.insert(0, f"base model {recipe.base_model.id} ({base})")
    return out + ([f"publish.license {claimed!r} allows commercial use, but {', '.join(restricted)} does not"] if restricted else [])


def _dataset(t: dict[str, Any]) -> dict[str, Any]:
    """model-index `dataset`: `type` is the Hub dataset id (or the file's name), never a description."""
    source = t.get("source") or t["name"]
    if t["name"] == "heldout" or source == "validation split":
        return {"name": "held-out split of this model's training data", "type": "heldout", "split": "validation"}
    if ":" in source:  # hub id[/config]:split
        where, split = source.rsplit(":", 1)
        parts = where.split("/")
        out = {"name": source, "type": "/".join(parts[:2]), "split": split}
        if len(parts) > 2:
            out["config"] = "/".join(parts[2:])
        return out
    return {"name": source, "type": source}


def model_index(name: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The Hub's model-index block: per task, the base, tuned (adapter) and merged scores with n and the 95% interval
    (metric args)."""
    results = []
    for t in report.get("tasks", []):
        metrics = []
        for who in ("base", "tuned", "merged"):
            s = t.get(who)
            if not s:
                continue
            metrics.append({"type": t["metric"], "name": f"{t['metric']} ({who})", "value": round(float(s["score"]), 4), "verified": False,
                            "args": {"n": t["n"], "ci95": [round(float(x), 4) for x in s["ci95"]]}})
        results.append({"task": {"type": "text-generation", "name": t["name"]}, "dataset": _dataset(t), "metrics": metrics})
    return [{"name": name, "results": results}] if results else []


def render_card(recipe: Recipe, run: RunDir, base_model_name: str, smoke: bool) -> str:
    prov = read_provenance(run.data / "provenance.json")
    report = EvalReport.read_checked(run.eval / "report.json")
    check = MergeCheck.read_if_present(run.merge_check)
    summary = TrainingSummary.read(run.adapter / "training_summary.json")
    sources = all_sources(prov)
    license_id, warnings = card_license(recipe, sources)
    tags = ["finetune", recipe.domain, "lora"] + (["qlora", "4-bit"] if recipe.quantization.bits == 4 else []) + list(recipe.publish.tags)
    front: dict[str, Any] = {
        "base_model": base_model_name,
        "library_name": "peft",
        "license": license_id,
        "tags": list(dict.fromkeys(tags)),
    }
    if license_id == "other":
        applies = {p.get("license") or "unknown" for p in sources} | ({recipe.base_model.license} if recipe.base_model.license else set())
        front["license_name"] = other_name(applies)
    hub_sets = list(dict.fromkeys(p["hub"] for p in sources if p.get("hub")))
    if hub_sets:
        front["datasets"] = hub_sets
    index = model_index(recipe.name, report)
    if index:
        front["model-index"] = index
    t = recipe.training
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe.name}", ""]
    if smoke:
        lines += ["> **Smoke test.** Trained by `finetune run --smoke`: a tiny randomly initialised stand-in of the "
                  f"{recipe.base_model.family} family and sample data. It checks the pipeline; it is not a usable model.", ""]
    lock = read_json(run.lock, {})
    if lock.get("laptop"):
        lines += ["> **Laptop rehearsal.** Trained by `finetune run --laptop`: the recipe's data pipeline, template and eval "
                  f"tasks with the small `{base_model_name}` on a CPU, in minutes. It shows the recipe works and what it moves; "
                  "it is not the specialist the recipe describes.", ""]
    lines += [f"A {recipe.domain} specialist fine-tuned from `{base_model_name}` with "
              f"{'QLoRA (4-bit NF4 base)' if recipe.quantization.bits == 4 else 'LoRA'} on all linear layers by finetune.", ""]
    gguf = lock.get("base_gguf")
    if gguf:
        lines += [f"The base was read from the GGUF file `{gguf['file']}` (sha256 `{gguf['sha256']}`), dequantized to {gguf.get('dtype', 'float32')}.", ""]
    lines += [f"> {w}" for w in warnings] + ([""] if warnings else [])
    sft = "SFT, " if recipe.stages[-1] in AFTER_SFT else ""
    lines += [f"## Evaluation (base, {sft}adapter as trained, and the published merged model, on identical prompts)", "",
              report_markdown(report) if report["tasks"] else "No evaluation was run.", ""]
    lines += ["## Training", "",
              f"- LoRA r={recipe.lora.r}, alpha={recipe.lora.lora_alpha}, dropout={recipe.lora.lora_dropout}, targets={recipe.lora.target_modules}",
              f"- learning rate {t.learning_rate} ({t.lr_scheduler_type}), batch {t.per_device_train_batch_size} x {t.gradient_accumulation_steps}, "
              f"{summary.global_step} steps, final train loss {summary.train_loss:.4f}",
              f"- template `{recipe.data.template}`, max length {recipe.data.max_length} tokens, seed {t.seed}"]
    lines += stage_lines(recipe, run)
    lines += model_changes(recipe, run, prov)
    q = summary.quantization
    if q.bits == 4:
        lines.append(f"- 4-bit: {q.quantized_modules} layers, {100 * (q.share_of_block_matmul_weights or 0):.1f}% of block matmul weights")
    lines += ["", "## Data provenance", "", "| source | licence | sha256 | rows read | kept | removed |", "|---|---|---|---|---|---|"]
    for p in sources:
        removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.get("removed", {}).items() if v) or "none"
        digest = (p.get("sha256") or p.get("fingerprint") or "")[:12]
        lines.append(f"| {_source_name(p)} | {p.get('license') or 'unknown'} | `{digest}` | {p['rows_read']} | {p['rows_kept']} | {removed} |")
    splits = prov.get("splits")
    if splits:
        lines += ["", f"{splits['train']['n']} training and {splits['val']['n']} validation examples; {prov['rejected']} rows rejected."]
    pii = prov.get("quality", {}).get("pii")
    if pii and pii.get("action") not in (None, "off"):
        found = ", ".join(f"{k} {v}" for k, v in sorted(pii.get("findings", {}).items())) or "none"
        lines += [f"Personal data ({pii['action']}): {pii['rows']} training-set rows had findings ({found}). "
                  f"Names: {pii.get('names', 'by title or label only')}. The data card (datacard.md) has the details."]
    elif pii:
        lines += ["Personal data: not scanned (data.quality.pii.action: off)."]
    if check:
        lines += ["", "## Merge check", "",
                  f"Merged into the {check.base} base and saved as {check.saved_dtype}. On {check.probes} probe rows the adapter "
                  f"moved the base's logits by up to {check.adapter_vs_base_max_abs_diff:.3g}; merged and adapter logits differ by at most "
                  f"{check.merged_vs_adapter_max_abs_diff:.2e} in float32 (tolerance {check.atol:.2e}"
                  f"{', derived from float32 rounding and the logits size' if check.atol_source == 'derived' else ''})."]
        ppl = check.perplexity
        if ppl:
            lines += ["", "| probe perplexity | " + " | ".join(ppl) + " |", "|---|" + "---|" * len(ppl),
                      "| | " + " | ".join(f"{v:.4g}" for v in ppl.values()) + " |"]
        if check.merged_vs_trained_max_abs_diff is not None:
            lines += ["", f"Against the model as trained (4-bit base + adapter) the merged model's logits differ by up to "
                      f"{check.merged_vs_trained_max_abs_diff:.3g}"
                      + (" (the 4-bit rounding the adapter was trained with)." if check.base == "original_16bit" else ".")]
    lines += ["", "## Intended use", "", DISCLAIMERS.get(recipe.domain, "Check outputs before relying on them."), "",
              *how_to_load(recipe.publish.to, recipe.publish.what, base_model_name, recipe.training.method == "block_expansion"),
              *(run_locally(recipe.publish.to, recipe.name, run) if "gguf" in recipe.publish.what else [])]
    return "\n".join(lines)


def model_changes(recipe: Recipe, run: RunDir, prov: dict[str, Any]) -> list[str]:
    """The vocabulary grown before CPT and the blocks added (issue 20): what changed in the model, with its proofs."""
    lines = []
    v = prov.get("vocabulary")
    if v:
        tpb, whole = v["tokens_per_byte"], v["tokens_per_byte_corpus"]
        how = "BPE merges learned from the CPT corpus" if v["how"] == "learned merges" else "tokens listed in cpt.vocabulary.tokens_file"
        lines += [f"- vocabulary: {v['base_tokens']:,} -> {v['size']:,} tokens ({v['added']:,} {how}); every existing token keeps its id, "
                  f"and all {v['documents_round_trip']} corpus documents decode back to their text",
                  f"- tokens per byte on {tpb['documents']} {'held-out ' if tpb['sample'] == 'held_out' else ''}corpus documents: "
                  f"{tpb['before']:.3f} -> {tpb['after']:.3f} ({100 * (tpb['after'] / tpb['before'] - 1):+.0f}%); whole corpus "
                  f"{whole['before']:.3f} -> {whole['after']:.3f}; instruction rows {v['tokens_per_byte_sft']['before']:.3f} -> "
                  f"{v['tokens_per_byte_sft']['after']:.3f}",
                  "- new embedding and lm_head rows start as the mean of the rows of the pieces the base tokenizer splits them into, "
                  "and both matrices train whole from CPT on; perplexity tasks compare base and tuned in bits per byte (their "
                  "tokenizers differ)"]
    if recipe.training.method == "block_expansion":
        e = TrainingSummary.read(run.stage_adapter(recipe.stages[0]) / "training_summary.json").expansion or {}
        layers = e.get("layers", {})
        lines += [f"- block expansion (LLaMA Pro): {layers.get('before')} -> {layers.get('after')} decoder blocks; the copies at "
                  f"{e.get('new_blocks')} started as identities (largest logit change from inserting them: "
                  f"{e.get('identity_max_abs_diff', float('nan')):.1e}) and were the only weights trained "
                  f"({'full weights' if recipe.expand.train == 'full' else 'LoRA on their linear layers'}); the merged model is a plain "
                  f"{layers.get('after')}-layer model"]
    return lines


def stage_lines(recipe: Recipe, run: RunDir) -> list[str]:
    """Which training stages ran, and for a stage after SFT what it trained on and against."""
    lines = [f"- stages: {' → '.join(recipe.stages)} (each one continues the adapter of the one before)"]
    last = recipe.stages[-1]
    if last not in AFTER_SFT:
        return lines
    s = TrainingSummary.read(run.stage_adapter(last) / "training_summary.json")
    if last == "grpo":
        g = recipe.grpo
        lines.append(f"- grpo: {s.train_rows} prompts, {g.num_generations} sampled answers each, rewards {', '.join(g.rewards)}, "
                     f"learning rate {g.learning_rate}, {s.global_step} steps, KL coefficient {g.beta}"
                     + (" against the SFT policy" if g.beta else " (no reference model)"))
    else:
        p = recipe.preference
        ref = "reference: the SFT policy (a frozen copy of the SFT adapter, checked tensor for tensor)" if s.reference else "no reference model"
        lines.append(f"- {last}: {s.train_rows} {'rows (each pair as a desirable and an undesirable answer)' if last == 'kto' else 'pairs'}, "
                     f"beta {p.beta}, learning rate {p.learning_rate}, {s.global_step} steps, final loss {s.train_loss:.4f}; {ref}")
    return lines


def run_locally(to: str | None, name: str, run: RunDir) -> list[str]:
    """The "Run it locally" section: the exact commands for the published GGUF files, and what their check found."""
    from .export import read_checks

    done = {n: c for n, c in sorted(read_checks(run.root / "export").items()) if c.get("passed")}
    if not done:
        return ["## Run it locally", "", "No GGUF export yet: `finetune export RUN_DIR --to gguf` writes and checks one.", ""]
    first = next(iter(done))
    repo = repo_name(to)
    get = ([f'huggingface-cli download {repo} --include "gguf/*" --local-dir {name}', f"cd {name}/gguf"] if repo else
           ["cd path/to/this/folder/gguf   # the published revision holding this card"])
    lines = ["## Run it locally", "", "GGUF files for llama.cpp, Ollama and LM Studio, each loaded back through transformers' GGUF reader "
             "and compared with the merged model before it was published:", "",
             "| file | type | size | logits vs merged model | greedy tokens |", "|---|---|---|---|---|"]
    for n, c in done.items():
        greedy = f"{c['greedy_tokens_equal']}/{c['greedy_tokens_compared']} equal" if "greedy_tokens_compared" in c else "-"
        gap = c.get("vs_reference_max_abs_diff", c["vs_merged_max_abs_diff"])
        ref = f"max gap {gap:.2g} to the {c['dtype']}-rounded model" if "vs_reference_max_abs_diff" in c else f"max gap {gap:.2g}"
        lines.append(f"| `{n}` | {c['dtype']} | {c['bytes'] / 1e6:.1f} MB | {ref} | {greedy} |")
    lines += ["", "```bash", *get, f"ollama create {name} -f Modelfile      # Modelfile: template, stops and system prompt of this model",
              f"ollama run {name}", f"llama-cli -m {first} -cnv             # llama.cpp", "```", ""]
    return lines


def repo_name(to: str | None) -> str | None:
    """What `from_pretrained` takes for a publish target: ORG/NAME on the Hub; None for a folder (its path is local)."""
    return to.removeprefix("hf://") if to and to.startswith("hf://") else None


def how_to_load(to: str | None, what, base: str, expanded: bool = False) -> list[str]:
    repo = repo_name(to)
    where = f'"{repo}"' if repo else '"path/to/this/folder"'
    lines = ["## How to load", ""] + ([] if repo else ["From the folder holding this card (a copy of the published revision):", ""]) + ["```python"]
    if "adapter" in what and expanded:
        lines += [f"# the adapter holds the new blocks of {base} expanded by finetune.expand.expand_blocks: load the merged model"]
    elif "adapter" in what:
        lines += ["from peft import AutoPeftModelForCausalLM", "",
                  f"model = AutoPeftModelForCausalLM.from_pretrained({where})  # the adapter, on {base}"]
    if "merged" in what:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained({where}, subfolder="merged")  # the merged model',
                  f'tokenizer = AutoTokenizer.from_pretrained({where}, subfolder="merged")']
    return lines + ["```", ""]


def write_card(recipe: Recipe, run: RunDir, base_model_name: str, smoke: bool) -> Path:
    run.card.mkdir(parents=True, exist_ok=True)
    path = run.card / "README.md"
    path.write_text(render_card(recipe, run, base_model_name, smoke), encoding="utf-8")
    return path


def front_matter(card_text: str) -> dict[str, Any]:
    """Parse a card's YAML front matter (used by tests and the publish gate)."""
    if not card_text.startswith("---\n"):
        return {}
    return yaml.safe_load(card_text.split("---\n", 2)[1]) or {}



def shown_base(base: str) -> str:
    """A base named in a card or a published adapter_config.json: a Hub id as is, a local folder by its config's
    `_name_or_path` when that is a Hub id, else by its name (no local paths leave the machine)."""
    p = Path(base)
    if not (p.is_absolute() or p.exists()):
        return base
    named = str(read_json(p / "config.json", {}).get("_name_or_path") or "")
    return named if re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists() else p.name


def combination_card(folder: Path, check: dict[str, Any], to: str | None = None) -> str:
    """The card of an adapter combination (`finetune merge --adapters ...`): what went in, with which weights, and how
    it scores when `finetune eval` was run into FOLDER/eval."""
    report = read_json(folder / "eval" / "report.json", {"tasks": []})
    shown = shown_base(check["base"])
    front: dict[str, Any] = {"base_model": shown, "library_name": "peft", "license": "other", "license_name": "see-inputs",
                             "tags": ["finetune", "lora", "merge", check["method"]]}
    index = model_index(folder.resolve().name, report)
    if index:
        front["model-index"] = index
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {folder.resolve().name}", "",
             f"{len(check['inputs'])} LoRA adapters of `{shown}` combined with peft's `{check['method']}`"
             + (f" (density {check['density']}, seed {check['seed']})" if check.get("density") is not None else "") + ".", "",
             "> Licence `other` (named `see-inputs`): that of the base model and of every input's training data apply; check each before use.", "",
             "| input | r | lora_alpha | weight | sha256 |", "|---|---|---|---|---|"]
    for inp, w in zip(check["inputs"], check["weights"]):
        lines.append(f"| {inp['adapter']} | {inp['r']} | {inp['lora_alpha']} | {w} | `{inp['sha256'][:12]}` |")
    lines += ["", f"Combined rank {check['combined_r']}; on {check['probes']} probe prompts it moves the base's logits by up to "
              f"{check['combined_vs_base_max_abs_diff']:.3g}."]
    if check.get("merged_vs_adapter_max_abs_diff") is not None:
        lines.append(f"Folded into the base (merged/): logits within {check['merged_vs_adapter_max_abs_diff']:.2e} of the adapter "
                     f"(tolerance {check['atol']:.2e}).")
    lines += ["", "## Evaluation (base vs combined)", "", report_markdown(report) if report["tasks"] else "Not evaluated: run "
              "`finetune eval BASE --adapter FOLDER/adapter --tasks TASKS.yaml --out FOLDER/eval` before publishing.", "",
              "## Intended use", "", "Check outputs before relying on them; the inputs' own cards state their domains and limits.", "",
              *how_to_load(to, ["adapter", *(["merged"] if check.get("merged_vs_adapter_max_abs_diff") is not None else [])], shown)]
    return "\n".join(lines)
