"""Synthetic instructions against a loopback stand-in of an OpenAI-compatible endpoint: self-instruct with
Alpaca's filters, document-grounded pairs, retries, and a restart that continues where it stopped."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_prep.synth.grounded import chunks, grounded
from data_prep.synth.selfinstruct import SeedTask, keyword_filter, load_seeds, parse_response, render_prompt, self_instruct
from data_prep.synth.teacher import OpenAITeacher, TeacherError

from .conftest import ROOT

TOPICS = ["tenancy deposits", "employment notice", "patent claims", "consumer refunds", "privacy notices", "court fees",
          "jury selection", "contract damages", "bail hearings", "copyright terms", "zoning permits", "estate probate"]


WORDS = ("lease notice deposit repair tenant landlord court appeal statute damages breach remedy patent claim licence royalty "
         "privacy consent data breach employer wage dismissal union jury verdict witness evidence bail custody probate estate "
         "trust zoning permit variance refund warranty defect invoice arbitration mediation").split()


def fake_self_instruct(prompt: str) -> str:
    """A deterministic teacher: tasks drawn from a hash of the prompt, plus some that Alpaca's filters must drop."""
    import random

    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    a, b = " ".join(rng.sample(WORDS, 6)), " ".join(rng.sample(WORDS, 6))
    tasks = [
        f" Explain how {a} relate for a first-year student.\n4. Input:\n<noinput>\n4. Output:\nThey relate by rule {rng.randint(1, 99)}.",
        f"5. Instruction: Draw a diagram of {b}.\n5. Input:\n<noinput>\n5. Output:\nA diagram.",  # blocked keyword
        f"6. Instruction: Explain how {a} relate for a first-year student!\n6. Input:\n<noinput>\n6. Output:\nSame.",  # ROUGE-L
        f"7. Instruction: Compare {b} in a client memo.\n7. Input:\nA memo draft.\n7. Output:\nThey differ in scope.",
        "8. Instruction: Hi.\n8. Input:\n<noinput>\n8. Output:\nHello.",  # too short
    ]
    return "\n###\n".join(tasks)


def fake_grounded(prompt: str) -> str:
    chunk = prompt.split('"""')[1]
    first = re.findall(r"[A-Z][^.]*\.", chunk)[0]
    return json.dumps([{"instruction": "What does the excerpt say first?", "input": "", "output": first},
                       {"instruction": "Invent something", "input": "", "output": "Unrelated moonbeam xylophone answer entirely."},
                       {"instruction": 3, "output": "x"}])


class Teacher(BaseHTTPRequestHandler):
    calls = 0
    fail_from: int | None = None  # every call from this one on gets HTTP 500 (a crashed server)
    flaky: int = 0  # the next N calls get HTTP 503 once each (retried)
    seen_auth: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.calls += 1
        cls.seen_auth.append(self.headers.get("Authorization"))
        if cls.flaky:
            cls.flaky -= 1
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if cls.fail_from is not None and cls.calls >= cls.fail_from:
            self.send_response(500)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        text = fake_grounded(prompt) if "Excerpt:" in prompt else fake_self_instruct(prompt)
        out = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def teacher_url():
    Teacher.calls, Teacher.fail_from, Teacher.flaky, Teacher.seen_auth = 0, None, 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


SEEDS = [SeedTask(f"Give an example of a legal term about {t} and define it.", "", f"Term about {t}.") for t in TOPICS[:6]]


def test_prompt_and_parsing():
    p = render_prompt("Come up with tasks.", SEEDS[:3])
    assert p.startswith("Come up with tasks.\n###\n1. Instruction: ") and p.endswith("###\n4. Instruction:")
    assert "1. Input:\n<noinput>\n1. Output:\n" in p
    tasks = parse_response(fake_self_instruct("x"), 4, truncated=False)
    assert len(tasks) == 5 and tasks[0].input == "" and tasks[3].input == "A memo draft."
    assert len(parse_response(fake_self_instruct("x"), 4, truncated=True)) == 4  # a cut-off last task is dropped
    reasons = [keyword_filter(t) for t in tasks]
    assert reasons == [None, "blocked keyword", None, None, "instruction length"]
    assert keyword_filter(SeedTask("Write a program that sorts a list of names", "", "x")) == "asks for a program"
    assert keyword_filter(SeedTask("¿Qué es un contrato de arrendamiento?", "", "x")) == "starts with a non-ASCII character"


def test_self_instruct_filters_and_resumes(teacher_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test-not-a-real-key-0000")
    t = OpenAITeacher(teacher_url, "stand-in", api_key_env="TEACHER_KEY", retries=0)
    out = tmp_path / "gen.jsonl"
    full = self_instruct(t, SEEDS, "Come up with tasks.", tmp_path / "full.jsonl", num=12, seed=7)
    assert full["rows"] == 12 and full["dropped: blocked keyword"] == full["requests"]
    assert full["dropped: ROUGE-L >= 0.7"] >= full["requests"] - 1  # the near-copy of the first task each time
    assert Teacher.seen_auth[0] == "Bearer sk-test-not-a-real-key-0000"
    # Interrupted run: the endpoint dies on its 3rd call; what was generated is kept and the rerun continues.
    Teacher.calls, Teacher.fail_from = 0, 3
    with pytest.raises(TeacherError, match="HTTP 500"):
        self_instruct(t, SEEDS, "Come up with tasks.", out, num=12, seed=7)
    partial = out.read_text().splitlines()
    assert 0 < len(partial) < 12
    Teacher.fail_from = None
    again = self_instruct(t, SEEDS, "Come up with tasks.", out, num=12, seed=7)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "origin"} for l in p.read_text().splitlines()]  # noqa: E731
    assert again["rows"] == 12 and strip(out) == strip(tmp_path / "full.jsonl")  # same rows as the uninterrupted run
    assert again["requests"] == full["requests"]
    # A row written by a request that was not recorded as done (crash between the two writes) is dropped on restart.
    with open(out, "a") as f:
        f.write(json.dumps({"instruction": "orphan", "input": "", "output": "x", "origin": {"unit": "request-999"}}) + "\n")
    self_instruct(t, SEEDS, "Come up with tasks.", out, num=12, seed=7)
    assert "orphan" not in out.read_text()
    # other settings on the same output are refused rather than mixed
    from data_prep.errors import DataError

    with pytest.raises(DataError, match="an earlier run used other settings \\(seed\\)"):
        self_instruct(t, SEEDS, "Come up with tasks.", out, num=12, seed=8)


def test_retries_with_backoff(teacher_url):
    Teacher.flaky = 2
    t = OpenAITeacher(teacher_url, "stand-in", retries=2, backoff=0.01)
    assert t.complete("x", max_tokens=10, temperature=0).text.startswith(" Explain how ")
    assert Teacher.calls == 3  # two 503s, then the answer
    Teacher.calls, Teacher.flaky = 0, 5
    with pytest.raises(TeacherError, match="no answer after 2 attempts \\(HTTP 503\\)"):
        OpenAITeacher(teacher_url, "stand-in", retries=1, backoff=0.01).complete("x", max_tokens=10, temperature=0)


def test_grounded_generation_and_restart(teacher_url, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    para = "The lessee shall keep the premises in good repair. Rent is due on the first day of each month. "
    (docs / "lease.md").write_text("\n\n".join(para * 3 for _ in range(6)))
    (docs / "nda.txt").write_text("Confidential information excludes public knowledge. The term is two years.")
    assert len(chunks((docs / "lease.md").read_text(), 60, 10)) == 6
    t = OpenAITeacher(teacher_url, "stand-in", retries=0)
    out = tmp_path / "pairs.jsonl"
    Teacher.fail_from = 4
    with pytest.raises(TeacherError):
        grounded(t, docs, out, domain="legal", chunk_words=60, overlap=10)
    assert len(out.read_text().splitlines()) == 3
    Teacher.fail_from = None
    res = grounded(t, docs, out, domain="legal", chunk_words=60, overlap=10)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert res["chunks"] == res["chunks_done"] == 7 and len(rows) == 7 and res["requests"] == 7
    assert res["dropped: ungrounded"] == 7 and res["dropped: missing or non-string field"] == 7
    assert rows[0]["output"] == "The lessee shall keep the premises in good repair." and rows[0]["origin"]["document"] == "lease.md"
    assert rows[-1]["origin"]["document"] == "nda.txt"
    assert Teacher.calls == 3 + 1 + 4  # 3 done, 1 failed, then only the 4 chunks not done yet


def test_synth_cli(teacher_url, tmp_path, shared_datasets):
    """`finetune data synth self-instruct` on Alpaca's real seed tasks and prompt (read in place, not copied)."""
    seeds = shared_datasets / "alpaca" / "seed_tasks.jsonl"
    assert len(load_seeds(seeds)) == 175
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "synth", "self-instruct", "--seeds", str(seeds),
                          "--out", str(tmp_path / "gen.jsonl"), "--teacher", teacher_url, "--model", "stand-in", "--num", "5",
                          "--no-progress", "--retries", "0"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows"] == 5 and len((tmp_path / "gen.jsonl").read_text().splitlines()) == 5
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "synth", "grounded", "--docs", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "g.jsonl"), "--teacher", teacher_url, "--model", "m"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not found" in out.stderr


def test_local_transformers_teacher(tmp_path):
    """`--teacher local:PATH`: a transformers model on this machine (a tiny random one here, so its text is noise:
    the test checks the plumbing: generation, the token limit, and that noise is dropped with a counted reason)."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_prep.synth.teacher import make_teacher
    from finetune.families import tiny_config
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["The lessee shall keep the premises in good repair."] * 5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    teacher = make_teacher(f"local:{tmp_path / 'm'}")
    got = teacher.complete("Write one question.", max_tokens=6, temperature=0.0)
    assert isinstance(got.text, str) and got.truncated  # 6 new tokens, no EOS from a random model: cut by the limit
    # the CLI loads a local teacher through finetune's loader: the same model, the same greedy answer
    from finetune.data_cli import load_local_teacher

    same = make_teacher(f"local:{tmp_path / 'm'}", local_load=load_local_teacher)
    assert same.complete("Write one question.", max_tokens=6, temperature=0.0).text == got.text
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The lessee shall keep the premises in good repair.")
    res = grounded(teacher, docs, tmp_path / "out.jsonl", max_tokens=8)
    assert res["requests"] == 1 and res["rows"] == 0 and res["dropped: no JSON list in the answer"] == 1
