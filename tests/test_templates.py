"""What the model is trained on: prompt masked, EOS supervised (also when pad == eos), one BOS, exact boundary."""

from __future__ import annotations

import pytest

from finetune.smoke import build_tokenizer
from finetune.templates import TemplateError, alpaca_prompt, encode, truncate

ROW = {"instruction": "Define tort.", "input": "", "output": "A civil wrong."}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Define tort. A civil wrong. Below is an instruction that describes a task."] * 5)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_prompt_masked_eos_supervised_one_bos(tok, template, pad_is_eos):
    if pad_is_eos:
        tok = build_tokenizer(["Define tort. A civil wrong."] * 5)
        tok.pad_token = tok.eos_token
    enc = encode(tok, ROW, template)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    assert enc.labels[-1] == tok.eos_token_id == enc.input_ids[-1]
    first = next(i for i, x in enumerate(enc.labels) if x != -100)
    assert all(x == -100 for x in enc.labels[:first]) and enc.labels[first:] == enc.input_ids[first:]
    # The supervised part decodes to the response (chat: plus the template's turn end), never the prompt.
    decoded = tok.decode(enc.labels[first:], skip_special_tokens=True)
    assert decoded.strip().startswith("A civil wrong.") and "Define tort" not in decoded
    # Training prompt == what inference is given: the prompt tokens alone reproduce the masked prefix.
    if template == "chat":
        gen = tok.apply_chat_template([{"role": "user", "content": "Define tort."}], tokenize=False, add_generation_prompt=True)
        assert gen == enc.prompt
    else:
        assert enc.prompt == alpaca_prompt("Define tort.") and enc.prompt.endswith("### Response:")


def test_multi_turn_chat_supervises_every_assistant_turn(tok):
    row = {"messages": [{"role": "user", "content": "Define tort."}, {"role": "assistant", "content": "A civil wrong."},
                        {"role": "user", "content": "Define tort."}, {"role": "assistant", "content": "A wrong."}]}
    enc = encode(tok, row, "chat")
    spans, inside = 0, False
    for x in enc.labels:
        if x != -100 and not inside:
            spans += 1
        inside = x != -100
    assert spans == 2
    assert enc.labels.count(tok.eos_token_id) == 2  # each supervised turn ends in a supervised EOS


def test_truncate_keeps_eos_and_refuses_prompt_only(tok):
    enc = encode(tok, {**ROW, "output": "A civil wrong. " * 30}, "alpaca")
    first = next(i for i, x in enumerate(enc.labels) if x != -100)
    cut = truncate(enc, first + 5, tok.eos_token_id)
    assert len(cut.input_ids) == first + 5 and cut.labels[-1] == tok.eos_token_id
    assert cut.labels[first:-1] == enc.labels[first : first + 4]
    assert truncate(enc, first, tok.eos_token_id) is None


def test_alpaca_template_refuses_messages_and_chat_needs_a_template(tok):
    with pytest.raises(TemplateError):
        encode(tok, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "alpaca")
    bare = build_tokenizer(["x"])
    bare.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        encode(bare, ROW, "chat")
