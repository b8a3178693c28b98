"""Try the model: `finetune generate RUN_DIR --prompt TEXT` and `finetune chat RUN_DIR`.

The tuned model is the run's base (loaded as training and eval saw it) with its adapter, and prompts are rendered with
the recipe's own template (tasks.wrap, the function eval uses), so what you try is what was measured. Output streams
token by token.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Callable, TextIO

from .errors import UserError
from .run import RunDir


def check_run(run_dir: Path) -> RunDir:
    """A run directory with a trained adapter, or one clear message (cheap: no torch)."""
    run = RunDir(run_dir)
    run.require()
    if not (run.adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: no trained adapter yet (run `finetune run RECIPE` or `finetune train RECIPE` first)")
    return run


def load_run_model(run_dir: Path, use: str = "auto"):
    """(model, tokenizer, recipe) of a finished run: RUN/merged (the published model) when it passed its check, or
    with `use="adapter"` the base as trained plus RUN/adapter."""
    from peft import PeftModel

    from .evaluate import merged_to_score
    from .models import DTYPES, load_model, load_tokenizer

    run = check_run(run_dir)
    recipe, _ = run.load_recipe()
    merged = merged_to_score(run)
    if use == "merged" and merged is None:
        raise UserError(f"{run_dir}: no merged model that passed its check (RUN/merged, merge_check.json); use --use adapter")
    if use != "adapter" and merged is not None:
        sys.stderr.write(f"[finetune] model: the merged model ({merged.name}/, as published); --use adapter for the adapter as trained\n")
        tok = load_tokenizer(str(merged), recipe)
        model = load_model(str(merged), recipe, quantized=False, dtype=DTYPES[recipe.merge.dtype])
        model.eval()
        return model, tok, recipe
    sys.stderr.write("[finetune] model: the base as trained with the adapter\n")
    from . import runbase

    tok = runbase.tokenizer(recipe, run)
    model = runbase.load(recipe, run, quantized=recipe.quantization.bits != 16)[0]
    model = PeftModel.from_pretrained(model, str(run.final_adapter(recipe.stages)))
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

    ids = HFLM(model, tok).encode(prompt, bos=True)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    sample = temperature > 0
    with torch.no_grad():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=sample,
                       **({"temperature": temperature} if sample else {}), pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(tok),
                       streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True))
    return "".join(pieces)


def generate(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float, out: TextIO = sys.stdout, use: str = "auto") -> str:
    model, tok, recipe = load_run_model(run_dir, use)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    answer = stream(model, tok, render(recipe, tok, [{"role": "user", "content": prompt}]), max_new_tokens, temperature, write)
    out.write("\n")
    return answer


HELP = ("/help     this list\n"
        "/reset    forget the conversation (the model sees only what follows)\n"
        "/exit     leave (also /quit, or Ctrl-D)\n"
        "Ctrl-C    stop the answer being written; at the prompt, leave\n"
        "Any other line is sent to the model. Lines starting with / are commands, never sent.")


def read_line(inp: TextIO, out: TextIO, prompt: str = "> ") -> str | None:
    """One line from the user; None at end of input. On a terminal, `input()` with readline gives line editing and
    history (arrow keys instead of ^[[A); from a pipe or file, a plain read."""
    if inp is sys.stdin and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (imported for its side effect: input() gains editing and history)
        except ImportError:  # Windows without pyreadline
            pass
        try:
            return input(prompt)
        except EOFError:
            out.write("\n")
            return None
    out.write(prompt)
    out.flush()
    line = inp.readline()
    if not line:
        out.write("\n")
        return None
    return line


def chat(run_dir: Path, max_new_tokens: int, temperature: float, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
         loaded=None, streamer=None, use: str = "auto") -> int:
    """Read a line, answer it, keep the conversation. Commands (/help, /reset, /exit) are never sent to the model;
    Ctrl-C while an answer is written stops that answer (what was written is kept as the turn) and the conversation
    goes on; Ctrl-C at the prompt or end of input leaves. Returns the turns taken."""
    model, tok, recipe = loaded or load_run_model(run_dir, use)
    streamer = streamer or stream
    out.write(f"{recipe.name} ({recipe.domain}, template {recipe.data.template}). /help lists the commands.\n")
    turns: list[dict[str, str]] = []
    taken = 0

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read_line(inp, out)
        except KeyboardInterrupt:
            out.write("\n")
            return taken
        if line is None:
            return taken
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd = line.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                return taken
            if cmd == "/reset":
                turns = []
                out.write("(conversation cleared)\n")
            elif cmd in ("/help", "/?"):
                out.write(HELP + "\n")
            else:
                close = difflib.get_close_matches(cmd, ["/help", "/reset", "/exit", "/quit"], n=1)
                out.write(f"(unknown command {cmd}" + (f"; did you mean {close[0]}?" if close else "") + " /help lists them)\n")
            continue
        turns.append({"role": "user", "content": line})
        pieces: list[str] = []

        def keep(text: str) -> None:
            pieces.append(text)
            write(text)

        try:
            answer = streamer(model, tok, render(recipe, tok, turns), max_new_tokens, temperature, keep)
        except KeyboardInterrupt:
            answer = "".join(pieces)
            out.write(" [stopped]")
        out.write("\n")
        turns.append({"role": "assistant", "content": answer.strip()})
        taken += 1
