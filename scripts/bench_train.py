"""QLoRA training throughput and memory: a plain Hugging Face baseline against finetune's settings, same machine, same run.

    python scripts/bench_train.py --shape llama3-8b --out bench/            # on a GPU (docs/benchmarks.md)
    python scripts/bench_train.py --shape tiny --steps 4 --warmup 1         # anywhere: keeps the script working (CI)

Each configuration runs in a fresh process (libraries that patch kernels would contaminate later runs). The model is
the real shape, randomly initialised (random weights do not change kernel speed), saved as safetensors and reloaded
as NF4 with double quantization and LoRA r=16 on every linear layer. Rows are drawn from a fixed-seed log-normal
length mix (median ~250 tokens, capped at --max-len), the same rows for every configuration.

- baseline: what the Hugging Face QLoRA guide has a user write: trl's SFTConfig defaults, rows padded per batch,
  no packing, gradient checkpointing, paged AdamW 32-bit.
- ours: finetune's GPU defaults: padding-free packing (BFD) of the same rows, activation checkpointing, SDPA, fused AdamW.

Measured after --warmup steps: tokens/s over non-pad tokens, MFU by the 4*N_mm + 12*L*s*d rule (forward
2*N_mm + attention 2*L*s*d, backward of activations only under LoRA; peak from --peak-tflops or the GPU's name), peak
memory (CUDA max allocated; peak RSS on CPU). Prints one
markdown table; full logs and per-config JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # L, d, ffn, kv heads, heads, vocab (from each model's config.json)
    "llama3-8b": dict(family="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "mistral-7b": dict(family="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(family="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "4090": 165.2}  # dense BF16


def matmul_params(s: dict) -> int:
    L, d, ffn, V = s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * ffn) + d * V


def flops_per_token(s: dict, seq: int) -> float:
    """LoRA/QLoRA model FLOPs per token: frozen weights skip the weight-gradient GEMM (4*N, not 6*N)."""
    return 4 * matmul_params(s) + 12 * s["num_hidden_layers"] * seq * s["hidden_size"]


def lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [max(8, min(max_len, int(rng.lognormvariate(math.log(250), 0.9)))) for _ in range(n)]


def build_model(shape: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k != "family"}
    cfg = AutoConfig.for_model(SHAPES[shape]["family"], **spec, tie_word_embeddings=False)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    t0 = time.time()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "save_seconds").write_text(f"{time.time() - t0:.3f}")
    # The rows are token ids already; the trainer only needs a tokenizer for its pad id.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from finetune.smoke import build_tokenizer

    build_tokenizer(["benchmark rows are random token ids"] * 4).save_pretrained(folder)


def child(args) -> dict:
    """One configuration, in this process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    spec = SHAPES[args.shape]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map={"": "cuda:0" if gpu else "cpu"}, attn_implementation="sdpa",
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    load_s = time.time() - t0
    if not gpu:  # bitsandbytes' CPU AVX512-BF16 weight repack (bitsandbytes 0.4x) breaks gradients after an eval forward
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    lens = lengths(args.rows, args.max_len)
    ids = [torch.randint(10, spec["vocab_size"], (n,), generator=g).tolist() for n in lens]
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    ours = args.config == "ours"
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                  gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, max_length=args.max_len, dataloader_num_workers=0)
    if ours:
        cfg = SFTConfig(**common, packing=True, packing_strategy="bfd", optim="adamw_torch_fused" if gpu else "adamw_torch",
                        gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        cfg = SFTConfig(**common, packing=False, optim="paged_adamw_32bit" if gpu else "adamw_torch")

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.tokens, self.seq = None, 0, []

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.t = time.time()

    clock = Clock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, callbacks=[clock])
    real_tokens = []
    step_fn = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        if trainer.state.global_step >= args.warmup:
            mask = inputs.get("attention_mask")
            real_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            clock.seq.append(int(inputs["input_ids"].shape[-1]))
        return step_fn(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step
    trainer.train()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.time() - clock.t
    tok_s = sum(real_tokens) / seconds
    seq = sum(clock.seq) / max(len(clock.seq), 1)
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out = {"config": args.config, "shape": args.shape, "device": name, "tokens_per_s": tok_s, "seconds": seconds,
           "steps": args.steps, "real_tokens": sum(real_tokens), "mean_seq_len": seq, "load_s": load_s,
           "mfu": tok_s * flops_per_token(spec, int(seq)) / (peak * 1e12) if peak else None,
           "peak_memory_gb": (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9,
           "memory_kind": "cuda max allocated" if gpu else "process peak RSS"}
    return out


def _load_nf4(args):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map={"": "cuda:0" if gpu else "cpu"}, attn_implementation="sdpa",
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    if not gpu:
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model, gpu, dtype


def longest_context(args) -> dict:
    """Binary search for the longest row that trains at batch 1 (forward, backward, optimizer step) within the GPU's
    memory, or within --budget-gb of peak memory where given (how the search is exercised on CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, gpu, dtype = _load_nf4(args)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ours = args.config == "ours"
    vocab = SHAPES[args.shape]["vocab_size"]

    def fits(n: int) -> bool:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(10, vocab, (1, n), device=model.device)
        try:
            if ours:  # trl's path: the loss computed from the hidden states in chunks, no full-vocabulary logits kept
                out = model(input_ids=ids, labels=ids, use_cache=False)
            else:  # the guide's path: logits materialised, then the loss
                logits = model(input_ids=ids, use_cache=False).logits
                out = type("O", (), {"loss": torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])})
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
        used = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
        return args.budget_gb is None or used <= args.budget_gb

    lo, hi = 0, args.context_start
    while True:  # double until a length fails (or the cap trains)
        if not fits(hi):
            break
        if hi >= args.context_cap:
            return {"config": args.config, "longest_context": hi, "capped": True}
        lo, hi = hi, min(hi * 2, args.context_cap)
    while hi - lo > max(lo // 64, 16):  # then bisect to within ~1.5%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"config": args.config, "longest_context": lo, "capped": False}


def merge_and_dequant(args) -> dict:
    """Merge time (dequantize NF4, W += s*B*A, save safetensors) against the disk floor (reading the 16-bit base and
    writing the merged files at this disk's measured speed), and the cost of one NF4 dequantization pass."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model

    model, gpu, dtype = _load_nf4(args)
    layers = [m for m in model.modules() if hasattr(m, "weight") and hasattr(m.weight, "quant_state")]

    def sync():
        if gpu:
            torch.cuda.synchronize()

    sync()
    t0 = time.time()
    for _ in range(3):
        for m in layers:
            bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
    sync()
    dequant_pass = (time.time() - t0) / 3
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
    out = Path(tempfile.mkdtemp())
    t0 = time.time()
    merged = model.merge_and_unload()
    sync()
    merge_s = time.time() - t0
    t0 = time.time()
    merged.save_pretrained(out / "merged", safe_serialization=True)
    save_s = time.time() - t0
    size = sum(p.stat().st_size for p in (out / "merged").rglob("*.safetensors"))
    base_size = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    t0 = time.time()  # the disk's own speed: write and read back a file of the merged model's size
    probe = out / "probe.bin"
    with open(probe, "wb") as f:
        chunk = os.urandom(1 << 24)
        for _ in range(max(1, size // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write_gbs = size / (time.time() - t0) / 1e9
    t0 = time.time()
    with open(probe, "rb") as f:
        while f.read(1 << 24):
            pass
    read_gbs = size / (time.time() - t0) / 1e9
    floor = base_size / 1e9 / read_gbs + size / 1e9 / write_gbs
    return {"dequant_pass_s": dequant_pass, "merge_s": merge_s, "save_s": save_s, "merged_gb": size / 1e9,
            "disk_floor_s": floor, "merge_vs_floor": (merge_s + save_s) / floor, "write_gbs": write_gbs, "read_gbs": read_gbs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--configs", default="baseline,ours")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--context", action="store_true", help="Also find the longest row that trains at batch 1, per config.")
    p.add_argument("--context-start", type=int, default=2048)
    p.add_argument("--context-cap", type=int, default=1 << 20)
    p.add_argument("--budget-gb", type=float, default=None, help="Memory budget for --context (default: the GPU's own limit).")
    p.add_argument("--merge", action="store_true", help="Also time merge + save against the disk floor, and one NF4 dequant pass.")
    p.add_argument("--measure", default="throughput", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:  # a child: one configuration, one measurement
        fn = {"throughput": child, "context": longest_context, "merge": merge_and_dequant}[args.measure]
        print("RESULT " + json.dumps(fn(args)))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-"))
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"model-{args.shape}"
    if not (model / "config.json").exists():
        build_model(args.shape, model)

    def measure(config: str, what: str) -> dict:
        cmd = [sys.executable, __file__, "--config", config, "--measure", what, "--model", str(model), "--shape", args.shape,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--rows", str(args.rows),
               "--max-len", str(args.max_len), "--context-start", str(args.context_start), "--context-cap", str(args.context_cap),
               *(["--budget-gb", str(args.budget_gb)] if args.budget_gb else []),
               *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
        name = config if what == "throughput" else f"{config}-{what}"
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        (out / f"{name}.log").write_text(r.stdout + r.stderr)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            sys.exit(f"{name} failed (exit {r.returncode}); log: {out / f'{name}.log'}")
        res = json.loads(line[len("RESULT "):])
        (out / f"{name}.json").write_text(json.dumps(res, indent=2))
        return res

    rows = [measure(config, "throughput") for config in args.configs.split(",")]
    base = rows[0]
    print(f"\n{args.shape}, {base['device']}, {args.steps} timed steps after {args.warmup} warmup, micro-batch {args.batch}\n")
    print("| config | tokens/s (non-pad) | x baseline | MFU | peak memory (GB) | x baseline | mean seq len |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {mfu} | "
              f"{r['peak_memory_gb']:.2f} | {r['peak_memory_gb'] / base['peak_memory_gb']:.2f} | {r['mean_seq_len']:.0f} |")
    print(f"\nmemory: {base['memory_kind']}")
    if args.context:
        ctx = [measure(config, "context") for config in args.configs.split(",")]
        print("\n| config | longest context at batch 1 (tokens) | x baseline |\n|---|---|---|")
        for c in ctx:
            print(f"| {c['config']} | {c['longest_context']}{'+ (cap)' if c['capped'] else ''} | "
                  f"{c['longest_context'] / max(ctx[0]['longest_context'], 1):.2f} |")
    if args.merge:
        m = measure("ours", "merge")
        print("\n| merge + save (s) | disk floor (s) | x floor | merged (GB) | one NF4 dequant pass (s) |\n|---|---|---|---|---|")
        print(f"| {m['merge_s'] + m['save_s']:.2f} | {m['disk_floor_s']:.2f} | {m['merge_vs_floor']:.2f} | {m['merged_gb']:.3f} | "
              f"{m['dequant_pass_s']:.4f} |")
    print(f"\nlogs and JSON in {out}")


if __name__ == "__main__":
    main()
