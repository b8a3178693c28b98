"""An Ollama Modelfile for an exported GGUF: FROM, a TEMPLATE equivalent to the run's own prompt, a `PARAMETER stop`
for every stop string the run's eval and chat use, and the recipe's system prompt.

Ollama's TEMPLATE is a Go template, the tokenizer's chat template is Jinja: the Go template is derived, not
translated. The chat template is rendered with sentinel contents, and each role's text before and after its content
is read off (`role_wrappers`); the Go template wraps each message the same way. That fits every template that wraps
each message alone (ChatML, Llama 3, Zephyr, Qwen2 ...), and those that add a default system prompt (SmolLM2,
Qwen2.5: the default becomes the Modelfile's SYSTEM). A template with other logic (a system prompt folded into the
first user turn, as Llama 2 and Mistral's do) is detected by rendering sample conversations both ways, and no
TEMPLATE is written rather than a wrong one. Alpaca-template runs get Alpaca's prompt around `.Prompt`.

The BOS token is left out of TEMPLATE: Ollama (llama.cpp) adds it from the GGUF's metadata, as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_S = {"system": "\x01SYS\x01", "user": "\x01USR{}\x01", "assistant": "\x01AST{}\x01"}


def _render(tok, messages: list[dict[str, str]], generation: bool) -> str:
    """The chat template's text without the BOS the runtime adds (when the tokenizer adds BOS itself, llama.cpp adds it
    too, from the GGUF's add_bos_token). A template's literal text that merely equals the BOS string (SmolLM2's BOS is
    <|im_start|>, which its template writes before every message) stays."""
    from .templates import adds_bos

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tok.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) and adds_bos(tok) else text


def role_wrappers(tok) -> dict[str, Any] | None:
    """{role: (text before the content, text after it)}, the generation prompt under "generation", and under
    "default_system" the system prompt the template adds when a conversation has none (SmolLM2's, Qwen2.5's); read off
    the chat template with sentinel contents. None when the template does not wrap each message alone."""
    try:
        out = _per_message(tok)
        if out is None:
            out = _with_default_system(tok)
    except Exception:  # a template that refuses a sentinel conversation (roles must alternate, no system ...)
        return None
    if out is None:
        return None
    # The wrappers must reproduce the template on conversations of other shapes, or they are not its equivalent.
    for conv in SAMPLES:
        if "system" not in out and conv[0]["role"] == "system":
            continue
        if wrapped(out, conv) != _render(tok, conv, True):
            return None
    return out


def _per_message(tok) -> dict[str, Any] | None:
    """Templates that render each message alone: a user message first is just the user's wrapper."""
    u1, a1, u2 = _S["user"].format(1), _S["assistant"].format(1), _S["user"].format(2)
    one = _render(tok, [{"role": "user", "content": u1}], False)
    conv = _render(tok, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}], True)
    with_sys = _render(tok, [{"role": "system", "content": _S["system"]}, {"role": "user", "content": u1}], False)
    if not (u1 in one and u1 in conv and a1 in conv and u2 in conv):
        return None
    user = (one[: one.index(u1)], one[one.index(u1) + len(u1):])
    between = conv[conv.index(u1) + len(u1): conv.index(a1)]  # user suffix + assistant prefix
    after_a = conv[conv.index(a1) + len(a1): conv.index(u2)]  # assistant suffix + user prefix
    generation = conv[conv.index(u2) + len(u2):]
    if not (between.startswith(user[1]) and after_a.endswith(user[0]) and generation.startswith(user[1])):
        return None
    a_suf = after_a[: len(after_a) - len(user[0])] if user[0] else after_a
    out: dict[str, Any] = {"user": user, "assistant": (between[len(user[1]):], a_suf), "generation": (generation[len(user[1]):], "")}
    if _S["system"] in with_sys:
        if not with_sys.endswith(one):
            return None  # a system prompt rendered inside another message (Llama 2's <<SYS>> in the first user turn)
        sys_part = with_sys[: len(with_sys) - len(one)]
        i = sys_part.index(_S["system"])
        out["system"] = (sys_part[:i], sys_part[i + len(_S["system"]):])
    return out


def _with_default_system(tok) -> dict[str, Any] | None:
    """Templates that add a system message of their own when a conversation has none. Every conversation then starts
    with a system message (Ollama sends the Modelfile's SYSTEM, set to that default), so each wrapper can carry the
    text up to the next message's content: system (prefix, its suffix + the user prefix), user ("", its suffix + the
    assistant prefix), assistant ("", its suffix + the user prefix). Exact for alternating conversations, which is
    what a chat sends; the samples below check it."""
    u1, a1, u2, sy = _S["user"].format(1), _S["assistant"].format(1), _S["user"].format(2), _S["system"]
    one = _render(tok, [{"role": "user", "content": u1}], False)
    with_sys = _render(tok, [{"role": "system", "content": sy}, {"role": "user", "content": u1}], False)
    if sy not in with_sys or u1 not in with_sys:
        return None
    i = with_sys.index(sy)
    sys_pre, tail = with_sys[:i], with_sys[i + len(sy):]
    if not (one.startswith(sys_pre) and one.endswith(tail) and len(one) > len(sys_pre) + len(tail)):
        return None
    default = one[len(sys_pre): len(one) - len(tail)]
    if _render(tok, [{"role": "system", "content": default}, {"role": "user", "content": u1}], False) != one:
        return None
    conv = _render(tok, [{"role": "system", "content": sy}, {"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": u2}], True)
    su = conv[conv.index(sy) + len(sy): conv.index(u1)]
    ua = conv[conv.index(u1) + len(u1): conv.index(a1)]
    au = conv[conv.index(a1) + len(a1): conv.index(u2)]
    if conv[conv.index(u2) + len(u2):] != ua:
        return None
    return {"system": (sys_pre, su), "user": ("", ua), "assistant": ("", au), "generation": ("", ""), "default_system": default}


SAMPLES = [
    [{"role": "user", "content": "Is a verbal lease valid?"}],
    [{"role": "system", "content": "You are a careful clinician."}, {"role": "user", "content": "Dose of amoxicillin?"},
     {"role": "assistant", "content": "500 mg three times daily."}, {"role": "user", "content": "For a child?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
     {"role": "assistant", "content": "6"}, {"role": "user", "content": "and {{ braces }}?"}],
]


def wrapped(w: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """A conversation rendered with the wrappers, ready for the assistant's turn (what the Go template produces; with a
    default system prompt, Ollama sends it as the first message when the conversation has none)."""
    if "default_system" in w and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": w["default_system"]}, *messages]
    return "".join(w[m["role"]][0] + m["content"] + w[m["role"]][1] for m in messages) + w["generation"][0]


def _go(s: str) -> str:
    """Text inside a Go template: literal, except that `{{` would open an action."""
    return s.replace("{{", '{{ "{{" }}')


def go_template(w: dict[str, Any]) -> str:
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
    w = None
    if recipe.data.template == "chat":
        w = role_wrappers(tok)
        if w is not None and recipe.data.system_prompt and "system" not in w:
            w = None  # the system prompt would be dropped: the template folds it into a user turn
        if w is None:
            info.update(template=None, why="the chat template does not wrap each message alone (e.g. a system prompt folded into the first user "
                        "turn): no TEMPLATE is written; Ollama then uses the GGUF's own chat template if it knows it")
        else:
            lines.append(f"TEMPLATE {_quote(go_template(w))}")
            info["template"] = "chat (role wrappers read off the tokenizer's chat template)"
    else:
        lines.append(f"TEMPLATE {_quote(alpaca_go_template())}")
        info["template"] = "alpaca"
    stops = stop_strings(tok, recipe)
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    system = recipe.data.system_prompt
    if not system and w is not None:
        system = w.get("default_system")  # the template's own default (chat runs only: w is None for alpaca)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
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
