"""Stage 4, merge: the adapter folded into a 16-bit copy of the original base, and proven equal to it.

Order of checks (peft's own test discipline): first show the adapter changes the base's logits (a zero-init or
untrained adapter would make "merged == adapter" pass trivially), then compare merged and adapter logits in
float32 on probe rows, then reload the saved files with plain transformers and compare again. Everything lands in
RUN/merge_check.json; a merge that fails its tolerance is not kept.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .errors import StageFailed
from .models import DTYPES, device, load_model, load_tokenizer
from .moe import refuse_experts
from .recipe import Recipe
from .run import RunDir, write_json

log = logging.getLogger("finetune")

CHANGED_MIN = 1e-6  # an adapter that moves no logit by more than this did not learn anything


class MergeError(StageFailed):
    pass


def probe_batch(run: RunDir, n: int, pad_id: int):
    """The first n validation rows (training rows when there is no validation split), right-padded."""
    import torch

    rows = []
    for name in ("val.jsonl", "train.jsonl"):
        p = run.data / name
        rows += [json.loads(line)["input_ids"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(rows) >= n:
            break
    rows = rows[:n]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def logits(model, ids, mask):
    import torch

    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()


def max_diff(a, b, mask) -> float:
    keep = mask.bool()  # compare real tokens only: pad positions carry no meaning
    return float((a - b).abs()[keep].max())


def merge(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = recipe.merge
    tok = load_tokenizer(recipe.base_model.id, recipe)
    ids, mask = probe_batch(run, m.probes, tok.pad_token_id)
    # float32 for the comparison: merge arithmetic is exact to ~1e-6 there, so any larger gap is a real defect.
    model = load_model(recipe.base_model.id, recipe, quantized=False, dtype=torch.float32)
    base_logits = logits(model, ids, mask)
    model = PeftModel.from_pretrained(model, str(run.adapter))
    adapter_logits = logits(model, ids, mask)
    changed = max_diff(adapter_logits, base_logits, mask)
    if changed <= CHANGED_MIN:
        raise MergeError(f"the adapter does not change the base's outputs (max logit change {changed:.2e}); nothing to merge")
    merged = model.merge_and_unload()
    merged_logits = logits(merged, ids, mask)
    diff = max_diff(merged_logits, adapter_logits, mask)
    refuse_experts(merged)  # MoE: back to transformers' fused layout so the merged model loads anywhere
    lora_left = [n for n, _ in merged.named_parameters() if "lora_" in n]
    check: dict[str, Any] = {
        "base": m.base,
        "probes": int(ids.shape[0]),
        "probe_tokens": int(mask.sum()),
        "adapter_vs_base_max_abs_diff": changed,
        "merged_vs_adapter_max_abs_diff": diff,
        "atol": m.atol,
        "compared_in": "float32",
        "saved_dtype": m.dtype,
        "lora_params_left": len(lora_left),
        "device": device(),
    }
    if m.verify and (diff > m.atol or lora_left):
        check["passed"] = False
        write_json(run.merge_check, check)
        raise MergeError(f"merged model differs from the adapter by {diff:.2e} > merge.atol {m.atol} (see {run.merge_check})")
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
            write_json(run.merge_check, check)
            raise MergeError(f"saved merged model does not reload as verified (see {run.merge_check})")
    write_json(run.merge_check, check)
    log.info("merge: adapter moved logits by %.3g; merged vs adapter %.2e (atol %.0e); saved as %s", changed, diff, m.atol, m.dtype)
    return check

