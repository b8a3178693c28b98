"""`finetune run`: the stages of stages.py in order, each skipped when already done with the same inputs.

A stage's fingerprint hashes the recipe sections it reads and the hashes of the files it reads, the outputs of the
stages before it included. It is skipped when the manifest has it done with that fingerprint and its outputs are
intact; otherwise it runs. A stage after it reruns when what it reads changed, not merely because an earlier stage
ran (the first design reran every later stage: a new eval then re-merged a 7B model for nothing). `force` names stages to
rerun regardless.
"""

from __future__ import annotations

import difflib
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

from . import stages
from .recipe import SECRET_ENV, Recipe, redact
from .run import RunDir, fingerprint, now, portable, read_json, sha256_file, sha256_json, swap_prefix, write_json, write_recipe

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
# The generic runner over stages.STAGES


def active_stages(recipe: Recipe) -> tuple[str, ...]:
    return stages.active(recipe)


def stage_inputs(ctx: Context, stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    """What a stage's fingerprint is made of (its declaration's `inputs`). The recipe's paths are absolute (resolved at
    load); those under the recipe's folder are spelled `$RECIPE/...` here, so a checkout moved with its data keeps its
    fingerprints and reruns nothing."""
    sections, inputs = stages.get(stage).inputs(ctx)
    here = str(Path(ctx.recipe_dir).resolve())

    def swap(obj: Any) -> Any:
        return swap_prefix(obj, here, "$RECIPE", os.sep)

    return swap(sections), {swap(k): v for k, v in inputs.items()}


def _parts(sections: dict[str, Any], inputs: dict[str, str]) -> dict[str, str]:
    """Per-part hashes behind a fingerprint, kept in the manifest so a refused resume can say what changed."""
    return {**{f"recipe {k}": sha256_json(v) for k, v in sections.items()}, **{f"file {k}": v for k, v in inputs.items()}}


def resume_point(ctx: Context, stage: str, rec: dict[str, Any] | None, fp: str, parts: dict[str, str]) -> Path | None:
    """The checkpoint an interrupted training stage continues from, or None to start it afresh. Resuming with other
    settings or data than the checkpoint was trained with would silently mix two runs: refused unless --allow-drift."""
    from . import checkpoints
    from .errors import UserError

    where = stages.get(stage).checkpoints
    if where is None or not ctx.resume or stage in ctx.force or rec is None or rec.get("status") == "done":
        return None
    last = checkpoints.latest(where(ctx.run))
    if last is None:
        return None
    if rec.get("fingerprint") != fp and not ctx.allow_drift:
        old = rec.get("parts", {})
        changed = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k)) or ["the stage's inputs"]
        raise UserError(f"{stage}: {last} was written by a run with other inputs (changed: {', '.join(changed[:5])}). "
                        f"Resume from it anyway with --allow-drift, start the stage over with --force {stage}, or undo the change")
    return last


def run_stage(ctx: Context, stage: str, resume_from: Path | None = None) -> Any:
    return stages.get(stage).run(ctx, resume_from)


def _summary(result: Any) -> Any:
    """Keep small scalars of a stage's result for the manifest."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return None


def _decide(ctx: Context, stage: str) -> dict[str, Any]:
    """Rank 0's decision for a stage: skip it, or run it (resuming from which checkpoint, with which fingerprint)."""
    run = ctx.run
    sections, inputs = stage_inputs(ctx, stage)
    fp = fingerprint(stage, sections, inputs)
    rec = run.stage_record(stage)
    done = (rec is not None and rec.get("status") == "done" and rec.get("fingerprint") == fp
            and run.outputs_intact(rec) and stages.get(stage).still_done(ctx))
    if done and stage not in ctx.force:
        return {"skip": True}
    parts = _parts(sections, inputs)
    return {"skip": False, "fp": fp, "parts": parts, "resume_from": resume_point(ctx, stage, rec, fp, parts)}


def stale_upstream(ctx: Context, stage: str, decided: set[str]) -> list[str]:
    """The earlier stages whose outputs no longer match their inputs (a re-`prepare` with other data, another recipe
    prepared into this run, an edited adapter): what `stage` would read and ship is stale. Stages decided in this
    invocation are current by construction and are not hashed again."""
    run = ctx.run
    out = []
    for up in [s for s in stages.get(stage).reads if s in active_stages(ctx.recipe)]:
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


def run_stages(ctx: Context, selected: tuple[str, ...] = stages.NAMES, on_event: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run `selected` (a prefix-closed selection of stages.NAMES) with skip/rerun logic; returns stage -> 'ran'|'skipped'.

    With several processes (distributed.py) rank 0 decides and shares its decision, runs the non-training stages
    alone and shares how they ended; every rank trains; only rank 0 writes the manifest."""
    from . import distributed
    from .errors import PublishRefused, StageFailed
    from .preempt import Preempted

    run = ctx.run
    main = distributed.is_main()
    outcome: dict[str, str] = {}
    decided: set[str] = set()
    for stage in map(stages.canonical, selected):
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
        all_ranks = stages.get(stage).all_ranks
        here = main or all_ranks
        error: BaseException | None = None
        result = None
        try:
            if here:
                result = run_stage(ctx, stage, resume_from)
        except BaseException as e:
            error = e
        if not all_ranks:  # the ranks that waited learn how rank 0's stage ended
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
                             outputs=run.describe_outputs([p for p in stages.get(stage).outputs(ctx) if p.exists()]), result=_summary(result))
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
    force = [stages.canonical(s) for s in force]
    bad = [s for s in force if s not in stages.NAMES]
    if bad:
        close = difflib.get_close_matches(bad[0], stages.NAMES, n=1)
        raise UserError(f"--force {bad[0]!r}: not a stage ({', '.join(stages.NAMES)})" + (f"; did you mean '{close[0]}'?" if close else ""))
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
    from .hub import check_hub
    from .recipe_paths import missing_files

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
