"""Where the time goes when the real small model trains and evaluates on a CPU (the `--laptop` profile).

    python scripts/bench_cpu.py                      # every configuration, a table (about 5 minutes on 2 cores)
    python scripts/bench_cpu.py --profile laptop     # plus torch.profiler's top operators for one configuration

The model is SmolLM2-135M-Instruct (the GGUF `--laptop` fetches, converted once; finetune/laptop.py). Rows have a
fixed-seed log-normal length mix (median ~200 tokens, capped at 512: GSM8K-like), the same rows for every
configuration, LoRA with Guanaco's shape (r 64, alpha 16, dropout 0.1) on every linear layer, batches of 8 rows.
Training tokens/s counts non-pad tokens over --steps optimizer steps after one warm-up step; eval tokens/s is
forward passes over the same rows in batches of 16.

Configurations (training):
- `recipe`: what a recipe meant for a GPU does on a CPU: 4-bit NF4 base (float32 compute), activation checkpointing,
  rows in file order (padding to the longest of each batch).
- `fp32`: 16-bit LoRA on a float32 base, no checkpointing.
- `bf16`: the same on a bfloat16 base (AMX / AVX512-BF16 CPUs).
- `bf16-grouped`: and rows grouped by length, so a batch pads to similar lengths (transformers' group_by_length).
- `laptop`: and no LoRA dropout (what `--laptop` runs on such a CPU); `fp32-laptop`: the same on a float32 base.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(16, min(512, int(rng.lognormvariate(math.log(200), 0.5)))) for _ in range(n)]


def batches(lens: list[int], size: int, grouped: bool) -> list[list[int]]:
    if not grouped:
        return [lens[i : i + size] for i in range(0, len(lens), size)]
    # grouped: sort within windows of 8 batches, as transformers' group_by_length does (megabatches)
    out = []
    window = size * 8
    for i in range(0, len(lens), window):
        chunk = sorted(lens[i : i + window], reverse=True)
        out += [chunk[j : j + size] for j in range(0, len(chunk), size)]
    random.Random(1).shuffle(out)
    return out


def model(path: str, mode: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if mode == "recipe":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    dtype = torch.bfloat16 if mode.startswith("bf16") or mode == "laptop" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cpu"}, **kw)
    if mode == "recipe":
        from finetune.models import disable_cpu_repack

        disable_cpu_repack(m)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    dropout = 0.0 if mode.endswith("laptop") else 0.1
    return get_peft_model(m, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))


def padded(batch: list[int], vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    width = max(batch)
    ids = torch.randint(100, vocab - 1, (len(batch), width), generator=g)
    mask = torch.zeros_like(ids)
    for j, n in enumerate(batch):
        mask[j, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train_speed(m, bs: list[list[int]], steps: int, vocab: int, profile: bool) -> float:
    import torch

    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    m.train()

    def step(i):
        ids, mask, labels = padded(bs[i % len(bs)], vocab, i)
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in range(1, steps + 1):
        if profile and i == 1:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CPU]) as p:
                step(i)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
        else:
            step(i)
        tokens += sum(bs[i % len(bs)])
    return tokens / (time.perf_counter() - t0)


def eval_speed(m, lens: list[int], vocab: int) -> float:
    import torch

    m.eval()
    order = sorted(lens, reverse=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(order), 16):
            ids, mask, _ = padded(order[i : i + 16], vocab, i)
            m(input_ids=ids, attention_mask=mask)
    return sum(lens) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="recipe,fp32,bf16,bf16-grouped,laptop,fp32-laptop")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--profile", default=None, help="print torch.profiler's top operators for this configuration")
    args = ap.parse_args()
    import torch

    from finetune.gguf import convert, describe
    from finetune.laptop import small_model_gguf
    from finetune.models import cpu_has_fast_bf16

    gguf = small_model_gguf()
    info = describe(gguf.parent, gguf.name)
    path = str(convert(gguf.parent, gguf.name, info["sha256"], "float32"))
    lens = lengths(8 * 8 * 4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fast bf16: {cpu_has_fast_bf16()}")
    print("| config | train tokens/s | eval tokens/s | peak RSS GB |")
    print("|---|---|---|---|")
    for name in args.configs.split(","):
        m = model(path, name)
        vocab = m.config.vocab_size
        bs = batches(lens, 8, grouped=name.endswith(("grouped", "laptop")))
        tr = train_speed(m, bs, args.steps, vocab, profile=(args.profile == name))
        ev = eval_speed(m, lens[: args.eval_rows], vocab)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"| {name} | {tr:.0f} | {ev:.0f} | {rss:.1f} |", flush=True)
        del m


if __name__ == "__main__":
    main()
