"""An Ollama Modelfile for an exported GGUF: FROM, a TEMPLATE equivalent to the run's own prompt, a `PARAMETER stop`
for every stop string the run's eval and chat use, and the recipe's system prompt.

Ollama's TEMPLATE is a Go template, the tokenizer's chat template is Jinja: the Go template is derived, not
translated. The chat template is rendered with sentinel contents, and each role's text before and after its content
is read off (`role_wrappers`); the Go template wraps each message the same way. That fits every template that wraps
each message alone (ChatML, Llama 3, Zephyr, Qwen2 ...). A template with other logic (a system prompt folded into
the first user turn, as Llama 2 and Mistral's do) is detected by rendering sample conversations both ways, and no
TEMPLATE is written rather than a wrong one. Alpaca-template runs get Alpaca's prompt around `.Prompt`.

The BOS token is left out of TEMPLATE: Ollama (llama.cpp) adds it from the GGUF's metadata, as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_S = {"system": "\x01SYS\x01", "user": "\x01USR{}\x01", "assistant": "\x01AST{}\x01"}


def _render(tok, messages: list[dict[str, str]], generation: bool) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tok.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


def role_wrappers(tok) -> dict[str, tuple[str, str]] | None:
    """{role: (text before the content, text after it)} and the generation prompt under "generation", read off the
    chat template with sentinel contents; None when the template does not wrap each message alone."""
    u1, a1, u2 = _S["user"].format(1), _S["assistant"].format(1), _S["user"].format(2)
    try:
        one = _render(tok, [{"role": "user", "content": u1}], False)
        conv = _render(tok, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}], True)
        with_sys = _render(tok, [{"role": "system", "content": _S["system"]}, {"role": "user", "content": u1}], False)
    except Exception:
        return None
    if not (u1 in one and u1 in conv and a1 in conv and u2 in conv):
        return None
    user = (one[: one.index(u1)], one[one.index(u1) + len(u1):])
    between = conv[conv.index(u1) + len(u1): conv.index(a1)]  # user suffix + assistant prefix
    if not between.startswith(user[1]):
        return None
    a_pre = between[len(user[1]):]
    after_a = conv[conv.index(a1) + len(a1): conv.index(u2)]  # assistant suffix + user prefix
    if not after_a.endswith(user[0]):
        return None
    a_suf = after_a[: len(after_a) - len(user[0])] if user[0] else after_a
    generation = conv[conv.index(u2) + len(u2):]
    if not generation.startswith(user[1]):
        return None
    out = {"user": user, "assistant": (a_pre, a_suf), "generation": (generation[len(user[1]):], "")}
    if _S["system"] in with_sys and not with_sys.endswith(one):
        return None  # a system prompt rendered inside another message (Llama 2's <<SYS>> in the first user turn)
    if _S["system"] in with_sys:
        sys_part = with_sys[: len(with_sys) - len(one)]
        i = sys_part.index(_S["system"])
        out["system"] = (sys_part[:i], sys_part[i + len(_S["system"]):])
    # The wrappers must reproduce the template on conversations of other shapes, or they are not its equivalent.
    for conv in SAMPLES:
        if "system" not in out and conv[0]["role"] == "system":
            continue
        if wrapped(out, conv) != _render(tok, conv, True):
            return None
    return out


SAMPLES = [
    [{"role": "user", "content": "Is a verbal lease valid?"}],
    [{"role": "system", "content": "You are a careful clinician."}, {"role": "user", "content": "Dose of amoxicillin?"},
     {"role": "assistant", "content": "500 mg three times daily."}, {"role": "user", "content": "For a child?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
     {"role": "assistant", "content": "6"}, {"role": "user", "content": "and {{ braces }}?"}],
]


def wrapped(w: dict[str, tuple[str, str]], messages: list[dict[str, str]]) -> str:
    """A conversation rendered with the wrappers, ready for the assistant's turn (what the Go template produces)."""
    return "".join(w[m["role"]][0] + m["content"] + w[m["role"]][1] for m in messages) + w["generation"][0]


def _go(s: str) -> str:
    """Text inside a Go template: literal, except that `{{` would open an action."""
    return s.replace("{{", '{{ "{{" }}')


def go_template(w: dict[str, tuple[str, str]]) -> str:
    # No trim markers ({{-): they would eat the newline a wrapper ends with. Nothing but the wrappers' own text sits
    # between the actions, so the output is exactly `wrapped`.
    parts = ["{{ range .Messages }}"]
    branches = [r for r in ("system", "user", "assistant") if r in w]
    for i, role in enumerate(branches):
        pre, suf = w[role]
        parts.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{_go(pre)}{{{{ .Content }}}}{_go(suf)}')
    parts.append("{{ end }}{{ end }}" + _go(w["generation"][0]))
    return "".join(parts)


def alpaca_go_template() -> str:
    from .templates import ALPACA_PROMPT

    head, tail = ALPACA_PROMPT.split("{instruction}")
    return f"{_go(head)}{{{{ .Prompt }}}}{_go(tail)}"


def stop_strings(tok, recipe) -> list[str]:
    """Every stop the run's chat and eval use: the EOS and end-of-turn tokens, and the text stops of its generation tasks
    (tasks.stops: "### Instruction" for Alpaca prompts, a task's own `stop:`)."""
    from .lm import stop_ids
    from .tasks import stops

    out = [tok.convert_ids_to_tokens(i) for i in stop_ids(tok)]
    for task in recipe.eval.tasks:
        if task.type == "exact_match":
            out += stops(task, recipe.data.template)
    if recipe.data.template == "alpaca":
        out.append("### Instruction")
    return list(dict.fromkeys(s for s in out if s))


def _quote(s: str) -> str:
    if '"""' in s:
        raise ValueError("a text holding three double quotes cannot be written in a Modelfile")
    return f'"""{s}"""'


def modelfile_text(gguf_name: str, tok, recipe) -> tuple[str, dict[str, Any]]:
    lines = [f"FROM ./{gguf_name}"]
    info: dict[str, Any] = {"written": True}
    if recipe.data.template == "chat":
        w = role_wrappers(tok)
        if w is not None and recipe.data.system_prompt and "system" not in w:
            w = None  # the system prompt would be dropped: the template folds it into a user turn
        if w is None:
            info.update(template=None, why="the chat template does not wrap each message alone (a system prompt folded into the first user turn, "
                        "or a default system prompt it adds): no TEMPLATE is written; Ollama then uses the GGUF's own chat template if it knows it")
        else:
            lines.append(f"TEMPLATE {_quote(go_template(w))}")
            info["template"] = "chat (role wrappers read off the tokenizer's chat template)"
    else:
        lines.append(f"TEMPLATE {_quote(alpaca_go_template())}")
        info["template"] = "alpaca"
    stops = stop_strings(tok, recipe)
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    if recipe.data.system_prompt:
        lines.append(f"SYSTEM {_quote(recipe.data.system_prompt)}")
    info["stops"] = stops
    return "\n".join(lines) + "\n", info


def write_modelfile(out: Path, gguf_name: str, tok, recipe) -> dict[str, Any]:
    """<stem>.Modelfile beside the GGUF, and `Modelfile` (what `ollama create NAME -f Modelfile` reads) as its copy."""
    text, info = modelfile_text(gguf_name, tok, recipe)
    own = out / f"{Path(gguf_name).stem}.Modelfile"
    own.write_text(text, encoding="utf-8")
    (out / "Modelfile").write_text(text, encoding="utf-8")
    info["file"] = own.name
    return info
