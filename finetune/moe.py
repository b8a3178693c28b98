"""Mixture-of-experts layers that QLoRA can reach.

transformers 5 stores the experts of Mixtral, GPT-OSS (and other `use_experts_implementation` classes) as fused 3-D
parameters (`gate_up_proj[E, ...]`, `down_proj[E, ...]`), not as `nn.Linear` modules. bitsandbytes only replaces
`nn.Linear` and peft's `all-linear` only targets linear modules, so a 4-bit load leaves the experts (the bulk of
an MoE model's weights) in 16-bit and untouched by LoRA. `unfuse_experts` swaps each fused experts module for an
equivalent one holding one `gate_up` and one `down` `nn.Linear` per expert, which bitsandbytes can quantize and
LoRA can adapt; `fuse_experts` (the inverse) writes merged weights back into the original fused layout so the merged model
loads in plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """Experts classes decorated by transformers' `use_experts_implementation` carry these attributes."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "is_concatenated")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and getattr(module, "down_proj").dim() == 3
    )


class LinearExperts(nn.Module):
    """Drop-in replacement for a fused experts module: same routing loop, one nn.Linear pair per expert."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        if getattr(fused, "has_post_expert_norm", False):
            raise NotImplementedError("experts with a post-expert norm are not supported")
        self.num_experts = fused.num_experts
        self.has_gate = getattr(fused, "has_gate", True)
        self.has_bias = getattr(fused, "has_bias", False)
        self.is_transposed = fused.is_transposed
        self.fused_class = type(fused)
        gate_up = fused.gate_up_proj if self.has_gate else fused.up_proj
        name_up = "gate_up_proj" if self.has_gate else "up_proj"
        self.up_name = name_up
        experts = []
        for e in range(self.num_experts):
            w_up = gate_up[e].T if self.is_transposed else gate_up[e]  # -> [out, in], nn.Linear's layout
            w_down = fused.down_proj[e].T if self.is_transposed else fused.down_proj[e]
            pair = nn.Module()
            pair.gate_up = _linear(w_up, getattr(fused, f"{name_up}_bias", None), e, self.has_bias)
            pair.down = _linear(w_down, getattr(fused, "down_proj_bias", None), e, self.has_bias)
            experts.append(pair)
        self.experts = nn.ModuleList(experts)
        # Keep the original module (its weights removed) for its activation: `_apply_gate` reads act_fn, alpha,
        # limit... object.__setattr__ keeps it out of the module tree, state dict and peft's targeting.
        for name in [name_up, f"{name_up}_bias", "down_proj", "down_proj_bias"]:
            if hasattr(fused, name):
                delattr(fused, name)
        object.__setattr__(self, "_fused", fused)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.has_gate:
            return self._fused._apply_gate(h)
        return self._fused.act_fn(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # num_experts + 1 classes: index num_experts marks tokens routed away (expert parallelism), as upstream.
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for idx in hit:
            e = int(idx[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            h = self._act(self.experts[e].gate_up(hidden_states[tok]))
            h = self.experts[e].down(h) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    def to_fused(self) -> nn.Module:
        """Rebuild the original fused module from the (merged, unquantized) per-expert linears."""
        fused = self._fused
        ups = [p.gate_up.weight.data for p in self.experts]
        downs = [p.down.weight.data for p in self.experts]
        if self.is_transposed:
            ups, downs = [w.T for w in ups], [w.T for w in downs]
        setattr(fused, self.up_name, nn.Parameter(torch.stack(ups).contiguous(), requires_grad=False))
        fused.down_proj = nn.Parameter(torch.stack(downs).contiguous(), requires_grad=False)
        if self.has_bias:
            setattr(fused, f"{self.up_name}_bias", nn.Parameter(torch.stack([p.gate_up.bias.data for p in self.experts]), requires_grad=False))
            fused.down_proj_bias = nn.Parameter(torch.stack([p.down.bias.data for p in self.experts]), requires_grad=False)
        return fused


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, e: int, has_bias: bool) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=has_bias, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if has_bias:
        lin.bias = nn.Parameter(bias[e].detach().clone(), requires_grad=False)
    return lin


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module in `model`; returns how many were replaced."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        model.set_submodule(name, LinearExperts(model.get_submodule(name)))
    return len(names)


def fuse_experts(model: nn.Module) -> int:
    names = [n for n, m in model.named_modules() if isinstance(m, LinearExperts)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_fused())
    return len(names)
