"""Architecture families: how to recognise them, and the tiny stand-ins `--smoke` builds for each.

A stand-in keeps the family's structure (GQA, MoE routing, Falcon's fused QKV and parallel attention, GPT-OSS's
biased experts) and shrinks the sizes. Every matmul's input width is a multiple of 64 because bitsandbytes'
CPU 4-bit kernel is only correct when a quantization block (64 values) never spans two rows (see models.py).
"""

from __future__ import annotations

import difflib
import re

from .errors import UserError
from .recipe import FAMILIES

# Substrings of hub ids that name a family. Order matters: "mixtral" before "mistral", "qwen2" before "qwen".
_ID_PATTERNS = [
    ("mixtral", "mixtral"),
    ("mistral", "mistral"),
    ("gpt-oss", "gpt_oss"),
    ("gpt_oss", "gpt_oss"),
    ("falcon", "falcon"),
    ("qwen2", "qwen2"),
    ("qwen", "qwen2"),
    ("llama", "llama"),
    ("saul", "mistral"),  # SaulLM is a Mistral-7B continued-pretraining
    ("biomistral", "mistral"),
]

# Shared tiny shape: 2 blocks, hidden 64, 4 query heads of 16, 2 KV heads (GQA as in the real models).
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_STANDINS = {
    "llama": dict(_TINY, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(_TINY, intermediate_size=128, num_key_value_heads=2, sliding_window=256, tie_word_embeddings=False),
    "qwen2": dict(_TINY, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False),
    # Mixtral-8x7B routes each token to 2 of 8 experts; 4 experts keep the routing real at a quarter of the size.
    "mixtral": dict(_TINY, intermediate_size=128, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    # GPT-OSS: biased, interleaved gate/up experts and attention sinks; head_dim is explicit in its config.
    "gpt_oss": dict(_TINY, intermediate_size=128, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"], sliding_window=128),
    # Falcon-7B: multi-query attention, parallel attention + MLP; its linear layers are FalconLinear subclasses.
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
                   new_decoder_architecture=False, tie_word_embeddings=False),
}
_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "mixtral": "MixtralConfig",
    "gpt_oss": "GptOssConfig",
    "falcon": "FalconConfig",
}


def infer_family(model_id: str, family: str | None = None) -> str:
    """The family named in the recipe, or the one its model id names."""
    if family is not None:
        return family
    low = model_id.lower()
    for pattern, fam in _ID_PATTERNS:
        if pattern in low:
            return fam
    raise UserError(
        f"base_model.id {model_id!r}: cannot tell its architecture family; set base_model.family to one of {', '.join(FAMILIES)}"
    )


def check_family(family: str) -> str:
    if family not in _STANDINS:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown architecture family {family!r} (known: {', '.join(FAMILIES)}){hint}")
    return family


def tiny_config(family: str, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """A transformers config of the family's shape, shrunk. Imports transformers lazily."""
    import transformers

    check_family(family)
    cls = getattr(transformers, _CONFIG_CLASSES[family])
    kwargs = dict(_STANDINS[family], vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return cls(**kwargs)


def model_type_to_family(model_type: str) -> str | None:
    """Map a loaded config's model_type onto our family names (None when it is not one of ours)."""
    return model_type if model_type in _STANDINS else None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
