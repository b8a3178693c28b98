"""Stage 4, merge: the adapter folded into a 16-bit base, and proven equal to it.

`merge.base` says which base (the choice peers argue about, recorded in merge_check.json):
- `original_16bit` (default; LLaMA-Factory's and unsloth's advice): the original weights W16. The adapter was trained
  against dequant(W4), so the merged model differs from the model as trained by the quantization error;
- `dequantized_4bit` (axolotl's default): dequant(W4) itself, the weights the adapter saw in training, saved in 16 bits.
Either way the gap to the model as trained (4-bit base + adapter, what eval scored) is measured and recorded.

Order of checks (peft's own test discipline): first show the adapter changes the base's logits (a zero-init or
untrained adapter would make "merged == adapter" pass trivially), then compare merged and adapter logits in
float32 on probe rows (and their perplexity), then reload the saved files with plain transformers and compare again,
dtype included. Everything lands in RUN/merge_check.json; a merge that fails its tolerance is not kept, and publish
never ships it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .artifacts import MergeCheck
from .errors import StageFailed
from .models import DTYPES, device, load_model
from .moe import fuse_experts
from .recipe import Recipe
from .run import RunDir, read_jsonl

log = logging.getLogger("finetune")

CHANGED_MIN = 1e-6  # an adapter that moves no logit by more than this did not learn anything
# Tolerance of "merged == adapter", derived rather than fixed (a fixed 1e-4 failed three of four real SmolLM2 merges at
# 1.1e-4 to 1.9e-4 while passing tiny stand-ins at 1e-7). Merged computes (W + s*B@A) x, the adapter W x + s*B (A x):
# the same numbers summed in another order. In float32 each length-d dot product carries a relative rounding error of
# about eps*sqrt(d) (errors of independent roundings add like a random walk); each of L residual layers adds its own,
# and the logits carry it in proportion to their size. So the gap is about eps * sqrt(d) * L * max|logit|, and we allow
# ROUNDING_SAFETY times that. A defect (a layer not merged, a wrong scale) moves the logits by a share of the adapter's own
# effect, so the gap must also stay under ADAPTER_SHARE of how far the adapter moved them.
ROUNDING_SAFETY = 4.0
ADAPTER_SHARE = 0.01


def derived_atol(logits_absmax: float, hidden: int, layers: int, dtype=None) -> float:
    """The largest |merged - adapter| logit gap float rounding explains (see ROUNDING_SAFETY); float32 by default."""
    import torch

    eps = torch.finfo(dtype or torch.float32).eps
    return ROUNDING_SAFETY * eps * math.sqrt(hidden) * max(layers, 1) * max(logits_absmax, 1.0)


def tolerance(model, adapter_logits, mask, changed: float, fixed: float | None) -> tuple[float, dict[str, Any]]:
    """merge.atol when the recipe fixes one; else the derived tolerance, capped by ADAPTER_SHARE of the adapter's effect."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    absmax = float(adapter_logits.abs()[mask.bool()].max())
    rounding = derived_atol(absmax, hidden, layers)
    atol = fixed if fixed is not None else min(rounding, ADAPTER_SHARE * changed)
    return atol, {"atol_source": "merge.atol" if fixed is not None else "derived", "atol_rounding": rounding,
                  "atol_adapter_share": ADAPTER_SHARE * changed, "logits_absmax": absmax, "hidden_size": hidden, "layers": layers}


class MergeError(StageFailed):
    pass


def probe_rows(run: RunDir, n: int) -> list[dict]:
    """The first n validation rows (training rows when there is no validation split): the merge's and the export's probes."""
    rows = []
    for name in ("val.jsonl", "train.jsonl"):
        p = run.data / name
        rows += read_jsonl(p)
        if len(rows) >= n:
            break
    return rows[:n]


def probe_batch(run: RunDir, n: int, pad_id: int):
    """probe_rows right-padded: input ids, attention mask, and labels (prompt masked as in training, -100 on padding) for
    the perplexity of the responses."""
    return rows_batch(probe_rows(run, n), pad_id)


def rows_batch(rows: list[dict], pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(r.get("labels", r["input_ids"]))
    return ids, mask, labels


def logits(model, ids, mask):
    import torch

    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()


def max_diff(a, b, mask) -> float:
    keep = mask.bool()  # compare real tokens only: pad positions carry no meaning
    return float((a - b).abs()[keep].max())


def perplexity(logits, labels) -> float:
    import torch

    shift, target = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return float(torch.exp(nll / (target != -100).sum().clamp(min=1)))


def dequantized_base(recipe: Recipe):
    """The 4-bit base as training saw it, with every 4-bit layer replaced by a float32 nn.Linear holding dequant(W4)."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    model = load_model(recipe.base_model.id, recipe, quantized=True)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = dequantize_bnb_weight(child.weight, state=child.weight.quant_state).to(torch.float32)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=torch.float32)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.float())
                setattr(module, child_name, lin)
    # Now a plain float32 model: drop what makes transformers treat it as a bitsandbytes one (which refuses dtype casts
    # and would write a quantization_config into the merged model's config.json).
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def base_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What the merged weights were built on: the sha256 of a local base's weight files, or the Hub commit resolved
    from the local cache."""
    from .run import sha256_file

    b = recipe.base_model
    if Path(b.id).is_dir():
        files = sorted(Path(b.id).glob("*.safetensors"))
        return {"id": "local", "weights_sha256": {f.name: sha256_file(f) for f in files}}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(b.id, "config.json", revision=b.revision)
        commit = Path(cached).parent.name if isinstance(cached, str) else None
    except Exception:  # noqa: BLE001  (the cache layout is informational only)
        commit = None
    return {"id": b.id, "revision": b.revision, "commit": commit}


def merge(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from . import runbase

    m = recipe.merge
    tok = runbase.tokenizer(recipe, run)  # an extended vocabulary travels with the merged model
    ids, mask, labels = probe_batch(run, m.probes, tok.pad_token_id)
    # The model as trained and evaluated: 4-bit base (when the recipe quantizes) + adapter.
    trained_logits = None
    if recipe.quantization.bits != 16:
        trained = PeftModel.from_pretrained(runbase.load(recipe, run, quantized=True)[0], str(run.final_adapter(recipe.stages)))
        trained_logits = logits(trained, ids, mask)
        del trained
    # float32 for the comparison: merge arithmetic is exact to ~1e-6 there, so any larger gap is a real defect.
    # The base as the run trained it: vocabulary grown, blocks expanded (runbase.py), so the merged model has their shapes.
    if m.base == "dequantized_4bit":
        model = dequantized_base(recipe)
        runbase.reshape(model, recipe, run)
    else:
        model = runbase.load(recipe, run, quantized=False, dtype=torch.float32)[0]
    base_logits = logits(model, ids, mask)
    model = PeftModel.from_pretrained(model, str(run.final_adapter(recipe.stages)))
    adapter_logits = logits(model, ids, mask)
    changed = max_diff(adapter_logits, base_logits, mask)
    if changed <= CHANGED_MIN:
        raise MergeError(f"the adapter does not change the base's outputs (max logit change {changed:.2e}); nothing to merge")
    atol, why = tolerance(model, adapter_logits, mask, changed, m.atol)
    merged = model.merge_and_unload()
    merged_logits = logits(merged, ids, mask)
    diff = max_diff(merged_logits, adapter_logits, mask)
    fuse_experts(merged)  # MoE: back to transformers' fused layout so the merged model loads anywhere
    lora_left = [n for n, _ in merged.named_parameters() if "lora_" in n]
    check: dict[str, Any] = {
        "base": m.base,
        "base_weights": base_fingerprint(recipe),
        "probes": int(ids.shape[0]),
        "probe_tokens": int(mask.sum()),
        "adapter_vs_base_max_abs_diff": changed,
        "merged_vs_adapter_max_abs_diff": diff,
        "perplexity": {"base": perplexity(base_logits, labels), "adapter": perplexity(adapter_logits, labels),
                       "merged": perplexity(merged_logits, labels),
                       **({"as_trained": perplexity(trained_logits, labels)} if trained_logits is not None else {})},
        # The model as trained (4-bit base + adapter) vs the merged one: the quantization error for original_16bit, ~0
        # for dequantized_4bit. Recorded, not gated: it is the price of the policy, not a defect.
        "merged_vs_trained_max_abs_diff": max_diff(merged_logits, trained_logits, mask) if trained_logits is not None else None,
        "atol": atol,
        **why,
        "atol_margin": atol / diff if diff > 0 else None,  # how many times the gap fits under the tolerance
        "compared_in": "float32",
        "saved_dtype": m.dtype,
        "lora_params_left": len(lora_left),
        "device": device(),
    }
    if m.verify and (diff > atol or lora_left):
        check["passed"] = False
        MergeCheck(**check).write(run.merge_check)
        raise MergeError(f"merged model differs from the adapter by {diff:.2e} > the tolerance {atol:.2e} ({why['atol_source']}; "
                         f"see {run.merge_check})")
    merged = merged.to(DTYPES[m.dtype])
    with run.staged("merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # Reload with plain transformers (no finetune code involved): the files must hold exactly the weights we
        # verified, in the dtype asked for.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[m.dtype], device_map={"": device()})
        ours, theirs = merged.state_dict(), reloaded.state_dict()
        differing = sorted(k for k in ours.keys() | theirs.keys() if k not in ours or k not in theirs or not torch.equal(ours[k], theirs[k]))
        weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in reloaded.parameters() if p.is_floating_point()})
        # What a user loading the files gets, compared in float32 with the adapter: the cost of the saved dtype.
        saved_logits = logits(reloaded.float(), ids, mask)
        del reloaded, ours, theirs
        check.update(
            reloaded_tensors_differing=len(differing),
            reloaded_differing_examples=differing[:5],
            saved_vs_adapter_max_abs_diff=max_diff(saved_logits, adapter_logits, mask),
            saved_weight_dtypes=weight_dtypes,
        )
        check["passed"] = (not m.verify) or (not differing and weight_dtypes == [m.dtype])
        if not check["passed"]:
            MergeCheck(**check).write(run.merge_check)
            raise MergeError(f"saved merged model does not reload as verified (see {run.merge_check})")
    MergeCheck(**check).write(run.merge_check)
    log.info("merge: adapter moved logits by %.3g; merged vs adapter %.2e (tolerance %.2e, %s); saved as %s", changed, diff, atol,
             why["atol_source"], m.dtype)
    return check

