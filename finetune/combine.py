"""`finetune merge --base M --adapters A B ...`: several LoRA adapters of one base combined into one, through peft's
`add_weighted_adapter` (BioMistral gained 0.6 to 2.1 points by merging its SFT model with the base; TIES and DARE are
the methods it compared).

Writes OUT/adapter/ (a plain peft adapter: `finetune eval M --adapter OUT/adapter` scores it), OUT/merge_check.json
(method, weights, density, seed, each input's hash, and proof the result changes the base), and with `--fold`
OUT/merged/, the combination folded into the 16-bit base and verified like the merge stage. `finetune publish OUT`
publishes it like a run.

Incompatible inputs fail before any weight is loaded, with one message: adapters of different bases, unequal ranks
for the methods that need equal ones (linear, ties, dare_*), different target modules.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from data_prep.outputs import mark

from .errors import UserError
from .run import sha256_file, write_json

log = logging.getLogger("finetune")

METHODS = ("linear", "ties", "dare_ties", "dare_linear", "cat")
EQUAL_RANK = ("linear", "ties", "dare_ties", "dare_linear")  # peft stacks A and B matrices: their shapes must agree
PROBES = ("The court held that", "The patient presented with", "Solve for x: 2x + 3 = 11.", "In summary,")


def _config(adapter: Path) -> dict[str, Any]:
    cfg = adapter / "adapter_config.json"
    if not cfg.exists():
        raise UserError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    data = json.loads(cfg.read_text(encoding="utf-8"))
    if data.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter}: a {data.get('peft_type')} adapter; only LoRA adapters can be combined")
    return data


def _base_identity(name: str) -> str:
    """The same base whatever the path it was loaded from: a local folder by its weights' hashes, a Hub id by name."""
    p = Path(name)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if files:
            return "sha256:" + ",".join(sha256_file(f) for f in files)
    return name


def check_inputs(base: str, adapters: list[Path], method: str, weights: list[float]) -> list[dict[str, Any]]:
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if len(adapters) < 2:
        raise UserError("--adapters: give at least two adapters to combine")
    if len(weights) != len(adapters):
        raise UserError(f"--weights: {len(weights)} weights for {len(adapters)} adapters")
    configs = [_config(a) for a in adapters]
    want = _base_identity(base)
    for a, c in zip(adapters, configs):
        theirs = c.get("base_model_name_or_path") or ""
        if theirs != base and _base_identity(theirs) != want:
            raise UserError(f"{a}: trained on {theirs!r}, not on --base {base!r}; adapters of different bases cannot be combined")
    ranks = [c["r"] for c in configs]
    if method in EQUAL_RANK and len(set(ranks)) > 1:
        raise UserError(f"--method {method} needs adapters of equal rank, got r = {', '.join(map(str, ranks))}; "
                        "use --method cat (ranks add up) or retrain with one lora.r")
    targets = [sorted(c["target_modules"]) if isinstance(c["target_modules"], list) else c["target_modules"] for c in configs]
    if any(t != targets[0] for t in targets):
        raise UserError(f"{adapters[1]}: adapts other modules than {adapters[0]}; combined adapters must target the same layers")
    return configs


def combine(base: str, adapters: list[Path], method: str, weights: list[float] | None, density: float, out: Path,
            seed: int = 0, fold: bool = False, atol: float | None = None) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from .merge import CHANGED_MIN, MergeError, logits, max_diff, tolerance
    from .models import Loader, load_model, load_tokenizer
    from .moe import fuse_experts

    weights = weights or [1.0 / len(adapters)] * len(adapters)
    configs = check_inputs(base, adapters, method, weights)
    sparsifies = method not in ("linear", "cat")  # ties and dare keep a `density` share of each adapter
    if sparsifies and not 0 < density <= 1:
        raise UserError(f"--density {density}: the share of each adapter's weights kept, in (0, 1]")
    # Through the loaders every run uses: the remote-code refusal, the pad-token fix, and MoE experts unfused into the
    # per-expert linears the adapters were trained on (a fused Mixtral has no module an expert adapter could reach).
    spec = Loader.plain(base, "--base")
    tok = load_tokenizer(str(adapters[0]) if (adapters[0] / "tokenizer_config.json").exists() else base, spec)
    model = load_model(base, spec, quantized=False, dtype=torch.float32)
    enc = tok(list(PROBES), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    base_logits = logits(model, ids, mask)
    names = [f"in{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, a in zip(names[1:], adapters[1:]):
        model.load_adapter(str(a), adapter_name=name)
    torch.manual_seed(seed)  # DARE drops weights at random
    kw = {"density": density} if sparsifies else {}
    model.add_weighted_adapter(names, weights, "default", combination_type=method, **kw)
    model.set_adapter("default")
    model.eval()  # the new adapter's modules are created in training mode: its LoRA dropout would make the probes random
    combined_logits = logits(model, ids, mask)
    changed = max_diff(combined_logits, base_logits, mask)
    if changed <= CHANGED_MIN:
        raise UserError(f"the combined adapter does not change the base's outputs (max logit change {changed:.2e}): "
                        "check --weights and --density")
    mark(out, "combination")
    shutil.rmtree(out / "adapter", ignore_errors=True)
    (out / "adapter").mkdir(parents=True)
    model.save_pretrained(out / "adapter", selected_adapters=["default"], safe_serialization=True)
    tok.save_pretrained(out / "adapter")
    check: dict[str, Any] = {
        "kind": "adapter_combination",
        "method": method,
        "weights": weights,
        "density": density if sparsifies else None,
        "seed": seed,
        "base": base,
        "inputs": [{"adapter": a.name, "r": c["r"], "lora_alpha": c["lora_alpha"],
                    "sha256": sha256_file(a / "adapter_model.safetensors")} for a, c in zip(adapters, configs)],
        "combined_r": json.loads((out / "adapter" / "adapter_config.json").read_text())["r"],
        "combined_vs_base_max_abs_diff": changed,
        "probes": len(PROBES),
    }
    if fold:
        atol, why = tolerance(model, combined_logits, mask, changed, atol)
        merged = model.merge_and_unload(adapter_names=["default"])
        diff = max_diff(logits(merged, ids, mask), combined_logits, mask)
        fuse_experts(merged)  # MoE: back to transformers' fused layout, so the merged model loads anywhere
        check.update(merged_vs_adapter_max_abs_diff=diff, atol=atol, **why, passed=diff <= atol)
        if diff > atol:
            write_json(out / "merge_check.json", check)
            # a failed check, as in `finetune merge RECIPE` (exit 1): the inputs were fine, the result was not
            raise MergeError(f"folding the combined adapter into the base changed its outputs by {diff:.2e} > {atol:.2e}")
        shutil.rmtree(out / "merged", ignore_errors=True)
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tok.save_pretrained(out / "merged")
    else:
        check["passed"] = True
    write_json(out / "merge_check.json", check)
    log.info("merge: %d adapters combined with %s into %s (changes the base by %.3g)", len(adapters), method, out, changed)
    return check
