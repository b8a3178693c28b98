"""Teachers: an OpenAI-compatible HTTP endpoint (vLLM, llama.cpp's server, TGI, a hosted API) or a local
transformers model. The API key comes from an environment variable only and is never logged."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from ..errors import FinetuneError


class TeacherError(FinetuneError):
    """The teacher could not answer (after retries). What was generated so far is kept; rerun to continue."""

    exit_code = 1


@dataclass
class Completion:
    text: str
    truncated: bool  # stopped by the token limit: the last item may be cut off


class Teacher(Protocol):
    name: str

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float = 1.0,
                 stop: list[str] | None = None) -> Completion: ...


class OpenAITeacher:
    """POST {base_url}/chat/completions (or /completions) with retries and exponential backoff on network errors,
    429 and 5xx (Retry-After honoured)."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retries: int = 4, backoff: float = 1.0):
        if api not in ("chat", "completions"):
            raise ValueError("api must be chat or completions")
        self.base_url, self.model, self.api = base_url.rstrip("/"), model, api
        self.api_key_env, self.timeout, self.retries, self.backoff = api_key_env, timeout, retries, backoff
        self.name = f"{model} @ {self.base_url}"

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST")
            wait = self.backoff * 2**attempt
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in (408, 429) and e.code < 500:
                    raise TeacherError(f"teacher {self.name}: {last} ({e.read()[:200].decode('utf-8', 'replace')})") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(wait)
        raise TeacherError(f"teacher {self.name}: no answer after {self.retries + 1} attempts ({last})")

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float = 1.0,
                 stop: list[str] | None = None) -> Completion:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if stop:
            body["stop"] = stop
        if self.api == "chat":
            out = self._post("/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]})
        else:
            out = self._post("/completions", {**body, "prompt": prompt})
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher {self.name}: unexpected response shape {str(out)[:200]}") from None
        return Completion(text or "", choice.get("finish_reason") == "length")


class LocalTeacher:
    """A transformers causal LM on this machine (imports torch only when used)."""

    def __init__(self, path: str, *, device: str | None = None, trust_remote_code: bool = False, load=None):
        """`load(path) -> (tokenizer, model)`: the CLI passes finetune's loader (remote-code refusal, pad token, MoE
        unfusing); without one, plain transformers (data_prep does not depend on finetune)."""
        import torch

        self.torch = torch
        if load is not None:
            self.tok, self.model = load(path)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.name = f"local:{path}"

    def complete(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float = 1.0,
                 stop: list[str] | None = None) -> Completion:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = self.tok(prompt, return_tensors="pt").input_ids
        ids = ids.to(self.device)
        sample = temperature > 0
        with self.torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else None,
                                      top_p=top_p if sample else None, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        new = out[0, ids.shape[1]:]
        text = self.tok.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text = text[: text.index(s)]
        return Completion(text, len(new) >= max_tokens)


def make_teacher(spec: str, model: str | None = None, local_load=None, **kw) -> Teacher:
    """`http(s)://host:port/v1` (OpenAI-compatible; --model names the served model) or `local:PATH` (loaded with
    `local_load` when given)."""
    if spec.startswith("local:"):
        return LocalTeacher(spec.removeprefix("local:"), load=local_load)
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ValueError("an OpenAI-compatible teacher needs --model (the served model's name)")
        return OpenAITeacher(spec, model, **kw)
    raise ValueError(f"teacher {spec!r}: expected http(s)://HOST[:PORT]/v1 or local:PATH")
