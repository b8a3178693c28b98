"""The one way finetune reads JSONL it wrote (prepared data, metrics, journals, seeds).

Lines are split on "\\n" only. `str.splitlines()` also splits on U+2028/U+2029 (and \\x1c-\\x1e, \\x85), which JSON
allows unescaped inside strings: GSM8K's train row 2382 and PubMedQA's 28177278 hold them, and a reader that
split there broke those rows in two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def lines(text: str) -> list[str]:
    """The non-blank lines of JSONL text."""
    return [line for line in text.split("\n") if line.strip()]


def read_jsonl(path: str | Path) -> list[Any]:
    """Every row of a JSONL file; none when it is absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines(text)]
