"""The stages of a run, each declared once: its name (the recipe's vocabulary, which is also its CLI command and its
`--force` value), the earlier stages whose outputs it reads, what makes its fingerprint, what it writes, when it is
active, whether every rank takes part, where it checkpoints, and the function that runs it.

pipeline.py is a generic runner over STAGES (decide, resume, rank protocol, manifest); cli.py builds the stage
commands and the relaunch from the same list. Adding a stage means writing its module and one declaration here;
tests/test_stages.py checks that every declared input is hashed and every declared output exists after a run.

Importing this module must not import torch: the CLI reads it to build its commands.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .recipe import AFTER_SFT, PREFERENCE_STAGES, Recipe, resolve_path
from .run import RunDir, read_json, sha256_file

if TYPE_CHECKING:
    from .pipeline import Context

Inputs = tuple[dict[str, Any], dict[str, str]]  # recipe sections, and file digests keyed by path


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # one line: the CLI command's help, and the architecture doc's stage table
    reads: tuple[str, ...]  # earlier stages whose outputs it reads or ships: they must be current before it runs
    inputs: Callable[[Context], Inputs]  # what its fingerprint hashes: change any of it and the stage reruns
    outputs: Callable[[Context], list[Path]]  # what it writes (checked intact before a skip)
    run: Callable[[Context, Path | None], Any]  # does the work; gets the checkpoint to resume from, if any
    active: Callable[[Recipe], bool] = lambda recipe: True
    all_ranks: bool = False  # every process takes part (training); rank 0 alone runs the others
    checkpoints: Callable[[RunDir], Path] | None = None  # resumable: where its checkpoints are
    still_done: Callable[[Context], bool] = lambda ctx: True  # beyond fingerprint and outputs (publish: the target has it)
    command: bool = True  # gets the generic `finetune NAME RECIPE` command (eval, merge and publish have richer ones)
    aliases: tuple[str, ...] = ()  # earlier names, still accepted on the command line and in old manifests


# --------------------------------------------------------------------------------------------------
# Helpers the declarations share


def files(run: RunDir, *paths: Path) -> dict[str, str]:
    """Digests of files and folders' files, keyed by their path inside the run (absolute outside it)."""
    out = {}
    for p in paths:
        found = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else ([p] if p.exists() else [])
        for q in found:
            out[str(q.relative_to(run.root)) if q.is_relative_to(run.root) else str(q)] = sha256_file(q)
    return out


def digest(p: Path) -> str:
    if p.is_dir():
        from data_prep.sources.readers import sha256_folder

        return sha256_folder(sorted(q for q in p.rglob("*") if q.is_file()), p)
    return sha256_file(p) if p.exists() else "missing"


def base_section(ctx: Context) -> dict[str, Any]:
    base = ctx.recipe.base_model.model_dump()
    if ctx.smoke:
        base["id"] = "smoke"  # the stand-in's path may move with the run dir; its files are hashed (base_inputs)
    return base


def base_inputs(ctx: Context) -> dict[str, str]:
    if ctx.smoke:
        return files(ctx.run, ctx.run.base)
    b = ctx.recipe.base_model
    return {"base_model": f"{b.id}@{b.revision}"}


def task_files(tasks) -> list[str]:
    """Every local file an eval task reads: its data, prompt file, id lists and few-shot split."""
    out = []
    for t in tasks:
        out += [p for p in (t.path, t.prompt_file, t.include_ids, t.exclude_ids) if p]
        if t.fewshot is not None:
            out += [p for p in (t.fewshot.path, t.fewshot.include_ids, t.fewshot.exclude_ids) if p]
    return out


LATER_FIELDS = ("method", "vocabulary")  # added after runs were fingerprinted: hashed only when set, so those runs stay done


def dump(section, exclude: set[str] | None = None) -> dict[str, Any]:
    d = section.model_dump(exclude=exclude)
    for k in LATER_FIELDS:
        if k in d and d[k] == type(section).model_fields[k].default:
            del d[k]
    return d


def cpt_on(recipe: Recipe) -> bool:
    return "cpt" in recipe.stages


def public_base(ctx: Context) -> str:
    """The base model as the world knows it (card, published adapter_config.json, data card): a Hub id, never a path."""
    b = ctx.recipe.base_model
    if ctx.smoke:
        return f"finetune-smoke/tiny-{b.family}"
    if b.hub_id:
        return b.hub_id
    if ctx.gguf:
        return ctx.gguf["file"]
    local = Path(b.id).expanduser()
    if not local.is_dir():
        return b.id
    named = str(read_json(local / "config.json", {}).get("_name_or_path") or "")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists():
        return named
    logging.getLogger("finetune").warning(
        "base_model.id is the local folder %s: the card and the published adapter name it %r; set base_model.hub_id "
        "to name its Hub id", local, local.name)
    return local.name


# --------------------------------------------------------------------------------------------------
# prepare


def _prepare_inputs(ctx: Context) -> Inputs:
    # Everything the build reads: sources, id lists, adapter option files, and the eval sets it decontaminates against
    # (their rows, not how they are scored: a prompt file or few-shot split is the eval stage's business).
    from .tasks import DECONTAMINATION_FIELDS

    r = ctx.recipe
    paths = [p for t in r.eval.tasks for p in (t.path, t.include_ids, t.exclude_ids) if p]
    pref = r.stages[-1] in PREFERENCE_STAGES
    sources = (list(r.data.sources) + list(r.data.quality.decontaminate.against) + (list(r.cpt.sources) if cpt_on(r) else [])
               + (list(r.preference.sources) if pref else []))
    for s in sources:
        paths += [p for p in (s.path, s.include_ids, s.exclude_ids) if p]
        paths += [v for k, v in s.options.items() if k.endswith("_file") and isinstance(v, str)]
    if cpt_on(r) and r.cpt.vocabulary is not None and r.cpt.vocabulary.tokens_file:  # the listed tokens prepare adds
        paths.append(r.cpt.vocabulary.tokens_file)
    src = {p: digest(resolve_path(ctx.recipe_dir, p)) for p in paths}
    sections = {"data": r.data.model_dump(), "eval_tasks": [t.model_dump(include=DECONTAMINATION_FIELDS) for t in r.eval.tasks],
                "base_model": base_section(ctx), "seed": r.training.seed,
                "cpt": dump(r.cpt, exclude=set(type(r.cpt).model_fields) - {"sources", "block_size", "val_fraction", "vocabulary"})
                if cpt_on(r) else None}
    if pref:  # only when there: a recipe without these stages keeps the fingerprint it had
        sections["preference"] = r.preference.model_dump(include={"sources", "val_fraction", "val_max"})
    if r.stages[-1] == "grpo":
        sections["grpo"] = r.grpo.model_dump(include={"max_prompts", "val_prompts"})
    return sections, {**src, **base_inputs(ctx)}


def _prepare_run(ctx: Context, resume_from: Path | None) -> Any:
    from .models import load_tokenizer
    from .pipeline import write_lock
    from .prepare import prepare

    r = ctx.recipe
    result = prepare(r, ctx.recipe_dir, ctx.run, load_tokenizer(r.base_model.id, r), tokenizer_name=public_base(ctx))
    write_lock(ctx)
    return result


# --------------------------------------------------------------------------------------------------
# cpt and sft: the training stages


def _cpt_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    own = {"learning_rate", "num_train_epochs", "max_steps", "weight_decay"}  # CPT takes these from `cpt:`, not `training:`
    sections = {"quantization": r.quantization.model_dump(), "lora": r.lora.model_dump(), "cpt": dump(r.cpt),
                "training": dump(r.training, exclude=own), "base_model": base_section(ctx)}
    if r.expand is not None:
        sections["expand"] = r.expand.model_dump()
    return sections, {**files(run, run.rows("cpt", "train"), run.rows("cpt", "val"), run.tokenizer), **base_inputs(ctx)}


def _sft_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    sections = {k: dump(getattr(r, k)) for k in ("quantization", "lora", "training")}
    if r.expand is not None:  # only when there: recipes without it keep their fingerprints
        sections["expand"] = r.expand.model_dump()
    start = files(run, run.cpt) if cpt_on(r) else {}
    # the stages up to sft: adding a stage after it (dpo, grpo ...) to a finished run does not retrain SFT
    upto_sft = r.stages[: r.stages.index("sft") + 1]
    return ({**sections, "base_model": base_section(ctx), "max_length": r.data.max_length, "stages": upto_sft},
            {**files(run, run.rows("sft", "train"), run.rows("sft", "val"), run.tokenizer), **start, **base_inputs(ctx)})


def _after_sft_inputs(stage: str) -> Callable[[Context], Inputs]:
    def inputs(ctx: Context) -> Inputs:
        r, run = ctx.recipe, ctx.run
        own = r.grpo if stage == "grpo" else r.preference
        sections = {k: dump(getattr(r, k)) for k in ("quantization", "lora", "training")}
        sections.update({stage: own.model_dump(exclude={"sources", "val_fraction", "val_max", "max_prompts", "val_prompts"}),
                         "base_model": base_section(ctx), "max_length": r.data.max_length, "template": r.data.template})
        return sections, {**files(run, run.rows(stage, "train"), run.rows(stage, "val"), run.adapter), **base_inputs(ctx)}

    return inputs


def final(ctx: Context) -> Path:
    """The adapter the run ships: the last training stage's."""
    return ctx.run.final_adapter(ctx.recipe.stages)


def _trainer(stage: str) -> Callable[[Context, Path | None], Any]:
    def run(ctx: Context, resume_from: Path | None) -> Any:
        from .train import train

        return train(ctx.recipe, ctx.run, stage, resume_from, ctx.show_example)

    return run


# --------------------------------------------------------------------------------------------------
# merge, eval, publish


def _merge_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    return ({"merge": r.merge.model_dump(), "base_model": base_section(ctx), "quantization": r.quantization.model_dump(),
             **({"expand": r.expand.model_dump()} if r.expand else {})},
            # probes: the validation rows, topped up from the training rows when there are fewer (merge.probe_rows)
            {**files(run, final(ctx), run.data / "val.jsonl", run.data / "train.jsonl", run.tokenizer), **base_inputs(ctx)})


def _merge_run(ctx: Context, resume_from: Path | None) -> Any:
    if not ctx.recipe.merge.enabled:
        return {"skipped": "merge.enabled is false"}
    from .merge import merge

    return merge(ctx.recipe, ctx.run)


def _export_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    return ({"export": r.export.model_dump(), "name": r.name, "template": r.data.template, "system_prompt": r.data.system_prompt,
             "merge_probes": r.merge.probes, "eval_tasks": [t.model_dump(mode="json") for t in r.eval.tasks]},
            files(run, run.merged, run.merge_check, run.data / "val.jsonl", run.data / "train.jsonl"))


def _export_run(ctx: Context, resume_from: Path | None) -> Any:
    from .export import export

    return {dtype: export(ctx.run.root, "gguf", dtype)["file"] for dtype in ctx.recipe.export.gguf}


def _eval_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    tasks = {p: digest(resolve_path(ctx.recipe_dir, p)) for p in task_files(r.eval.tasks)}
    return ({"eval": r.eval.model_dump(), "base_model": base_section(ctx), "quantization": r.quantization.model_dump(),
             "template": r.data.template, "system_prompt": r.data.system_prompt},
            {**files(run, run.adapter, final(ctx), run.data / "val.jsonl", run.rows(r.stages[-1], "val"), run.merged, run.merge_check,
                     run.tokenizer),
             **tasks, **base_inputs(ctx)})


def _eval_run(ctx: Context, resume_from: Path | None) -> Any:
    from .evaluate import evaluate

    return evaluate(ctx.recipe, ctx.recipe_dir, ctx.run)


def _card_inputs(ctx: Context) -> Inputs:
    # The card shows most of the recipe (training settings, template, licence, publish target) and the run's records.
    run = ctx.run
    return ({"recipe": ctx.recipe.model_dump(mode="json"), "base_name": public_base(ctx), "smoke": ctx.smoke},
            files(run, run.data / "provenance.json", run.eval / "report.json", run.merge_check, run.adapter / "training_summary.json",
                  final(ctx) / "training_summary.json",
                  run.lock, run.root / "export" / "export_check.json"))


def _card_run(ctx: Context, resume_from: Path | None) -> Any:
    from .card import write_card

    return {"card": str(write_card(ctx.recipe, ctx.run, public_base(ctx), ctx.smoke).relative_to(ctx.run.root))}


def _publish_inputs(ctx: Context) -> Inputs:
    r, run = ctx.recipe, ctx.run
    return ({"publish": r.publish.model_dump(), "name": r.name, "domain": r.domain},
            files(run, final(ctx), run.merged, run.merge_check, run.eval / "report.json", run.data / "provenance.json", run.card, run.lock,
                  run.root / "export"))


def _publish_run(ctx: Context, resume_from: Path | None) -> Any:
    from .publish import publish

    return publish(ctx.recipe, ctx.run, public_base(ctx), ctx.smoke, ctx.force_gates)


def _publish_target_present(ctx: Context) -> bool:
    """A file:// target someone emptied: publish again, although nothing of ours changed."""
    to = ctx.recipe.publish.to
    if to and to.startswith("file://"):
        from .publish import latest_revision

        return latest_revision(Path(to.removeprefix("file://")).expanduser()) is not None
    return True


# --------------------------------------------------------------------------------------------------
# The list, in run order. cpt runs only when the recipe's stages have it, export only when export.gguf names a type.
# eval comes after merge: what is published (the merged model) is what is evaluated, beside the adapter as trained.

STAGES: tuple[Stage, ...] = (
    Stage("prepare", "Build the instruction set: RUN/data/{train,val,rejects}.jsonl, provenance.json, datacard.md.",
          reads=(), inputs=_prepare_inputs, outputs=lambda ctx: [ctx.run.data], run=_prepare_run),
    Stage("cpt", "Continued pretraining on the recipe's raw text (when its stages are [cpt, sft]; runs prepare first).",
          reads=("prepare",), inputs=_cpt_inputs, outputs=lambda ctx: [ctx.run.cpt], run=_trainer("cpt"),
          active=cpt_on, all_ranks=True, checkpoints=lambda run: run.cpt_checkpoints),
    Stage("sft", "Train the adapter on the instruction set (runs the stages before it if they are not done).",
          reads=("prepare", "cpt"), inputs=_sft_inputs, outputs=lambda ctx: [ctx.run.adapter], run=_trainer("sft"),
          all_ranks=True, checkpoints=lambda run: run.checkpoints, aliases=("train",)),
    *(Stage(name, f"{what} (when the recipe's stages end with {name}; runs the stages before it if they are not done).",
            reads=("prepare", "cpt", "sft"), inputs=_after_sft_inputs(name), outputs=lambda ctx, n=name: [ctx.run.stage_adapter(n)],
            run=_trainer(name), active=lambda recipe, n=name: recipe.stages[-1] == n, all_ranks=True,
            checkpoints=lambda run, n=name: run.stage_checkpoints(n))
      for name, what in (("dpo", "Train the SFT adapter further on preference pairs with DPO, the SFT policy as reference"),
                         ("orpo", "Train the SFT adapter further on preference pairs with ORPO (no reference model)"),
                         ("kto", "Train the SFT adapter further on preference pairs with KTO, the SFT policy as reference"),
                         ("grpo", "Train the SFT adapter further with GRPO on verifiable rewards (grpo.rewards)"))),
    Stage("merge", "Merge the adapter into the 16-bit base and verify the merged model against the adapter.",
          reads=("prepare", "sft", *AFTER_SFT), inputs=_merge_inputs, run=_merge_run, command=False,
          outputs=lambda ctx: [ctx.run.merged, ctx.run.merge_check] if ctx.recipe.merge.enabled else []),
    Stage("export", "Write the merged model as GGUF files (export.gguf) with Ollama Modelfiles, each verified against the merged model.",
          reads=("prepare", "sft", *AFTER_SFT, "merge"), inputs=_export_inputs, outputs=lambda ctx: [ctx.run.root / "export"], run=_export_run,
          active=lambda recipe: bool(recipe.export.gguf), command=False),
    Stage("eval", "Evaluate base and tuned (adapter and merged) side by side on the recipe's tasks.",
          reads=("prepare", "sft", *AFTER_SFT, "merge"), inputs=_eval_inputs, outputs=lambda ctx: [ctx.run.eval], run=_eval_run,
          command=False),
    Stage("card", "Write the model card (card/README.md) from the run's records: eval table, data provenance, merge check, "
          "licence. Read it before you publish.", reads=("prepare", "cpt", "sft", *AFTER_SFT, "merge", "export", "eval"), inputs=_card_inputs,
          outputs=lambda ctx: [ctx.run.card], run=_card_run),
    Stage("publish", "Publish the adapter (and merged model) with its card behind the gates.",
          reads=("prepare", "cpt", "sft", *AFTER_SFT, "merge", "export", "eval", "card"), inputs=_publish_inputs, outputs=lambda ctx: [],
          run=_publish_run, still_done=_publish_target_present, command=False),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
ALIASES: dict[str, str] = {a: s.name for s in STAGES for a in s.aliases}


def get(name: str) -> Stage:
    return next(s for s in STAGES if s.name == ALIASES.get(name, name))


def canonical(name: str) -> str:
    """A stage's name from a name or an alias (`train` -> `sft`); unknown names are returned unchanged."""
    return ALIASES.get(name, name)


def active(recipe: Recipe) -> tuple[str, ...]:
    return tuple(s.name for s in STAGES if s.active(recipe))


def upto(name: str) -> tuple[str, ...]:
    """The stages up to and including `name`, in run order."""
    return NAMES[: NAMES.index(canonical(name)) + 1]
