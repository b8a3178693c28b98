"""What a grown vocabulary buys and costs before any training, on a real model (issue 20; docs/adaptation.md).

For each number of new tokens: learn them from a corpus (finetune/vocab.py: continued BPE), initialise the new rows by
subword mean, and measure on held-out text the tokens per byte and the bits per byte of the untrained model, against
the base. Fewer tokens per byte is the gain (context, speed); the rise in bits per byte at init is what continued
pretraining has to win back before the new tokens pay.

    .venv/bin/python scripts/bench_vocab.py [--model DIR] [--corpus recipes/samples/ja_docs.jsonl]
                                            [--heldout recipes/samples/ja_eval.jsonl] [--adds 0 100 300 1000]

Default model: SmolLM2-135M-Instruct (the --laptop model, converted from its GGUF into the user cache).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bits_per_byte(model, tok, docs: list[str]) -> float:
    from finetune.lm import HFLM

    lm = HFLM(model, tok, batch_size=4, progress=False)
    nll = sum(s for s, _ in lm.nll([[(d, True)] for d in docs]))
    return nll / math.log(2) / sum(len(d.encode("utf-8")) for d in docs)


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import vocab

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--corpus", default=str(ROOT / "recipes/samples/ja_docs.jsonl"))
    ap.add_argument("--heldout", default=str(ROOT / "recipes/samples/ja_eval.jsonl"))
    ap.add_argument("--adds", type=int, nargs="+", default=[0, 100, 300, 1000])
    a = ap.parse_args()
    if a.model is None:
        from finetune.gguf import convert, describe
        from finetune.laptop import small_model_gguf

        g = small_model_gguf()
        a.model = str(convert(g.parent, g.name, describe(g.parent, g.name)["sha256"], "float32"))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    corpus, held = texts(Path(a.corpus)), texts(Path(a.heldout))
    print(f"# {Path(a.model).name}: {len(corpus)} corpus documents, {len(held)} held-out; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| new tokens asked | added | learn (s) | tokens/byte held-out | bits/byte at init | scoring (s) |")
    print("|---|---|---|---|---|---|")
    for n in a.adds:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        if n:
            ext, entries = vocab.learn_merges(tok, corpus, n, 2)
            vocab.fit(model, entries, len(ext))
        else:
            ext, entries = tok, []
        learn = time.perf_counter() - t0
        t0 = time.perf_counter()
        bpb = bits_per_byte(model, ext, held)
        print(f"| {n} | {len(entries)} | {learn:.2f} | {vocab.tokens_per_byte(ext, held):.3f} | {bpb:.3f} | {time.perf_counter() - t0:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
