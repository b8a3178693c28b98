"""`--gpus 2` on a CPU machine: two processes over gloo through torchrun, against one process with the same global
batch; and a SIGTERM to one rank that still ends in one complete, resumable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from finetune import checkpoints

from .conftest import RECIPES, ROOT

# 3 steps of 8 rows: 2 ranks x micro-batch 4, or 1 process x micro-batch 4 x accumulation 2. Dropout off: each rank
# draws its own dropout masks, so only the dropout-free optimisation can be compared exactly.
SETS = ["training.max_steps=3", "lora.lora_dropout=0.0", "training.per_device_train_batch_size=4", "training.save_steps=1"]


def finetune(*args: str, interrupt: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "tests.interrupt", *interrupt, "--"] if interrupt else [sys.executable, "-m", "finetune.cli"]
    return subprocess.run([*head, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def sets(*extra: str) -> list[str]:
    return [a for s in (*SETS, *extra) for a in ("--set", s)]


def losses(run) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "logs/metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one") / "run", tmp_path_factory.mktemp("two") / "run"
    a = finetune("run", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(one), *sets("training.gradient_accumulation_steps=2"))
    assert a.returncode == 0, a.stderr[-3000:]
    b = finetune("run", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(two), "--gpus", "2", *sets())
    assert b.returncode == 0, b.stderr[-3000:]
    return one, two, b


def test_two_processes_train_like_one_with_the_same_global_batch(pair):
    one, two, out = pair
    assert "launching 2 processes x 1 node (ddp, CPU over gloo)" in out.stderr
    assert out.stderr.count("sft      ran") == 1 and out.stdout.count(str(two)) == 1  # one voice, not one per rank
    summary = json.loads((two / "adapter/training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 3
    assert json.loads((one / "adapter/training_summary.json").read_text())["processes"] == 1
    la, lb = losses(one), losses(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3]
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(la, lb)), (la, lb)
    wa, wb = load_file(one / "adapter/adapter_model.safetensors"), load_file(two / "adapter/adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert max(v.abs().max().item() for k, v in wb.items() if "lora_B" in k) > 1e-3  # it trained: the comparison can fail


def test_two_processes_leave_the_same_artifacts_written_once(pair):
    one, two, _ = pair

    def files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts)

    ckpts = [p.name for p in checkpoints.complete(two / "checkpoints")]
    assert ckpts == [p.name for p in checkpoints.complete(one / "checkpoints")] == ["step-000002", "step-000003"]
    # Rank 1's own log, and one RNG state per rank in each checkpoint where one process has one: nothing else differs.
    assert set(files(two)) - set(files(one)) == {"logs/run.rank1.log", *[f"checkpoints/{c}/rng_state_{r}.pth" for c in ckpts for r in (0, 1)]}
    assert set(files(one)) - set(files(two)) == {f"checkpoints/{c}/rng_state.pth" for c in ckpts}
    m = json.loads((two / "manifest.json").read_text())
    assert m["status"] == "done" and all(s["status"] == "done" for s in m["stages"].values())
    # Each checkpoint holds both ranks' RNG states and its COMPLETE marker, written by rank 0 once.
    ck = checkpoints.latest(two / "checkpoints")
    assert {"rng_state_0.pth", "rng_state_1.pth", "COMPLETE"} <= {p.name for p in ck.iterdir()}


@pytest.mark.slow
def test_sigterm_to_one_rank_ends_in_one_complete_resumable_checkpoint(tmp_path):
    """Rank 1 alone gets SIGTERM as step 4 begins: the ranks agree to stop after that step, rank 0 seals one checkpoint
    holding both ranks' RNG states, and the same command resumes it to the planned 8 steps."""
    run = tmp_path / "run"
    args = ["train", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(run), "--gpus", "2",
            *sets("training.max_steps=8", "training.save_steps=100")]
    out = finetune(*args, interrupt=["--at-step", "4", "--signal", "TERM", "--only-rank", "1"])
    assert out.returncode == 143, out.stderr[-3000:]
    assert "SIGTERM received" in out.stderr
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "preempted" and m["stages"]["sft"]["status"] == "preempted"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000004"] and checkpoints.is_complete(run / "checkpoints/step-000004")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run / "checkpoints/step-000004").iterdir()}
    resumed = finetune(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "adapter/training_summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["global_step"] == 8
    assert [s for s, _ in losses(run)] == list(range(1, 9))


def test_rank_1_trains_and_runs_no_other_stage(pair):
    """Rank 0 alone prepares, merges, evaluates and publishes (one push, not one per rank: alignment-handbook#198)."""
    _, two, _ = pair
    rank0, rank1 = (two / "logs/run.log").read_text(), (two / "logs/run.rank1.log").read_text()
    assert "sft: LoRA" in rank1
    for stage in ("prepare", "merge", "eval", "publish"):  # each stage's log lines start with its name
        assert f"INFO {stage}" in rank0 and f"INFO {stage}" not in rank1, stage


def test_launch_command_and_strategies():
    from finetune.distributed import launch_command
    from finetune.models import bnb_config
    from finetune.recipe import load_recipe
    from finetune.train import strategy_args

    one = launch_command(["train", "r.yaml"], 4, 1, 0, None, 29500)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "-m", "finetune.cli", "train", "r.yaml"]
    two = launch_command(["run", "r.yaml"], 8, 2, 1, "10.0.0.1", 29600)
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29600"} <= set(two) and "--standalone" not in two
    with pytest.raises(ValueError, match="--main-address"):
        launch_command(["run", "r.yaml"], 8, 2, 1, None, 29500)
    r, _ = load_recipe(RECIPES / "medical.yaml", ["distributed.strategy=fsdp"])
    assert strategy_args(r)["fsdp"] == "full_shard auto_wrap" and not strategy_args(r)["fsdp_config"]["use_orig_params"]
    assert bnb_config(r).bnb_4bit_quant_storage == bnb_config(r).bnb_4bit_compute_dtype  # FSDP shards one dtype
    r, _ = load_recipe(RECIPES / "medical.yaml", ["distributed.strategy=deepspeed"])
    assert strategy_args(r)["deepspeed"]["zero_optimization"]["stage"] == 3
    r, _ = load_recipe(RECIPES / "medical.yaml")
    assert strategy_args(r) == {} and str(bnb_config(r).bnb_4bit_quant_storage) == "torch.uint8"


def test_sharded_strategies_need_cuda(tmp_path):
    import torch
    from typer.testing import CliRunner

    from finetune.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = CliRunner().invoke(app, ["run", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(tmp_path / "r"), "--gpus", "2",
                                   "--set", "distributed.strategy=fsdp"])
    assert out.exit_code == 2 and "distributed.strategy 'fsdp' needs CUDA GPUs" in out.output
