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


def test_concurrent_requests_wait_their_turn(client, engine):
    results, errors = [], []

    def ask():
        try:
            r = client.post("/v1/chat/completions", json={"model": "legal-saul-7b", "messages": ASK, "max_tokens": 8})
            results.append(r.json()["choices"][0]["message"]["content"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4 and len(set(results)) == 1 and results[0] == direct(engine, ASK, 8)


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
