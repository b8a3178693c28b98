"""Decontamination: a training row that shares an n-gram of words with an evaluation item would inflate that
item's score, so it is removed (or flagged). As GPT-3 (Brown et al. 2020, appendix C): lower-cased words without
punctuation, 13-grams; eval items shorter than that are matched whole, when long enough to be specific."""

from __future__ import annotations

import re
from typing import Any, Iterable

from ..formats import row_texts

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class EvalIndex:
    """The n-grams of a set of eval texts, each remembering which eval set it came from."""

    def __init__(self, n: int = 13, min_words: int = 8):
        self.n, self.min_words = n, min_words
        self.grams: dict[int, dict[tuple[str, ...], str]] = {}  # length -> gram -> eval set name
        self.items = 0

    def add(self, name: str, texts: Iterable[str]) -> None:
        for text in texts:
            w = words(text)
            if len(w) >= self.n:
                table = self.grams.setdefault(self.n, {})
                for i in range(len(w) - self.n + 1):
                    table.setdefault(tuple(w[i : i + self.n]), name)
                self.items += 1
            elif len(w) >= self.min_words:
                self.grams.setdefault(len(w), {}).setdefault(tuple(w), name)
                self.items += 1

    def match(self, text: str) -> str | None:
        """The eval set a text overlaps with, or None."""
        w = words(text)
        for n, table in self.grams.items():
            for i in range(len(w) - n + 1):
                hit = table.get(tuple(w[i : i + n]))
                if hit is not None:
                    return hit
        return None


def decontaminate(rows: list[dict[str, Any]], index: EvalIndex) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    kept, hits = [], []
    for r in rows:
        name = index.match("\n".join(row_texts(r)))
        if name is None:
            kept.append(r)
        else:
            hits.append((r, f"shares a {index.n}-gram with eval set {name!r}"))
    return kept, hits
