"""Llama Pro block expansion (issue 20, first piece): the expanded model starts as the original, to 1e-6, in the llama
and mistral families, and reloads with plain transformers with the new layer count."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import UserError


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
