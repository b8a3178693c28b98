"""Secrets, serialization and trackers: tokens never reach a file of the run, weights
are safetensors only, custom model code runs only when the recipe says so, and every tracker ends its run."""

from __future__ import annotations

import json
import logging
import os

import pytest

from finetune.errors import UserError
from finetune.pipeline import make_context, run_stages, start
from finetune.recipe import load_recipe

from .conftest import RECIPES

# Fake, but shaped like the real thing (hf_ + 34 letters and digits; a 40-hex W&B key).
HF_FAKE = "hf_" + "FakeToken0123456789abcdefghijklmnop"[:34]
WANDB_FAKE = "0123456789abcdef" * 2 + "01234567"


def test_a_token_in_a_recipe_is_rejected_naming_the_key_not_the_value(tmp_path, monkeypatch):
    text = (RECIPES / "legal.yaml").read_text()
    bad = tmp_path / "legal.yaml"
    bad.write_text(text + f"\n# ok in a comment: {HF_FAKE}\n")
    load_recipe(bad)  # a comment is not a value
    with pytest.raises(UserError, match=r"data.system_prompt holds what looks like an access token") as e:
        load_recipe(RECIPES / "legal.yaml", [f"data.system_prompt=Use {HF_FAKE} to log in"])
    assert HF_FAKE not in str(e.value)
    with pytest.raises(UserError, match=r"publish.to holds"):
        load_recipe(RECIPES / "legal.yaml", [f"publish.to=hf://org/{HF_FAKE}"])
    # The value of a secret variable pasted into a recipe, whatever its shape.
    monkeypatch.setenv("WANDB_API_KEY", WANDB_FAKE)
    with pytest.raises(UserError, match=r"tracking.project holds"):
        load_recipe(RECIPES / "legal.yaml", [f"tracking.project=p{WANDB_FAKE}"])
    # Paths and names that merely start like a token are fine.
    load_recipe(RECIPES / "legal.yaml", ["tracking.project=hf_datasets_cache_project"])


def test_wandb_is_online_only_with_a_key(tmp_path, monkeypatch):
    from finetune import tracking

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):  # restored after the test
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking, "_ours", {})
    tracking.configure(["wandb"], "p", tmp_path, "sft")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_FAKE)
    tracking.configure(["wandb"], "p", tmp_path, "sft")
    assert os.environ["WANDB_MODE"] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own choice is kept
    monkeypatch.setattr(tracking, "_ours", {})
    tracking.configure(["wandb"], "p", tmp_path, "sft")
    assert os.environ["WANDB_MODE"] == "disabled"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """The legal smoke run with every tracker on and fake secrets in the environment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", HF_FAKE)
    mp.setenv("WANDB_API_KEY", WANDB_FAKE)
    mp.setenv("WANDB_MODE", "offline")  # a key is set, so without this wandb would go online
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "WANDB_PROJECT"):
        mp.delenv(var, raising=False)
    d = tmp_path_factory.mktemp("tracked") / "run"
    try:
        ctx, resolved = make_context(str(RECIPES / "legal.yaml"), ["tracking.report_to=[wandb, tensorboard, mlflow]"], True, str(d), [])
        start(ctx, resolved)
        logging.getLogger("finetune").info("a careless log line with %s and %s", HF_FAKE, WANDB_FAKE)
        run_stages(ctx)
    finally:
        mp.undo()
    return d


def test_no_secret_in_any_file_of_the_run(tracked_run):
    files = [p for p in tracked_run.rglob("*") if p.is_file()]
    assert len(files) > 50 and any("wandb" in p.parts for p in files) and any("mlruns" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        assert HF_FAKE.encode() not in data and WANDB_FAKE.encode() not in data, p
    assert "a careless log line with *** and ***" in (tracked_run / "logs/run.log").read_text()  # redacted, not dropped


def test_every_tracker_got_the_metrics_and_ended_its_run(tracked_run):
    steps = [json.loads(line) for line in (tracked_run / "logs/metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in steps if "loss" in m) == 20
    # wandb: an offline run, closed (the summary is written by finish()).
    runs = list((tracked_run / "logs/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert b"train/loss" in (next(runs[0].glob("run-*.wandb"))).read_bytes()  # history records (protobuf)
    assert "got exitcode: 0" in (runs[0] / "logs/debug.log").read_text()  # wandb.finish() ran
    # tensorboard: the loss curve in event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "logs/tensorboard/sft"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 20
    # mlflow: a finished run with the loss history.
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run / "logs/mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 20


def test_outputs_are_safetensors_and_json_never_pickles(tracked_run):
    def pickled(p):
        head = p.read_bytes()[:4]
        return head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04"  # pickle / torch.save zip

    published = [p for d in ("adapter", "merged", "hub", "card", "eval") for p in (tracked_run / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in published)
    assert not [p for p in published if pickled(p) or p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    # Checkpoints keep the optimizer/scheduler/RNG state resume needs (read back with weights_only=True), not the
    # pickled TrainingArguments.
    assert not list((tracked_run / "checkpoints").rglob("training_args.bin"))


def test_custom_model_code_runs_only_when_the_recipe_trusts_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models import load_model

    folder = tmp_path / "custom"
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    sentinel = tmp_path / "custom-code-ran"
    (folder / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(sentinel)!r}).write_text('yes')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    conf = json.loads((folder / "config.json").read_text())
    conf.update(model_type="custom_llama", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(conf))
    recipe, _ = load_recipe(RECIPES / "legal.yaml", [f"base_model.id={folder}", "quantization.bits=16"])
    with pytest.raises(UserError, match="trust_remote_code: true only for a repository you trust"):
        load_model(str(folder), recipe, quantized=False)
    assert not sentinel.exists()
    trusted, _ = load_recipe(RECIPES / "legal.yaml", [f"base_model.id={folder}", "quantization.bits=16", "base_model.trust_remote_code=true"])
    model = load_model(str(folder), trusted, quantized=False)
    assert sentinel.exists() and type(model).__name__ == "CustomForCausalLM"
