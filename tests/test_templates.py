"""What the model is trained on: prompt masked, EOS supervised (and kept in a batch when pad == eos), one BOS, exact boundary."""

from __future__ import annotations

import pytest

from finetune.smoke import build_tokenizer
from finetune.templates import TemplateError, alpaca_prompt, encode, truncate

ROW = {"instruction": "Define tort.", "input": "", "output": "A civil wrong."}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Define tort. A civil wrong. Below is an instruction that describes a task."] * 5)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_masked_eos_supervised_one_bos(tok, template):
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


@pytest.mark.parametrize("packing", [False, True])
def test_eos_stays_supervised_in_a_batch_when_pad_is_eos(packing):
    """Where pad == eos matters: collation. trl's collator with our labels keeps every supervised EOS (also for the
    shorter, padded row, and padding-free); the collator a plain causal-LM script uses masks every pad id, so it
    drops the EOS: the preflight check that compares them must catch that."""
    from transformers import DataCollatorForLanguageModeling as PlainCollator
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.preflight import check_batch

    tok = build_tokenizer(["Define tort. A civil wrong. Below is an instruction that describes a task."] * 5)
    tok.pad_token = tok.eos_token
    rows = [encode(tok, ROW, "alpaca"), encode(tok, {**ROW, "output": "A civil wrong, and a longer answer."}, "alpaca")]
    items = [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]
    assert check_batch(tok, DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=packing), items) == []
    plain = PlainCollator(tok, mlm=False)
    naive = check_batch(tok, plain, [{"input_ids": e.input_ids} for e in rows])
    assert naive and "supervises 0 EOS tokens, the examples 2 (pad == eos)" in naive[0], naive


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
