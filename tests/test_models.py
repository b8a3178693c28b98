"""Really 4-bit: every family's block matmul weights quantized, experts unfused exactly, gradients right on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune import models
from finetune.errors import QuantizationError
from finetune.families import tiny_config
from finetune.moe import LinearExperts, fuse_experts, unfuse_experts
from finetune.recipe import load_recipe
from finetune.smoke import build_tokenizer

from .conftest import RECIPES

FAMILIES = ["llama", "mistral", "qwen2", "falcon", "mixtral", "gpt_oss"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Below is an instruction that describes a task.", "The contract is void.", "12 + 7 = 19"] * 5)


def save_tiny(family, tok, path, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def recipe_for(family, **sets):
    r, _ = load_recipe(RECIPES / "legal.yaml", [f"base_model.family={family}", "quantization.compute_dtype=float32",
                                                *[f"{k}={v}" for k, v in sets.items()]])
    return r


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_quantizes_every_block_matmul_weight(family, tok, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    path = save_tiny(family, tok, tmp_path)
    r = recipe_for(family)
    # What transformers alone does (the libraries' behaviour this fixes): count its 4-bit layers.
    plain = AutoModelForCausalLM.from_pretrained(path, quantization_config=models.bnb_config(r), device_map={"": "cpu"})
    plain_report = models.quantization_report(plain, 4)
    model = models.load_model(path, r, quantized=True)
    rep = models.check_quantization(model, r)
    assert rep.matmul_share == 1.0, rep.as_dict()
    assert rep.unquantized_matmul_params == 0
    assert rep.quantized_modules >= plain_report.quantized_modules
    assert all(not isinstance(m, nn.Linear) or isinstance(m, bnb.nn.Linear4bit) or n == "lm_head" for n, m in model.named_modules())
    if family in ("falcon", "mixtral", "gpt_oss"):
        # transformers 5.23 left these partly or wholly 16-bit; make sure we noticed a real gap.
        assert plain_report.matmul_share < 1.0


def test_low_4bit_share_is_refused_or_warned(tok, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    path = save_tiny("falcon", tok, tmp_path)
    r = recipe_for("falcon")
    plain = AutoModelForCausalLM.from_pretrained(path, quantization_config=models.bnb_config(r), device_map={"": "cpu"})
    with pytest.raises(QuantizationError, match="only 0% of the block matmul weights"):
        models.check_quantization(plain, r)
    rep = models.check_quantization(plain, recipe_for("falcon", **{"quantization.on_low_share": "warn"}))
    assert rep.matmul_share == 0.0 and "only 0%" in caplog.text


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_unfused_experts_compute_exactly_what_fused_ones_do(family, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny(family, tok, tmp_path)
    fused = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    unfused = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Random biases too (GPT-OSS), so a transposition or bias slip cannot hide behind zeros.
    torch.manual_seed(1)
    with torch.no_grad():
        for (n, p), (_, q) in zip(fused.named_parameters(), unfused.named_parameters()):
            if "experts" in n:
                p.normal_(0, 0.05)
                q.copy_(p)
    assert unfuse_experts(unfused) == 2
    assert any(isinstance(m, LinearExperts) for m in unfused.modules())
    ids = torch.randint(5, len(tok), (3, 17))
    with torch.no_grad():
        a, b = fused(ids).logits, unfused(ids).logits
    assert (a - fused(ids[:, :1]).logits[:, :1]).abs().max() > 0  # the comparison can fail: outputs vary
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    fuse_experts(unfused)
    sd_a, sd_b = fused.state_dict(), unfused.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_lora_gradients_on_4bit_equal_fp32_on_dequantized_weights_after_an_eval(tok, tmp_path):
    """LoRA gradients through 4-bit weights equal fp32 gradients on the dequantized weights, checked after an eval
    forward: bitsandbytes repacks CPU weights for AVX512-BF16 on the first no-grad forward, which broke gradients."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    path = save_tiny("llama", tok, tmp_path)
    r = recipe_for("llama")
    q = models.load_model(path, r, quantized=True)
    ids = torch.randint(5, len(tok), (2, 12))
    q.eval()
    with torch.no_grad():
        q(ids)  # the first eval forward is where bitsandbytes would repack weights and break autograd
    ref = models.load_model(path, r, quantized=False, dtype=torch.float32)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                ref.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    grads = []
    for model in (q, ref):
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=models.lora_targets(model, "all-linear"), init_lora_weights=False)
        pm = get_peft_model(model, cfg)
        pm.train()
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n


def _reference_nf4(w: torch.Tensor) -> torch.Tensor:
    """NF4 round trip written from the definition: blocks of 64 consecutive values, absmax scaling, nearest code."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type("nf4", device="cpu")
    blocks = w.flatten().view(-1, 64)
    am = blocks.abs().max(1, keepdim=True).values
    return (code[((blocks / am)[..., None] - code).abs().argmin(-1)] * am).view_as(w)


def test_bitsandbytes_cpu_4bit_matches_reference_for_our_shapes_and_we_refuse_others(tok, tmp_path):
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    for shape in [(128, 64), (32, 64), (64, 128)]:  # every stand-in matmul: input width a multiple of 64
        w = torch.randn(*shape)
        qw, st = F.quantize_4bit(w, quant_type="nf4")
        assert torch.allclose(F.dequantize_4bit(qw, st), _reference_nf4(w), atol=1e-6), shape
    w = torch.randn(32, 16)  # a block spans 4 rows: the CPU kernel reads the wrong scale
    qw, st = F.quantize_4bit(w, quant_type="nf4")
    assert (F.dequantize_4bit(qw, st) - _reference_nf4(w)).abs().max() > 1e-3  # the bug the guard exists for
    path = save_tiny("llama", tok, tmp_path, hidden_size=48, num_attention_heads=3, head_dim=16)
    model = models.load_model(path, recipe_for("llama"), quantized=True)
    with pytest.raises(QuantizationError, match="not a multiple of 64"):
        models.check_quantization(model, recipe_for("llama"))
