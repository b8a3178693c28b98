"""Continued pretraining data: raw documents, cleaned like instruction rows, mixed by weight, packed into blocks.

1. Each source goes through data_prep (read, validate, exact/near dedupe, decontamination against the eval tasks, PII),
   so domain text that leaks the test set or names patients is handled exactly as instruction data is.
2. Mixing: the first source (the domain corpus) is used whole; every other source is drawn, in a seeded random order of
   whole documents and repeated if it is too short, until it holds its weight's share of the stream. Domain 0.98 +
   general 0.02 replays 2% general text (SaulLM ~2%, Meditron ~1%) to limit forgetting.
3. Packing: documents are shuffled (seeded), each ends with EOS (and starts with BOS when the tokenizer uses one), and
   the stream is cut into `block_size` blocks; the last partial block is dropped. Every token is supervised.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from data_prep.build import collect
from data_prep.errors import DataError
from data_prep.spec import DataSpec, Source

from .recipe import Recipe
from .templates import token_ids

log = logging.getLogger("finetune")


def _tokens(tok, text: str) -> list[int]:
    return token_ids(tok, text) + [tok.eos_token_id]


def mix(docs_by_source: list[list[list[int]]], weights: list[float], seed: int) -> tuple[list[list[int]], list[int]]:
    """The documents of the stream and the number of tokens each source contributed (see the module docstring)."""
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    anchor_tokens = sum(len(d) for d in docs_by_source[0])
    stream_tokens = anchor_tokens / shares[0]
    rng = random.Random(seed)
    out = list(docs_by_source[0])
    counts = [anchor_tokens] + [0] * (len(docs_by_source) - 1)
    for i, (docs, share) in enumerate(zip(docs_by_source[1:], shares[1:]), start=1):
        budget = int(round(stream_tokens * share))
        if not docs or budget <= 0:
            continue
        order: list[int] = []
        while counts[i] < budget:
            if not order:
                order = list(range(len(docs)))
                rng.shuffle(order)
            doc = docs[order.pop()]
            take = doc[: budget - counts[i]]  # the last document is cut to the budget
            out.append(take)
            counts[i] += len(take)
    rng.shuffle(out)
    return out, counts


def pack(docs: list[list[int]], block_size: int) -> list[list[int]]:
    stream = [t for d in docs for t in d]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


class Documents:
    """The CPT sources' documents after cleaning, by source (text), with data_prep's record of what was read and removed."""

    def __init__(self, texts: list[list[str]], got):
        self.texts, self.got = texts, got


def collect_documents(recipe: Recipe, recipe_dir: Path, eval_sets: list[tuple[str, list[str]]]) -> Documents:
    cpt = recipe.cpt
    assert cpt is not None
    sources = [Source(**s.model_dump(exclude={"weight"})) for s in cpt.sources]
    # Documents are never "overlong": the length check is off (max_length huge) and long documents span several blocks.
    spec = DataSpec(sources=sources, quality=recipe.data.quality, max_length=10**12, overlong="truncate", min_rows=1)
    got = collect(spec, recipe_dir, eval_sets=eval_sets)
    texts: list[list[str]] = [[] for _ in sources]
    index = {s.origin: i for i, s in enumerate(sources)}
    for row in got.rows:
        texts[index[row["_source"]]].append(row["text"])
    if not texts[0]:
        raise DataError(f"cpt.sources[0] {sources[0].origin}: no usable documents after cleaning")
    return Documents(texts, got)


def build_blocks(recipe: Recipe, docs: Documents, tok) -> tuple[list[list[int]], list[list[int]], dict[str, Any]]:
    cpt = recipe.cpt
    assert cpt is not None
    by_source = [[_tokens(tok, t) for t in texts] for texts in docs.texts]
    docs_, counts = mix(by_source, [s.weight for s in cpt.sources], recipe.training.seed)
    blocks = pack(docs_, cpt.block_size)
    if not blocks:
        raise DataError(f"cpt: {sum(counts)} tokens in all, fewer than one block of {cpt.block_size}")
    n_val = int(len(blocks) * cpt.val_fraction)
    if cpt.val_fraction and len(blocks) >= 2:
        n_val = max(1, n_val)
    val, train = blocks[:n_val], blocks[n_val:]
    total = sum(counts)
    prov = {"block_size": cpt.block_size, "blocks": {"train": len(train), "val": len(val)}, "tokens": total,
            "dropped_tail_tokens": total - len(blocks) * cpt.block_size,
            "mix": [{"source": s.origin if s.hub else Path(s.path or "").name, "weight": s.weight, "license": s.license, "documents": len(d),
                     "tokens": c, "share": round(c / total, 4) if total else 0.0} for s, d, c in zip(cpt.sources, by_source, counts)],
            "sources": docs.got.sources, "rejected": len(docs.got.rejects)}
    log.info("cpt data: %d documents, %d tokens -> %d train + %d val blocks of %d", sum(map(len, by_source)), total, len(train), len(val), cpt.block_size)
    return train, val, prov
