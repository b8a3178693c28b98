"""Personal data in medical and legal sources, to HIPAA Safe Harbor: found by the detectors table (detectors.py,
rendered in docs/pii.md), names also by a spaCy pipeline when one is installed (ner.py), then redacted to [KIND],
replaced by consistent pseudonyms ([NAME_1] wherever the same person appears), flagged or dropped.

What leaves this module is counts by kind and hashed row ids: never a found value. Pseudonyms come from an HMAC
of the value under a key drawn for each scan and held in memory only, so the mapping from value to placeholder
exists nowhere on disk and differs from build to build; the numbering follows first appearance, so the same input
gives the same output.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from . import names
from .detectors import ACTIVE, DETECTORS, KINDS, Text
from .ner import Ner

__all__ = ["KINDS", "DETECTORS", "Findings", "Scanner", "scan", "scan_row", "row_fields"]


@dataclass
class Findings:
    counts: Counter = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.counts)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


def _resolve(candidates: list[tuple[int, int, str, int]]) -> list[Span]:
    """Overlapping findings: the longest wins, then the earlier detector in the table."""
    kept: list[tuple[int, int, str]] = []
    for s, e, kind, _ in sorted(candidates, key=lambda c: (c[0] - c[1], c[3], c[0])):
        if all(e <= ks or s >= ke for ks, ke, _ in kept):
            kept.append((s, e, kind))
    return [Span(s, e, k) for s, e, k in sorted(kept)]


def find(text: str, kinds: set[str], persons: Iterable[tuple[int, int]] = ()) -> list[Span]:
    """Every finding in `text` (non-overlapping, in order). `persons`: spans an NER pipeline found."""
    return find_related([text], kinds, [persons])[0]


def find_related(texts: list[str], kinds: set[str], persons: list[Iterable[tuple[int, int]]] | None = None) -> list[list[Span]]:
    """The findings of texts that belong together (the fields of one row). A value found in one is personal wherever
    it appears in the others: "admitted on 14/02/2022" in the input makes "14/02/2022" in the output a date too, and a
    name is also looked for part by part ("Mrs. Siobhan O'Hara" in the input, "O'Hara" alone in the output)."""
    persons = persons or [() for _ in texts]
    found = []
    for text, people in zip(texts, persons):
        t = Text.of(text)
        candidates = [(s, e, d.kind, i) for i, d in enumerate(ACTIVE) if d.kind in kinds for s, e in d.find(t)]
        if "name" in kinds:
            candidates += [(s, e, "name", len(ACTIVE)) for s, e in people]
        found.append(_resolve(candidates))
    values = {text[sp.start:sp.end]: sp.kind for text, spans in zip(texts, found) for sp in spans}
    if not values:
        return found
    name_values = [v for v, k in values.items() if k == "name"]
    # Values of 4 characters or more: a 2-digit age ("94") found after "aged" is not personal in "94 mg".
    exact = sorted((v for v, k in values.items() if k != "name" and len(v) >= 4), key=len, reverse=True)
    again = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, exact)) + r")(?!\w)") if exact else None
    out = []
    for text, spans in zip(texts, found):
        later = [(s, e, "name", len(ACTIVE) + 1) for s, e, _ in names.follow(text, name_values)]
        if again is not None:
            later += [(m.start(), m.end(), values[m.group(0)], len(ACTIVE) + 1) for m in again.finditer(text)]
        out.append(_resolve([(sp.start, sp.end, sp.kind, 0) for sp in spans] + later) if later else spans)
    return out


def row_fields(row: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The text fields of a row, in reading order: (field, message index or None)."""
    if "chosen" in row:
        return [("prompt", i) for i in range(len(row["prompt"]))] + [("chosen", None), ("rejected", None)]
    if "messages" in row:
        return [("messages", i) for i in range(len(row["messages"]))]
    if "text" in row:
        return [("text", None)]
    return [(k, None) for k in ("instruction", "input", "output") if isinstance(row.get(k), str)]


def _get(row, f):
    key, i = f
    return row[key][i]["content"] if i is not None else row[key]


def _normal(kind: str, value: str) -> str:
    if kind in ("email", "url", "date", "address"):
        return " ".join(value.casefold().split())
    return re.sub(r"[\W_]", "", value.casefold())


class Scanner:
    """One scan of a build: the detectors for `kinds`, an optional NER pipeline, and (for `pseudonymize`) the
    in-memory numbering of the values seen so far."""

    def __init__(self, kinds: Iterable[str] = KINDS, action: str = "redact", ner: Ner | None = None):
        self.kinds = set(kinds)
        self.pseudonymize = action == "pseudonymize"
        self.ner = ner
        self._key = os.urandom(32)  # never written: the value-to-placeholder mapping dies with the scan
        self._ids: dict[bytes, int] = {}
        self._next: Counter = Counter()

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{_normal(kind, value)}".encode(), hashlib.sha256).digest()

    def _placeholder(self, kind: str, value: str) -> str:
        if not self.pseudonymize:
            return f"[{kind.upper()}]"
        key = self._digest(kind, value)
        if key not in self._ids:
            self._next[kind] += 1
            self._ids[key] = self._next[kind]
        n = self._ids[key]
        if kind == "name":  # "O'Hara" alone later is the same person as "Siobhan O'Hara"
            for part in names.parts_to_follow(value):
                self._ids.setdefault(self._digest(kind, part), n)
        return f"[{kind.upper()}_{n}]"

    def redact(self, text: str, spans: list[Span]) -> str:
        out, pos = [], 0
        for sp in spans:
            out += [text[pos:sp.start], self._placeholder(sp.kind, text[sp.start:sp.end])]
            pos = sp.end
        out.append(text[pos:])
        return "".join(out)

    def scan_texts(self, texts: list[str], groups: list[int] | None = None) -> list[tuple[str, Counter]]:
        """Each text redacted (or pseudonymised), with its findings by kind. `groups`: how many consecutive texts
        belong together (one row's fields), for names found in one and used alone in another; default one each."""
        if self.ner is not None and "name" in self.kinds:
            persons = list(self.ner.persons(texts))
        else:
            persons = [() for _ in texts]
        out, i = [], 0
        for n in groups or [1] * len(texts):
            for text, spans in zip(texts[i:i + n], find_related(texts[i:i + n], self.kinds, persons[i:i + n])):
                out.append((self.redact(text, spans) if spans else text, Counter(sp.kind for sp in spans)))
            i += n
        return out

    def scan_rows(self, rows: list[dict[str, Any]], batch: int = 256) -> Iterator[tuple[dict[str, Any], Findings]]:
        """Each row with its text fields redacted, and what was found in it (rows in order: pseudonyms number by first use)."""
        for b in range(0, len(rows), batch):
            chunk = rows[b:b + batch]
            fields = [row_fields(r) for r in chunk]
            texts = [_get(r, f) for r, fs in zip(chunk, fields) for f in fs]
            results = iter(self.scan_texts(texts, [len(fs) for fs in fields]))
            for r, fs in zip(chunk, fields):
                out, found = dict(r), Findings()
                for key in ("messages", "prompt"):
                    if isinstance(r.get(key), list):
                        out[key] = [dict(m) for m in r[key]]
                for key, i in fs:
                    text, counts = next(results)
                    found.counts.update(counts)
                    if i is None:
                        out[key] = text
                    else:
                        out[key][i]["content"] = text
                yield out, found


def scan(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Findings]:
    """One text redacted to [KIND] placeholders, and its findings (no NER)."""
    [(red, counts)] = Scanner(kinds).scan_texts([text])
    return red, Findings(counts)


def scan_row(row: dict[str, Any], kinds: Iterable[str] = KINDS) -> tuple[dict[str, Any], Findings]:
    """A redacted copy of one row and what was found in it (no NER)."""
    return next(Scanner(kinds).scan_rows([row]))
