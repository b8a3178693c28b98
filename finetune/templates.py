"""Prompt templates and tokenisation: one place decides what the model sees and what it is trained on.

Rules (each one a failure mode seen in peer tools):
- prompt tokens are labelled -100; the response and its end-of-sequence token are supervised;
- EOS is supervised on every example, by token id, so pad == eos can never mask it;
- exactly one BOS when the tokenizer uses one (templates that write `<s>` themselves are not given a second);
- prompt and response are tokenised as separate segments, so the boundary is exact and inference (which
  tokenises the prompt alone) sees the same prompt tokens as training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py), byte for byte: the prompt ends at "### Response:" with no
# trailing space or newline, and the output follows directly, as in Alpaca's train.py.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


class TemplateError(Exception):
    """The row cannot be rendered with the recipe's template (the row is rejected; the build goes on)."""


class TokenizerUnfit(TemplateError):
    """The tokenizer cannot render any row with the recipe's template (no chat template, no EOS): the recipe or the base
    model is wrong, not the row."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt: str  # text of the first prompt segment (what inference would be given)
    completion: str  # text the model is trained to produce for it

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def as_messages(row: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    if "messages" in row:
        msgs = list(row["messages"])
    else:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def segments(tok, row: dict[str, Any], template: str, system_prompt: str | None) -> list[tuple[str, bool]]:
    """The example as (text, supervised) segments, in order."""
    if template == "alpaca":
        if "messages" in row:
            raise TemplateError("the alpaca template renders instruction/input/output rows, not messages")
        return [(alpaca_prompt(row["instruction"], row.get("input", "")), False), (row["output"], True)]
    if not getattr(tok, "chat_template", None):
        raise TokenizerUnfit("data.template is `chat` but the tokenizer has no chat template")
    msgs = as_messages(row, system_prompt)
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        except Exception as e:  # jinja raises for conversations a template does not accept
            raise TemplateError(f"chat template refused the conversation: {e}") from None
        if not prompt.startswith(done) or not full.startswith(prompt):
            # The template rewrites earlier turns depending on later ones: masks would be wrong, so refuse.
            raise TemplateError("chat template is not prefix-consistent across turns; cannot mask the prompt exactly")
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return out


def encode(tok, row: dict[str, Any], template: str, system_prompt: str | None = None) -> Encoded:
    """Tokenise one example into input_ids and labels (prompt masked, EOS supervised, one BOS)."""
    eos = tok.eos_token_id
    if eos is None:
        raise TokenizerUnfit("the tokenizer has no EOS token: the model could never learn to stop")
    ids: list[int] = []
    labels: list[int] = []
    segs = segments(tok, row, template, system_prompt)
    for text, supervised in segs:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        if supervised:
            # The supervised span ends at the EOS: the template's own terminator if it writes one, else ours.
            if eos in piece:
                piece = piece[: len(piece) - piece[::-1].index(eos)]
            else:
                piece = piece + [eos]
        ids += piece
        labels += piece if supervised else [-100] * len(piece)
    bos = tok.bos_token_id
    if bos is not None and adds_bos(tok):
        if ids[:1] != [bos]:
            ids, labels = [bos] + ids, [-100] + labels
        elif ids[1:2] == [bos]:
            raise TemplateError("the rendered example starts with two BOS tokens")
    return Encoded(ids, labels, segs[0][0], segs[1][0])


def token_ids(tok, text: str, bos: bool = True) -> list[int]:
    """`text` tokenised as a prompt segment is at inference: no special tokens, one BOS in front when the tokenizer
    uses one and the text does not already start with it."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if bos and tok.bos_token_id is not None and adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id] + ids
    return ids


def adds_bos(tok) -> bool:
    """Whether the tokenizer's own encoding starts sequences with BOS (Llama/Mistral do; Qwen2 does not)."""
    cached = getattr(tok, "_finetune_adds_bos", None)
    if cached is None:
        probe = tok("a")["input_ids"]
        cached = bool(probe) and probe[0] == tok.bos_token_id
        try:
            tok._finetune_adds_bos = cached
        except AttributeError:
            pass
    return cached


def row_encoder(tok, template: str, system_prompt: str | None = None):
    """`encode` for the data build: a row's encoding is cached on the row (the length check and the tokenising step
    share it); a row the template cannot render is a RowError (rejected, the build goes on); a tokenizer that cannot
    render any row (no chat template, no EOS) is a DataError (the build stops with one message).

    The cache holds the texts it was computed from and is used only while the row still has them: the PII step
    runs between the length check and the tokenising, and a redacted copy of a row carries the cache of the raw
    text (trusting it trained on the personal data the build had removed from train.jsonl)."""
    from data_prep.errors import DataError, RowError
    from data_prep.formats import row_texts

    def enc(row: dict[str, Any]) -> Encoded:
        texts = row_texts(row)
        cached = row.get("_enc")
        if cached is not None and cached[0] == texts:
            return cached[1]
        try:
            out = encode(tok, row, template, system_prompt)
        except TokenizerUnfit as e:
            raise DataError(f"data.template: {e}") from None
        except TemplateError as e:
            raise RowError(str(e)) from None
        row["_enc"] = (texts, out)
        return out

    return enc


def truncate(enc: Encoded, max_length: int, eos: int) -> Encoded | None:
    """Cut the response so the example fits, keeping the EOS supervised; None when the prompt alone does not fit."""
    first_label = next((i for i, x in enumerate(enc.labels) if x != -100), len(enc.labels))
    if first_label >= max_length - 1:
        return None
    ids = enc.input_ids[: max_length - 1] + [eos]
    labels = enc.labels[: max_length - 1] + [eos]
    return Encoded(ids, labels, enc.prompt, enc.completion)
