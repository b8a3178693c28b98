"""Exact duplicates (normalised-text hash) and near duplicates (MinHash LSH from datasketch).

The first occurrence wins (sources in recipe order, rows in file order), so a build is deterministic and the
removed row's reason names the row it duplicates.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..formats import content_texts, normalised_hash, normalised_text


def exact(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    kept, removed, first = [], [], {}
    for r in rows:
        h = normalised_hash(r)
        if h in first:
            f = first[h]
            removed.append((r, f"exact duplicate of {f['_source']} row {f['_row']}"))
            continue
        first[h] = r
        kept.append(r)
    return kept, removed


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams of the normalised text; a text shorter than n words is one shingle."""
    words = normalised_text(text).split(" ")
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def near(rows: list[dict[str, Any]], threshold: float, num_perm: int, ngram: int,
         progress: bool = False) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Drop rows whose word-shingle Jaccard similarity with an earlier kept row is >= threshold (compared on their
    distinctive text: a task template shared by many rows is left out, see formats.content_texts). MinHash LSH finds
    the candidates; the exact Jaccard of the shingle sets confirms them, so the reported similarity is not an estimate."""
    from datasketch import MinHash, MinHashLSH

    sets = [shingles(text, ngram) for text in content_texts(rows)]
    # bulk hashing is several times faster than updating one MinHash per shingle; seed fixed for reproducible builds
    hashes = MinHash.bulk([[s.encode("utf-8") for s in ss] for ss in sets], num_perm=num_perm, seed=1)
    # The LSH only proposes candidates, so it is tuned for recall. datasketch's default banding at threshold 0.8
    # (9 bands x 13 rows) misses a pair at Jaccard 0.8 with probability 0.60 and at 0.85 with 0.31; banded at 0.15
    # below the threshold with false negatives weighted 9:1 (21 x 6), 0.0017 and 0.00005. A false candidate costs one
    # exact Jaccard.
    lsh = MinHashLSH(threshold=max(0.05, threshold - 0.15), num_perm=num_perm, weights=(0.1, 0.9))
    kept, removed = [], []
    it: Iterable[int] = range(len(rows))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="near dedupe", unit=" rows", leave=False)
    for i in it:
        best, best_j = None, 0.0
        for j in lsh.query(hashes[i]):
            a, b = sets[i], sets[j]
            jac = len(a & b) / len(a | b)
            if jac > best_j:
                best, best_j = j, jac
        if best is not None and best_j >= threshold:
            f = rows[best]
            removed.append((rows[i], f"near duplicate of {f['_source']} row {f['_row']} (Jaccard {best_j:.2f})"))
            continue
        lsh.insert(i, hashes[i])
        kept.append(rows[i])
    return kept, removed
