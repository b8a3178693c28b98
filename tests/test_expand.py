"""Llama Pro block expansion (issue 20, first piece): the expanded model starts as the original, to 1e-6, in the llama
and mistral families, and reloads with plain transformers with the new layer count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune.errors import UserError

from .conftest import RECIPES, ROOT


def _tiny(family: str, layers: int = 4):
    from transformers import AutoModelForCausalLM

    from finetune.families import tiny_config

    cfg = tiny_config(family, 96, 1, 2, 0)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1] * layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_expanded_model_starts_as_the_original_and_reloads_plain(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.expand import expand_blocks

    model = _tiny(family)
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    assert float(before.abs().max()) > 0.1  # the comparison below compares real logits
    new = expand_blocks(model, 2)
    assert new == [2, 5] and len(model.model.layers) == model.config.num_hidden_layers == 6
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    # a new block with its zeroed projections restored would not be an identity: the check above can fail
    broken = _tiny(family)
    expand_blocks(broken, 2)
    broken.model.layers[2].mlp.down_proj.weight.data.normal_()
    with torch.no_grad():
        assert float((broken(ids).logits - before).abs().max()) > 1e-3
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, before, atol=1e-6, rtol=0)


def test_blocks_must_divide_the_layer_count():
    from finetune.expand import expand_blocks

    with pytest.raises(UserError, match="must divide the model's 4 layers"):
        expand_blocks(_tiny("llama"), 3)


# --------------------------------------------------------------------------------------------------
# training.method: block_expansion in a run


def _recipe(**sets):
    from finetune.recipe import apply_overrides, load_recipe, parse_recipe

    recipe, _ = load_recipe(RECIPES / "math_pro.yaml")
    d = recipe.model_dump()
    return parse_recipe(apply_overrides(d, [f"{k}={v}" for k, v in sets.items()]))


@pytest.mark.parametrize("train", ["full", "lora"])
def test_only_the_new_blocks_are_trainable(train):
    from peft import get_peft_model

    from finetune.expand import expand_blocks
    from finetune.train import adapter_config, freeze_anchor

    recipe = _recipe(**{"expand.train": train, "expand.blocks": 2})
    model = _tiny("llama")
    new = expand_blocks(model, recipe.expand.blocks)
    peft = get_peft_model(model, adapter_config(model, recipe, "sft", new))
    freeze_anchor(peft)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(any(f".layers.{i}." in n for i in new) for n in trainable), trainable
    if train == "full":  # every weight of each new block, as a trainable copy
        block = {n.split(f".layers.{new[0]}.", 1)[1].replace("modules_to_save.default.", "") for n in trainable if f".layers.{new[0]}." in n}
        assert block == {n for n, _ in _tiny("llama").model.layers[0].named_parameters()}
        anchor = [p for n, p in peft.named_parameters() if "lora_" in n]
        assert anchor and not any(p.requires_grad for p in anchor)
        assert all(float(p.abs().max()) == 0 for n, p in peft.named_parameters() if "lora_B" in n)  # adds exactly nothing
    else:
        assert all("lora_" in n for n in trainable)


def test_the_run_refuses_to_train_when_the_expanded_model_is_not_the_original(monkeypatch, tmp_path):
    import finetune.expand as expand
    from finetune.errors import StageFailed
    from finetune.merge import rows_batch
    from finetune.run import RunDir
    from finetune.runbase import reshape

    recipe = _recipe(**{"expand.blocks": 2})
    probe = rows_batch([{"input_ids": list(range(3, 15))}, {"input_ids": list(range(20, 28))}], 0)[:2]
    info = reshape(_tiny("llama"), recipe, RunDir(tmp_path), probe)
    assert info["expansion"]["identity_max_abs_diff"] <= 1e-6 and info["expansion"]["new_blocks"] == [2, 5]
    monkeypatch.setattr(expand, "ZEROED", (("self_attn", "o_proj"),))  # the MLP copy left as it was: not an identity
    with pytest.raises(StageFailed, match="refusing to train"):
        reshape(_tiny("llama"), recipe, RunDir(tmp_path), probe)


def test_block_expansion_recipe_checks():
    from finetune.recipe import apply_overrides, load_recipe, parse_recipe

    recipe, _ = load_recipe(RECIPES / "math_pro.yaml")
    d = recipe.model_dump()
    for sets, message in ((["quantization.bits=4"], "set quantization.bits: 16"), (["expand=null"], "needs an `expand:` section"),
                          (["training.method=lora"], "used only with training.method: block_expansion"),
                          (["expand.blocks=0"], "expand.blocks")):
        with pytest.raises(UserError, match=message):
            parse_recipe(apply_overrides(json.loads(json.dumps(d)), sets))


@pytest.fixture(scope="module")
def expanded_run(tmp_path_factory):
    """recipes/math_pro.yaml under --smoke (2 -> 3 layers), merged in float32 so the merged weights compare exactly."""
    run = tmp_path_factory.mktemp("expanded") / "run"
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(RECIPES / "math_pro.yaml"), "--smoke", "--run-dir", str(run),
                          "--set", "merge.dtype=float32"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_only_the_new_blocks_change_and_the_merged_model_is_plain_and_equals_the_trained_one(expanded_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.merge import logits, max_diff, probe_batch
    from finetune.run import RunDir, read_json
    from finetune.runbase import load, tokenizer

    run = RunDir(expanded_run)
    recipe, _ = run.load_recipe()
    summary = read_json(run.adapter / "training_summary.json")
    assert summary["method"] == "block_expansion" and summary["expansion"]["identity_max_abs_diff"] <= 1e-6
    assert summary["expansion"]["layers"] == {"before": 2, "after": 3} and summary["expansion"]["new_blocks"] == [2]
    base = AutoModelForCausalLM.from_pretrained(run.base).eval()
    merged = AutoModelForCausalLM.from_pretrained(run.merged).eval()  # plain transformers: no finetune code
    assert merged.config.num_hidden_layers == 3 and len(merged.model.layers) == 3
    b, m = base.state_dict(), merged.state_dict()
    new_prefix = "model.layers.2."
    for k, v in m.items():
        if k.startswith(new_prefix):
            continue
        assert torch.equal(v, b[k]), f"{k} changed, but only the new block trains"
    moved = [k for k in m if k.startswith(new_prefix) and not torch.equal(m[k], b[k.replace("layers.2.", "layers.1.")])]
    assert "model.layers.2.mlp.down_proj.weight" in moved and "model.layers.2.self_attn.o_proj.weight" in moved  # no longer zero
    # the merged model computes what the trained one (expanded base + adapter) did; first: training moved the logits
    tok = tokenizer(recipe, run)
    ids, mask, _ = probe_batch(run, 4, tok.pad_token_id)
    trained = PeftModel.from_pretrained(load(recipe, run, quantized=False, dtype=torch.float32)[0], str(run.adapter)).eval()
    moved_by = max_diff(logits(trained, ids, mask), logits(base, ids, mask), mask)
    assert moved_by > 1e-2
    assert max_diff(logits(merged, ids, mask), logits(trained, ids, mask), mask) <= 1e-5
    report = read_json(run.eval / "report.json")
    assert {t["name"] for t in report["tasks"]} >= {"heldout"} and all("merged" in t for t in report["tasks"])
