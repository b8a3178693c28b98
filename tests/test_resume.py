"""Preemption and exact resume, with real subprocesses and real signals.

The legal recipe's smoke run on 26 sample rows, micro-batch 4: 7 optimizer steps per epoch, 2 epochs = 14 steps,
LoRA dropout 0.1 and shuffling on, a checkpoint every 3 steps. Every interrupted run is resumed with the plain
command and compared with one uninterrupted run of the same command: the same loss at every step (exactly) and the
same adapter (within 1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoints
from finetune.errors import UserError
from finetune.pipeline import make_context, run_stages, start

from .conftest import RECIPES, ROOT

SETS = ["training.max_steps=-1", "training.num_train_epochs=2", "training.save_steps=3", "training.save_total_limit=2",
        "lora.lora_dropout=0.1"]
STEPS = 14  # ceil(26 / 4) = 7 per epoch, 2 epochs


def command(run_dir, *extra: str, interrupt: list[str] | None = None, stage: str = "train") -> subprocess.CompletedProcess:
    args = [stage, str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(run_dir), *[a for s in SETS for a in ("--set", s)], *extra]
    head = [sys.executable, "-m", "tests.interrupt", *interrupt, "--"] if interrupt else [sys.executable, "-m", "finetune.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(head + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def losses(run_dir) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def max_diff(a, b) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The data prepared once (in-process); every run below starts from a copy."""
    d = tmp_path_factory.mktemp("prepared") / "run"
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), SETS, True, str(d), [])
    start(ctx, resolved)
    run_stages(ctx, ("prepare",))
    return d


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(prepared, d)
    done = command(d)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in losses(d)] == list(range(1, STEPS + 1))
    return d


@pytest.mark.parametrize("sig, at, case", [
    ("TERM", 10, "epoch 2"),
    ("TERM", 7, "last step of epoch 1"),
    ("INT", 5, "epoch 1, Ctrl-C"),
])
def test_signal_then_resume_equals_an_uninterrupted_run(prepared, reference, tmp_path, sig, at, case):
    d = tmp_path / "run"
    shutil.copytree(prepared, d)
    stopped = command(d, interrupt=["--at-step", str(at), "--signal", sig])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"stopped by SIG{sig} after step {at}" in stopped.stderr
    m = manifest(d)
    assert m["status"] == "preempted" and m["stages"]["sft"]["status"] == "preempted"
    assert checkpoints.latest(d / "checkpoints").name == f"step-{at:06d}"  # the step it was in, finished and saved
    assert not (d / "adapter").exists()
    at_stop = d / f"checkpoints/step-{at:06d}/adapter_model.safetensors"
    kept = d / "kept.safetensors"
    shutil.copy(at_stop, kept)

    resumed = command(d)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {d / 'checkpoints' / f'step-{at:06d}'}" in resumed.stderr
    # Every step exactly once, each with the loss of the uninterrupted run (same batches, same dropout masks).
    assert losses(d) == losses(reference)
    summary = json.loads((d / "adapter/training_summary.json").read_text())
    assert summary["global_step"] == summary["planned_steps"] == STEPS and summary["resumed_from_step"] == at
    final, ref = d / "adapter/adapter_model.safetensors", reference / "adapter/adapter_model.safetensors"
    assert max_diff(final, kept) > 1e-4  # training went on after the resume: the comparison below can fail
    assert max_diff(final, ref) <= 1e-6
    assert manifest(d)["status"] == "done"


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_previous_one(prepared, reference, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(prepared, d)
    killed = command(d, interrupt=["--at-step", "6", "--signal", "KILL", "--in-checkpoint-write"])
    assert killed.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000006.tmp"]  # the half-written one is there, unmarked
    assert checkpoints.latest(d / "checkpoints").name == "step-000003"
    resumed = command(d)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-000003" in resumed.stderr
    assert losses(d) == losses(reference)
    assert max_diff(d / "adapter/adapter_model.safetensors", reference / "adapter/adapter_model.safetensors") <= 1e-6
    assert not list((d / "checkpoints").glob("*.tmp"))
    # Rotation kept the newest two complete checkpoints, and only complete ones.
    assert [p.name for p in checkpoints.complete(d / "checkpoints")] == ["step-000012", "step-000014"]


def stopped_after_12(reference, tmp_path):
    """A copy of the reference run as if it had been stopped after step 12: the stage not done, its checkpoint there."""
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    m = manifest(d)
    m["stages"]["sft"]["status"] = "preempted"
    (d / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(d / "checkpoints/step-000014")
    return d


def test_resume_with_changed_settings_is_refused_unless_allowed(reference, tmp_path):
    d = stopped_after_12(reference, tmp_path)
    changed = [*SETS, "training.learning_rate=1e-3"]
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), changed, True, str(d), [])
    start(ctx, resolved)
    with pytest.raises(UserError, match=r"sft: .*step-000012 was written by a run with other inputs \(changed: recipe training\).*--allow-drift"):
        run_stages(ctx, ("prepare", "sft"))
    assert (d / "checkpoints/step-000012/COMPLETE").exists()  # nothing lost
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), changed, True, str(d), [], allow_drift=True)
    start(ctx, resolved)
    assert run_stages(ctx, ("prepare", "sft")) == {"prepare": "skipped", "sft": "ran"}
    summary = json.loads((d / "adapter/training_summary.json").read_text())
    assert summary["resumed_from_step"] == 12 and summary["global_step"] == STEPS
    # --force train starts over instead.
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), changed, True, str(d), ["train"])
    start(ctx, resolved)
    run_stages(ctx, ("prepare", "sft"))
    assert json.loads((d / "adapter/training_summary.json").read_text())["resumed_from_step"] is None


def test_a_pickle_payload_in_a_checkpoint_is_refused(reference, tmp_path):
    """torch.load(weights_only=True) everywhere a checkpoint is read: a crafted rng_state.pth runs nothing."""
    d = stopped_after_12(reference, tmp_path)
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    ck = d / "checkpoints/step-000012"
    torch.save({"python": Payload()}, ck / "rng_state.pth")
    marker = json.loads((ck / "COMPLETE").read_text())
    marker["files"]["rng_state.pth"] = (ck / "rng_state.pth").stat().st_size  # a "complete" checkpoint, to reach the load
    (ck / "COMPLETE").write_text(json.dumps(marker))
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), SETS, True, str(d), [])
    start(ctx, resolved)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        run_stages(ctx, ("prepare", "sft"))
    assert not sentinel.exists()


def unsafe_loads(text: str) -> list[str]:
    """Calls that can run code from a file: pickle/dill/joblib loads, torch.load without weights_only=True, numpy's
    allow_pickle=True, yaml.load with a non-safe loader, and eval/exec."""
    import re

    out = [c for c in re.findall(r"torch\.load\([^)]*\)", text) if "weights_only=True" not in c]
    out += re.findall(r"\b(?:pickle|dill|joblib|cloudpickle)\.loads?\(", text)
    out += re.findall(r"allow_pickle\s*=\s*True", text)
    out += [c for c in re.findall(r"yaml\.load\([^)]*\)", text) if "Safe" not in c and "_StrictLoader" not in c]
    out += re.findall(r"(?<![\w.])(?:eval|exec)\(", text)
    return out


def test_no_code_loads_a_pickle():
    """Checkpoints, adapters and recipes come from disks other people write to: nothing in finetune/ or data_prep/
    deserialises code (weights are safetensors; transformers' own checkpoint loading uses weights_only)."""
    planted = ("state = torch.load(path)\nx = pickle.load(f)\nnp.load(p, allow_pickle=True)\nyaml.load(t, Loader=yaml.Loader)\n"
               "eval(s)\ntorch.load(p, weights_only=True)\nyaml.load(t, Loader=_StrictLoader)\nmodel.eval()\n")
    assert len(unsafe_loads(planted)) == 5, unsafe_loads(planted)  # the scan finds each kind, and passes the safe ones
    found = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text()) for p in [*ROOT.glob("finetune/*.py"), *ROOT.glob("data_prep/**/*.py")]}
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("stage", ["prepare", "eval"])
def test_signal_outside_the_training_loop_stops_at_once_and_the_rerun_completes(prepared, reference, tmp_path, stage):
    d = tmp_path / "run"
    shutil.copytree(reference if stage == "eval" else prepared, d)
    if stage == "prepare":
        shutil.rmtree(d / "data")
    out = command(d, interrupt=["--in-stage", stage, "--signal", "TERM"], stage="run")
    assert out.returncode == 143, out.stderr[-3000:]
    m = manifest(d)
    assert m["status"] == "preempted" and m["stages"][stage]["status"] == "preempted"
    assert not (d / ("data" if stage == "prepare" else "eval")).exists() and not list(d.glob(".staging-*"))
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), SETS, True, str(d), [])
    start(ctx, resolved)
    outcome = run_stages(ctx)
    assert outcome[stage] == "ran" and manifest(d)["status"] == "done"
    if stage == "eval":
        assert outcome["sft"] == "skipped"
