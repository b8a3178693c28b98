"""The stage declarations (finetune/stages.py) hold: every file a stage reads is in its fingerprint, every output it
declares exists after it ran, the CLI's commands come from the list, and a stage the recipe does not run is refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from finetune import pipeline, stages
from finetune.pipeline import make_context, run_stages, start

from .conftest import RECIPES

_reads: dict[str, set[str]] = {}
_current: list[str] = []


def _audit(event: str, args) -> None:
    """Record every file opened for reading while a stage runs (Python-level opens: json, yaml, tokenizer files,
    jsonl rows, adapter configs)."""
    if event != "open" or not _current:
        return
    path, mode, flags = (list(args) + [None, None])[:3]
    if not isinstance(path, (str, bytes, os.PathLike)) or isinstance(path, int):
        return
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if not writing:
        _reads.setdefault(_current[-1], set()).add(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while _current names a stage


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stages") / "run"
    # every kind of stage in one run: cpt, sft, a preference stage after it (dpo; orpo, kto and grpo share its
    # declaration), export
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), ["stages=[cpt, sft, dpo]", "export.gguf=[q8_0]"], True, str(run_dir), [])
    start(ctx, resolved)
    real = pipeline.run_stage

    def recording(ctx, stage, *a):
        _current.append(stage)
        try:
            return real(ctx, stage, *a)
        finally:
            _current.pop()

    pipeline.run_stage = recording
    try:
        outcome = run_stages(ctx)
    finally:
        pipeline.run_stage = real
    return ctx, outcome


def test_every_declared_stage_ran_and_left_its_outputs(traced):
    ctx, outcome = traced
    assert outcome == {name: "ran" for name in stages.NAMES if name not in ("orpo", "kto", "grpo")}
    for s in stages.STAGES:
        if s.name not in outcome:
            continue
        outs = s.outputs(ctx)
        assert outs or s.name == "publish", s.name  # publish writes to its target (checked by its still_done)
        for p in outs:
            assert p.exists(), (s.name, p)
        assert ctx.run.stage_record(s.name)["outputs"] or not outs, s.name


def test_every_file_a_stage_reads_is_in_its_fingerprint(traced):
    """A file a stage opens that its fingerprint does not hash would let a skip reuse outputs made from other inputs:
    the worst failure a skip-when-done pipeline can have. Checked for the run's own files and the recipe's."""
    ctx, _ = traced
    root = ctx.run.root.resolve()
    recipe_dir = Path(ctx.recipe_dir).resolve()
    checked = 0
    for s in stages.STAGES:
        if not s.active(ctx.recipe):
            continue
        sections, inputs = pipeline.stage_inputs(ctx, s.name)
        hashed = {str(root / k) if not k.startswith(("/", "$RECIPE")) else k.replace("$RECIPE", str(recipe_dir), 1) for k in inputs}
        own = [p.resolve() for p in s.outputs(ctx)] + ([s.checkpoints(ctx.run).resolve()] if s.checkpoints else [])
        unhashed = []
        for f in sorted(_reads.get(s.name, ())):
            p = Path(f)
            if not (p.is_relative_to(root) or p.is_relative_to(recipe_dir)) or not p.is_file():
                continue
            rel = p.relative_to(root) if p.is_relative_to(root) else None
            if rel is not None and (rel.parts[0] in ("logs", "manifest.json", "recipe.yaml")
                                    or rel.parts[0].startswith(".")  # its own staging folders
                                    or any(p.is_relative_to(o) for o in own)):
                continue
            if p.suffix == ".py":
                continue
            checked += 1
            if str(p) not in hashed:
                unhashed.append(str(rel or p))
        assert unhashed == [], (s.name, unhashed)
    assert checked > 10  # the trace saw the stages read their inputs: the check above can fail


def test_a_missed_input_is_caught(traced, monkeypatch):
    """The check above fails when a declaration forgets a file (here: eval forgetting the merge check it reads)."""
    ctx, _ = traced
    ev = stages.get("eval")
    forgetful = stages.Stage(**{**ev.__dict__, "inputs": lambda c: (ev.inputs(c)[0], {k: v for k, v in ev.inputs(c)[1].items()
                                                                                    if k != "merge_check.json"})})
    monkeypatch.setattr(stages, "STAGES", tuple(forgetful if s.name == "eval" else s for s in stages.STAGES))
    with pytest.raises(AssertionError, match="merge_check.json"):
        test_every_file_a_stage_reads_is_in_its_fingerprint(traced)


def test_stage_commands_come_from_the_list():
    from typer.main import get_command

    from finetune.cli import app

    names = set(get_command(app).commands)
    for s in stages.STAGES:
        assert s.name in names, s.name  # generic or its own richer command
        assert set(s.aliases) <= names
    assert stages.canonical("train") == "sft" and stages.upto("train") == ("prepare", "cpt", "sft")


def test_a_stage_the_recipe_does_not_run_is_refused(tmp_path):
    from .test_hostile import cli

    r = cli("cpt", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and "has no cpt stage (stages: [sft])" in r.stderr and "--set 'stages=[cpt, sft]'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_relaunch_argv_carries_every_option():
    """The torchrun relaunch rebuilds the command from RunOptions: each field reaches the argv (--data-dir was lost once)."""
    import dataclasses

    from finetune.cli import RunOptions

    o = RunOptions(Path("r.yaml"), smoke=False, laptop=True, data_dir=Path("/d"), overrides=["a=1"], run_dir=Path("x"),
                   force=["eval"], resume=False, allow_drift=True, show_example=True)
    argv = o.argv("sft", Path("/runs/x"))
    assert argv == ["sft", "r.yaml", "--laptop", "--data-dir", "/d", "--set", "a=1", "--run-dir", "/runs/x", "--force", "eval",
                    "--no-resume", "--allow-drift", "--show-example"]
    scale = {"gpus", "nodes", "node_rank", "main_address"}  # torchrun's, not the processes'
    carried = {f.name for f in dataclasses.fields(RunOptions)} - scale - {"recipe", "run_dir"}
    defaults = RunOptions(Path("r.yaml")).argv("sft", Path("/runs/x"))
    for name in carried:  # every option changes the argv when set away from its default
        value = {"smoke": True, "laptop": True, "data_dir": Path("/d"), "overrides": ["a=1"], "force": ["eval"], "resume": False,
                 "allow_drift": True, "show_example": True}[name]
        assert RunOptions(Path("r.yaml"), **{name: value}).argv("sft", Path("/runs/x")) != defaults, name
