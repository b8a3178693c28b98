"""The `finetune` command line: parse, then call stage functions. Importing it must not import torch.

Exit codes (README.md, docs/architecture.md): 0 success; 1 runtime failure; 2 bad usage, recipe or data; 3 publish refused by a gate.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import importlib.util
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from data_prep.errors import FinetuneError

from .errors import UserError
from .preempt import Preempted
from .stages import NAMES as STAGE_NAMES


def _plain_types() -> None:
    """typer 0.29 prints each option's Python type in help (`--set <list[str]>`, `--smoke <bool>`) and, with rich markup
    on, eats `[cpt, sft]` from docstrings as a style tag. Show click's plain metavars (PATH, N, TEXT, or the option's
    own metavar) and no markup instead."""
    import typer.core as core

    def display_type(self, ctx):
        if isinstance(self, core.TyperArgument):
            return None  # an argument is shown by its name (RECIPE), not twice
        desc = self.type_descriptor
        if desc.is_path:
            return "PATH"
        element = desc.annotation if not desc.is_list else (getattr(desc.annotation, "__args__", (str,)) or (str,))[0]
        return {int: "N", float: "NUMBER"}.get(element, "TEXT")

    def usage_name(self) -> str:  # `finetune cpt RECIPE`, as click and the README write it (typer: `{recipe}`)
        name = self.display_name_raw.strip("[]")
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    core._TyperParameter.display_type = display_type
    core.TyperArgument._usage_display_name = usage_name


_plain_types()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Turn a YAML recipe into a published domain specialist: prepare, train, eval, merge, publish.")

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file (see `finetune schema`).")]
SmokeOpt = Annotated[bool, typer.Option("--smoke", help="Tiny stand-in model and sample data: the whole pipeline on a CPU in minutes, offline.")]
LaptopOpt = Annotated[bool, typer.Option("--laptop", help="The real small model (SmolLM2-135M-Instruct) through every stage on a CPU: "
                                         "the recipe's pipeline, template and tasks, sized to about 15 minutes on 2 cores.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", metavar="DIR", help="With --laptop: where the `local:` files of the "
                                                   "recipe's Hub sources and tasks are (default: the recipe's folder).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                    help="Override a recipe value: --set training.learning_rate=1e-4 (repeatable).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", metavar="DIR", help="Run directory (default runs/<name>/, runs/<name>-smoke/ "
                                                  "with --smoke, runs/<name>-laptop/ with --laptop).")]
ForceOpt = Annotated[Optional[list[str]], typer.Option("--force", metavar="STAGE",
                                                      help="Rerun this stage even if it is done (repeatable): " + ", ".join(STAGE_NAMES) + ".")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Skip stages done with the same inputs and continue an interrupted "
                                         "training from its newest complete checkpoint (default); --no-resume starts training over.")]
DriftOpt = Annotated[bool, typer.Option("--allow-drift", help="Resume a training whose recipe or data changed since its checkpoint "
                                        "(refused otherwise).")]
ShowOpt = Annotated[bool, typer.Option("--show-example", help="Print the text of a training sample that fails the preflight "
                                       "(redacted to token counts otherwise: training data may be confidential).")]


def _fail(e: BaseException | str, code: int) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    _traceback_if_debug()
    raise typer.Exit(code)


def _traceback_if_debug() -> None:
    if os.environ.get("FINETUNE_DEBUG") == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc()


def _log_file(message: str) -> str | None:
    """Write to the run's log file only (not the terminal); return its path, if a run log is open."""
    logger = logging.getLogger("finetune")
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if files:
        logger.error(message, extra={"file_only": True})
        return files[0].baseFilename
    return None


# errno -> (what to say, exit code). A path problem the user can fix is bad usage (2); the machine failing is 1.
OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space, or use a run directory on a larger disk, then run the same "
                   "command again: finished stages are kept", 1),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, then run the same command again", 1),
    errno.EACCES: ("permission denied", "choose a folder you can write to (--run-dir, --out, --to), or fix its permissions", 2),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to (--run-dir, --out, --to)", 2),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system (--run-dir, --out, --to)", 2),
    errno.ENOTDIR: ("a file stands where a folder is needed", "give a folder path", 2),
    errno.EISDIR: ("a folder stands where a file is needed", "give a file path", 2),
    errno.ENOENT: ("no such file or folder", "check the path", 2),
    errno.EEXIST: ("already exists", "give a new path", 2),
}


def guard(fn):
    """Map failures to exit codes with one line each. Ours (UserError, DataError, ...) carry their code; an OSError
    names its path and what to do; anything else is a bug: one line here, the traceback in RUN/logs/run.log (and on
    the terminal with `finetune --debug ...`)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Preempted as e:  # a clean stop, not an error
            typer.secho(f"stopped: {e}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(e.exit_code) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None
        except FinetuneError as e:  # ours, each with its exit code (data_prep/errors.py)
            _fail(e, e.exit_code)
        except OSError as e:
            what, todo, code = OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "", 1))
            where = f"{e.filename}: " if e.filename else ""
            logged = _log_file(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            _fail(f"{where}{what}" + (f"; {todo}" if todo else "") + (f" (details in {logged})" if logged and code == 1 else ""), code)
        except Exception as e:  # noqa: BLE001
            logged = _log_file(f"failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            first = (str(e).splitlines() or [""])[0][:300]
            _fail(f"{type(e).__name__}: {first} (unexpected: the traceback is in {logged or 'the output of `finetune --debug ...`'}; "
                  "please report it)", 1)

    return wrapper


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of a failure (it is always in RUN/logs/run.log).")] = False) -> None:
    if debug:
        os.environ["FINETUNE_DEBUG"] = "1"


def _quiet_libraries() -> None:
    """Fewer progress bars and notices from the libraries; our own log says what happens."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' rename notices, not the user's business
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


@dataclass
class RunOptions:
    """How `finetune run` and the stage commands were invoked: read once from the command line, turned back into one
    (`argv`) for the torchrun relaunch, so an option added here cannot be lost on the way to the other processes."""

    recipe: Path
    smoke: bool = False
    laptop: bool = False
    data_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    force: list[str] = field(default_factory=list)
    resume: bool = True
    allow_drift: bool = False
    show_example: bool = False
    gpus: int | None = None
    nodes: int | None = None
    node_rank: int = 0
    main_address: str | None = None

    def argv(self, command: str, run_dir: Path) -> list[str]:
        """The same command for each process torchrun starts (without the scale options: they are torchrun's now)."""
        return [command, str(self.recipe), *(["--smoke"] if self.smoke else []), *(["--laptop"] if self.laptop else []),
                *(["--data-dir", str(self.data_dir)] if self.data_dir else []),
                *[a for o in self.overrides for a in ("--set", o)], "--run-dir", str(run_dir),
                *[a for s in self.force for a in ("--force", s)], *([] if self.resume else ["--no-resume"]),
                *(["--allow-drift"] if self.allow_drift else []), *(["--show-example"] if self.show_example else [])]


def _run(command: str, opts: RunOptions) -> None:
    """Run the stages up to `command`'s (all of them for `run`)."""
    from . import stages
    from .pipeline import make_context

    selected = stages.NAMES if command == "run" else stages.upto(command)
    ctx, resolved = make_context(str(opts.recipe), opts.overrides, opts.smoke, str(opts.run_dir) if opts.run_dir else None,
                                 opts.force, resume=opts.resume, allow_drift=opts.allow_drift, show_example=opts.show_example,
                                 laptop=opts.laptop, data_dir=str(opts.data_dir) if opts.data_dir else None)
    target = stages.get(selected[-1])
    if not target.active(ctx.recipe):
        raise UserError(f"finetune {command}: {opts.recipe} has no {target.name} stage (stages: [{', '.join(ctx.recipe.stages)}]); "
                        f"add it with --set 'stages=[{target.name}, sft]'" if target.name == "cpt" else
                        f"finetune {command}: the recipe does not run the {target.name} stage")
    nodes = opts.nodes or ctx.recipe.distributed.nodes
    if not opts.node_rank < nodes:
        raise UserError(f"--node-rank {opts.node_rank}: node ranks run from 0 to --nodes - 1 ({nodes - 1}); this one would wait forever")

    from .runlock import exclusive

    # Node rank 0 holds the lock for the whole job; other nodes may share its file system.
    with exclusive(ctx.run.root) if not opts.node_rank else contextlib.nullcontext():
        _run_locked(ctx, resolved, command, selected, opts)


def _run_locked(ctx, resolved, command: str, selected: tuple[str, ...], opts: RunOptions) -> None:
    from . import distributed, stages
    from .pipeline import run_stages, start
    from .preempt import handling

    d = ctx.recipe.distributed
    gpus, nodes = opts.gpus or d.gpus, opts.nodes or d.nodes
    trains = any(stages.get(s).all_ranks and stages.get(s).active(ctx.recipe) for s in selected)
    if (gpus > 1 or nodes > 1) and trains and not distributed.active():
        _relaunch(ctx, opts.argv(command, ctx.run.root), gpus, nodes, opts.node_rank, opts.main_address, d.main_port)
        return
    _quiet_libraries()

    def event(stage, what):
        if distributed.is_main():  # one line per stage, not one per process
            colour = typer.colors.GREEN if what == "ran" else typer.colors.BLUE
            typer.secho(f"{stage:8s} {what}", fg=colour, err=True)

    with handling():
        start(ctx, resolved)
        run_stages(ctx, selected, on_event=event)
    if not distributed.active():  # under --gpus the launching process says it, once
        typer.echo(str(ctx.run.root))


def _relaunch(ctx, argv: list[str], gpus: int, nodes: int, node_rank: int, main_address: str | None, port: int) -> None:
    """Start `gpus` processes on this machine through torchrun; exit as the run ended (read from its manifest, since
    torchrun reports any failed rank as 1)."""
    import torch

    from . import distributed

    strategy = ctx.recipe.distributed.strategy
    if strategy != "ddp" and not torch.cuda.is_available():
        raise UserError(f"distributed.strategy {strategy!r} needs CUDA GPUs; on CPU use ddp (gloo)")
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("distributed.strategy deepspeed: DeepSpeed is not installed (pip install deepspeed, built for your CUDA)")
    try:
        cmd = distributed.launch_command(argv, gpus, nodes, node_rank, main_address, port)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.secho(f"launching {gpus} process{'es' if gpus > 1 else ''} x {nodes} node{'s' if nodes > 1 else ''} "
                f"({ctx.recipe.distributed.strategy}{'' if torch.cuda.is_available() else ', CPU over gloo'})", err=True)
    rc = distributed.launch(cmd, dict(os.environ))
    status = ctx.run.manifest().get("status")
    if rc == 0 and status == "done":
        typer.echo(str(ctx.run.root))
        return
    code = {"preempted": 143, "refused": 3}.get(status, 1 if rc else 0)
    raise typer.Exit(code)


GpusOpt = Annotated[Optional[int], typer.Option("--gpus", min=1, help="Processes on this machine, one per GPU (CPU processes over gloo without CUDA).")]
NodesOpt = Annotated[Optional[int], typer.Option("--nodes", min=1, help="Machines taking part (run the same command on each).")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, help="This machine's rank, 0 to nodes-1.")]
MainOpt = Annotated[Optional[str], typer.Option("--main-address", metavar="HOST", help="Host of node rank 0 (multi-node).")]


@app.command()
@guard
def run(recipe: RecipeArg, smoke: SmokeOpt = False, laptop: LaptopOpt = False, data_dir: DataDirOpt = None, set_: SetOpt = None,
        run_dir: RunDirOpt = None, force: ForceOpt = None,
        resume: ResumeOpt = True, allow_drift: DriftOpt = False, show_example: ShowOpt = False, gpus: GpusOpt = None,
        nodes: NodesOpt = None, node_rank: NodeRankOpt = 0, main_address: MainOpt = None) -> None:
    """Run every stage: prepare, [cpt], sft, merge, eval, card, publish. Stages done with the same inputs are skipped.

    SIGTERM or Ctrl-C during training finishes the step, writes a checkpoint and exits 143; the same command continues."""
    _run("run", RunOptions(recipe, smoke, laptop, data_dir, set_ or [], run_dir, force or [], resume, allow_drift, show_example,
                           gpus, nodes, node_rank, main_address))


def _stage_command(name: str, doc: str, trains: bool) -> None:
    """`finetune NAME RECIPE`: the stages up to NAME. A command that reaches a training stage takes `run`'s options;
    one that does not (prepare) only those that apply to it."""
    def training_command(recipe: RecipeArg, smoke: SmokeOpt = False, laptop: LaptopOpt = False, data_dir: DataDirOpt = None,
                         set_: SetOpt = None, run_dir: RunDirOpt = None, force: ForceOpt = None,
                         resume: ResumeOpt = True, allow_drift: DriftOpt = False, show_example: ShowOpt = False, gpus: GpusOpt = None,
                         nodes: NodesOpt = None, node_rank: NodeRankOpt = 0, main_address: MainOpt = None) -> None:
        _run(name, RunOptions(recipe, smoke, laptop, data_dir, set_ or [], run_dir, force or [], resume, allow_drift, show_example,
                              gpus, nodes, node_rank, main_address))

    def command(recipe: RecipeArg, smoke: SmokeOpt = False, laptop: LaptopOpt = False, data_dir: DataDirOpt = None,
                set_: SetOpt = None, run_dir: RunDirOpt = None, force: ForceOpt = None) -> None:
        _run(name, RunOptions(recipe, smoke, laptop, data_dir, set_ or [], run_dir, force or []))

    chosen = training_command if trains else command
    chosen.__doc__ = doc
    app.command(name=name)(guard(chosen))


def _stage_commands() -> None:
    """One command per declared stage (finetune/stages.py) that has no richer command of its own, and one per alias."""
    from . import stages

    for s in stages.STAGES:
        if s.command:
            trains = any(stages.get(u).all_ranks for u in stages.upto(s.name))
            _stage_command(s.name, s.help, trains)
            for alias in s.aliases:
                _stage_command(alias, f"Same as `finetune {s.name}` (its earlier name). " + s.help, trains)


_stage_commands()


@app.command()
@guard
def merge(recipe: Annotated[Optional[Path], typer.Argument(metavar="[RECIPE]",
                                                           help="Recipe YAML: merge its run's adapter (runs earlier stages if needed).")] = None,
          smoke: SmokeOpt = False, laptop: LaptopOpt = False, data_dir: DataDirOpt = None, set_: SetOpt = None,
          run_dir: RunDirOpt = None, force: ForceOpt = None,
          base: Annotated[Optional[str], typer.Option("--base", metavar="MODEL", help="Without a recipe: the base model the adapters were trained on.")] = None,
          adapters: Annotated[Optional[list[str]], typer.Option("--adapters", metavar="DIR[,DIR...]",
                                                                help="Adapter folders to combine (repeat, or comma-separated).")] = None,
          method: Annotated[str, typer.Option("--method", metavar="METHOD", help="linear, ties, dare_ties, dare_linear or cat.")] = "linear",
          weights: Annotated[Optional[str], typer.Option("--weights", metavar="W[,W...]",
                                                         help="One weight per adapter, comma-separated (default: equal, summing to 1).")] = None,
          density: Annotated[float, typer.Option("--density", help="ties/dare: share of each adapter's weights kept.")] = 0.5,
          seed: Annotated[int, typer.Option("--seed", help="dare: seed of the random drop.")] = 0,
          fold: Annotated[bool, typer.Option("--fold", help="Also fold the combination into the base: OUT/merged/, verified.")] = False,
          out: Annotated[Optional[Path], typer.Option("--out", help="Output folder of a combination.")] = None) -> None:
    """Merge a run's adapter into its 16-bit base and verify it, or combine several adapters (--base, --adapters, --out)."""
    if adapters or base:
        if recipe is not None:
            raise UserError("give either a RECIPE (merge its run) or --base/--adapters/--out (combine adapters), not both")
        if not (base and adapters and out):
            raise UserError("combining adapters needs --base MODEL, --adapters A --adapters B ... and --out DIR")
        from data_prep.outputs import check_output

        check_output(out, "combination", "--out", legacy=lambda p: (p / "merge_check.json").is_file(), error=UserError)
        paths = [Path(a) for item in adapters for a in item.split(",") if a]
        try:
            ws = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise UserError(f"--weights {weights!r}: numbers separated by commas, e.g. 0.6,0.4") from None
        from .combine import check_inputs, combine

        check_inputs(base, paths, method, ws or [1.0 / len(paths)] * len(paths))  # every argument checked before torch loads
        _quiet_libraries()
        combine(base, paths, method, ws, density, out, seed, fold)
        typer.echo(str(out))
        return
    if recipe is None:
        raise UserError("finetune merge: give a RECIPE, or --base/--adapters/--out to combine adapters")
    _run("merge", RunOptions(recipe, smoke, laptop, data_dir, set_ or [], run_dir, force or []))





@app.command(name="eval")
@guard
def eval_(target: Annotated[Path, typer.Argument(metavar="MODEL_OR_RUN_DIR",
                                                help="A run directory, a Hugging Face-format model folder, or an adapter folder.")],
          tasks: Annotated[Optional[Path], typer.Option("--tasks", help="Task file (YAML, `tasks: [...]`); default for a run: the recipe's eval.")] = None,
          adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter folder: the report then has base and tuned side by side.")] = None,
          out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default RUN/eval-<tasks> or ./eval-<model>).")] = None,
          template: Annotated[Optional[str], typer.Option("--template", metavar="raw|alpaca|chat",
                                                          help="Force every task's template: raw, alpaca or chat.")] = None,
          batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 8,
          max_samples: Annotated[Optional[int], typer.Option("--max-samples", min=1, help="Score N items per task: a seeded sample, "
                                                             "stratified by gold label for classification (quick runs).")] = None,
          bits: Annotated[int, typer.Option("--bits", help="Load a plain model in 16 bits, or 4/8 through bitsandbytes.")] = 16,
          force: Annotated[bool, typer.Option("--force", help="Run directory without --tasks: re-evaluate even if done.")] = False) -> None:
    """Evaluate a model (and its adapter) on tasks defined in YAML; for a run directory, base vs tuned as its recipe says."""
    if template is not None and template not in ("raw", "alpaca", "chat"):
        raise UserError(f"--template {template!r}: choose raw, alpaca or chat")
    if bits not in (4, 8, 16):
        raise UserError(f"--bits {bits}: choose 4, 8 or 16")
    if tasks is None:
        if not (target / "recipe.yaml").exists():
            raise UserError(f"{target}: not a run directory; give the tasks to evaluate a model on with --tasks TASKS.yaml")
        _existing_run(target, "eval", force)
        return
    from .evaluate import eval_command

    _quiet_libraries()
    folder = eval_command(target, tasks, adapter, out, template, batch_size, max_samples, bits)
    typer.echo((folder / "report.md").read_text(encoding="utf-8"))
    typer.echo(str(folder))


MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation budget per answer.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy (reproducible); above 0 samples.")]
UseOpt = Annotated[str, typer.Option("--use", metavar="auto|merged|adapter", help="Which model answers: the merged model as "
                                     "published (auto, when the run has one that passed its check) or the adapter as trained.")]


@app.command()
@guard
def generate(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory with a trained adapter.")],
             prompt: Annotated[str, typer.Option("--prompt", help="The user's message; rendered with the recipe's template.")],
             max_new_tokens: MaxNewOpt = 256, temperature: TempOpt = 0.0, use: UseOpt = "auto") -> None:
    """Answer one prompt with the tuned model, streaming the output."""
    from .chat import check_run
    from .chat import generate as run_generate

    _check_use(use)
    check_run(run_dir)  # before torch and transformers load (seconds)
    _quiet_libraries()
    run_generate(run_dir, prompt, max_new_tokens, temperature, use=use)


@app.command()
@guard
def chat(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory with a trained adapter.")],
         max_new_tokens: MaxNewOpt = 256, temperature: TempOpt = 0.0, use: UseOpt = "auto") -> None:
    """Talk to the tuned model in the recipe's own template (/help, /reset, /exit; Ctrl-C stops an answer)."""
    from .chat import chat as run_chat
    from .chat import check_run

    _check_use(use)
    check_run(run_dir)
    _quiet_libraries()
    run_chat(run_dir, max_new_tokens, temperature, use=use)


@app.command()
@guard
def export(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory with a merged model that passed its check.")],
           to: Annotated[str, typer.Option("--to", help="Format: gguf (llama.cpp, Ollama, LM Studio).")] = "gguf",
           dtype: Annotated[str, typer.Option("--dtype", help="f16, bf16 or q8_0 (norms stay float32).")] = "f16",
           out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default RUN/export/): absent, empty or an export.")] = None) -> None:
    """Write the merged model as one GGUF file with an Ollama Modelfile, verified by loading it back through transformers'
    GGUF reader (export_check.json); a failed check writes no model file and exits 1."""
    from .export import export as run_export
    from .runlock import exclusive

    _quiet_libraries()
    # The run's lock: a `finetune run --force merge` rewriting RUN/merged, or a second export updating
    # export_check.json, must not interleave with this one.
    with exclusive(run_dir):
        check = run_export(run_dir, to, dtype, out)  # the check of this file
    where = Path(out) if out is not None else Path(run_dir) / "export"
    gap = check.get("vs_reference_max_abs_diff", check["vs_merged_max_abs_diff"])
    typer.secho(f"[finetune] export: {check['file']} ({check['bytes'] / 1e6:.1f} MB, {check['dtype']}); logits within {gap:.2e} of "
                f"{'the ' + check['dtype'] + '-rounded merged model' if 'reference' in check else 'the merged model'} "
                f"({check['vs_merged_max_abs_diff']:.2e} of the unrounded one); tokenizer, template and "
                f"stop ids identical; {check['seconds']:.0f} s", err=True)
    lc = check.get("llama_cpp") or {}
    typer.secho(f"[finetune] export: llama.cpp {lc['version']} reads it: {lc['texts_same_ids']}/{lc['texts']} probe texts tokenized the "
                f"same, top token equal at {lc['top_token_equal']}/{lc['top_token_compared']} positions" if "version" in lc else
                f"[finetune] export: llama.cpp check skipped ({lc.get('skipped', 'not run')}; pip install llama-cpp-python to run it)", err=True)
    typer.echo(str(where / check["file"]))


@app.command()
@guard
def serve(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory with a trained adapter.")],
          model: Annotated[str, typer.Option("--model", help="tuned (merged, or base + adapter) or base.")] = "tuned",
          host: Annotated[str, typer.Option("--host", help="Address to listen on; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
          api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key; when it is set, requests "
                                                                          "need `Authorization: Bearer KEY`.")] = "FINETUNE_API_KEY",
          max_tokens: Annotated[int, typer.Option("--max-tokens", help="Largest max_tokens a request may ask for.")] = 512,
          max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", help="Largest request body.")] = 1_000_000,
          engine: Annotated[str, typer.Option("--engine", help="auto (vLLM when installed and a GPU is present, else transformers), "
                                                                "vllm or transformers.")] = "auto") -> None:
    """An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions, streaming) for the run's model."""
    from .chat import check_run
    from .serve import serve as run_serve

    check_run(run_dir)
    _quiet_libraries()
    run_serve(run_dir, model, host, port, api_key_env, max_tokens, max_request_bytes, engine)


def _check_use(use: str) -> None:
    if use not in ("auto", "merged", "adapter"):
        raise UserError(f"--use {use!r}: choose auto, merged or adapter")


@app.command()
@guard
def publish(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A finished run directory, or the output of `finetune merge --adapters`.")],
            to: Annotated[Optional[str], typer.Option("--to", metavar="URL", help="hf://ORG/NAME or file://DIR (default: the recipe's publish.to).")] = None,
            what: Annotated[Optional[str], typer.Option("--what", metavar="adapter,merged,gguf", help="Any of adapter, merged, gguf, comma-separated.")] = None,
            private: Annotated[Optional[bool], typer.Option("--private/--public", help="Hub repository visibility.")] = None,
            force: Annotated[bool, typer.Option("--force", help="Publish again even if done, and even when a gate (regression, "
                                                "licence, PII) refuses.")] = False) -> None:
    """Publish a run's adapter and/or merged model with its model card."""
    parts = _publish_options(to, what)
    if not (run_dir / "recipe.yaml").exists() and (run_dir / "merge_check.json").exists():
        if not to:
            raise UserError(f"{run_dir}: an adapter combination has no recipe; say where with --to hf://ORG/NAME or file://DIR")
        from .publish import publish_combination

        out = publish_combination(run_dir, _absolute_target(to, Path.cwd()), parts or ["adapter"], True if private is None else private)
        typer.echo(str(out.get("revision") or out.get("target")))
        return
    overrides = []
    if to:
        overrides.append(f"publish.to={_absolute_target(to, Path.cwd())}")
    if what:
        overrides.append(f"publish.what=[{what}]")
    if private is not None:
        overrides.append(f"publish.private={str(private).lower()}")
    _existing_run(run_dir, "publish", force, overrides)


def _publish_options(to: str | None, what: str | None) -> list[str] | None:
    """--to and --what checked as the recipe's publish section checks them, with the option named (not the recipe)."""
    from .recipe import PublishSpec

    if to is not None:
        try:
            PublishSpec(to=to)
        except Exception:  # noqa: BLE001  (pydantic's ValidationError; the message below says all)
            raise UserError(f"--to {to!r}: must look like hf://ORG/NAME (Hugging Face Hub) or file://DIR (a folder)") from None
    if what is None:
        return None
    parts = [w.strip() for w in what.split(",") if w.strip()]
    for w in parts:
        if w not in ("adapter", "merged", "gguf"):
            close = difflib.get_close_matches(w, ["adapter", "merged", "gguf"], n=1)
            raise UserError(f"--what {w!r}: choose from adapter, merged, gguf (comma-separated)" + (f"; did you mean '{close[0]}'?" if close else ""))
    if not parts:
        raise UserError("--what is empty: choose from adapter, merged, gguf (comma-separated)")
    return parts


def _absolute_target(to: str, base: Path) -> str:
    """A relative file:// target given on the command line is relative to where the command runs."""
    if to.startswith("file://"):
        p = Path(to.removeprefix("file://")).expanduser()
        return "file://" + str(p if p.is_absolute() else (base / p).resolve())
    return to


def _existing_run(run_dir: Path, stage: str, force: bool, overrides: list[str] | None = None) -> None:
    """Run `stage` on a run directory (its earlier stages must be done), with the card before publish and after eval:
    a published card always matches what is published, and a re-evaluation shows in the card."""
    from .pipeline import Context, run_stages, setup_logging
    from .run import RunDir

    run = RunDir(run_dir)
    run.require()
    recipe, recipe_dir = run.load_recipe(overrides or [])
    m = run.manifest()
    if stage == "eval" and not m.get("smoke"):
        from .hub import check_hub

        check_hub(recipe)
    ctx = Context(recipe, recipe_dir, run, bool(m.get("smoke")), m.get("base_model", recipe.base_model.id),
                  {stage} if force else set(), force_gates=force and stage == "publish")
    _quiet_libraries()
    setup_logging(run)
    from .pipeline import active_stages

    selected = {"eval": ("eval", "card"), "publish": ("card", "publish")}.get(stage, (stage,))
    active = active_stages(recipe)
    missing = [s for s in active[: active.index(selected[0])] if (run.stage_record(s) or {}).get("status") != "done"]
    if missing:
        raise UserError(f"{run_dir}: stage {missing[0]} is not done; run `finetune run RECIPE` first")
    from .preempt import handling
    from .runlock import exclusive

    with exclusive(run.root), handling():
        run_stages(ctx, selected)
    typer.echo(str(run.root))


@app.command()
@guard
def validate(recipe: RecipeArg, smoke: SmokeOpt = False, laptop: LaptopOpt = False, data_dir: DataDirOpt = None, set_: SetOpt = None,
             preflight: Annotated[bool, typer.Option("--preflight", help="Also build a sample of the training data with the "
                                                     "recipe's tokenizer and template and check it as training would (one BOS, "
                                                     "EOS supervised, prompt masked, response marker, truncation, prompt parity).")] = False,
             show_example: ShowOpt = False) -> None:
    """Check a recipe against the schema (and, with --smoke, that it can run as a smoke test)."""
    from .pipeline import make_context

    with tempfile.TemporaryDirectory(prefix="finetune-preflight-") as scratch:
        ctx, resolved = make_context(str(recipe), set_ or [], smoke, scratch, [], hub_required=False, laptop=laptop,
                                     data_dir=str(data_dir) if data_dir else None)
        typer.echo(f"{recipe}: valid ({ctx.recipe.name}, {ctx.recipe.domain}, base {ctx.original_base})")
        if not preflight:
            return
        from .pipeline import start
        from .preflight import preflight_recipe

        _quiet_libraries()
        start(ctx, resolved)  # under --smoke this builds the stand-in model and tokenizer in the scratch folder
        preflight_recipe(ctx.recipe, ctx.recipe_dir, ctx.run, show_example)  # its log line says what passed


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (every field is documented there)."""
    from .recipe import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def _add_data_commands() -> None:
    from . import data_cli

    for cmd in data_cli.app.registered_commands:
        cmd.callback = guard(cmd.callback)
    for cmd in data_cli.synth_app.registered_commands:
        cmd.callback = guard(cmd.callback)
    app.add_typer(data_cli.app, name="data")


_add_data_commands()


def main() -> None:
    app(prog_name="finetune")


if __name__ == "__main__":
    sys.exit(main())
