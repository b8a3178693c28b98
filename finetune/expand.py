"""Llama Pro block expansion (Wu et al., ACL 2024; issue 20, first piece): after every (L/N)-th decoder block a copy of
it is inserted whose attention output projection and MLP down projection are zero, so each new block adds nothing to
the residual stream and the expanded model computes exactly what the original did. Training then updates only the new
blocks. `expand_blocks` edits a loaded transformers model in place and keeps its config in step (layer count, and
`layer_types` where the family has one), so the result saves and reloads as a plain transformers model.
"""

from __future__ import annotations

import copy

from .errors import UserError

# the projections that write into the residual stream, per family's module names
ZEROED = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def expand_blocks(model, blocks: int) -> list[int]:
    """Insert `blocks` identity copies; returns the indices of the new blocks in the expanded model."""
    layers = model.model.layers
    total = len(layers)
    if blocks < 1 or total % blocks:
        raise UserError(f"expand.blocks {blocks}: must divide the model's {total} layers (Llama Pro inserts one copy after every "
                        "L/N-th block)")
    group = total // blocks
    out, new = [], []
    for i, layer in enumerate(layers):
        out.append(layer)
        if (i + 1) % group == 0:
            twin = copy.deepcopy(layer)
            for part, proj in ZEROED:
                lin = getattr(getattr(twin, part), proj)
                lin.weight.data.zero_()
                if lin.bias is not None:
                    lin.bias.data.zero_()
            new.append(len(out))
            out.append(twin)
    for idx, layer in enumerate(out):  # the KV cache is indexed by layer
        layer.self_attn.layer_idx = idx
    model.model.layers = type(layers)(out)
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types:
        cfg.layer_types = [t for i, t in enumerate(types) for t in ([t, t] if (i + 1) % group == 0 else [t])]
    cfg.num_hidden_layers = len(out)
    return new


def stand_in_blocks(layers: int) -> int:
    """The blocks to add to a stand-in model of `layers` layers (--smoke, --laptop), whose count the recipe's N need not
    divide: the divisor of `layers` closest to a quarter of it, Llama Pro's share (8 new blocks on LLaMA2-7B's 32)."""
    return min((d for d in range(1, layers + 1) if layers % d == 0), key=lambda d: (abs(d - layers / 4), d))
