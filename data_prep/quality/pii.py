"""Personal data in medical and legal sources: found by patterns, reported as counts and hashed row ids only.

Patterns (each a kind that `quality.pii.kinds` can turn off):
- email: name@domain.tld
- phone: international (+33 1 23 45 67 89) and North American ((555) 123-4567, 555-123-4567) layouts; three digit
  groups at least, so arithmetic ("3-4") and years ("2011-2012") do not match
- ssn: US Social Security numbers (123-45-6789) and French NIR-style 13+2-digit ids
- record_id: an id holding a digit, introduced by MRN, medical record, patient id/no., case/docket/file no.
- date_of_birth: a date introduced by DOB, born (on), date of birth, birthdate
- name: a capitalised name after a title (Mr, Mrs, Ms, Mx, Dr, Prof, Judge, Justice; not "Miss", a common verb) or after a label (Patient:, Name:, Client:,
  Plaintiff:, Defendant:). Pattern-based on purpose: NER models (spaCy's, Presidio's) are downloads, not available
  offline, so a bare name without title or label is not found; say so in the data card.

Redaction replaces the whole finding (or, for labelled ones, the value after the label) with [KIND].
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_MONTH = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
_DATE = rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|\d{{4}}-\d{{2}}-\d{{2}}|{_MONTH}\.? \d{{1,2}},? \d{{4}}|\d{{1,2}} {_MONTH}\.? \d{{4}})"
_NAME = r"[A-Z][a-z]+(?:[ '-][A-Z][a-z]+){0,2}"

# (kind, pattern, group holding the personal value: 0 = the whole match)
PATTERNS: list[tuple[str, re.Pattern, int]] = [
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), 0),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), 0),
    ("ssn", re.compile(r"\b[12] ?\d{2} ?(?:0[1-9]|1[0-2]) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3}(?: ?\d{2})?\b"), 0),
    ("phone", re.compile(r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}\b"), 0),
    ("phone", re.compile(r"(?<![\w-])(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}\b"), 0),
    ("record_id", re.compile(r"(?i)\b(?:MRN|medical record(?: number| no\.?)?|record (?:number|no\.?|#)|patient (?:id|number|no\.?|#)"
                             r"|case (?:number|no\.?|#)|docket (?:number|no\.?|#)|file (?:number|no\.?|#))\s*[:#]?\s*"
                             r"((?=[A-Z/.:-]*\d)[A-Z0-9][A-Z0-9:/.-]{2,}[A-Z0-9])\b"), 1),
    ("date_of_birth", re.compile(rf"(?i)\b(?:DOB|D\.O\.B\.|date of birth|birth ?date|born(?: on)?)\s*[:-]?\s*({_DATE})"), 1),
    ("name", re.compile(rf"\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|Judge|Justice)\.? ({_NAME})"), 1),
    ("name", re.compile(rf"\b(?:Patient|Name|Client|Plaintiff|Defendant|Claimant|Witness)\s*:\s*({_NAME})"), 1),
]


@dataclass
class Findings:
    counts: Counter = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.counts)


def scan(text: str, kinds: set[str]) -> tuple[str, Findings]:
    """The text with every finding replaced by [KIND], and the counts by kind."""
    found = Findings()
    for kind, pattern, group in PATTERNS:
        if kind not in kinds:
            continue

        def sub(m: re.Match, kind=kind, group=group) -> str:
            found.counts[kind] += 1
            if group == 0:
                return f"[{kind.upper()}]"
            s, e = m.span(group)
            return m.group(0)[: s - m.start()] + f"[{kind.upper()}]" + m.group(0)[e - m.start():]

        text = pattern.sub(sub, text)
    return text, found


def scan_row(row: dict[str, Any], kinds: set[str]) -> tuple[dict[str, Any], Findings]:
    """A redacted copy of the row and what was found in it."""
    total = Findings()
    out = dict(row)

    def one(text: str) -> str:
        red, f = scan(text, kinds)
        total.counts.update(f.counts)
        return red

    if "messages" in row:
        out["messages"] = [{**m, "content": one(m["content"])} for m in row["messages"]]
    elif "text" in row:
        out["text"] = one(row["text"])
    else:
        for k in ("instruction", "input", "output"):
            out[k] = one(row[k])
    return out, total
