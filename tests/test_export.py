"""`finetune export RUN --to gguf`: the file transformers reads back is the merged model, its tokenizer, template and
stops travel with it, a wrong file is refused, and the Modelfile's Go template renders like the tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RECIPES, ROOT


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "finetune.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


# --------------------------------------------------------------------------------------------------
# A Go text/template interpreter for the subset Modelfiles use (range, if / else if eq .Role "x", .Content, .Prompt,
# string literals): written here, independently of finetune/modelfile.py, to render what Ollama would.


def go_render(template: str, messages: list[dict[str, str]] | None = None, prompt: str | None = None) -> str:
    tokens = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)

    def parse(i: int, stop: tuple[str, ...]):
        nodes = []
        while i < len(tokens):
            t = tokens[i]
            if t.startswith("{{"):
                if t.startswith("{{-"):
                    if nodes and nodes[-1][0] == "text":
                        nodes[-1] = ("text", nodes[-1][1].rstrip())
                body = t.strip("{}").strip("-").strip()
                if body.startswith(stop) or body == "end" and "end" in stop:
                    return nodes, i, body
                if body.startswith("range"):
                    inner, i, _ = parse(i + 1, ("end",))
                    nodes.append(("range", body.split()[1], inner))
                elif body.startswith("if"):
                    branches = []
                    cond = body[2:].strip()
                    while True:
                        inner, i, closing = parse(i + 1, ("else", "end"))
                        branches.append((cond, inner))
                        if closing == "end":
                            break
                        cond = closing[len("else"):].strip()
                        cond = cond[2:].strip() if cond.startswith("if") else "true"
                    nodes.append(("if", branches))
                else:
                    nodes.append(("expr", body))
            elif t:
                nodes.append(("text", t))
            i += 1
        return nodes, i, None

    def value(expr: str, dot: dict) -> str:
        if expr.startswith('"'):
            return json.loads(expr)
        return dot[expr.lstrip(".")]

    def cond_true(cond: str, dot: dict) -> bool:
        if cond == "true":
            return True
        m = re.fullmatch(r'eq \.(\w+) "(.*)"', cond)
        assert m, cond
        return dot[m.group(1)] == m.group(2)

    def run(nodes, dot) -> str:
        out = []
        for n in nodes:
            if n[0] == "text":
                out.append(n[1])
            elif n[0] == "expr":
                out.append(value(n[1], dot))
            elif n[0] == "range":
                for item in dot[n[1].lstrip(".")]:
                    out.append(run(n[2], {"Role": item["role"], "Content": item["content"]}))
            elif n[0] == "if":
                for cond, inner in n[1]:
                    if cond_true(cond, dot):
                        out.append(run(inner, dot))
                        break
        return "".join(out)

    nodes, _, _ = parse(0, ())
    return run(nodes, {"Messages": messages or [], "Prompt": prompt})


def modelfile(path: Path) -> dict[str, list[str]]:
    """FROM / TEMPLATE / PARAMETER / SYSTEM values of a Modelfile; a triple-quoted value is read whole, across lines."""
    text, out, i = path.read_text(), {}, 0
    key = re.compile(r"^(FROM|TEMPLATE|PARAMETER|SYSTEM) ", re.M)
    while (m := key.search(text, i)) is not None:
        j = m.end()
        end = text.find("\n", j)
        end = len(text) if end < 0 else end
        if '"""' in text[j:end]:
            q = text.index('"""', j)
            end = text.index('"""', q + 3) + 3
        value = text[j:end]
        out.setdefault(m.group(1), []).append(value[3:-3] if value.startswith('"""') else value)
        i = end
    return out


def test_go_renderer_matches_go_semantics_on_a_known_template():
    """The interpreter itself: a hand-written ChatML template and its expected output."""
    t = '{{ range .Messages }}{{ if eq .Role "user" }}<u>{{ .Content }}</u>\n{{ else }}<a>{{ .Content }}</a>\n{{ end }}{{ end }}<a>'
    assert go_render(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) == "<u>hi</u>\n<a>yo</a>\n<a>"
    assert go_render("x \n{{- .Prompt }}", prompt="p") == "xp"  # {{- trims the whitespace before it


# --------------------------------------------------------------------------------------------------
# Export of a smoke run (mistral family), each dtype


def _merged_logits(run: Path, rounded_to=None):
    """Logits of RUN/merged on the first validation rows, its 2-D weights rounded to `rounded_to` first: a torch dtype, or
    "q8_0", done with the gguf package's numpy Q8_0 (export.py's reference is its own torch code)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    if rounded_to is not None:
        q8 = gguf.GGMLQuantizationType.Q8_0
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2 and rounded_to == "q8_0" and p.shape[-1] % 32 == 0:
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)).reshape(p.shape))
                elif p.ndim >= 2:
                    p.copy_(p.to(torch.float16 if rounded_to == "q8_0" else rounded_to).float())
    tok = AutoTokenizer.from_pretrained(run / "merged")
    rows = [json.loads(line) for line in (run / "data" / "val.jsonl").read_text().splitlines()[:3]]
    with torch.no_grad():
        return [model(torch.tensor([r["input_ids"]])).logits[0] for r in rows], tok, rows


def _file_logits(path: Path, rows):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([r["input_ids"]])).logits[0] for r in rows]


def test_q8_0_reference_is_bit_exact_with_ggml():
    """export.q8_0_round (torch, from the format's definition) against the gguf package's numpy Q8_0 (bit-exact with
    ggml-quants.c): random rows, exact halves (x * 127 / absmax = k + 0.5), an all-zero block and a huge one."""
    import gguf
    import numpy as np
    import torch

    from finetune.export import q8_0_round

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 2, 64).unsqueeze(1)
    w[0, :32] = 0.0
    w[1, :32] = torch.arange(32) + 0.5  # absmax 31.5: x / d = (k + 0.5) * 127 / 31.5, and halves when scaled
    w[2, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(31)])  # d = 1: exact halves, rounded away from zero
    w[3, :32] = -w[2, :32]
    w[4, :32] = 6e4
    q8 = gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8)
    got = q8_0_round(w).numpy()
    assert np.array_equal(got, want)
    assert got[2, 1] == 1.0 and got[3, 1] == -1.0  # 0.5 -> 1, -0.5 -> -1 (torch.round would give 0)
    assert not np.array_equal(torch.round(w[2:4, :32]).numpy(), want[2:4, :32])


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_export_reads_back_as_the_merged_model(smoke_runs, tmp_path, dtype):
    import torch

    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    done = _cli("export", run, "--dtype", dtype)
    assert done.returncode == 0, done.stderr
    out = run / "export"
    name = f"legal-saul-7b-{dtype}.gguf"
    assert done.stdout.strip() == str(out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted([".finetune.json", "Modelfile", "export_check.json", name, name.replace(".gguf", ".Modelfile")])
    check = json.loads((out / "export_check.json").read_text())["files"][name]
    assert check["passed"] and check["tokenizer_same_ids"] and check["special_ids_same"] and check["stop_ids_same"] and check["chat_template_same"]
    # Independently of export.py: transformers reads the file, and the test compares with its own reference.
    merged, _, rows = _merged_logits(run)
    got = _file_logits(out / name, rows)
    ref, _, _ = _merged_logits(run, {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": "q8_0"}[dtype])
    # That this comparison can fail is test_a_wrong_file_is_refused_and_nothing_is_left's job.
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= check["atol"]
    gap = max(float((a - b).abs().max()) for a, b in zip(merged, got))
    if dtype == "q8_0":
        assert gap > 10 * check["atol"]  # quantization moved the logits: the comparison above is not trivially met
        # the top token may change only where the merged model's top-2 margin is within twice the gap
        for a, b in zip(merged, got):
            top2 = a.topk(2, dim=-1).values
            flips = a.argmax(-1) != b.argmax(-1)
            assert bool((top2[:, 0] - top2[:, 1])[flips].le(2 * gap).all())
    else:
        # RUN/merged is saved in merge.dtype (bfloat16), which both 16-bit formats hold exactly: the file gives the merged logits
        assert gap <= check["atol"]


def test_a_wrong_file_is_refused_and_nothing_is_left(smoke_runs, tmp_path, monkeypatch):
    """Forgetting llama.cpp's q/k permutation gives a file that loads fine and computes something else: the check
    must see it, exit 1, and leave no model file (export_check.json says why)."""
    from finetune import export as ex
    from finetune.errors import StageFailed

    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    monkeypatch.setitem(ex.FAMILIES, "mistral", ("LLAMA", False))
    with pytest.raises(StageFailed, match="export check failed: logits differ from the f16-rounded merged model"):
        ex.export(run, "gguf", "f16")
    out = run / "export"
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*partial"))
    check = json.loads((out / "export_check.json").read_text())["files"]["legal-saul-7b-f16.gguf"]
    assert check["passed"] is False and check["vs_reference_max_abs_diff"] > check["atol"]


def test_export_bad_input_one_message_exit_2_nothing_written(smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    done = _cli("export", run, "--dtype", "q4_k")
    assert done.returncode == 2 and "--dtype 'q4_k': one of f16, bf16, q8_0" in done.stderr
    done = _cli("export", run, "--to", "onnx")
    assert done.returncode == 2 and "the export formats are: gguf" in done.stderr
    (tmp_path / "afile").write_text("x")
    done = _cli("export", run, "--out", tmp_path / "afile")
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    done = _cli("export", run, "--out", mine)
    assert done.returncode == 2 and "finetune did not write" in done.stderr and [p.name for p in mine.iterdir()] == ["notes.txt"]
    tj = run / "merged" / "tokenizer.json"
    kept = tj.read_text()
    tj.write_text(json.dumps({**json.loads(kept), "model": {"type": "Unigram", "vocab": []}}))
    done = _cli("export", run)
    assert done.returncode == 2 and "neither a byte-level BPE" in done.stderr and "SentencePiece-style BPE with byte fallback" in done.stderr
    tj.write_text(kept)
    cfg = json.loads((run / "merged" / "config.json").read_text())
    (run / "merged" / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2"}))
    done = _cli("export", run)
    assert done.returncode == 2 and "a 'gemma2' model cannot be exported to GGUF (its tensors are not mapped" in done.stderr
    assert "supported: llama, mistral, qwen2" in done.stderr
    (run / "merged" / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    done = _cli("export", run)
    assert done.returncode == 2 and "a 'mixtral' model cannot be exported to GGUF (transformers' GGUF reader cannot load" in done.stderr
    shutil.rmtree(run / "merged")
    done = _cli("export", run)
    assert done.returncode == 2 and "no merged model to export" in done.stderr
    assert not (run / "export").exists()


def test_export_is_refused_while_another_command_writes_the_run(smoke_runs, tmp_path):
    """A second export (or a merge) holding the run's lock: exit 2 naming the holder, nothing written; then it runs."""
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom finetune.runlock import exclusive\n"
                               f"with exclusive({str(run)!r}, 'finetune export (holder)'):\n    print('held', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _cli("export", run)
        assert done.returncode == 2 and "another finetune command is writing this run" in done.stderr and "finetune export (holder)" in done.stderr
        assert not (run / "export").exists()
    finally:
        holder.kill()
        holder.wait()
    done = _cli("export", run)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# Modelfile


def test_alpaca_modelfile_renders_the_alpaca_prompt_and_lists_every_stop(smoke_runs, tmp_path):
    from finetune.tasks import wrap

    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    assert _cli("export", run).returncode == 0
    mf = modelfile(run / "export" / "Modelfile")
    assert mf["FROM"] == ["./legal-saul-7b-f16.gguf"]
    assert go_render(mf["TEMPLATE"][0], prompt="Is this hearsay?") == wrap("Is this hearsay?", "", "alpaca")
    # EOS, the stand-in's end-of-turn token, and the Alpaca stop eval cuts generations at (tasks.stops)
    assert mf["PARAMETER"] == ['stop """</s>"""', 'stop """<|im_end|>"""', 'stop """### Instruction"""']


def test_chat_template_becomes_an_equivalent_go_template():
    from finetune.modelfile import SAMPLES, go_template, role_wrappers
    from finetune.smoke import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer(["What is the limitation period?", "Six years."])
    tok.chat_template = CHAT_TEMPLATE
    w = role_wrappers(tok)
    assert w is not None
    go = go_template(w)
    convs = SAMPLES + [[{"role": "user", "content": "Line one\nline two {{ not an action }}"}, {"role": "assistant", "content": "ok\n"},
                        {"role": "user", "content": "again"}]]
    for conv in convs:
        expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert expected.startswith(tok.bos_token)  # Ollama adds BOS from the GGUF: the TEMPLATE leaves it out
        assert go_render(go, conv) == expected[len(tok.bos_token):], conv
    # Llama 2 style: the system prompt folded into the first user turn is not a per-message wrapper: no TEMPLATE
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                         "{% elif m['role'] == 'user' %}[INST] {% if loop.index == 2 %}<<SYS>>{{ messages[0]['content'] }}<</SYS>> {% endif %}"
                         "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    assert role_wrappers(tok) is None


def ollama_render(mf: dict[str, list[str]], conv: list[dict[str, str]]) -> str:
    """What Ollama sends the model: the Modelfile's SYSTEM as the first message when the conversation has none."""
    if "SYSTEM" in mf and conv[0]["role"] != "system":
        conv = [{"role": "system", "content": mf["SYSTEM"][0]}, *conv]
    return go_render(mf["TEMPLATE"][0], conv)


def test_a_template_with_a_default_system_prompt_gets_it_as_the_modelfile_system(tmp_path):
    """Templates that add their own system message when there is none (as SmolLM2's and Qwen2.5's do)."""
    from types import SimpleNamespace

    from finetune.modelfile import SAMPLES, modelfile_text
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["What is the limitation period?", "Six years."])
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou answer briefly.<|im_end|>\n"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    recipe = SimpleNamespace(data=SimpleNamespace(template="chat", system_prompt=None), eval=SimpleNamespace(tasks=[]))
    text, info = modelfile_text("m.gguf", tok, recipe)
    (tmp_path / "Modelfile").write_text(text)
    mf = modelfile(tmp_path / "Modelfile")
    assert mf["SYSTEM"] == ["You answer briefly."] and info["template"].startswith("chat")
    for conv in SAMPLES:
        assert ollama_render(mf, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), conv


# --------------------------------------------------------------------------------------------------
# Other families: llama (permuted q/k) and qwen2 (biases, no permutation), through real smoke runs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_and_qwen2_runs_export_with_their_chat_template(tmp_path, family):
    run = tmp_path / "run"
    done = _cli("run", RECIPES / "medical.yaml", "--smoke", "--run-dir", run, "--set", f"base_model.family={family}", "--set", "data.template=chat",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for dtype in ("f16", "q8_0"):
        done = _cli("export", run, "--dtype", dtype)
        assert done.returncode == 0, done.stderr[-2000:]
    checks = json.loads((run / "export" / "export_check.json").read_text())["files"]
    assert len(checks) == 2 and all(c["passed"] and c["chat_template_same"] for c in checks.values())
    assert json.loads((run / "merged" / "config.json").read_text())["model_type"] == family
    assert {c["family"] for c in checks.values()} == {family}
    mf = modelfile(run / "export" / "Modelfile")
    assert "{{ .Content }}" in mf["TEMPLATE"][0] and 'stop "<|im_end|>"' in " ".join(mf["PARAMETER"]).replace('"""', '"')


# --------------------------------------------------------------------------------------------------
# SentencePiece tokenizers (Llama 2, Mistral-7B v0.1: the real bases of the shipped recipes): "llama" vocabulary with
# scores and byte tokens, and llama.cpp's rule for the space after a special token


@pytest.fixture(scope="module")
def spm_chat_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("spm") / "run"
    done = _cli("run", RECIPES / "medical.yaml", "--smoke", "--run-dir", run, "--set", "samples.tokenizer=sentencepiece", "--set", "data.template=chat",
                "--set", "base_model.family=llama", cwd=run.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.mark.slow
def test_sentencepiece_run_exports_with_scores_byte_tokens_and_its_space_rule(spm_chat_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(spm_chat_run, run)
    tok = AutoTokenizer.from_pretrained(run / "merged")
    spec = json.loads((run / "merged" / "tokenizer.json").read_text())
    assert spec["model"]["byte_fallback"] and tok.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    for dtype in ("f16", "q8_0"):
        done = _cli("export", run, "--dtype", dtype)
        assert done.returncode == 0, done.stderr[-2000:]
    checks = json.loads((run / "export" / "export_check.json").read_text())["files"]
    assert set(checks) == {"medical-mistral-7b-f16.gguf", "medical-mistral-7b-q8_0.gguf"}
    assert all(c["passed"] and c["tokenizer_same_ids"] and c["chat_template_same"] and c["llamacpp_add_space_prefix"] is True for c in checks.values())
    # What llama.cpp reads: the metadata itself (gguf's reader), independently of transformers
    r = gguf.GGUFReader(run / "export" / "medical-mistral-7b-f16.gguf")

    def field(key):
        f = r.fields[key]
        return [f.contents(i) for i in range(len(f.data))] if len(f.data) > 1 else f.contents()

    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is True
    assert "tokenizer.ggml.merges" not in r.fields
    tokens, types, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.scores")
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                                                           gguf.TokenType.BYTE]
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>") != field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id and field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    # each merged piece scores minus the rank of its first merge: later merges score lower
    merges = [m if isinstance(m, list) else m.split(" ") for m in spec["model"]["merges"]]
    first, last = "".join(merges[0]), "".join(merges[-1])
    assert scores[tok.convert_tokens_to_ids(first)] == -1.0 and scores[tok.convert_tokens_to_ids(last)] < -len(merges) / 2
    # the file's tokenizer, as transformers builds it from those scores, spells unknown characters with byte tokens
    back = AutoTokenizer.from_pretrained(run / "export", gguf_file="medical-mistral-7b-f16.gguf")
    text = "Dose: 5 µg — naïve ✓"
    assert back(text)["input_ids"] == tok(text)["input_ids"] and "<0xE2>" in tok.convert_ids_to_tokens(tok(text)["input_ids"])


@pytest.mark.slow
def test_sentencepiece_checks_can_fail(spm_chat_run, tmp_path, monkeypatch):
    """Scores that order the merges wrongly, and a tokenizer whose spacing after special tokens llama.cpp cannot
    reproduce, are each refused (exit 1, no file)."""
    from finetune import export as ex
    from finetune.errors import StageFailed

    run = tmp_path / "run"
    shutil.copytree(spm_chat_run, run)
    right = ex._sentencepiece_scores
    monkeypatch.setattr(ex, "_sentencepiece_scores", lambda *a: [-s for s in right(*a)])  # last merge first
    with pytest.raises(StageFailed, match="encodes the probe texts differently"):
        ex.export(run, "gguf", "f16")
    monkeypatch.undo()
    assert not list((run / "export").glob("*.gguf"))
    # Metaspace with prepend_scheme "first" (no `▁` after a special token): llama.cpp puts one there when
    # add_space_prefix is on (the first text needs it), so no setting reproduces the run's ids on a chat prompt.
    tj = run / "merged" / "tokenizer.json"
    spec = json.loads(tj.read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    tj.write_text(json.dumps(spec))
    with pytest.raises(StageFailed, match="llama.cpp would tokenize the text after special tokens differently"):
        ex.export(run, "gguf", "f16")
    check = json.loads((run / "export" / "export_check.json").read_text())["files"]["medical-mistral-7b-f16.gguf"]
    assert check["passed"] is False and check["llamacpp_add_space_prefix"] is None


def test_byte_level_pre_tokenizer_gets_llama_cpps_name_for_it():
    """llama.cpp picks its split regexes by tokenizer.ggml.pre; "default" matches no real tokenizer (it split SmolLM2's
    "\\n\\n###" differently from training, found with llama.cpp itself)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from finetune.export import bpe_pre
    from finetune.smoke import build_tokenizer

    smoke = json.loads(build_tokenizer(["a b c"] * 3).backend_tokenizer.to_str())
    assert bpe_pre(smoke) == "gpt-2"

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert bpe_pre(split(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"])) in ("llama3", "llama-v3", "llama-bpe")
    assert bpe_pre(split(GGUF_PRE_TOKENIZER_SPLITS["qwen2"])) in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")
    assert bpe_pre(split(r"\p{L}+|\s+")) is None
    assert bpe_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}) is None


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp; finetune does not depend on it)")


@pytest.mark.slow
def test_llama_cpp_reads_the_export_as_the_run_tokenizes(spm_chat_run, tmp_path):
    """With llama-cpp-python installed, the export is also read by llama.cpp itself: the same token ids on every probe
    text (SentencePiece scores, byte tokens, the space after special tokens), the same BOS/EOS, the stops end a turn."""
    _llama_cpp()
    run = tmp_path / "run"
    shutil.copytree(spm_chat_run, run)
    for dtype in ("f16", "q8_0"):
        done = _cli("export", run, "--dtype", dtype)
        assert done.returncode == 0, done.stderr[-2000:]
    for check in json.loads((run / "export" / "export_check.json").read_text())["files"].values():
        lc = check["llama_cpp"]
        assert lc["passed"] and lc["texts_same_ids"] == lc["texts"] >= 5 and lc["bos_eos"] == [1, 2] and not lc["stop_ids_not_eog"]
        assert lc["top_token_equal"] >= 0.9 * lc["top_token_compared"]


@pytest.mark.slow
def test_llama_cpp_refuses_a_file_with_the_wrong_pre_tokenizer(tmp_path, monkeypatch):
    """The bug llama.cpp found: a byte-level BPE written with pre "default" tokenizes "\\n\\n" apart; the export fails."""
    _llama_cpp()
    from finetune import export as ex
    from finetune.errors import StageFailed

    run = tmp_path / "run"
    done = _cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", run, "--set", "samples.tokenizer=byte_level", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ex.export(run, "gguf", "f16")["llama_cpp"]["passed"]
    monkeypatch.setattr(ex, "bpe_pre", lambda spec: "default")
    with pytest.raises(StageFailed, match="llama.cpp tokenizes .* probe texts differently"):
        ex.export(run, "gguf", "f16")


# --------------------------------------------------------------------------------------------------
# Publishing the GGUF: file:// (and the card's "Run it locally"), refused when stale or missing


def test_gguf_is_published_with_its_modelfile_and_the_card_says_how_to_run_it(smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    target = tmp_path / "pub"
    done = _cli("publish", run, "--to", f"file://{target}", "--what", "adapter,gguf")
    assert done.returncode == 2 and "has no GGUF that passed its check; run `finetune export" in done.stderr
    assert _cli("export", run, "--dtype", "q8_0").returncode == 0
    done = _cli("publish", run, "--to", f"file://{target}", "--what", "adapter,gguf")
    assert done.returncode == 0, done.stderr
    rev = target / (target / "refs" / "main").read_text().strip()
    got = sorted(p.name for p in (rev / "gguf").iterdir())
    assert got == ["Modelfile", "export_check.json", "legal-saul-7b-q8_0.Modelfile", "legal-saul-7b-q8_0.gguf"]
    assert (rev / "gguf" / "legal-saul-7b-q8_0.gguf").read_bytes() == (run / "export" / "legal-saul-7b-q8_0.gguf").read_bytes()
    assert modelfile(rev / "gguf" / "Modelfile")["FROM"] == ["./legal-saul-7b-q8_0.gguf"]
    card = (rev / "README.md").read_text()
    check = json.loads((run / "export" / "export_check.json").read_text())["files"]["legal-saul-7b-q8_0.gguf"]
    assert "## Run it locally" in card and "ollama create legal-saul-7b -f Modelfile" in card and "llama-cli -m legal-saul-7b-q8_0.gguf" in card
    assert f"{check['greedy_tokens_equal']}/{check['greedy_tokens_compared']} equal" in card
    from finetune.card import run_locally
    from finetune.run import RunDir

    hub_lines = run_locally("hf://acme/legal", "legal-saul-7b", RunDir(run))
    assert 'huggingface-cli download acme/legal --include "gguf/*" --local-dir legal-saul-7b' in hub_lines and "cd legal-saul-7b/gguf" in hub_lines
    # An export made from an earlier merge (the merge stage ran again since) is not published.
    checks_path = run / "export" / "export_check.json"
    kept = checks_path.read_text()
    checks = json.loads(kept)
    checks["files"]["legal-saul-7b-q8_0.gguf"]["merged_sha256"] = "0" * 64
    checks_path.write_text(json.dumps(checks))
    done = _cli("publish", run, "--to", f"file://{target}", "--what", "adapter,gguf")
    assert done.returncode == 2 and "exported from an earlier merged model" in done.stderr and "finetune export" in done.stderr
    checks_path.write_text(kept)
    # Merged weights changed behind the pipeline's back: refused too (the stage records see it first).
    from safetensors.torch import load_file, save_file

    weights = run / "merged" / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "edited": "yes"})
    done = _cli("publish", run, "--to", f"file://{target}", "--what", "adapter,gguf")
    assert done.returncode == 2 and "refused" in done.stderr
    assert (target / "refs" / "main").read_text().strip() == rev.name
    done = _cli("publish", run, "--to", f"file://{target}", "--what", "adapter,guff")
    assert done.returncode == 2 and "did you mean 'gguf'?" in done.stderr


def test_ollama_create_runs_when_ollama_is_on_path(smoke_runs, tmp_path, monkeypatch):
    """A stand-in `ollama` on PATH records how it is called; one that fails makes the export fail (exit 1)."""
    from finetune import export as ex
    from finetune.errors import StageFailed

    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "ollama"
    fake.write_text(f"#!/bin/sh\necho \"$@\" \"$(pwd)\" >> {calls}\nhead -1 \"$4\" >> {calls}\nexit ${{OLLAMA_FAKE_EXIT:-0}}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    check = ex.export(run, "gguf", "q8_0")
    assert check["ollama"]["passed"] is True and check["ollama"]["model"] == "finetune-check-legal-saul-7b"
    args, first_line = calls.read_text().splitlines()
    assert args == f"create finetune-check-legal-saul-7b -f legal-saul-7b-q8_0.Modelfile {run / 'export'}"
    assert first_line == "FROM ./legal-saul-7b-q8_0.gguf"
    monkeypatch.setenv("OLLAMA_FAKE_EXIT", "1")
    with pytest.raises(StageFailed, match="ollama create refused the Modelfile"):
        ex.export(run, "gguf", "f16")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert ex.ollama_create(run / "export", "Modelfile", "x") == {"skipped": "the ollama binary is not on PATH"}
