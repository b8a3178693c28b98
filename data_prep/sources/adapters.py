"""Adapters: one small function per public schema, turning one raw row into an Alpaca row
({instruction, input, output}) or a conversation ({messages: [...]}).

How to add one:
1. Write `def myschema(row: dict, *, option=default, ...) -> dict` below. Read fields with `_text(row, "name")`, which
   rejects a missing, empty or non-string field with a clear reason; raise `RowError("why")` for any other bad row
   (it goes to rejects.jsonl with its row number; the build goes on).
2. Decorate it with `@adapter("myschema")`; pass `columns=(...)` when the schema's CSV files have no header row.
3. Use it from a recipe: `{path: data.csv, adapter: myschema, options: {option: value}}`. Options are checked against
   the function's keyword arguments, so a typo gets a did-you-mean. Options whose name ends in `_file` arrive as
   absolute paths (resolved against the recipe's folder).
4. Add a test in tests/test_adapters.py with a row written in the test.

Importable without torch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, RowError


@dataclass(frozen=True)
class Adapter:
    fn: Callable[..., dict[str, Any]]
    columns: tuple[str, ...] | None  # column names when the schema's CSVs have no header row


ADAPTERS: dict[str, Adapter] = {}


def adapter(name: str, columns: tuple[str, ...] | None = None):
    def register(fn):
        ADAPTERS[name] = Adapter(fn, columns)
        return fn

    return register


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the adapter does not take (ValueError, shown with the recipe's dotted path)."""
    params = [p for p in inspect.signature(ADAPTERS[name].fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    valid = [p.name for p in params]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; it takes: {', '.join(valid)}" if valid else "; it takes none")
            raise ValueError(f"adapter {name!r} has no option {key!r}{hint}")


def _text(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise RowError(f"empty field '{key}'")
    return value


# --------------------------------------------------------------------------------------------------
# Math


_GSM8K_FINAL = re.compile(r"\n?####\s*(?P<answer>[^\n]+?)\s*$")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@adapter("gsm8k")
def gsm8k(row: dict[str, Any], *, boxed: bool = False, calculator: bool = True) -> dict[str, Any]:
    """GSM8K (Cobbe et al. 2021): {question, answer}, the answer a worked solution ending in a `#### N` line.

    boxed: end the solution with `\\boxed{N}` instead of `#### N`, OpenMath's answer format (the number loses its
        thousands separators there, so `\\boxed{}` holds a plain number).
    calculator: keep the `<<48/2=24>>` calculator annotations of the original solutions (False removes them).
    """
    question, answer = _text(row, "question"), _text(row, "answer")
    m = _GSM8K_FINAL.search(answer)
    if not m:
        raise RowError("field 'answer' has no final '#### N' line")
    body = answer[: m.start()].rstrip()
    if not calculator:
        body = _CALCULATOR.sub("", body)
    final = m.group("answer").strip()
    tail = f"\\boxed{{{final.replace(',', '')}}}" if boxed else f"#### {final}"
    return {"instruction": question, "input": "", "output": f"{body}\n{tail}" if body else tail}


# --------------------------------------------------------------------------------------------------
# Medical


PUBMEDQA_INSTRUCTION = "Answer the research question with yes, no or maybe, using the context if given, then explain briefly."


@adapter("pubmedqa")
def pubmedqa(row: dict[str, Any], *, contexts: bool = True, long_answer: bool = True) -> dict[str, Any]:
    """PubMedQA PQA-L (Jin et al. 2019): {QUESTION, CONTEXTS: [abstract sections], final_decision, LONG_ANSWER}, keyed by PMID.

    The question is answered yes, no or maybe, then (long_answer) explained by the abstract's conclusion.
    contexts: give the abstract (without its conclusion) as the input, as in PubMedQA's reasoning-required setting.
    """
    if "QUESTION" not in row and "question" in row:  # the Hub copy (qiaojin/PubMedQA) names columns in lower case
        ctx = row.get("context") if isinstance(row.get("context"), dict) else {}
        row = {**row, "QUESTION": row["question"], "CONTEXTS": ctx.get("contexts"), "LONG_ANSWER": row.get("long_answer")}
    question = _text(row, "QUESTION").strip()
    decision = _text(row, "final_decision").strip().lower()
    if decision not in ("yes", "no", "maybe"):
        raise RowError(f"final_decision {decision!r} is not yes, no or maybe")
    text = question
    if contexts:
        parts = row.get("CONTEXTS")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise RowError("field 'CONTEXTS' must be a non-empty list of strings")
        text = f"{question}\n\nContext:\n" + "\n".join(p.strip() for p in parts)
    output = f"{decision}. {_text(row, 'LONG_ANSWER').strip()}" if long_answer else decision
    # One fixed task instruction: the question is the row's content (and what decontamination compares).
    return {"instruction": PUBMEDQA_INSTRUCTION, "input": text, "output": output}


# --------------------------------------------------------------------------------------------------
# Legal


@functools.lru_cache(maxsize=32)
def _legalbench_prompt(path: str) -> str:
    """The task description of a LegalBench base_prompt.txt: the text before its first few-shot example, plus the
    question its examples ask (`Q: {{text}} Is there hearsay?` gives "Is there hearsay?")."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the LegalBench prompt file ({e})") from None
    description = re.split(r"(?m)^Q:", text, maxsplit=1)[0].strip()
    m = re.search(r"\{\{text\}\}(?P<question>[^\n]*)", text)
    if not m:
        raise DataError(f"{path}: no '{{{{text}}}}' placeholder, so this is not a LegalBench base prompt")
    return "\n\n".join(p for p in (description, m.group("question").strip()) if p)


@adapter("legalbench")
def legalbench(row: dict[str, Any], *, instruction: str | None = None, prompt_file: str | None = None,
               text_field: str = "text", label_field: str = "label") -> dict[str, Any]:
    """LegalBench-style classification tasks (Guha et al. 2023): TSV rows {text, label}, plus the task's instruction.

    instruction: the task's instruction, written out; or
    prompt_file: the task's base_prompt.txt, whose description and question become the instruction.
    """
    if (instruction is None) == (prompt_file is None):
        raise DataError("adapter 'legalbench' needs exactly one of options.instruction or options.prompt_file")
    task = instruction if instruction is not None else _legalbench_prompt(prompt_file)
    return {"instruction": task, "input": _text(row, text_field).strip(), "output": _text(row, label_field).strip()}


# --------------------------------------------------------------------------------------------------
# Multiple choice


MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


@adapter("mmlu", columns=MMLU_COLUMNS)
def mmlu(row: dict[str, Any], *, subject: str | None = None) -> dict[str, Any]:
    """Multiple-choice CSV in MMLU's layout (Hendrycks et al. 2021): question, A, B, C, D, answer (a letter). MMLU's
    files have no header row; these column names are then used. The output is the answer's letter.

    subject: named in the instruction ("... about professional law"), as MMLU's own prompt does.
    """
    question = _text(row, "question").strip()
    options = [f"{k}. {_text(row, k).strip()}" for k in "ABCD"]
    answer = _text(row, "answer").strip().upper()
    if answer not in ("A", "B", "C", "D"):
        raise RowError(f"answer {answer!r} is not one of A, B, C, D")
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return {"instruction": f"The following is a multiple choice question{about}. Answer with the letter of the correct option.",
            "input": question + "\n" + "\n".join(options), "output": answer}


# --------------------------------------------------------------------------------------------------
# Conversations


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                   "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@adapter("sharegpt")
def sharegpt(row: dict[str, Any], *, system: str | None = None) -> dict[str, Any]:
    """ShareGPT / Vicuna conversations: {conversations: [{from: human|gpt|system, value}]} (rows already in
    {messages: [{role, content}]} pass through). As FastChat does, leading turns before the first user turn are dropped
    and a trailing user turn with no answer is cut.

    system: a system message for conversations that have none.
    """
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise RowError("field 'conversations' must be a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"conversations[{i}] is not an object")
        who = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise RowError(f"conversations[{i}] has unknown speaker {who!r}")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"conversations[{i}] has an empty or non-string value")
        messages.append({"role": role, "content": text})
    head = [m for m in messages[:1] if m["role"] == "system"] or ([{"role": "system", "content": system}] if system else [])
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    while rest and rest[-1]["role"] != "assistant":
        rest = rest[:-1]
    if not rest:
        raise RowError("conversation has no user turn answered by the assistant")
    for a, b in zip(rest, rest[1:]):
        if a["role"] == b["role"]:
            raise RowError(f"two {a['role']} turns in a row")
    return {"messages": head + rest}


# --------------------------------------------------------------------------------------------------
# Preference pairs: each adapter returns {prompt, chosen, rejected}, the prompt as messages (formats.normalise checks
# the rest: roles, the prompt ending on a user turn, chosen different from rejected).


def _turns(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise RowError(f"{field}[{i}] needs 'role' and a string 'content'")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


@adapter("ultrafeedback")
def ultrafeedback(row: dict[str, Any]) -> dict[str, Any]:
    """UltraFeedback-binarized style (HuggingFaceH4/ultrafeedback_binarized): `chosen` and `rejected` are whole
    conversations ([{role, content}], the last message the assistant's answer), `prompt` optionally the prompt text.
    The conversation before the last message is the prompt, and must be the same on both sides."""
    chosen, rejected = _turns(row.get("chosen"), "chosen"), _turns(row.get("rejected"), "rejected")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError(f"{side}: the last message must be the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("chosen and rejected conversations differ before the answer: they do not share a prompt")
    prompt = chosen[:-1]
    if not prompt:
        prompt = [{"role": "user", "content": _text(row, "prompt")}]
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_split(text: str, side: str) -> tuple[list[dict[str, str]], str]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise RowError(f"{side}: text before the first 'Human:' turn")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError(f"{side}: does not end with an 'Assistant:' turn")
    return turns[:-1], turns[-1]["content"]


@adapter("hh_rlhf")
def hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    """Anthropic HH-RLHF (Bai et al. 2022): `chosen` and `rejected` are whole dialogues as text ("\\n\\nHuman: ...
    \\n\\nAssistant: ..."). Each is split at its last "Assistant:" turn; the dialogue before it is the prompt and must
    be the same on both sides."""
    prompt, chosen = _hh_split(_text(row, "chosen"), "chosen")
    prompt_r, rejected = _hh_split(_text(row, "rejected"), "rejected")
    if prompt != prompt_r:
        raise RowError("chosen and rejected dialogues differ before the last assistant turn: they do not share a prompt")
    if not prompt:
        raise RowError("no 'Human:' turn before the answer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@adapter("argilla")
def argilla(row: dict[str, Any], *, ties: bool = False) -> dict[str, Any]:
    """Argilla / distilabel preference sets: the prompt in `instruction`, `input` or `prompt` (with an optional
    `system`), the answers in `chosen`/`rejected` or `chosen_response`/`rejected_response` (text, or message lists
    whose last message is the answer). When `chosen_rating` and `rejected_rating` are present, a tie is rejected.

    ties: keep pairs whose two ratings are equal (off: a tie says neither answer is preferred)."""
    key = next((k for k in ("instruction", "input", "prompt") if isinstance(row.get(k), str)), None)
    if key is None:
        raise RowError("no prompt: expected a text field 'instruction', 'input' or 'prompt'")
    prompt = [{"role": "user", "content": _text(row, key)}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        prompt.insert(0, {"role": "system", "content": row["system"]})
    answers = []
    for side in ("chosen", "rejected"):
        field = next((k for k in (side, f"{side}_response") if k in row), side)
        value = row.get(field)
        answers.append(_turns(value, field)[-1]["content"] if isinstance(value, list) else _text(row, field))
    rated = [row.get(f"{side}_rating") for side in ("chosen", "rejected")]
    if not ties and all(isinstance(r, (int, float)) for r in rated) and rated[0] == rated[1]:
        raise RowError(f"tie: chosen_rating and rejected_rating are both {rated[0]}")
    return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}
