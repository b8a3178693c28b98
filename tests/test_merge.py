"""Merging: the two base policies checked against an independent computation of the merged weights, and multi-adapter
merges (linear, cat, ties) against the formulas computed here from the adapters' files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.pipeline import make_context, run_stages, start

from .conftest import RECIPES


def merge_run(legal, tmp_path, *sets):
    d = tmp_path / "run"
    shutil.copytree(legal, d, ignore=shutil.ignore_patterns("hub"))
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), ["merge.dtype=float32", *sets], True, str(d), [])
    start(ctx, resolved)
    out = run_stages(ctx, ("prepare", "train", "eval", "merge"))
    assert out == {"prepare": "skipped", "train": "skipped", "eval": "skipped", "merge": "ran"}
    return d


def lora_delta(adapter_dir, module: str) -> torch.Tensor:
    """scaling * B @ A of one module, from the adapter's files alone."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = load_file(adapter_dir / "adapter_model.safetensors")
    a = w[f"base_model.model.{module}.lora_A.weight"].float()
    b = w[f"base_model.model.{module}.lora_B.weight"].float()
    return (cfg["lora_alpha"] / cfg["r"]) * b @ a


MODULE = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("policy", ["original_16bit", "dequantized_4bit"])
def test_merged_weights_are_the_chosen_base_plus_the_adapter(smoke_runs, tmp_path, policy):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    d = merge_run(smoke_runs["legal"][0], tmp_path, f"merge.base={policy}")
    check = json.loads((d / "merge_check.json").read_text())
    assert check["base"] == policy and check["passed"] and check["saved_weight_dtypes"] == ["float32"]
    assert check["base_weights"]["weights_sha256"]["model.safetensors"]
    merged = load_file(d / "merged/model.safetensors")[f"{MODULE}.weight"]
    if policy == "original_16bit":
        base_w = load_file(d / "base/model.safetensors")[f"{MODULE}.weight"].float()
    else:  # the 4-bit weights training saw, dequantized by bitsandbytes directly
        q = AutoModelForCausalLM.from_pretrained(d / "base", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
        layer = q.get_submodule(MODULE)
        base_w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    delta = lora_delta(d / "adapter", MODULE)
    assert delta.abs().max() > 1e-4  # the adapter moved this layer: the comparison can fail
    assert torch.allclose(merged, base_w + delta, atol=1e-6)
    # The gap to the model as trained (4-bit base + adapter) is the policy's price: the 4-bit rounding, or ~nothing.
    gap = check["merged_vs_trained_max_abs_diff"]
    assert gap < 1e-5 if policy == "dequantized_4bit" else gap > 1e-3
    ppl = check["perplexity"]
    assert ppl["merged"] == pytest.approx(ppl["adapter"], rel=1e-4) and ppl["adapter"] < ppl["base"]


def test_dequantized_policy_needs_a_4bit_recipe():
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    with pytest.raises(UserError, match="dequantized_4bit needs quantization.bits: 4"):
        load_recipe(RECIPES / "legal.yaml", ["merge.base=dequantized_4bit", "quantization.bits=16"])
