"""Final answers out of generated text, and whether two answers mean the same (exact_match tasks).

Extraction tries, in the task's order, the places an answer conventionally sits:
- `boxed`: the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced, as OpenMath's grader does (rfind);
- `hash`: what follows the last `####` (GSM8K's gold answers end with `#### 72`);
- `answer_is`: what follows the last "the answer is" / "final answer:" (chain-of-thought prompts);
- `last_number`: the last number in the text (lm-eval-harness's GSM8K fallback).
Equivalence: normalised strings first, then math-verify (numbers, fractions, LaTeX, sets) for the rest.
Importing this module must not import torch.
"""

from __future__ import annotations

import re
from functools import lru_cache

METHODS = ("boxed", "hash", "answer_is", "last_number")

_NUMBER = re.compile(r"(?<![\w.])[-+−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?(?![\w])")
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?)\s*[:=]?\s*", re.I)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces balanced; None when absent or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # `\boxed 5` (no braces) is valid LaTeX for a single token
        m = re.match(r"\\(?:boxed|fbox)\s+(\S+)", text[start:])
        return m.group(1) if m else None
    j = closing_brace(text, i)
    return text[i + 1 : j] if j is not None else None


def closing_brace(text: str, i: int) -> int | None:
    """Index of the `}` that closes the `{` at text[i], nested braces balanced; None when it is never closed."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _after_hash(text: str) -> str | None:
    k = text.rfind("####")
    if k < 0:
        return None
    rest = text[k + 4 :].strip().splitlines()
    return rest[0].strip() if rest and rest[0].strip() else None


def _after_answer_is(text: str) -> str | None:
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    rest = text[hits[-1].end() :].strip()
    if not rest:
        return None
    boxed = _last_boxed(rest)
    if boxed is not None:
        return boxed
    # up to the end of the sentence: a period followed by a space or the end, not a decimal point
    line = rest.splitlines()[0]
    m = re.match(r"(.*?)(?:\.(?:\s|$)|$)", line)
    return (m.group(1) if m else line).strip().strip("*$").strip() or None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].strip() if found else None


_EXTRACTORS = {"boxed": _last_boxed, "hash": _after_hash, "answer_is": _after_answer_is, "last_number": _last_number}


def extract(text: str, methods: tuple[str, ...] | list[str] = METHODS) -> str | None:
    """The answer by the first method that finds one, or None (scored as wrong)."""
    for m in methods:
        got = _EXTRACTORS[m](text)
        if got is not None and got.strip():
            return got.strip()
    return None


def normalise(ans: str) -> str:
    """Surface forms that never change the value: $, thousands separators, unit words after a number, trailing period,
    spaces, a trailing .0, \\text{}, \\!, unicode minus, `x =` prefixes."""
    s = ans.strip().replace("−", "-").replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5"
    s = s.rstrip(".").strip()
    unit = re.fullmatch(r"([-+]?[\d,]*\.?\d+)\s+[a-zA-Z][a-zA-Z ]*", s)  # "250 dollars", "8 apples": the number is the answer
    if unit:
        s = unit.group(1)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+\.0+", s):
        s = s.split(".")[0]
    s = s.lstrip("+")
    return re.sub(r"\s+", " ", s).lower()


@lru_cache(maxsize=65536)
def _parsed(s: str):
    from math_verify import parse

    # math-verify wants LaTeX inside delimiters; a plain number or expression parses either way
    return parse(f"${s}$") or parse(s)


def equivalent(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one: normalised string match, else math-verify's symbolic check."""
    if pred is None:
        return False
    a, b = normalise(pred), normalise(gold)
    if a == b:
        return True
    if not a or not b:
        return False
    try:
        from math_verify import verify

        pa, pb = _parsed(a), _parsed(b)
        return bool(pa and pb and verify(pb, pa))
    except Exception:  # math-verify raises on inputs it cannot parse (and times out on pathological ones)
        return False
