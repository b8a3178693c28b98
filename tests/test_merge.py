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
    out = run_stages(ctx, ("prepare", "sft", "eval", "merge"))
    assert out == {"prepare": "skipped", "sft": "skipped", "eval": "skipped", "merge": "ran"}
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
    # Merging again gives the same file, byte for byte (merging is idempotent).
    first = (d / "merged/model.safetensors").read_bytes()
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), ["merge.dtype=float32", f"merge.base={policy}"], True, str(d), ["merge"])
    start(ctx, resolved)
    assert run_stages(ctx, ("prepare", "sft", "eval", "merge"))["merge"] == "ran"
    assert (d / "merged/model.safetensors").read_bytes() == first


def test_dequantized_policy_needs_a_4bit_recipe():
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    with pytest.raises(UserError, match="dequantized_4bit needs quantization.bits: 4"):
        load_recipe(RECIPES / "legal.yaml", ["merge.base=dequantized_4bit", "quantization.bits=16"])


# ---- combining adapters


@pytest.fixture(scope="module")
def adapters(smoke_runs, tmp_path_factory):
    """Three adapters of the legal smoke run's base: two of rank 8 trained with other seeds, one of rank 4."""
    legal = smoke_runs["legal"][0]
    out = {}
    for name, sets in (("x", ["training.seed=1"]), ("y", ["training.seed=2", "training.learning_rate=5e-3"]), ("z", ["lora.r=4", "lora.lora_alpha=8"])):
        d = tmp_path_factory.mktemp(f"adapter-{name}") / "run"
        shutil.copytree(legal, d, ignore=shutil.ignore_patterns("hub", "merged", "checkpoints"))
        ctx, resolved = make_context(str(RECIPES / "legal.yaml"), ["training.max_steps=6", "lora.r=8", "lora.lora_alpha=16", *sets], True, str(d), [])
        start(ctx, resolved)
        run_stages(ctx, ("prepare", "sft"))
        out[name] = d / "adapter"
    out["base"] = str((legal / "base").resolve())
    return out


def ab(adapter_dir, module=MODULE):
    w = load_file(adapter_dir / "adapter_model.safetensors")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return (w[f"base_model.model.{module}.lora_A.weight"].float(), w[f"base_model.model.{module}.lora_B.weight"].float(),
            cfg["lora_alpha"] / cfg["r"])


def ties_reference(tensors, weights, density):
    """TIES as peft documents it, written out: keep each tensor's top `density` share by magnitude, elect the sign of
    the sum of the trimmed tensors, average the weighted entries that agree with it."""
    trimmed = []
    for t in tensors:
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().reshape(-1).topk(k).indices] = True
        trimmed.append(t * keep.reshape(t.shape))
    stack = torch.stack(trimmed)
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = stack.sign() == elected
    weighted = stack * torch.tensor(weights).reshape(-1, *([1] * t.dim()))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("method", ["linear", "cat", "ties"])
def test_combined_adapter_matches_the_formula(adapters, tmp_path, method):
    from finetune.combine import combine

    w = [0.7, 0.3]
    check = combine(adapters["base"], [adapters["x"], adapters["y"]], method, w, 0.5, tmp_path / "out")
    (ax, bx, sx), (ay, by, sy) = ab(adapters["x"]), ab(adapters["y"])
    ac, bc, sc = ab(tmp_path / "out/adapter")
    got = sc * bc @ ac
    if method == "cat":  # the ranks add up and the deltas add exactly: sum_i w_i s_i B_i A_i
        want = w[0] * sx * bx @ ax + w[1] * sy * by @ ay
        assert check["combined_r"] == 16
    else:  # peft combines A and B separately, with sqrt(w_i s_i) on each side
        va = [(wi * si) ** 0.5 for wi, si in zip(w, (sx, sy))]
        if method == "linear":
            want_a, want_b = va[0] * ax + va[1] * ay, va[0] * bx + va[1] * by
        else:
            want_a, want_b = ties_reference([ax, ay], va, 0.5), ties_reference([bx, by], va, 0.5)
        assert torch.allclose(ac, want_a, atol=1e-6) and torch.allclose(bc, want_b, atol=1e-6)
        want = sc * want_b @ want_a
        assert check["combined_r"] == 8
    assert (want - sx * bx @ ax).abs().max() > 1e-4  # not just one of the inputs: the check can fail
    assert torch.allclose(got, want, atol=1e-6)
    assert check["combined_vs_base_max_abs_diff"] > 1e-6 and check["inputs"][0]["sha256"]


def test_incompatible_adapters_are_refused_with_one_message(adapters, tmp_path):
    from finetune.combine import combine
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"--method ties needs adapters of equal rank, got r = 8, 4"):
        combine(adapters["base"], [adapters["x"], adapters["z"]], "ties", None, 0.5, tmp_path / "o")
    check = combine(adapters["base"], [adapters["x"], adapters["z"]], "cat", None, 0.5, tmp_path / "o")
    assert check["combined_r"] == 12  # cat accepts mixed ranks
    other = tmp_path / "other"
    shutil.copytree(adapters["y"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"trained on 'mistralai/Mistral-7B-v0.1', not on --base"):
        combine(adapters["base"], [adapters["x"], other], "linear", None, 0.5, tmp_path / "o")
    with pytest.raises(UserError, match="2 weights for 3 adapters"):
        combine(adapters["base"], [adapters["x"], adapters["y"], adapters["x"]], "linear", [0.5, 0.5], 0.5, tmp_path / "o")


def test_combination_folds_evaluates_and_publishes_from_the_command_line(adapters, tmp_path):
    from typer.testing import CliRunner

    from finetune.card import front_matter
    from finetune.cli import app

    out = tmp_path / "combo"
    runner = CliRunner()
    r = runner.invoke(app, ["merge", "--base", adapters["base"], "--adapters", f"{adapters['x']},{adapters['y']}",
                            "--method", "dare_linear", "--density", "0.7", "--weights", "0.5,0.5", "--fold", "--out", str(out)])
    assert r.exit_code == 0, r.output
    check = json.loads((out / "merge_check.json").read_text())
    assert check["passed"] and check["merged_vs_adapter_max_abs_diff"] < 1e-4 and check["density"] == 0.7
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - {{name: hearsay, type: classification, path: {RECIPES / 'samples/legal_hearsay.jsonl'}, "
                     "prompt: \"Q: {{text}} Is there hearsay?\\nA:\", labels: [\"Yes\", \"No\"]}\n")
    r = runner.invoke(app, ["eval", adapters["base"], "--adapter", str(out / "adapter"), "--tasks", str(tasks), "--out", str(out / "eval")])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "eval/report.json").read_text())
    assert report["tasks"][0]["tuned"] is not None
    r = runner.invoke(app, ["publish", str(out), "--to", f"file://{tmp_path / 'pub'}", "--what", "adapter,merged"])
    assert r.exit_code == 0, r.output
    rev = tmp_path / "pub/0001"
    card = (rev / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == "base" and front["library_name"] == "peft" and "dare_linear" in front["tags"]
    assert front["model-index"][0]["results"][0]["task"]["name"] == "hearsay"
    assert str(tmp_path) not in card and "/tmp/" not in card
    assert (rev / "adapter_model.safetensors").read_bytes() == (out / "adapter/adapter_model.safetensors").read_bytes()
    assert (rev / "merged/model.safetensors").is_file() and (rev / "eval_report.json").is_file()


@pytest.fixture(scope="module")
def moe_adapters(tmp_path_factory):
    """Two adapters of a Mixtral stand-in (fused experts in transformers 5): trained on the unfused per-expert linears."""
    out = {}
    for name, sets in (("a", ["training.seed=1"]), ("b", ["training.seed=2", "training.learning_rate=5e-3"])):
        d = tmp_path_factory.mktemp(f"moe-{name}") / "run"
        ctx, resolved = make_context(str(RECIPES / "legal.yaml"), ["base_model.family=mixtral", "training.max_steps=6", "lora.r=8",
                                                                  "lora.lora_alpha=16", "quantization.bits=16", *sets], True, str(d), [])
        start(ctx, resolved)
        run_stages(ctx, ("prepare", "sft"))
        out[name] = d / "adapter"
        out["base"] = str((d / "base").resolve())  # the same seeded stand-in in both runs
    return out


def test_moe_adapters_combine_and_fold_into_a_plain_transformers_model(moe_adapters, tmp_path):
    """`finetune merge --adapters` on two Mixtral adapters: their expert LoRAs exist only on the unfused per-expert
    linears, so the base must be loaded the way training loaded it. The folded model, reloaded by plain transformers
    (fused experts), must equal an independent fold: each adapter's w_i * (alpha/r) * B @ A added by hand to the
    unfused base's weights, experts included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.combine import PROBES, combine
    from finetune.merge import logits, max_diff
    from finetune.models import Loader, load_model

    a, b, base = moe_adapters["a"], moe_adapters["b"], moe_adapters["base"]
    wa = load_file(a / "adapter_model.safetensors")
    assert any(".experts." in k for k in wa), sorted(wa)[:5]  # the adapters really reach the experts
    w = [0.6, 0.4]
    combine(base, [a, b], "cat", w, 0.5, tmp_path / "out", fold=True)

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(list(PROBES), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def by_hand(experts: bool):
        model = load_model(base, Loader.plain(base, "base"), quantized=False, dtype=torch.float32)
        with torch.no_grad():
            for wi, adapter in zip(w, (a, b)):
                t = load_file(adapter / "adapter_model.safetensors")
                cfg = json.loads((adapter / "adapter_config.json").read_text())
                for key in [k for k in t if k.endswith("lora_A.weight")]:
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    if ".experts." in module and not experts:
                        continue
                    delta = wi * cfg["lora_alpha"] / cfg["r"] * t[key.replace("lora_A", "lora_B")].float() @ t[key].float()
                    model.get_submodule(module).weight += delta
        return logits(model, ids, mask)

    want, without_experts = by_hand(True), by_hand(False)
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "out/merged", dtype=torch.float32)
    assert type(folded.model.layers[0].mlp.experts).__name__ != "LinearExperts"  # plain transformers' fused layout
    got = logits(folded, ids, mask)
    gap = max_diff(got, want, mask)
    assert max_diff(want, without_experts, mask) > 100 * max(gap, 1e-6)  # the experts' part matters: the check can fail
    assert gap < 1e-4
