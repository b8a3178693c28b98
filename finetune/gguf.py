"""A GGUF file as a base model (the format Ollama, LM Studio and llama.cpp keep models in).

transformers reads a GGUF with the `gguf` package and dequantizes every tensor to a plain torch model, but that model
keeps a `GgufConfig` quantization config and `save_pretrained` then refuses ("quantized with gguf and is not
serializable"). Dequantizing takes seconds to minutes and happens on every load, so we convert once: the GGUF is
dequantized, its quantization config dropped, and the weights saved as a plain 16-bit (or float32) model folder in
the user cache, keyed by the file's sha256 and the dtype (float32 without CUDA: GGUF blocks dequantize exactly
to float32, not to bfloat16). Every stage then loads that folder like any base (QLoRA quantizes it to
NF4 as usual); run.lock and the model card name the GGUF and its sha256.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .run import sha256_file

log = logging.getLogger("finetune")

CONVERTED = "finetune-gguf.json"  # written last into a converted folder: its presence means the conversion finished


def cache_root() -> Path:
    """finetune's user cache: $FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "finetune"


def split(model_id: str, gguf_file: str | None) -> tuple[Path, str] | None:
    """(folder, file name) when the base is a GGUF: `id` a `.gguf` path, or `id` a folder plus `gguf_file`."""
    if gguf_file:
        return Path(model_id).expanduser(), gguf_file
    if model_id.lower().endswith(".gguf"):
        p = Path(model_id).expanduser()
        return p.parent, p.name
    return None


def converted_dir(sha256: str, dtype: str) -> Path:
    return cache_root() / "gguf" / f"{sha256[:24]}-{dtype}"


def dtype_for(base) -> str:
    """The dtype the GGUF is saved in: the recipe's 16-bit dtype on a GPU, float32 without one (as models.weights_dtype)."""
    import torch

    return base.dtype if torch.cuda.is_available() else "float32"


def describe(folder: Path, name: str) -> dict[str, str]:
    """What run.lock and the card record of a GGUF base: its file name and sha256 (this reads the whole file)."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"base_model: the GGUF file {path} is not there")
    return {"file": name, "sha256": sha256_file(path)}


def convert(folder: Path, name: str, sha256: str, dtype: str) -> Path:
    """The GGUF as a plain model folder (config, safetensors, tokenizer), converted once and reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(sha256, dtype)
    if (out / CONVERTED).is_file():
        return out
    log.info("base_model: converting the GGUF %s (sha256 %s...) to a %s model in %s (once)", name, sha256[:12], dtype, out)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise UserError(f"base_model: {folder / name} cannot be read as a GGUF model ({type(e).__name__}: {e}); "
                        "transformers reads GGUF files of the llama, mistral, qwen2, falcon and a few other architectures") from None
    # The dequantized weights are plain tensors; only the config still says "gguf", which blocks save_pretrained.
    model.config.quantization_config = None
    for attr in ("quantization_method", "hf_quantizer"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))  # unique: two runs may convert at once
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED).write_text(json.dumps({"gguf_file": name, "sha256": sha256, "dtype": dtype}, indent=1) + "\n")
        try:
            tmp.rename(out)
        except OSError:
            if not (out / CONVERTED).is_file():  # not another process finishing first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
