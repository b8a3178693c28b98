"""`finetune serve RUN`: an OpenAI-compatible API over the run's model: answers equal to a direct generation, streaming
that adds up to the same text, stops, limits and errors as JSON, one request at a time, and `finetune data synth`'s
teacher client talking to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def engine(smoke_runs):
    from finetune.serve import load_engine

    return load_engine(smoke_runs["legal"][0], "tuned")


@pytest.fixture
def client(engine, monkeypatch):
    from fastapi.testclient import TestClient

    from finetune.serve import build_app

    monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    app = build_app(engine, api_key_env="SERVE_TEST_KEY", max_tokens=32, max_request_bytes=4000)
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer k-123"
        yield c


def direct(engine, messages, max_new_tokens: int) -> str:
    """The same prompt generated with model.generate directly (greedy), decoded: what the API must return."""
    import torch

    from finetune.lm import HFLM, stop_ids

    ids = HFLM(engine.model, engine.tok).encode(engine.prompt_for(messages), bos=True)
    with torch.no_grad():
        out = engine.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.tok.pad_token_id,
                                    eos_token_id=stop_ids(engine.tok))
    return engine.tok.decode(out[0, len(ids):], skip_special_tokens=True)


ASK = [{"role": "user", "content": "Is a statement made out of court hearsay?"}]


def test_chat_completion_equals_a_direct_generation_and_streams_the_same_text(client, engine):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["legal-saul-7b"]
    r = client.post("/v1/chat/completions", json={"model": "legal-saul-7b", "messages": ASK, "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    want = direct(engine, ASK, 12)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want} and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] >= 1 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions", json={"model": "legal-saul-7b", "messages": ASK, "max_tokens": 12, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_and_stop_strings(client, engine):
    prompt = "The court held that"
    full = client.post("/v1/completions", json={"model": "legal-saul-7b", "prompt": prompt, "max_tokens": 16}).json()["choices"][0]
    text = full["text"]
    assert text, "the tiny model wrote nothing to cut"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.post("/v1/completions", json={"model": "legal-saul-7b", "prompt": prompt, "max_tokens": 16, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_bad_requests_get_a_json_error_and_the_documented_status(client):
    def post(body, path="/v1/chat/completions", **kw):
        r = client.post(path, **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}), **kw)
        return r.status_code, r.json()["error"]["message"]

    ok = {"model": "legal-saul-7b", "messages": ASK}
    assert post({**ok, "model": "gpt-4"}) == (404, "model 'gpt-4' is not served here; this server serves 'legal-saul-7b'")
    assert post({**ok, "max_tokens": -5})[0] == 400 and "max_tokens" in post({**ok, "max_tokens": -5})[1]
    assert post({**ok, "max_tokens": 33}) == (400, "max_tokens: 33 is over this server's limit of 32 (finetune serve --max-tokens)")
    assert post(b"{not json", headers={"content-type": "application/json"}) == (400, "request body is not valid JSON")
    assert post({**ok, "messages": [{"role": "robot", "content": "x"}]})[0] == 400
    assert post({**ok, "messages": []})[0] == 400
    assert post({"model": "legal-saul-7b", "prompt": "x" * 5000}, path="/v1/completions")[0] == 413
    r = client.post("/v1/chat/completions", json=ok, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_twenty_concurrent_requests_wait_their_turn(client, engine):
    results, errors = [], []

    def ask():
        try:
            r = client.post("/v1/chat/completions", json={"model": "legal-saul-7b", "messages": ASK, "max_tokens": 8})
            results.append(r.json()["choices"][0]["message"]["content"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 20 and len(set(results)) == 1 and results[0] == direct(engine, ASK, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_synth_teacher_client_talks_to_the_server(engine):
    """`finetune data synth --teacher http://127.0.0.1:PORT/v1`: the tuned specialist can teach the next round."""
    import uvicorn

    from data_prep.synth.teacher import make_teacher
    from finetune.serve import build_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        teacher = make_teacher(f"http://127.0.0.1:{port}/v1", "legal-saul-7b", retries=0)
        got = teacher.complete("Is a statement made out of court hearsay?", max_tokens=12, temperature=0.0)
        assert got.text == direct(engine, ASK, 12)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
def test_serve_command_port_in_use_and_sigterm(smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "finetune.cli", "serve", str(run), "--port", str(port)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert done.returncode == 2 and f"--port {port}: cannot listen there" in done.stderr
    port = _free_port()
    env = {**os.environ, "FINETUNE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", str(run), "--port", str(port)], stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    line = ""
    for _ in range(60):
        line = proc.stderr.readline()
        if "serving" in line:
            break
    assert f"on http://127.0.0.1:{port}/v1" in line  # this machine only, unless --host says otherwise
    import urllib.request

    for _ in range(100):  # the line is written just before uvicorn binds
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
                assert json.loads(r.read())["data"][0]["id"] == "legal-saul-7b"
            break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("the server never answered")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    assert proc.stderr.read().count("Traceback") == 0


# --------------------------------------------------------------------------------------------------
# vLLM: a stand-in `vllm` package (vllm.LLM, SamplingParams, lora.request.LoRARequest) that generates with transformers
# and records how it was called; the engine finetune builds on it must answer as the transformers engine does.

FAKE_VLLM = """
import torch
from transformers import AutoModelForCausalLM

CALLS = []


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Out:
    def __init__(self, text, token_ids, finish_reason):
        self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason


class _Request:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, model, **kw):
        CALLS.append(("LLM", model, kw))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.tok = None
        self.kw = kw

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        from peft import PeftModel
        from transformers import AutoTokenizer

        CALLS.append(("generate", prompts, params.__dict__, lora_request))
        assert lora_request is None or self.kw.get("enable_lora"), "a LoRA request on an engine built without enable_lora"
        if lora_request is not None and not hasattr(self, "lora"):
            self.lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(CALLS[0][1], dtype=torch.float32), lora_request.lora_path)
        model = self.lora if lora_request is not None else self.model
        tok = AutoTokenizer.from_pretrained(self.kw.get("tokenizer") or CALLS[0][1])
        out = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=params.stop_token_ids,
                                     pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            text = tok.decode(gen, skip_special_tokens=True)
            finish = "stop" if gen and gen[-1] in params.stop_token_ids else "length"
            for s in params.stop or []:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            out.append(_Request([_Out(text, gen, finish)]))
        return out
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "fakevllm" / "vllm"
    (pkg / "lora").mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "lora" / "__init__.py").write_text("")
    (pkg / "lora" / "request.py").write_text("class LoRARequest:\n    def __init__(self, lora_name, lora_int_id, lora_path):\n"
                                             "        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


def test_engine_choice(fake_vllm, monkeypatch):
    import torch

    from finetune.errors import UserError
    from finetune.serve import pick_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_engine("auto") == "transformers" and pick_engine("transformers") == "transformers"
    with pytest.raises(UserError, match="--engine vllm needs the vllm package .* vllm installed, GPU missing"):
        pick_engine("vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_engine("auto") == "vllm" and pick_engine("vllm") == "vllm"
    with pytest.raises(UserError, match="--engine 'vlm': auto, vllm or transformers"):
        pick_engine("vlm")


@pytest.mark.parametrize("which", ["tuned-merged", "tuned-adapter", "base"])
def test_vllm_engine_answers_as_the_transformers_engine(fake_vllm, smoke_runs, tmp_path, which):
    import torch
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.run import RunDir
    from finetune.serve import Engine, build_app, load_engine, load_vllm_engine

    run = tmp_path / "run"
    shutil.copytree(smoke_runs["legal"][0], run)
    if which == "tuned-adapter":
        shutil.rmtree(run / "merged")  # no verified merged model: vLLM gets the base and the adapter as a LoRA
    kind = "base" if which == "base" else "tuned"
    fake_vllm.CALLS.clear()
    hf, vl = load_engine(run, kind), load_vllm_engine(run, kind)
    assert vl.name == hf.name
    built = [c for c in fake_vllm.CALLS if c[0] == "LLM"][-1]
    recipe, _ = RunDir(run).load_recipe()
    if which != "tuned-merged":
        # vLLM serves the 16-bit base (plus the adapter's update), where `finetune serve --engine transformers` runs the
        # 4-bit base as training did: the reference is the transformers engine over the 16-bit base.
        model = AutoModelForCausalLM.from_pretrained(recipe.base_model.id, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(run / "adapter")) if which == "tuned-adapter" else model
        hf = Engine(model.eval(), hf.tok, hf.recipe, hf.name)
    if which == "tuned-merged":
        assert built[1] == str(run / "merged") and "enable_lora" not in built[2] and vl.lora is None
    elif which == "tuned-adapter":
        assert built[1] == recipe.base_model.id and built[2]["enable_lora"] and built[2]["max_lora_rank"] >= recipe.lora.r
        assert vl.lora.lora_path == str((run / "adapter").resolve())
    else:
        assert built[1] == recipe.base_model.id and vl.lora is None
    answers = []
    for engine in (hf, vl):
        with TestClient(build_app(engine, max_tokens=32)) as c:
            chat = c.post("/v1/chat/completions", json={"model": engine.name, "messages": ASK, "max_tokens": 10}).json()
            with c.stream("POST", "/v1/completions", json={"model": engine.name, "prompt": "The court held that", "max_tokens": 10,
                                                           "stream": True}) as s:
                events = [json.loads(e.removeprefix("data: ")) for e in s.iter_lines() if e.startswith("data: {")]
            answers.append((chat["choices"][0]["message"]["content"], chat["usage"], "".join(e["choices"][0]["text"] for e in events),
                            events[-1]["choices"][0]["finish_reason"]))
    assert answers[0] == answers[1] and answers[0][0]
    gen = [c for c in fake_vllm.CALLS if c[0] == "generate"][-1]
    assert gen[2]["stop_token_ids"] and gen[2]["skip_special_tokens"] is True and gen[2]["max_tokens"] == 10
