"""Try the model: `finetune generate RUN_DIR --prompt TEXT` and `finetune chat RUN_DIR`.

The tuned model is the run's base (loaded as training and eval saw it) with its adapter, and prompts are rendered with
the recipe's own template (tasks.wrap, the function eval uses), so what you try is what was measured. Output streams
token by token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from .errors import UserError
from .run import RunDir


def load_run_model(run_dir: Path):
    """(model, tokenizer, recipe) of a finished run: base + RUN/adapter."""
    from peft import PeftModel

    from .models import load_model, load_tokenizer

    run = RunDir(run_dir)
    if not run.recipe.exists():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml)")
    if not (run.adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: no trained adapter yet (run `finetune run RECIPE` or `finetune train RECIPE` first)")
    recipe, _ = run.load_recipe()
    tok = load_tokenizer(recipe.base_model.id, recipe)
    model = load_model(recipe.base_model.id, recipe, quantized=recipe.quantization.bits != 16)
    model = PeftModel.from_pretrained(model, str(run.adapter))
    model.eval()
    return model, tok, recipe


def render(recipe, tok, turns: list[dict[str, str]]) -> str:
    """The prompt for the next assistant turn. The Alpaca template is single-turn: earlier turns go into the instruction."""
    from .tasks import wrap

    if recipe.data.template == "chat":
        msgs = ([{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []) + turns
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    earlier = "\n\n".join(f"{t['role']}: {t['content']}" for t in turns[:-1])
    instruction = turns[-1]["content"] if not earlier else f"{earlier}\n\nuser: {turns[-1]['content']}"
    return wrap(instruction, "", "alpaca")


def stream(model, tok, prompt: str, max_new_tokens: int, temperature: float, write: Callable[[str], None]) -> str:
    """Generate from `prompt`, calling `write` with each piece of text as it is decoded; returns the whole answer."""
    import torch
    from transformers import TextStreamer

    from .lm import HFLM, stop_ids

    pieces: list[str] = []

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                pieces.append(text)
                write(text)

    ids = HFLM(model, tok)._ids(prompt, bos=True)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    sample = temperature > 0
    with torch.no_grad():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=sample,
                       **({"temperature": temperature} if sample else {}), pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(tok),
                       streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True))
    return "".join(pieces)


def generate(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float, out: TextIO = sys.stdout) -> str:
    model, tok, recipe = load_run_model(run_dir)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    answer = stream(model, tok, render(recipe, tok, [{"role": "user", "content": prompt}]), max_new_tokens, temperature, write)
    out.write("\n")
    return answer


def chat(run_dir: Path, max_new_tokens: int, temperature: float, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Read a line, answer it, keep the conversation; `/reset` forgets it, `/exit` or end of input leaves. Returns turns taken."""
    model, tok, recipe = load_run_model(run_dir)
    out.write(f"{recipe.name} ({recipe.domain}, template {recipe.data.template}). /reset forgets the conversation, /exit leaves.\n")
    turns: list[dict[str, str]] = []
    taken = 0

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return taken
        line = line.strip()
        if line in ("/exit", "/quit"):
            return taken
        if line == "/reset":
            turns = []
            continue
        if not line:
            continue
        turns.append({"role": "user", "content": line})
        answer = stream(model, tok, render(recipe, tok, turns), max_new_tokens, temperature, write)
        out.write("\n")
        turns.append({"role": "assistant", "content": answer.strip()})
        taken += 1
