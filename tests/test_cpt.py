"""Continued pretraining: weighted mixing and packing (against independent counts), and `stages: [cpt, sft]` end to
end with trainable embeddings, each stage skipped or rerun on its own; plus `finetune generate` / `chat` on a run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finetune.cpt import mix, pack

from .conftest import RECIPES, ROOT


def test_mix_uses_the_domain_whole_and_replays_the_rest_to_its_share():
    domain = [[1] * 50 for _ in range(19)]  # 950 tokens
    general = [[2] * 7, [3] * 7]  # 14 tokens: too short, it is repeated
    docs, counts = mix([domain, general], [0.95, 0.05], seed=0)
    stream = 950 / 0.95
    assert counts == [950, round(stream * 0.05)]  # 50 replayed tokens out of 1,000
    flat = [t for d in docs for t in d]
    assert flat.count(1) == 950 and flat.count(2) + flat.count(3) == 50
    assert docs != domain + general  # shuffled into the stream (seeded)
    assert mix([domain, general], [0.95, 0.05], seed=0) == (docs, counts)
    # equal weights and one document each: the replay source gets as many tokens as the domain
    assert mix([[[1] * 10], [[2] * 4]], [1, 1], seed=1)[1] == [10, 10]


def test_pack_cuts_fixed_blocks_and_drops_only_the_tail():
    docs = [[5] * 10, [6] * 7, [7] * 9]  # 26 tokens
    blocks = pack(docs, 8)
    assert [len(b) for b in blocks] == [8, 8, 8] and [t for b in blocks for t in b] == [t for d in docs for t in d][:24]


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory):
    from finetune.pipeline import make_context, run_stages, start

    d = tmp_path_factory.mktemp("cpt")
    sets = ["stages=[cpt, sft]", "cpt.train_embeddings=true"]
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), sets, True, str(d), [])
    start(ctx, resolved)
    return d, sets, run_stages(ctx)


@pytest.mark.slow
def test_cpt_then_sft_end_to_end(cpt_run):
    from safetensors.torch import load_file

    d, _, outcome = cpt_run
    assert outcome == {s: "ran" for s in ("prepare", "cpt", "sft", "eval", "merge", "card", "publish")}
    prov = json.loads((d / "data/provenance.json").read_text())["cpt"]
    blocks = [json.loads(l)["input_ids"] for l in (d / "data/cpt_train.jsonl").read_text().splitlines()]
    assert len(blocks) == prov["blocks"]["train"] > 0 and {len(b) for b in blocks} == {prov["block_size"]}
    assert [m["weight"] for m in prov["mix"]] == [0.99, 0.01] and prov["mix"][1]["tokens"] > 0
    assert prov["tokens"] == sum(m["tokens"] for m in prov["mix"])
    # embeddings and lm_head trained in CPT, carried by the final adapter, merged and verified
    cfg = json.loads((d / "adapter/adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}
    weights = load_file(str(d / "adapter/adapter_model.safetensors"))
    base = load_file(str(d / "base/model.safetensors"))
    emb = next(v for k, v in weights.items() if "embed_tokens" in k)
    assert not torch.equal(emb, base["model.embed_tokens.weight"])  # really trained
    assert json.loads((d / "merge_check.json").read_text())["passed"]
    summary = json.loads((d / "adapter/training_summary.json").read_text())
    assert summary["continued_from"] == "cpt" and (d / "logs/metrics-cpt.jsonl").exists()


@pytest.mark.slow
def test_sft_starts_from_the_cpt_adapter(cpt_run):
    """The SFT stage's trainable weights before its first step are exactly the CPT adapter's."""
    from safetensors.torch import load_file

    from finetune.models import load_model
    from finetune.run import RunDir
    from finetune.train import with_adapter

    d, _, _ = cpt_run
    recipe, _ = RunDir(d).load_recipe()
    model = with_adapter(load_model(recipe.base_model.id, recipe, quantized=False), recipe, RunDir(d), "sft")
    saved = load_file(str(d / "cpt/adapter_model.safetensors"))
    live = {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    assert saved and sum(1 for v in saved.values() if v.abs().sum() > 0) == len(saved)
    for key, value in saved.items():
        match = [v for k, v in live.items() if k.replace(".modules_to_save", "").replace(".default", "") == key]
        assert match and torch.equal(match[0], value), key


@pytest.mark.slow
def test_each_stage_reruns_on_its_own(cpt_run, tmp_path):
    import shutil

    from finetune.pipeline import make_context, run_stages, start

    d, sets, _ = cpt_run

    def go(*more):
        ctx, resolved = make_context(str(RECIPES / "medical.yaml"), sets + list(more), True, str(tmp_path / "r"), [])
        start(ctx, resolved)
        return run_stages(ctx)

    shutil.copytree(d, tmp_path / "r")
    assert go()["cpt"] == "skipped"
    out = go("training.learning_rate=1e-3")  # SFT's settings: CPT's result stands
    assert (out["prepare"], out["cpt"], out["sft"]) == ("skipped", "skipped", "ran")
    out = go("training.learning_rate=1e-3", "cpt.learning_rate=1e-3")
    assert (out["prepare"], out["cpt"], out["sft"]) == ("skipped", "ran", "ran")


@pytest.mark.slow
def test_generate_and_chat_use_the_run(smoke_runs):
    run, _ = smoke_runs["legal"]
    gen = subprocess.run([sys.executable, "-m", "finetune.cli", "generate", str(run), "--prompt", "Define estoppel.", "--max-new-tokens", "5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    chat = subprocess.run([sys.executable, "-m", "finetune.cli", "chat", str(run), "--max-new-tokens", "4"], input="hello\n/reset\nDefine tort.\n/exit\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("> ") == 4 and "template alpaca" in chat.stdout
    bad = subprocess.run([sys.executable, "-m", "finetune.cli", "generate", str(run / "data"), "--prompt", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_chat_prompt_is_the_recipes_template():
    from finetune.chat import render
    from finetune.recipe import load_recipe
    from finetune.templates import alpaca_prompt

    recipe, _ = load_recipe(RECIPES / "legal.yaml")
    assert render(recipe, None, [{"role": "user", "content": "Define tort."}]) == alpaca_prompt("Define tort.")
