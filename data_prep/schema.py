"""Shared pieces of the YAML schemas (data specs here, recipes in finetune.recipe): sections that forbid unknown
keys, and validation errors turned into one readable message with a did-you-mean for misspelled keys and choices."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """Base of every schema section: unknown keys are errors, never silently dropped; no number may be inf or NaN
    (`learning_rate: .inf` passed `gt=0` and failed at the first step)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def did_you_mean(key: str, valid: list[str], aliases: dict[str, str] | None = None) -> str | None:
    """The valid name closest to `key`; `aliases` maps other tools' names onto ours (`lr` -> `learning_rate`)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    if aliases:
        alias = difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.7)
        if alias and aliases[alias[0]] in valid:
            return aliases[alias[0]]
    return None


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside an annotation such as `LoraSpec | None` or `list[EvalTask]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """Valid key names of the section at `loc` (a pydantic error location, list indices included)."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        cls = _section_class(field.annotation)
    return list(cls.model_fields) if cls is not None else []


def explain(err: ValidationError, source: str, root: type[BaseModel], what: str, aliases: dict[str, str] | None = None) -> str:
    """One message for all problems of a document: dotted path, bad value, and the closest valid key or choice."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p)))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = fields_at(root, loc[:-1])
            close = did_you_mean(str(loc[-1]), valid, aliases)
            hint = f"; did you mean '{close}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"{path}: unknown key{hint}")
            continue
        value = e.get("input")
        shown = json.dumps(value, default=str)[:80] if not isinstance(value, dict) else "{…}"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error" and isinstance(value, str):
            choices = re.findall(r"'([^']+)'", msg)
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        lines.append(f"{path}: {msg} (got {shown})" if e["type"] != "missing" else f"{path}: required key is missing")
    head = f"{source}: invalid {what} ({len(lines)} problem{'s' if len(lines) > 1 else ''})"
    return head + "\n  " + "\n  ".join(lines)
