"""Loading the base model and tokenizer, and making QLoRA really 4-bit.

Three things transformers 5.23 + bitsandbytes 0.50.2 get wrong for QLoRA, each fixed here and measured by
`quantization_report` after every quantized load (counting is the only way to notice):

1. `replace_with_bnb_linear` converts only modules whose type *is* `nn.Linear`; subclasses such as Falcon's
   `FalconLinear` are skipped, so a "4-bit" Falcon trains a 16-bit base. We quantize such subclasses ourselves,
   after checking on a probe input that their forward really is `x @ W.T + b`.
2. MoE experts (Mixtral, GPT-OSS) are fused 3-D parameters, out of reach of bitsandbytes and of LoRA's
   `all-linear`; `moe.unfuse_experts` turns them into per-expert linears, which are then quantized like the rest.
3. On CPUs with AVX512-BF16, the first `Linear4bit` forward in eval mode under no_grad repacks the weights in place
   to a format without autograd support; training after any eval then gets wrong gradients. We switch that
   repacking off on every `Linear4bit` (found on this stack: bitsandbytes repacks 4-bit weights for CPU kernels).

A fourth trap we guard rather than fix: bitsandbytes' native CPU 4-bit dequantization is wrong when a
quantization block (64 values) spans two weight rows, i.e. when `in_features % 64 != 0`. Real models never have
such shapes; we refuse to train on one on CPU instead of training against silently corrupted weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import QuantizationError, UserError
from .moe import LinearExperts, unfuse_experts
from .recipe import BaseModelSpec, QuantizationSpec, Recipe

log = logging.getLogger("finetune")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size for weights


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Loader:
    """What loading a model needs, and nothing more: the base model section, how to quantize it, and how ranks shard.
    Every command loads through it (train, eval, merge, combine, chat, the data commands), so the remote-code refusal,
    the pad-token fix and MoE expert unfusing apply everywhere; `Loader.of(recipe)` for a run, `Loader.plain(id)` for a
    model given on the command line."""

    base: BaseModelSpec
    quantization: QuantizationSpec = field(default_factory=lambda: QuantizationSpec(bits=16))
    strategy: str = "ddp"
    what: str = "base_model.id"  # how messages name the model: the recipe key, or the option it came from

    @classmethod
    def of(cls, recipe: Recipe) -> Loader:
        return cls(recipe.base_model, recipe.quantization, recipe.distributed.strategy)

    @classmethod
    def plain(cls, model_id: str, what: str, bits: int = 16, trust_remote_code: bool = False) -> Loader:
        return cls(BaseModelSpec(id=model_id, trust_remote_code=trust_remote_code),
                   QuantizationSpec(bits=bits, on_low_share="warn"), what=what)


def loader(spec: Loader | Recipe) -> Loader:
    return spec if isinstance(spec, Loader) else Loader.of(spec)



def placement(spec: Loader | Recipe) -> dict[str, Any] | None:
    """Where the weights load: this rank's own GPU under DDP (not all on cuda:0), nowhere in particular under FSDP or
    DeepSpeed (they place the shards), the CPU without CUDA."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and loader(spec).strategy != "ddp":
        return None
    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}


def compute_dtype(spec: Loader | Recipe) -> torch.dtype:
    # CPUs compute 4-bit matmuls in float32 (bf16 autocast on CPU is slow and changes nothing we test).
    return DTYPES[loader(spec).quantization.compute_dtype] if device() == "cuda" else torch.float32


def weights_dtype(spec: Loader | Recipe) -> torch.dtype:
    return DTYPES[loader(spec).base.dtype] if device() == "cuda" else torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16); scripts/bench_cpu.py reports it. finetune keeps
    float32 on CPUs anyway: with a float32 LoRA adapter, bf16 training was no faster (the casts ate the gain), and bf16
    logits (steps of 1/8 at |logit| 16 to 32) tie the scores of labels and options in evaluation (docs/laptop.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.backends.mkldnn.is_available()


_REMOTE_CODE = ("{what} {id!r} needs Python code shipped with the model repository, which finetune does not run "
                "unless the recipe says so: set base_model.trust_remote_code: true only for a repository you trust")


def load_tokenizer(model_path: str, spec: Loader | Recipe):
    from transformers import AutoTokenizer

    base = loader(spec).base
    try:
        tok = AutoTokenizer.from_pretrained(model_path, revision=_revision(model_path, base), trust_remote_code=base.trust_remote_code)
    except OSError as e:
        raise UserError(f"{loader(spec).what} {base.id!r}: cannot load its tokenizer ({e})") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(_REMOTE_CODE.format(what=loader(spec).what, id=base.id)) from None
    if tok.pad_token is None:
        # Our labels carry the EOS explicitly, so pad == eos cannot mask it; a distinct pad is still preferred.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _revision(model_path: str, base: BaseModelSpec) -> str | None:
    return None if Path(model_path).exists() else base.revision


def bnb_config(spec: Loader | Recipe):
    from transformers import BitsAndBytesConfig

    spec = loader(spec)
    q = spec.quantization
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(spec),
            # FSDP/ZeRO-3 shard parameters of one dtype: the packed 4-bit weights are stored in the compute dtype
            # (Answer.AI's FSDP+QLoRA); DDP keeps bitsandbytes' uint8 storage.
            **({"bnb_4bit_quant_storage": compute_dtype(spec)} if spec.strategy != "ddp" else {}),
        )
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(model_path: str, spec: Loader | Recipe, quantized: bool, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base for training or evaluation (`quantized`: as the recipe says) or as a plain 16/32-bit model
    (merging). MoE experts are always unfused, so adapter module names agree between training and merging."""
    from transformers import AutoModelForCausalLM

    spec = loader(spec)
    qconf = bnb_config(spec) if quantized else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=_revision(model_path, spec.base),
            dtype=dtype or weights_dtype(spec),
            quantization_config=qconf,
            device_map=placement(spec),
            trust_remote_code=spec.base.trust_remote_code,
        )
    except OSError as e:
        raise UserError(f"{spec.what} {spec.base.id!r}: cannot load the model ({e})") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(_REMOTE_CODE.format(what=spec.what, id=spec.base.id)) from None
    unfuse_experts(model)
    if qconf is not None and spec.quantization.bits == 4:
        quantize_leftover_linears(model, spec)
        disable_cpu_repack(model)
    return model


# --------------------------------------------------------------------------------------------------
# 4-bit: finishing what transformers' replacement misses, and measuring the result


def _skip_names(model: nn.Module) -> set[str]:
    """Modules kept in 16-bit on purpose: the output head (and any the model declares fp32)."""
    names = {"lm_head"}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if m is out:
            names.add(n)
    names.update(getattr(model, "_keep_in_fp32_modules", None) or [])
    return names


def _behaves_like_linear(module: nn.Linear) -> bool:
    """True when a Linear subclass computes exactly x @ W.T + b (checked on a random probe input)."""
    with torch.no_grad():
        x = torch.randn(3, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
        ref = nn.functional.linear(x, module.weight, module.bias)
        return torch.allclose(module(x), ref, rtol=1e-4, atol=1e-5)


def to_linear4bit(module: nn.Linear, spec: Loader | Recipe) -> nn.Module:
    import bitsandbytes as bnb

    q = loader(spec).quantization
    new = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype(spec),
        compress_statistics=q.double_quant,
        quant_type=q.type,
        device="meta",
    )
    dev = module.weight.device
    new.weight = bnb.nn.Params4bit(
        module.weight.data.to("cpu"), requires_grad=False, compress_statistics=q.double_quant, quant_type=q.type
    )
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.data.to("cpu"), requires_grad=False)
    new = new.to(dev)  # moving an unquantized Params4bit quantizes it
    new.requires_grad_(False)
    return new


def quantize_leftover_linears(model: nn.Module, spec: Loader | Recipe) -> list[str]:
    """Quantize the linear layers transformers left in 16-bit: nn.Linear subclasses (Falcon) and unfused experts."""
    import bitsandbytes as bnb

    skip = _skip_names(model)
    expert_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LinearExperts))
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        if name in skip or name.split(".")[-1] in skip:
            continue
        if type(module) is nn.Linear and not name.startswith(expert_prefixes):
            continue  # an exact nn.Linear transformers chose not to convert: respect that
        if type(module) is not nn.Linear and not _behaves_like_linear(module):
            log.warning("left %s (%s) in 16-bit: its forward is not a plain linear map", name, type(module).__name__)
            continue
        model.set_submodule(name, to_linear4bit(module, spec))
        done.append(name)
    if done:
        log.info("quantized %d linear layers transformers left in 16-bit (e.g. %s)", len(done), done[0])
    return done


def disable_cpu_repack(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 on the first eval forward (breaks backprop)."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def lora_targets(model: nn.Module, spec) -> list[str] | str:
    """`all-linear` resolved to explicit module paths: every linear layer (16-bit or quantized) but the output head.
    peft resolves `all-linear` itself, but for Mixtral under transformers 5 it then adds `target_parameters` that
    wrap the router's weight (and fail with dropout); explicit paths keep LoRA on exactly the linear layers."""
    if spec != "all-linear":
        return spec
    import bitsandbytes as bnb

    skip = _skip_names(model)
    return sorted(
        n for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and n not in skip and n.split(".")[-1] not in skip
    )


@dataclass
class QuantReport:
    """How much of the base really is quantized. Block matmul weights = the linear / expert weights inside the
    transformer blocks, the weights QLoRA means to hold in 4-bit; embeddings and lm_head are counted apart."""

    bits: int
    quantized_modules: int = 0
    quantized_params: int = 0
    unquantized_matmul_params: int = 0
    other_params: int = 0
    unquantized_matmul_modules: list[str] = field(default_factory=list)

    @property
    def matmul_share(self) -> float:
        total = self.quantized_params + self.unquantized_matmul_params
        return self.quantized_params / total if total else 0.0

    @property
    def overall_share(self) -> float:
        total = self.quantized_params + self.unquantized_matmul_params + self.other_params
        return self.quantized_params / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unquantized_matmul_modules"] = d["unquantized_matmul_modules"][:20]
        d["share_of_block_matmul_weights"] = round(self.matmul_share, 6)
        d["share_of_all_weights"] = round(self.overall_share, 6)
        return d


def quantization_report(model: nn.Module, bits: int) -> QuantReport:
    import bitsandbytes as bnb

    rep = QuantReport(bits=bits)
    skip = _skip_names(model)
    counted: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            rep.quantized_modules += 1
            rep.quantized_params += m.in_features * m.out_features
            counted.add(id(m.weight))
        elif isinstance(m, nn.Linear) and name not in skip and name.split(".")[-1] not in skip and "lora_" not in name:
            rep.unquantized_matmul_params += m.weight.numel()
            rep.unquantized_matmul_modules.append(name)
            counted.add(id(m.weight))
    for name, p in model.named_parameters():
        if id(p) in counted or "lora_" in name:
            continue
        if p.dim() == 3:  # fused experts we could not unfuse
            rep.unquantized_matmul_params += p.numel()
            rep.unquantized_matmul_modules.append(name)
        else:
            rep.other_params += p.numel()
    return rep


def check_quantization(model: nn.Module, recipe: Recipe) -> QuantReport:
    """Measure the quantized share and refuse (or warn loudly) when QLoRA did not really happen."""
    rep = quantization_report(model, recipe.quantization.bits)
    q = recipe.quantization
    if device() == "cpu" and q.bits == 4:
        import bitsandbytes as bnb

        bad = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features % BNB_BLOCKSIZE]
        if bad:
            raise QuantizationError(
                f"{len(bad)} 4-bit layers (e.g. {bad[0]}) have an input width that is not a multiple of {BNB_BLOCKSIZE}; "
                "bitsandbytes' CPU kernel dequantizes those wrongly. Train on a GPU or with quantization.bits: 16."
            )
    if rep.matmul_share < q.min_4bit_share:
        msg = (
            f"QLoRA asked for {q.bits}-bit, but only {rep.matmul_share:.0%} of the block matmul weights were quantized "
            f"({rep.quantized_modules} layers; still 16-bit: {', '.join(rep.unquantized_matmul_modules[:4])}...). "
            f"quantization.min_4bit_share is {q.min_4bit_share}."
        )
        if q.on_low_share == "error":
            raise QuantizationError(msg + " Set quantization.on_low_share: warn to train anyway.")
        log.warning("!" * 20 + " " + msg)
    log.info(
        "%d-bit: %d layers, %.1f%% of block matmul weights, %.1f%% of all weights",
        q.bits, rep.quantized_modules, 100 * rep.matmul_share, 100 * rep.overall_share,
    )
    return rep
