"""Served tokens/s of `finetune serve RUN` over real HTTP (issue 18), run by hand:

    python scripts/bench_serve.py RUN_DIR [--requests 8] [--max-tokens 64] [--concurrency 4] [--engine transformers]

Starts the server on a free port (the command a user runs), waits until /v1/models answers, then measures
- one request at a time: completion tokens / wall seconds, from the `usage` the server reports;
- streaming: time to the first content chunk, and the whole answer;
- `--concurrency` requests at once (the server queues them: total tokens / wall of the batch).
Prompts are fixed domain questions; temperature 0, so runs are comparable. Prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

QUESTIONS = [
    "Is a statement made out of court hearsay when it is offered to prove the truth of what it says?",
    "A tenant stops paying rent after the landlord refuses to repair the heating. What can the landlord do?",
    "What is the difference between a descriptive and a suggestive trademark?",
    "Explain in two sentences what a limitation period is.",
]


def post(url: str, body: dict, stream: bool = False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600) if stream else json.loads(urllib.request.urlopen(req, timeout=600).read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--engine", default="auto")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_API_KEY"}
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", str(a.run_dir), "--port", str(port), "--engine", a.engine,
                               "--max-tokens", str(max(a.max_tokens, 512))], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                model = json.loads(urllib.request.urlopen(f"{base}/models", timeout=5).read())["data"][0]["id"]
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        ready = time.perf_counter() - t0
        ask = lambda i: {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],  # noqa: E731
                         "max_tokens": a.max_tokens, "temperature": 0}
        post(f"{base}/chat/completions", ask(0))  # warm-up (first-call allocations)
        tokens, t = 0, time.perf_counter()
        for i in range(a.requests):
            tokens += post(f"{base}/chat/completions", ask(i))["usage"]["completion_tokens"]
        serial = (tokens, time.perf_counter() - t)
        t = time.perf_counter()
        first = None
        with post(f"{base}/chat/completions", {**ask(1), "stream": True}, stream=True) as r:
            for line in r:
                if first is None and b'"content"' in line:
                    first = time.perf_counter() - t
        streamed = time.perf_counter() - t
        done: list[int] = []
        t = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i: done.append(post(f"{base}/chat/completions", ask(i))["usage"]["completion_tokens"]))
                   for i in range(a.concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        together = (sum(done), time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=60)
    import torch
    import transformers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; model {model!r} from {a.run_dir}; engine {a.engine}")
    print(f"server ready after {ready:.1f} s (process start, model load)\n")
    print("| measure | tokens | wall | tokens/s |\n|---|---|---|---|")
    print(f"| {a.requests} requests one at a time, max_tokens {a.max_tokens} | {serial[0]} | {serial[1]:.1f} s | {serial[0] / serial[1]:.1f} |")
    print(f"| {a.concurrency} requests at once (queued) | {together[0]} | {together[1]:.1f} s | {together[0] / together[1]:.1f} |")
    print(f"| one streamed answer: first chunk after {first or float('nan'):.2f} s | | {streamed:.1f} s | |")


if __name__ == "__main__":
    main()
