"""`finetune run`: the five stages in order, each skipped when already done with the same inputs.

A stage's fingerprint hashes the recipe sections it reads and the hashes of the files it reads, the outputs of the
stages before it included. It is skipped when the manifest has it done with that fingerprint and its outputs are
intact; otherwise it runs. A stage after it reruns when what it reads changed, not merely because an earlier stage
ran (the first design reran every later stage: a new eval then re-merged a 7B model for nothing). `force` names stages to
rerun regardless.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from .recipe import SECRET_ENV, Recipe, redact, resolve_path
from .run import STAGES, RunDir, fingerprint, now, portable, read_json, sha256_file, sha256_json, write_json, write_recipe  # noqa: F401

log = logging.getLogger("finetune")

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
            "huggingface_hub", "tokenizers", "safetensors", "pydantic", "wandb", "datasketch", "pyarrow", "math-verify")


@dataclass
class Context:
    recipe: Recipe  # the effective recipe (after overrides and --smoke)
    recipe_dir: Path
    run: RunDir
    smoke: bool = False
    original_base: str = ""
    force: set[str] = field(default_factory=set)
    raw: Recipe | None = None  # the recipe as written (before --smoke), which holds `samples`
    resume: bool = True  # continue an interrupted training stage from its newest complete checkpoint
    allow_drift: bool = False  # ... even when its recipe sections or input files changed since
    show_example: bool = False  # preflight failures print the offending sample's text (redacted otherwise)
    force_gates: bool = False  # `finetune publish --force`: publish even when a gate says no
    laptop: bool = False  # --laptop: the real small model on a CPU (laptop.py)
    gguf: dict[str, str] | None = None  # a GGUF base: its file name and sha256 (gguf.py), for run.lock and the card


from .errors import UserError  # noqa: E402


class StaleInputs(UserError):
    """A stage would read or publish artifacts of earlier stages that no longer match their inputs (exit 2)."""


class RedactSecrets(logging.Filter):
    """Replace the values of secret environment variables in every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for name in SECRET_ENV:
            val = os.environ.get(name)
            if val and len(val) >= 6 and val in msg:
                msg = msg.replace(val, "***")
        record.msg, record.args = msg, None
        return True


def setup_logging(run: RunDir) -> None:
    run.logs.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("finetune")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_finetune", False):
            logger.removeHandler(h)
            h.close()
    from .distributed import rank

    fh = logging.FileHandler(run.logs / ("run.log" if rank() == 0 else f"run.rank{rank()}.log"), encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("[finetune] %(message)s" if rank() == 0 else f"[finetune rank {rank()}] %(message)s"))
    if rank() != 0:
        sh.setLevel(logging.WARNING)  # the other ranks' INFO lines repeat rank 0's; they stay in logs/run.rankN.log
    sh.addFilter(lambda record: not getattr(record, "file_only", False))  # tracebacks and details: the log file only
    for h in (fh, sh):
        h._finetune = True  # type: ignore[attr-defined]
        h.addFilter(RedactSecrets())
        logger.addHandler(h)
    logger.propagate = False


def _versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_lock(ctx: Context) -> None:
    import torch

    hw: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                          "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    prov = read_json(ctx.run.data / "provenance.json", {})
    write_json(ctx.run.lock, {
        "created": now(), "versions": _versions(), "finetune_git_commit": _git_commit(), "hardware": hw,
        "seed": ctx.recipe.training.seed, "smoke": ctx.smoke, "laptop": ctx.laptop, "base_model": ctx.original_base,
        **({"base_gguf": ctx.gguf} if ctx.gguf else {}),
        "data": {name: sha256_file(ctx.run.data / name) for name in ("train.jsonl", "val.jsonl") if (ctx.run.data / name).exists()},
        "sources": [{k: v for k, v in s.items() if k in ("path", "hub", "revision", "sha256", "license")} for s in prov.get("sources", [])],
    })


# --------------------------------------------------------------------------------------------------
# What each stage reads


def _files(run: RunDir, *paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else ([p] if p.exists() else [])
        for q in files:
            out[str(q.relative_to(run.root)) if q.is_relative_to(run.root) else str(q)] = sha256_file(q)
    return out


def _digest(p: Path) -> str:
    if p.is_dir():
        from data_prep.sources.readers import sha256_folder

        return sha256_folder(sorted(q for q in p.rglob("*") if q.is_file()), p)
    return sha256_file(p) if p.exists() else "missing"


def _base_inputs(ctx: Context) -> dict[str, str]:
    if ctx.smoke:
        return _files(ctx.run, ctx.run.base)
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


def active_stages(recipe: Recipe) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s != "cpt" or "cpt" in recipe.stages)


def stage_inputs(ctx: Context, stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    """What a stage's fingerprint is made of: recipe sections, and file digests keyed by path. The recipe's paths are
    absolute (resolved at load); those under the recipe's folder are spelled `$RECIPE/...` here, so a checkout moved
    with its data keeps its fingerprints and reruns nothing."""
    from .run import swap_prefix

    sections, inputs = _stage_inputs(ctx, stage)
    here = str(Path(ctx.recipe_dir).resolve())

    def swap(obj: Any) -> Any:
        return swap_prefix(obj, here, "$RECIPE", os.sep)

    return swap(sections), {swap(k): v for k, v in inputs.items()}


def _stage_inputs(ctx: Context, stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    r, run = ctx.recipe, ctx.run
    base = r.base_model.model_dump()
    if ctx.smoke:
        base["id"] = "smoke"  # the stand-in's path may move with the run dir; its files are hashed below
    cpt_on = "cpt" in r.stages
    if stage == "prepare":
        # Everything the build reads: sources, id lists, adapter option files, and the eval sets it decontaminates against
        # (their rows, not how they are scored: a prompt file or few-shot split is the eval stage's business).
        paths = [p for t in r.eval.tasks for p in (t.path, t.include_ids, t.exclude_ids) if p]
        sources = list(r.data.sources) + list(r.data.quality.decontaminate.against) + (list(r.cpt.sources) if cpt_on else [])
        for s in sources:
            paths += [p for p in (s.path, s.include_ids, s.exclude_ids) if p]
            paths += [v for k, v in s.options.items() if k.endswith("_file") and isinstance(v, str)]
        src = {p: _digest(resolve_path(ctx.recipe_dir, p)) for p in paths}
        from .tasks import DECONTAMINATION_FIELDS

        sections = {"data": r.data.model_dump(), "eval_tasks": [t.model_dump(include=DECONTAMINATION_FIELDS) for t in r.eval.tasks], "base_model": base,
                    "cpt": r.cpt.model_dump(include={"sources", "block_size", "val_fraction"}) if cpt_on else None, "seed": r.training.seed}
        return sections, {**src, **_base_inputs(ctx)}
    if stage == "cpt":
        # CPT takes its learning rate, length and decay from `cpt:`; changing SFT's does not redo it
        own = {"learning_rate", "num_train_epochs", "max_steps", "weight_decay"}
        sections = {"quantization": r.quantization.model_dump(), "lora": r.lora.model_dump(), "cpt": r.cpt.model_dump(),
                    "training": r.training.model_dump(exclude=own)}
        return {**sections, "base_model": base}, {**_files(run, run.data / "cpt_train.jsonl", run.data / "cpt_val.jsonl"), **_base_inputs(ctx)}
    if stage == "train":
        sections = {k: getattr(r, k).model_dump() for k in ("quantization", "lora", "training")}
        start = _files(run, run.root / "cpt") if cpt_on else {}
        return ({**sections, "base_model": base, "max_length": r.data.max_length, "stages": r.stages},
                {**_files(run, run.data / "train.jsonl", run.data / "val.jsonl"), **start, **_base_inputs(ctx)})
    if stage == "eval":
        tasks = {p: _digest(resolve_path(ctx.recipe_dir, p)) for p in task_files(r.eval.tasks)}
        return ({"eval": r.eval.model_dump(), "base_model": base, "quantization": r.quantization.model_dump(),
                 "template": r.data.template, "system_prompt": r.data.system_prompt},
                {**_files(run, run.adapter, run.data / "val.jsonl", run.merged, run.merge_check), **tasks})
    if stage == "merge":
        return ({"merge": r.merge.model_dump(), "base_model": base, "quantization": r.quantization.model_dump()},
                {**_files(run, run.adapter, run.data / "val.jsonl"), **_base_inputs(ctx)})
    if stage == "publish":
        return ({"publish": r.publish.model_dump(), "name": r.name, "domain": r.domain},
                _files(run, run.adapter, run.merged, run.merge_check, run.eval / "report.json", run.data / "provenance.json"))
    raise ValueError(stage)


def stage_outputs(ctx: Context, stage: str) -> list[Path]:
    run = ctx.run
    return {
        "prepare": [run.data],
        "cpt": [run.root / "cpt"],
        "train": [run.adapter],
        "eval": [run.eval],
        "merge": [run.merged, run.merge_check] if ctx.recipe.merge.enabled else [],
        "publish": [run.card],
    }[stage]


def _publish_target_present(ctx: Context) -> bool:
    to = ctx.recipe.publish.to
    if to and to.startswith("file://"):
        from .publish import latest_revision

        return latest_revision(Path(to.removeprefix("file://")).expanduser()) is not None
    return True


def checkpoint_dir(run: RunDir, stage: str) -> Path:
    return run.checkpoints if stage == "train" else run.root / f"checkpoints-{stage}"


def _parts(sections: dict[str, Any], inputs: dict[str, str]) -> dict[str, str]:
    """Per-part hashes behind a fingerprint, kept in the manifest so a refused resume can say what changed."""
    return {**{f"recipe {k}": sha256_json(v) for k, v in sections.items()}, **{f"file {k}": v for k, v in inputs.items()}}


def resume_point(ctx: Context, stage: str, rec: dict[str, Any] | None, fp: str, parts: dict[str, str]) -> Path | None:
    """The checkpoint an interrupted training stage continues from, or None to start it afresh. Resuming with other
    settings or data than the checkpoint was trained with would silently mix two runs: refused unless --allow-drift."""
    from . import checkpoints
    from .errors import UserError

    if stage not in ("cpt", "train") or not ctx.resume or stage in ctx.force or rec is None or rec.get("status") == "done":
        return None
    last = checkpoints.latest(checkpoint_dir(ctx.run, stage))
    if last is None:
        return None
    if rec.get("fingerprint") != fp and not ctx.allow_drift:
        old = rec.get("parts", {})
        changed = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k)) or ["the stage's inputs"]
        raise UserError(f"{stage}: {last} was written by a run with other inputs (changed: {', '.join(changed[:5])}). "
                        f"Resume from it anyway with --allow-drift, start the stage over with --force {stage}, or undo the change")
    return last


def run_stage(ctx: Context, stage: str, resume_from: Path | None = None) -> Any:
    r, run = ctx.recipe, ctx.run
    if stage == "prepare":
        from .models import load_tokenizer
        from .prepare import prepare

        result = prepare(r, ctx.recipe_dir, run, load_tokenizer(r.base_model.id, r), tokenizer_name=public_base(ctx))
        write_lock(ctx)
        return result
    if stage in ("cpt", "train"):
        from .train import train

        return train(r, run, "cpt" if stage == "cpt" else "sft", resume_from, ctx.show_example)
    if stage == "eval":
        from .evaluate import evaluate

        return evaluate(r, ctx.recipe_dir, run)
    if stage == "merge":
        if not r.merge.enabled:
            return {"skipped": "merge.enabled is false"}
        from .merge import merge

        return merge(r, run)
    if stage == "publish":
        from .publish import publish

        return publish(r, run, public_base(ctx), ctx.smoke, ctx.force_gates)
    raise ValueError(stage)


def public_base(ctx: Context) -> str:
    """The base model as the world knows it (card, published adapter_config.json, data card): a Hub id, never a path."""
    import re

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
    log.warning("base_model.id is the local folder %s: the card and the published adapter name it %r; set base_model.hub_id "
                "to name its Hub id", local, local.name)
    return local.name


def _summary(result: Any) -> Any:
    """Keep small scalars of a stage's result for the manifest."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return None


TRAINING = ("cpt", "train")  # the stages every rank takes part in; rank 0 alone runs the others


def _decide(ctx: Context, stage: str) -> dict[str, Any]:
    """Rank 0's decision for a stage: skip it, or run it (resuming from which checkpoint, with which fingerprint)."""
    run = ctx.run
    sections, inputs = stage_inputs(ctx, stage)
    fp = fingerprint(stage, sections, inputs)
    rec = run.stage_record(stage)
    done = (rec is not None and rec.get("status") == "done" and rec.get("fingerprint") == fp
            and run.outputs_intact(rec) and (stage != "publish" or _publish_target_present(ctx)))
    if done and stage not in ctx.force:
        return {"skip": True}
    parts = _parts(sections, inputs)
    return {"skip": False, "fp": fp, "parts": parts, "resume_from": resume_point(ctx, stage, rec, fp, parts)}


# The earlier stages whose outputs each stage reads (or ships): what must be current before it runs.
READS = {"prepare": (), "cpt": ("prepare",), "train": ("prepare", "cpt"), "merge": ("prepare", "train"), "eval": ("prepare", "train", "merge"),
         "publish": ("prepare", "cpt", "train", "merge", "eval")}


def stale_upstream(ctx: Context, stage: str, decided: set[str]) -> list[str]:
    """The earlier stages whose outputs no longer match their inputs (a re-`prepare` with other data, another recipe
    prepared into this run, an edited adapter): what `stage` would read and ship is stale. Stages decided in this
    invocation are current by construction and are not hashed again."""
    run = ctx.run
    out = []
    for up in [s for s in READS[stage] if s in active_stages(ctx.recipe)]:
        if up in decided:
            continue
        rec = run.stage_record(up)
        if rec is None or rec.get("status") != "done":
            out.append(f"{up} (not done)")
            continue
        sections, inputs = stage_inputs(ctx, up)
        if rec.get("fingerprint") != fingerprint(up, sections, inputs):
            parts, old = _parts(sections, inputs), rec.get("parts", {})
            changed = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k))
            out.append(f"{up} (changed since it ran: {', '.join(changed[:4]) or 'its inputs'})")
        elif not run.outputs_intact(rec):
            out.append(f"{up} (its outputs were modified or removed)")
    return out


def run_stages(ctx: Context, stages: tuple[str, ...] = STAGES, on_event: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run `stages` (a prefix-closed selection of STAGES) with skip/rerun logic; returns stage -> 'ran'|'skipped'.

    With several processes (distributed.py) rank 0 decides and shares its decision, runs the non-training stages
    alone and shares how they ended; every rank trains; only rank 0 writes the manifest."""
    from . import distributed
    from .errors import PublishRefused, StageFailed
    from .preempt import Preempted

    run = ctx.run
    main = distributed.is_main()
    outcome: dict[str, str] = {}
    decided: set[str] = set()
    for stage in stages:
        if stage not in active_stages(ctx.recipe):
            continue
        decision, refused = None, None
        if main:
            try:
                decision = _decide(ctx, stage)
                stale = [] if decision["skip"] else stale_upstream(ctx, stage, decided)
                if stale:
                    raise StaleInputs(f"{stage}: refused, what it would read or ship is out of date: {'; '.join(stale)}. Rerun "
                                      f"from {stale[0].split(' ')[0]} with `finetune run RECIPE` (the run's recipe is {run.recipe})")
                decided.add(stage)  # current now: skipped as unchanged, or about to run
            except Exception as e:  # noqa: BLE001  (shared first, so the other ranks do not wait forever)
                decision, refused = {"error": f"{type(e).__name__}: {e}"}, e
        decision = distributed.share(decision)
        if decision.get("error"):
            raise refused if refused is not None else StageFailed(f"{stage}: rank 0 stopped ({decision['error']})")
        if decision["skip"]:
            outcome[stage] = "skipped"
            log.info("%s: done with the same inputs, skipped", stage, extra={"file_only": bool(on_event)})  # on_event says it on screen
            if on_event:
                on_event(stage, "skipped")
            continue
        resume_from = decision["resume_from"]
        if main:
            run.update_stage(stage, status="running", fingerprint=decision["fp"], parts=decision["parts"], started=now(), ended=None,
                             error=None, outputs={}, resumed_from=str(resume_from.relative_to(run.root)) if resume_from else None)
            _set_status(run, "running")
        t0 = time.time()
        here = main or stage in TRAINING
        error: BaseException | None = None
        result = None
        try:
            if here:
                result = run_stage(ctx, stage, resume_from)
        except BaseException as e:
            error = e
        if stage not in TRAINING:  # the ranks that waited learn how rank 0's stage ended
            ended = distributed.share(None if error is None else type(error).__name__)
            if error is None and ended is not None:
                error = Preempted(f"{stage}: stopped on rank 0") if ended == "Preempted" else StageFailed(f"{stage} failed on rank 0 ({ended})")
        if error is not None:
            status = ("preempted" if isinstance(error, (Preempted, KeyboardInterrupt)) else
                      "refused" if isinstance(error, PublishRefused) else "failed")
            if main:
                try:
                    run.update_stage(stage, status=status, ended=now(), error=f"{type(error).__name__}: {error}"[:2000])
                    _set_status(run, status)
                except OSError as e:  # a full disk fails this write too: the stage's own error is the one to report
                    log.error("%s: could not record the failure in %s (%s)", stage, run.manifest_path, e, extra={"file_only": True})
            raise error
        if main:
            run.update_stage(stage, status="done", ended=now(), seconds=round(time.time() - t0, 3),
                             outputs=run.describe_outputs([p for p in stage_outputs(ctx, stage) if p.exists()]), result=_summary(result))
        outcome[stage] = "ran"
        if on_event:
            on_event(stage, "ran")
    if main:
        _set_status(run, "done")
    return outcome


def _set_status(run: RunDir, status: str) -> None:
    """The run's overall state: running, done, failed, or preempted (stopped on a signal after a clean checkpoint)."""
    m = run.manifest()
    m["status"] = status
    write_json(run.manifest_path, m)


def make_context(recipe_path: str, overrides: list[str], smoke: bool, run_dir: str | None, force: list[str],
                 **options: Any) -> tuple[Context, dict[str, Any]]:
    """Validate everything that can be validated before the run directory is touched."""
    from .errors import UserError
    from .recipe import load_recipe

    recipe, recipe_dir = load_recipe(recipe_path, overrides)
    raw = recipe
    bad = [s for s in force if s not in STAGES]
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], STAGES, n=1)
        raise UserError(f"--force {bad[0]!r}: not a stage ({', '.join(STAGES)})" + (f"; did you mean '{close[0]}'?" if close else ""))
    laptop, data_dir = options.pop("laptop", False), options.pop("data_dir", None)
    if laptop and smoke:
        raise UserError("--smoke and --laptop are two profiles: --smoke checks the wiring with a tiny random model in seconds, "
                        "--laptop trains the real small model in minutes; give one")
    if data_dir and not laptop:
        raise UserError("--data-dir says where --laptop finds the local files of Hub sources; give --laptop with it")
    default = Path("runs") / (recipe.name + ("-smoke" if smoke else "-laptop" if laptop else ""))
    run = RunDir(run_dir or default)
    run.check_ours("--run-dir" if run_dir else "run directory")
    original = recipe.base_model.id
    if smoke:
        from .smoke import smoke_recipe

        recipe = smoke_recipe(recipe, recipe_dir, run, overrides)
    if laptop:
        from .laptop import laptop_recipe

        recipe = laptop_recipe(recipe, recipe_dir, run, overrides, Path(data_dir) if data_dir else None)
        original = recipe.base_model.hub_id or recipe.base_model.id
    gguf_info = None
    from . import gguf

    where = gguf.split(recipe.base_model.id, recipe.base_model.gguf_file)
    if where is not None:
        folder = where[0] if where[0].is_absolute() or not (recipe_dir / where[0]).exists() else recipe_dir / where[0]
        gguf_info = gguf.describe(folder.resolve(), where[1])
        gguf_info["folder"] = str(folder.resolve())
        gguf_info["dtype"] = gguf.dtype_for(recipe.base_model)
        b = recipe.base_model.model_copy(update={"id": str(gguf.converted_dir(gguf_info["sha256"], gguf_info["dtype"])), "gguf_file": None})
        recipe = recipe.model_copy(update={"base_model": b})
    from .recipe import missing_files

    from .hub import check_hub

    required = options.pop("hub_required", True)
    if not smoke:  # --smoke is offline by design
        check_hub(recipe, fail=required)  # one message now, not minutes of retries later
    gone = missing_files(recipe, recipe_dir)
    if gone:
        raise UserError(f"{recipe_path}: {len(gone)} file{'s' if len(gone) > 1 else ''} the recipe names "
                        f"{'are' if len(gone) > 1 else 'is'} not there (paths are relative to the recipe file): " + "; ".join(gone[:5]))
    ctx = Context(recipe, recipe_dir, run, smoke, original, set(force), raw, laptop=laptop, gguf=gguf_info, **options)
    return ctx, recipe.model_dump(mode="json")


def start(ctx: Context, resolved: dict[str, Any]) -> None:
    """First writes into the run directory: logging, the resolved recipe (redacted), the smoke stand-in. With several
    processes rank 0 writes and the others wait for it."""
    from . import distributed

    distributed.init()
    if not distributed.is_main():
        distributed.barrier()  # rank 0 claims the folder first: nothing of ours may be in it before it checks
        setup_logging(ctx.run)
        return
    ctx.run.claim()
    setup_logging(ctx.run)
    header = f"# Resolved recipe{' (--smoke)' if ctx.smoke else ''}, written by finetune {_versions().get('finetune', '')}; secrets redacted.\n"
    write_recipe(ctx.run, portable(redact(resolved), ctx.run.root), header)
    m = ctx.run.manifest()
    m.update({"name": ctx.recipe.name, "smoke": ctx.smoke, "laptop": ctx.laptop, "base_model": ctx.original_base,
              "recipe_dir": str(ctx.recipe_dir), **({"base_gguf": ctx.gguf} if ctx.gguf else {})})
    write_json(ctx.run.manifest_path, m)
    if ctx.gguf:
        from .gguf import convert

        convert(Path(ctx.gguf["folder"]), ctx.gguf["file"], ctx.gguf["sha256"], ctx.gguf["dtype"])
    if ctx.smoke:
        from .smoke import build_base

        build_base(ctx.raw, ctx.recipe_dir, ctx.run, ctx.recipe.base_model.family)
    distributed.barrier()
