"""Stage eval: the base, the tuned model and the merged model scored side by side on identical prompts; and
`finetune eval` on any Hugging Face-format model directory, with or without an adapter.

- base: the model as training saw it (4-bit when QLoRA) with the adapter switched off;
- tuned: the same weights with the adapter on (the adapter as trained: one load, the only difference is the adapter);
- merged: RUN/merged/, the 16-bit model that is published, loaded as anyone would load it. It is not the same
  function as `tuned` (the adapter was trained against the 4-bit rounding of the base; a real model's logits moved by
  up to 18-26 between the two), so it is scored on its own, and the publish gate reads the column it publishes.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

from .errors import UserError
from .harness import log_entry, score_items, task_entry, write_report
from .recipe import Recipe
from .run import RunDir, read_jsonl
from .tasks import EvalTask, Item, load_items

log = logging.getLogger("finetune")


def heldout_suite(run: RunDir, recipe: Recipe | None = None, tok=None) -> tuple[EvalTask, list[Item]] | None:
    """The validation split, already tokenised by prepare: response loss exactly as training measured it. With `tok`
    (the base's tokenizer, when the run extended the vocabulary) the rows are encoded again with it, by the same template."""
    path = run.data / "val.jsonl"
    rows = read_jsonl(path)
    if not rows:
        return None
    task = EvalTask(name="heldout", type="perplexity", path=str(path))
    enc = None
    if tok is not None:
        from .templates import row_encoder

        enc = row_encoder(tok, recipe.data.template, recipe.data.system_prompt)

    def encoded(r: dict) -> dict[str, Any]:
        e = enc(r) if enc is not None else None
        ids, labels = (e.input_ids, e.labels) if e is not None else (r["input_ids"], r["labels"])
        return {"input_ids": ids, "labels": labels, "bytes": len(r.get("completion", "").encode("utf-8"))}

    return task, [Item(id=str(r.get("id", i)), prompt="", gold=None, encoded=encoded(r), row=i + 1) for i, r in enumerate(rows)]


def per_byte(suites: list[tuple[EvalTask, list[Item]]]) -> list[tuple[EvalTask, list[Item]]]:
    """Perplexity tasks scored in bits per byte: the comparison when base and tuned read different vocabularies (vocab.py)."""
    return [(t.model_copy(update={"metric": "bits_per_byte"}) if t.type == "perplexity" else t, items) for t, items in suites]


def drop_token_perplexity(entries: list[dict[str, Any]]) -> None:
    """Per-token perplexity of two vocabularies is not comparable: not shown beside bits per byte."""
    for e in entries:
        if e["type"] == "perplexity":
            for col in ("base", "tuned", "sft", "merged"):
                if isinstance(e.get(col), dict):
                    e[col].get("metrics", {}).pop("perplexity", None)


def score_suites(model, tok, suites: list[tuple[EvalTask, list[Item]]], batch_size: int, template: str | None,
                 with_adapter: bool, throughput: dict[str, Any] | None = None,
                 base: tuple[Any, Any, list[tuple[EvalTask, list[Item]]]] | None = None) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict]]]]:
    """Every task for the base (adapter off) and, when there is an adapter, the tuned model. `throughput` gets each
    model's tokens processed and seconds. `base`: (model, tokenizer, suites) of a base scored on its own, when the tuned
    model reads another vocabulary (the suites then differ only in how the held-out rows are tokenised)."""
    from .lm import HFLM

    per_item: dict[str, dict[str, list[dict]]] = {t.name: {} for t, _ in suites}
    speed = throughput if throughput is not None else {}

    def column(m, t, scored: list[tuple[EvalTask, list[Item]]], who: str, desc: str) -> None:
        lm = HFLM(m, t, batch_size, desc=desc)
        for task, items in scored:
            per_item[task.name][who] = score_items(lm, task, items, template)
        speed[desc] = lm.throughput()

    if base is not None:
        column(base[0], base[1], base[2], "base", "base")
        column(model, tok, suites, "tuned", "tuned")
    elif with_adapter:
        with model.disable_adapter():
            column(model, tok, suites, "base", "base")
        column(model, tok, suites, "tuned", "tuned")
    else:
        column(model, tok, suites, "base", "model")
    entries = []
    for task, _ in suites:
        got = per_item[task.name]
        entries.append(task_entry(task, got["base"], got.get("tuned"), "validation split" if task.name == "heldout" else task.source_label))
        log_entry(entries[-1])
    return entries, per_item


def evaluate(recipe: Recipe, recipe_dir: Path, run: RunDir) -> dict[str, Any]:
    from peft import PeftModel

    from . import runbase
    from .models import load_model, load_tokenizer

    tok = runbase.tokenizer(recipe, run)
    quantized = recipe.quantization.bits != 16
    # An extended vocabulary (vocab.py): the base is scored as it is, with its own tokenizer, on the same text; perplexity
    # per token means different things for the two, so those tasks compare bits per byte.
    other_vocab = runbase.extended(run)
    suites = []
    if recipe.eval.heldout and (held := heldout_suite(run)) is not None:
        suites.append(held)
    sampling: dict[str, dict[str, Any]] = {}
    for task in recipe.eval.tasks:
        suites.append((task, load_items(task, recipe_dir, recipe.data.template, tok, recipe.data.system_prompt,
                                        info=sampling.setdefault(task.name, {}))))
    base = base_tok = None
    if other_vocab:
        suites = per_byte(suites)
        base_tok = load_tokenizer(recipe.base_model.id, recipe)
        base_suites = [(t, heldout_suite(run, recipe, base_tok)[1] if t.name == "heldout" and recipe.eval.heldout else items) for t, items in suites]
        base = (load_model(recipe.base_model.id, recipe, quantized=quantized), base_tok, base_suites)
    model, _ = runbase.load(recipe, run, quantized=quantized)
    final = run.final_adapter(recipe.stages)
    model = PeftModel.from_pretrained(model, str(final))
    throughput: dict[str, Any] = {}
    entries, per_item = score_suites(model, tok, suites, recipe.eval.batch_size, recipe.data.template, with_adapter=True,
                                     throughput=throughput, base=base)
    base = None  # the base model's memory goes before the merged model loads
    stage_report: dict[str, Any] = {}
    if final != run.adapter:  # a stage after SFT: the SFT adapter is the middle column, on the same 4-bit base
        from .stage_eval import after_sft_report

        model.load_adapter(str(run.adapter), adapter_name="sft")
        model.set_adapter("sft")
        throughput["sft"] = score_column(model, tok, suites, entries, per_item, recipe.eval.batch_size, recipe.data.template, "sft")
        model.set_adapter("default")
        stage_report = after_sft_report(recipe, run, model, tok)
    del model
    merged = merged_to_score(run)
    if merged is not None:
        _free_memory()
        from .models import DTYPES

        mmodel = load_model(str(merged), recipe, quantized=False, dtype=DTYPES[recipe.merge.dtype])
        throughput["merged"] = score_column(mmodel, tok, suites, entries, per_item, recipe.eval.batch_size, recipe.data.template, "merged")
        del mmodel
    for e in entries:
        if e["name"] in sampling:
            e["sampling"] = sampling[e["name"]]
    if other_vocab:
        drop_token_perplexity(entries)
    for who, t in throughput.items():
        log.info("eval %s: %d tokens in %.1f s (%s tokens/s)", who, t["tokens"], t["seconds"], t["tokens_per_s"])
    report = {"tasks": entries, "throughput": throughput, "stages": list(recipe.stages), **stage_report,
              **({"vocabulary": {"base_tokens": len(base_tok), "tuned_tokens": len(tok),
                                 "compared": "bits_per_byte for perplexity tasks (the tokenizers differ)"}} if other_vocab else {})}
    with run.staged("eval") as tmp:
        write_report(tmp, report, per_item)
    return {"tasks": len(entries), **{f"{e['name']}.{e['metric']}": e["tuned"]["score"] for e in entries}}


def merged_to_score(run: RunDir) -> Path | None:
    """RUN/merged/ when it exists and passed its check (a failed merge is never published, so never scored)."""
    from .artifacts import MergeCheck

    check = MergeCheck.read_if_present(run.merge_check)
    if not (run.merged / "config.json").is_file() or check is None or not check.passed:
        return None
    return run.merged


def score_column(model, tok, suites, entries: list[dict[str, Any]], per_item, batch_size: int, template: str | None,
                 column: str) -> dict[str, Any]:
    """Add a column to each task's entry: `merged` (the published model) or `sft` (the SFT adapter, when a stage came
    after it), with its scores and its paired delta against the base; for `sft` also the tuned model's paired delta
    against it (what the preference or reward stage changed). Returns the column's throughput."""
    from . import metrics
    from .harness import _fmt as fmt
    from .harness import model_scores, note_degenerate
    from .lm import HFLM

    model.eval()
    lm = HFLM(model, tok, batch_size, desc=column)
    for (task, items), entry in zip(suites, entries):
        got = score_items(lm, task, items, template)
        per_item[task.name][column] = got
        base = per_item[task.name]["base"]
        entry[column] = model_scores(task, got)
        entry[f"{column}_delta"] = entry[column]["score"] - entry["base"]["score"]
        entry[f"{column}_delta_ci95"] = metrics.paired_delta_ci(task.metric, base, got)
        if column == "sft":
            tuned = per_item[task.name]["tuned"]
            entry["tuned_vs_sft"] = entry["tuned"]["score"] - entry["sft"]["score"]
            entry["tuned_vs_sft_ci95"] = metrics.paired_delta_ci(task.metric, got, tuned)
        note_degenerate(entry, column)
        log.info("eval %s: %s base %s -> %s %s", task.name, task.metric, fmt(entry["base"]["score"], task.metric), column,
                 fmt(entry[column]["score"], task.metric))
    return lm.throughput()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# `finetune eval MODEL_OR_RUN_DIR --tasks FILE`


def check_model_dir(path: Path) -> str:
    """'model' or 'adapter'; anything else is the user's mistake, said once."""
    if not path.exists():
        raise UserError(f"{path}: not found")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json or adapter_config.json); give a Hugging Face-format "
                        "model folder, a run directory or an adapter folder")
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json: not readable JSON ({e})") from None
    if "model_type" not in cfg:
        raise UserError(f"{path}/config.json has no model_type: not a transformers model")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise UserError(f"{path}: no .safetensors weights (finetune loads safetensors only)")
    return "model"


def _grown_adapter(adapter: Path, model_dir: str, spec) -> bool:
    """An adapter saved with a tokenizer longer than its base's: trained on a grown vocabulary (vocab.py)."""
    if not (adapter / "tokenizer_config.json").is_file():
        return False
    from .models import load_tokenizer

    return len(load_tokenizer(str(adapter), spec)) > len(load_tokenizer(model_dir, spec))


def eval_command(target: Path, tasks_file: Path, adapter: Path | None, out: Path | None, template: str | None,
                 batch_size: int, max_samples: int | None, bits: int) -> Path:
    from . import runbase
    from .models import Loader, load_model, load_tokenizer
    from .tasks import load_task_file

    tasks, tasks_dir = load_task_file(tasks_file)
    run = RunDir(target)
    recipe_template = None
    if run.recipe.exists():  # a run directory: its base (as trained) and its adapter, its template
        recipe, _ = run.load_recipe()
        spec = Loader.of(recipe)
        model_dir = recipe.base_model.id
        adapter = adapter or run.final_adapter(recipe.stages)
        recipe_template, system_prompt = recipe.data.template, recipe.data.system_prompt
        out = out or run.root / f"eval-{tasks_file.stem}"
    else:
        kind = check_model_dir(target)
        if kind == "adapter":
            adapter = adapter or target
            cfg = json.loads((target / "adapter_config.json").read_text(encoding="utf-8"))
            model_dir = cfg.get("base_model_name_or_path") or ""
            if not model_dir:
                raise UserError(f"{target}/adapter_config.json names no base model; pass the base as MODEL and this folder as --adapter")
        else:
            model_dir = str(target)
        spec = Loader.plain(model_dir, "MODEL", bits=bits)
        system_prompt = None
        out = out or Path(f"eval-{target.resolve().name}")
    from data_prep.outputs import check_output, mark

    check_output(Path(out), "eval", "--out", legacy=lambda p: (p / "report.json").is_file(), error=UserError)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
    if template:
        tasks = [t.model_copy(update={"template": template}) for t in tasks]
    if max_samples:
        tasks = [t.model_copy(update={"max_samples": min(max_samples, t.max_samples or max_samples)}) for t in tasks]
    reshaped = run.recipe.exists() and (runbase.extended(run) or recipe.training.method == "block_expansion")
    if not reshaped and adapter is not None and _grown_adapter(Path(adapter), model_dir, spec):
        raise UserError(f"--adapter {adapter}: its tokenizer has more tokens than {model_dir}'s (a grown vocabulary): evaluate the run "
                        "directory it came from (finetune eval RUN_DIR), or its merged model")
    tok = runbase.tokenizer(recipe, run) if reshaped else load_tokenizer(model_dir, spec)
    sampling: dict[str, dict[str, Any]] = {}
    suites = [(t, load_items(t, tasks_dir, recipe_template, tok, system_prompt, info=sampling.setdefault(t.name, {}))) for t in tasks]
    base = None
    if reshaped:  # the run's base as trained (vocabulary grown, blocks added: runbase.py)
        model = runbase.load(recipe, run, quantized=spec.quantization.bits != 16)[0]
        if runbase.extended(run):  # as in the run's own eval: the base as it is, per byte where the tokenizers differ
            suites = per_byte(suites)
            base = (load_model(model_dir, spec, quantized=spec.quantization.bits != 16), load_tokenizer(model_dir, spec), suites)
    else:
        model = load_model(model_dir, spec, quantized=spec.quantization.bits != 16)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    entries, per_item = score_suites(model, tok, suites, batch_size, recipe_template, with_adapter=adapter is not None, base=base)
    for e in entries:
        e["sampling"] = sampling.get(e["name"])
    if base is not None:
        drop_token_perplexity(entries)
    report = {"model": Path(model_dir).name if Path(model_dir).exists() else model_dir,
              "adapter": Path(adapter).name if adapter else None, "tasks": entries}
    mark(Path(out), "eval")
    write_report(Path(out), report, per_item)
    return Path(out)
