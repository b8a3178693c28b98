"""Verifiable rewards (finetune/rewards.py): each hand-written completion's reward is labelled by hand here, the
independent checker; the functions take TRL GRPOTrainer's calling convention (extra keyword columns included)."""

from __future__ import annotations

import pytest

# (completion, reference answer, correct?, exactly one closed \boxed{}?), each label decided by reading the text
CASES = [
    ("She has 5 + 7 = 12 apples, so the answer is \\boxed{12}.", "12", 1.0, 1.0),
    ("12 + 3 = 15. \\boxed{15}", "18", 0.0, 1.0),
    ("The total is 1,250 dollars.\n#### 1250", "1250", 1.0, 0.0),  # right, but not in the boxed format
    ("Half of 3 is \\boxed{\\frac{3}{2}}", "1.5", 1.0, 1.0),  # math-verify: 3/2 == 1.5
    ("Maybe \\boxed{4} or \\boxed{5}", "5", 1.0, 0.0),  # the last box is read; two boxes earn no format reward
    ("The answer is \\boxed{7", "7", 0.0, 0.0),  # unclosed: "the answer is" gives "\\boxed{7", malformed, as eval scores it
    ("I cannot tell.", "3", 0.0, 0.0),
    ("x = \\boxed{-2}", "-2", 1.0, 1.0),
    ("\\boxed{\\{1, 2\\}} is the set", "{1,2}", 1.0, 1.0),  # braces inside the box stay balanced
]


def test_rewards_on_hand_written_completions():
    from finetune.rewards import boxed_format, correctness

    completions = [c for c, *_ in CASES]
    answers = [a for _, a, _, _ in CASES]
    prompts = ["q"] * len(CASES)
    # GRPOTrainer passes the prompts, the completions, every dataset column, and more keyword arguments
    assert correctness(prompts, completions, answer=answers, completion_ids=[[0]] * len(CASES), trainer_state=None) == [c[2] for c in CASES]
    assert boxed_format(prompts, completions, answer=answers) == [c[3] for c in CASES]
    # conversational completions: the last message is the answer
    chats = [[{"role": "assistant", "content": c}] for c in completions]
    assert correctness(prompts, chats, answer=answers) == [c[2] for c in CASES]


def test_rewards_are_named_in_recipes_and_resolved_with_one_message():
    from finetune.errors import UserError
    from finetune.rewards import REWARDS, correctness, resolve

    assert resolve("correctness") is correctness and {"correctness", "boxed_format"} <= set(REWARDS)
    assert resolve("finetune.rewards:boxed_format") is REWARDS["boxed_format"]
    with pytest.raises(UserError, match="unknown reward 'correctnes'.*did you mean 'correctness'"):
        resolve("correctnes")
    with pytest.raises(UserError, match="reward 'nosuch.module:f': cannot import it"):
        resolve("nosuch.module:f")
