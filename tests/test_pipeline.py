"""Stages end to end on tiny stand-ins: skip and rerun logic, bad input, every family's QLoRA step + merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_prep.errors import DataError
from finetune.errors import UserError
from finetune.pipeline import make_context, run_stages, start
from finetune.recipe import AFTER_SFT
from finetune.run import RunDir
from finetune.stages import NAMES as STAGES

from .conftest import RECIPES

SFT_STAGES = tuple(s for s in STAGES if s not in ("cpt", "export", *AFTER_SFT))  # the shipped recipes' stages are [sft], no GGUF export
ALL_RAN = {s: "ran" for s in SFT_STAGES}


def local(path: str) -> list[str]:
    """Overrides that point the legal recipe at a local file (its shipped sources and eval tasks are on the Hub)."""
    return [f"data.sources=[{{path: '{path}', format: alpaca}}]", "eval.tasks=[]"]


def go(run_dir, *sets, force=(), recipe="legal", stages=STAGES):
    ctx, resolved = make_context(str(RECIPES / f"{recipe}.yaml"), list(sets), True, str(run_dir), list(force))
    start(ctx, resolved)
    return run_stages(ctx, stages)


@pytest.fixture(scope="module")
def legal_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("legal")
    assert go(d) == ALL_RAN
    return d


def test_second_run_skips_everything(legal_run):
    assert go(legal_run) == {s: "skipped" for s in SFT_STAGES}


def test_changed_training_reruns_train_and_later_only(legal_run, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(legal_run, d)
    out = go(d, "training.learning_rate=1e-3")
    assert out == {"prepare": "skipped", "sft": "ran", "eval": "ran", "merge": "ran", "card": "ran", "publish": "ran"}


def test_force_and_damaged_outputs_rerun(legal_run, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(legal_run, d)
    # merge does not read eval's outputs: it stays (a forced eval used to re-merge the model for nothing)
    assert go(d, force=["eval"]) == {"prepare": "skipped", "sft": "skipped", "eval": "ran", "merge": "skipped", "card": "ran", "publish": "ran"}
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"corrupt")
    assert go(d)["sft"] == "ran"
    shutil.rmtree(d / "hub")  # the published copy went missing: publish again
    assert go(d)["publish"] == "ran"


def test_bad_input_exits_cleanly_and_leaves_the_run_intact(legal_run, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(legal_run, d)
    before = {p: p.read_bytes() for p in (d / "adapter").iterdir()}
    manifest = (d / "manifest.json").read_text()
    with pytest.raises(UserError, match="lerning_rate"):
        go(d, "training.lerning_rate=1")
    with pytest.raises(UserError, match="not a stage"):
        go(d, force=["evaluate"])
    assert {p: p.read_bytes() for p in (d / "adapter").iterdir()} == before
    assert (d / "manifest.json").read_text() == manifest


def test_missing_and_empty_data_are_user_errors(tmp_path):
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["x y z"] * 3)
    r, _ = load_recipe(RECIPES / "legal.yaml", [*local("nope.jsonl")])
    with pytest.raises(DataError, match="nope.jsonl: not found"):
        prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "", "output": "x"}\n{"instruction": "q"}\nnot json\n')
    r, _ = load_recipe(RECIPES / "legal.yaml", [*local(f"{bad}"), "data.quality.max_reject_rate=1.0"])
    with pytest.raises(DataError, match="no usable rows"):
        prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    assert not (tmp_path / "run" / "data").exists()  # nothing half-written
    # Past the reject threshold, the build stops, and the rejected rows are kept with their reasons.
    r, _ = load_recipe(RECIPES / "legal.yaml", [*local(f"{bad}")])
    with pytest.raises(DataError, match=r"3 of 3 rows rejected \(100% > quality.max_reject_rate 5%\)"):
        prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    kept = [json.loads(l) for l in (tmp_path / "run/logs/prepare-rejects.jsonl").read_text().splitlines()]
    assert [(k["row"], k["reason"]) for k in kept] == [(1, "empty field 'instruction'"), (2, "missing field 'output'"),
                                                       (3, "invalid JSON (Expecting value at column 1)")]
    assert not (tmp_path / "run" / "data").exists()


def test_rejects_are_counted_with_row_numbers(tmp_path):
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["q a"] * 3)
    data = tmp_path / "d.jsonl"
    good = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(8)]
    data.write_text("\n".join(good[:4] + ['{"instruction": 3, "output": "x"}', good[0], "{oops"] + good[4:]) + "\n")
    r, _ = load_recipe(RECIPES / "legal.yaml", [*local(f"{data}"), "data.quality.max_reject_rate=0.2", "data.min_rows=1"])
    stats = prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    rejects = [json.loads(l) for l in (tmp_path / "run/data/rejects.jsonl").read_text().splitlines()]
    assert sorted((x["row"], x["filter"], x["reason"].split(" ")[0]) for x in rejects) == [
        (5, "invalid", "field"), (6, "exact_duplicate", "exact"), (7, "invalid", "invalid")]
    assert stats["train"]["n"] + stats["val"]["n"] == 8 and stats["rejected"] == 3


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "falcon", "mixtral", "gpt_oss"])
def test_qlora_step_and_verified_merge_for_every_family(family, tmp_path):
    """Train a 4-bit adapter, merge it (float32 to compare tightly), then check the merge independently: the saved
    merged model, loaded by plain transformers, equals the adapter applied to the 16-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.merge import probe_batch
    from finetune.models import load_model

    out = go(tmp_path, f"base_model.family={family}", "merge.dtype=float32", "training.max_steps=6", stages=("prepare", "sft", "merge"))
    assert out == {"prepare": "ran", "sft": "ran", "merge": "ran"}
    summary = json.loads((tmp_path / "adapter/training_summary.json").read_text())
    assert summary["quantization"]["share_of_block_matmul_weights"] == 1.0
    metrics = [m for m in map(json.loads, (tmp_path / "logs/metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(metrics) >= 6 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    r, _ = RunDir(tmp_path).load_recipe()
    ids, mask, _ = probe_batch(RunDir(tmp_path), 3, 0)
    base = load_model(r.base_model.id, r, quantized=False, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (adapter_logits - base_logits).abs()[keep].max() > 1e-3  # the adapter changed the model: the check can fail
    assert (merged_logits - adapter_logits).abs()[keep].max() < 1e-5
    assert not any("lora" in k for k in merged.state_dict())
    check = json.loads((tmp_path / "merge_check.json").read_text())
    assert check["passed"] and check["reloaded_tensors_differing"] == 0


def test_rows_the_template_cannot_render_are_rejected_not_fatal(tmp_path):
    """A messages row in an Alpaca-template recipe is one bad row (rejected with the template's reason), not a crash."""
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["q a"] * 3)
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(30)]
    rows.insert(3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r, _ = load_recipe(RECIPES / "legal.yaml", [*local(f"{data}"), "data.sources.0.format=auto"])
    stats = prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    rejects = [json.loads(l) for l in (tmp_path / "run/data/rejects.jsonl").read_text().splitlines()]
    assert [(x["row"], x["filter"], x["reason"]) for x in rejects] == [
        (4, "invalid", "the alpaca template renders instruction/input/output rows, not messages")]
    assert stats["train"]["n"] + stats["val"]["n"] == 30
