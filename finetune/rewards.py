"""Reward functions for reinforcement learning with verifiable rewards (GRPO, issue 19): small, documented callables
scored against a row's reference answer with the same extraction and equivalence the eval harness uses (answers.py),
so a reward of 1 means exactly what a correct answer means in the eval report.

Each reward has the signature TRL's GRPOTrainer calls: `reward(prompts, completions, **columns) -> list[float]`,
one float per completion. `completions` are strings, or conversations (lists of {role, content}) whose last message is
the answer; dataset columns (here `answer`, the reference) arrive as keyword lists aligned with the completions.

How to add one:
1. Write `def myreward(prompts, completions, **columns) -> list[float]` below (or in your own module), documented:
   what earns what, and why.
2. Decorate it with `@reward("myreward")`.
3. Name it in a recipe: `rewards: [correctness, myreward]`, or `my_package.my_module:my_function` for one outside
   finetune; `resolve` checks the name (did-you-mean) and imports it.

Importable without torch.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from .answers import METHODS, closing_brace, equivalent, extract
from .errors import UserError

Reward = Callable[..., list[float]]
REWARDS: dict[str, Reward] = {}


def reward(name: str):
    def register(fn: Reward) -> Reward:
        REWARDS[name] = fn
        return fn

    return register


def _text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of a conversation's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return ""


@reward("correctness")
def correctness(prompts, completions, answer: list[str], extract_methods: tuple[str, ...] = METHODS, **_) -> list[float]:
    """1.0 when the completion's answer (the last \\boxed{}, else `#### x`, `the answer is x`, the last number: the eval
    harness's order) equals the reference by answers.equivalent (normalised text, then math-verify), else 0.0."""
    return [1.0 if equivalent(extract(_text(c), extract_methods), str(gold)) else 0.0 for c, gold in zip(completions, answer)]


def _boxed_count(text: str) -> int:
    """How many \\boxed{...} with balanced braces the text holds (an unclosed one ends the count)."""
    count, i = 0, text.find("\\boxed{")
    while i >= 0 and (j := closing_brace(text, i + len("\\boxed"))) is not None:
        count += 1
        i = text.find("\\boxed{", j + 1)
    return count


@reward("boxed_format")
def boxed_format(prompts, completions, **_) -> list[float]:
    """1.0 when the completion puts exactly one closed \\boxed{...} in its text, else 0.0: OpenMath's answer format,
    which the correctness reward and the GSM8K/MATH eval read first. Two boxes (hedging) or an unclosed one earn 0."""
    return [1.0 if _boxed_count(_text(c)) == 1 else 0.0 for c in completions]


def resolve(name: str) -> Reward:
    """A reward by its registered name, or `module.path:function` for a user's own; one clear message otherwise."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"reward {name!r}: cannot import it ({e})") from None
        if not callable(fn):
            raise UserError(f"reward {name!r}: not a function")
        return fn
    close = difflib.get_close_matches(name, REWARDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown reward {name!r} (known: {', '.join(sorted(REWARDS))}, or module:function){hint}")
