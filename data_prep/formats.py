"""Row layouts and their validation: Alpaca ({instruction, input?, output}), messages ({messages: [{role, content}]}),
text ({text}: raw documents) and pairs ({prompt, chosen, rejected}: preference data, the prompt held as
messages). Every problem is a RowError with a reason naming the field; nothing is coerced
silently (a number where text is expected is rejected, not stringified). Importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from typing import Any

from .errors import RowError
from .sources.readers import has_surrogates

ROLES = ("system", "user", "assistant")


def detect_format(row: dict[str, Any]) -> str:
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "messages" in row:
        return "messages"
    if "text" in row and "instruction" not in row and "output" not in row:
        return "text"
    return "alpaca"


def _string(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is {type(value).__name__}, not a string")
    if has_surrogates(value):
        raise RowError(f"invalid UTF-8 in field '{key}'")
    if required and not value.strip():
        raise RowError(f"empty field '{key}'")
    return value


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RowError(f"messages[{i}].content is empty or not a string")
        if has_surrogates(m["content"]):
            raise RowError(f"invalid UTF-8 in messages[{i}].content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (it is what the model learns to say)")
    return out


def _prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """A pair's prompt as messages: text becomes one user turn; a conversation must end with a user turn (the answers
    that follow are the pair's)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        msgs = _messages({"messages": prompt + [{"role": "assistant", "content": "-"}]})[:-1]
        if msgs[-1]["role"] != "user":
            raise RowError("the prompt's last message must be the user's (the answers compared follow it)")
        return msgs
    return [{"role": "user", "content": _string(row, "prompt")}]


def _answer(row: dict[str, Any], key: str) -> str:
    """A pair's answer: text, or trl's conversational form, one assistant message ([{role: assistant, content}])."""
    value = row.get(key)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RowError(f"field '{key}' as messages must be one assistant message (the answer to the prompt)")
        return _string(value[0], "content")
    return _string(row, key)


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    out = {"prompt": _prompt(row), "chosen": _answer(row, "chosen"), "rejected": _answer(row, "rejected")}
    if normalised_text(out["chosen"]) == normalised_text(out["rejected"]):
        raise RowError("chosen and rejected are the same answer: the pair teaches nothing")
    return out


def normalise(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The row in our layout (plus its `id` when it has one), or RowError."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "pairs":
        out: dict[str, Any] = _pair(row)
    elif fmt == "messages":
        out = {"messages": _messages(row)}
    elif fmt == "text":
        out = {"text": _string(row, "text")}
    else:
        out = {"instruction": _string(row, "instruction"), "input": _string(row, "input", required=False), "output": _string(row, "output")}
    rid = row.get("id")
    if rid is not None:
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise RowError(f"field 'id' is {type(rid).__name__}, not a string or integer")
        out["id"] = str(rid)
    return out


def row_texts(row: dict[str, Any]) -> list[str]:
    """The row's text fields, in order (what dedupe, PII and decontamination look at)."""
    if "chosen" in row:
        return [m["content"] for m in row["prompt"]] + [row["chosen"], row["rejected"]]
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    if "text" in row:
        return [row["text"]]
    return [row["instruction"], row["input"], row["output"]]


def content_texts(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's distinctive text. An instruction shared by several rows is the task's template (LegalBench's task
    description, a classification prompt), not the row's content: left in, it would make every row of a task look
    like a near duplicate of the others, or like a copy of any eval item of the same task."""
    shared = Counter(r["instruction"] for r in rows if "instruction" in r)
    out = []
    for r in rows:
        if "instruction" in r and shared[r["instruction"]] > 1:
            out.append("\n".join(t for t in (r["input"], r["output"]) if t))
        else:
            out.append("\n".join(t for t in row_texts(r) if t))
    return out


def content_hash(row: dict[str, Any]) -> str:
    """Stable hash of a row's content (not its id): ids for rows without one, and the train/validation split."""
    if "chosen" in row:
        payload: Any = [row["prompt"], row["chosen"], row["rejected"]]
    elif "messages" in row:
        payload = row["messages"]
    elif "text" in row:
        payload = row["text"]
    else:
        payload = [row["instruction"], row["input"], row["output"]]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


_SPACE = re.compile(r"\s+")


def normalised_text(text: str) -> str:
    """Text as compared for exact duplicates: Unicode NFKC, case-folded, whitespace collapsed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalised_hash(row: dict[str, Any]) -> str:
    """Hash of the normalised text: rows that differ only in case, spacing or Unicode form are exact duplicates."""
    parts = [normalised_text(t) for t in row_texts(row)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def hashed_id(row: dict[str, Any]) -> str:
    """A row's id as reports show it when the row may hold personal data: a hash, never the raw text or id."""
    return hashlib.sha256(f"{row.get('_source')}\0{row.get('_row')}\0{row.get('id')}".encode()).hexdigest()[:16]
