"""`finetune serve RUN_DIR`: the tuned (or base) model behind an OpenAI-compatible HTTP API, so a team's own tools, and
`finetune data synth --teacher http://127.0.0.1:PORT/v1`, can talk to it.

- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`; `"stream": true` answers with server-sent
  events (`data: {chunk}` ... `data: [DONE]`), as OpenAI's API does.
- The model: `--model tuned` (default) is the merged model when its check passed, else the base as trained with the
  adapter (chat.load_run_model: what `finetune chat` talks to); `--model base` is the base alone, so the two can be put
  side by side (two servers, two ports). Chat prompts are rendered with the recipe's own template (chat.render), and
  generation stops at the EOS and end-of-turn tokens and at the request's `stop` strings.
- Safe defaults: binds 127.0.0.1 unless `--host` says otherwise; with `--api-key-env NAME` set in the environment,
  every request needs `Authorization: Bearer <key>` (401 otherwise); `max_tokens` above `--max-tokens` or below 1,
  unknown fields of the wrong type, an unknown model (404), a body over `--max-request-bytes` (413) and malformed JSON
  are answered with a JSON error, never a crash. Requests are served one at a time (a lock): concurrent ones wait.
- SIGTERM/SIGINT: uvicorn finishes the request in flight and exits 0.
- `--engine auto` (default) generates with vLLM when it is installed and a CUDA GPU is present, with transformers
  otherwise; `--engine vllm` / `--engine transformers` choose. vLLM serves the verified merged model, or the base with
  RUN/adapter as a LoRA (`LoRARequest`) when there is no merged model that passed its check; its offline `LLM.generate`
  is blocking, so a streamed vLLM answer arrives as one chunk.
"""

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import UserError

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_REQUEST_BYTES = 1_000_000


# Request bodies (module level: FastAPI resolves the handlers' annotations in this module).
class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (n=1, user, logprobs=false ...)
    model: str
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Common):
    prompt: str


class Engine:
    """One model and its tokenizer, generating one request at a time."""

    def __init__(self, model, tok, recipe, name: str):
        self.model, self.tok, self.recipe, self.name = model, tok, recipe, name
        self.lock = threading.Lock()

    def prompt_for(self, messages: list[dict[str, str]]) -> str:
        from .chat import render

        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        recipe = self.recipe
        if system:  # the request's system prompt replaces the recipe's
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"system_prompt": "\n".join(system)})})
        return render(recipe, self.tok, turns)

    def stream(self, prompt: str, max_tokens: int, temperature: float, stop: list[str]) -> Iterator[tuple[str, str | None, int, int]]:
        """(text piece, finish reason on the last piece, prompt tokens, completion tokens so far)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from .lm import HFLM, stop_ids

        ids = HFLM(self.model, self.tok).encode(prompt, bos=True)
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        sample = temperature > 0
        result: dict[str, Any] = {}
        halt = threading.Event()  # a stop string was seen in the text: generation ends at the next step

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        def run():
            with torch.no_grad():
                result["out"] = self.model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=sample,
                    **({"temperature": temperature} if sample else {}), pad_token_id=self.tok.pad_token_id, eos_token_id=stop_ids(self.tok),
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([Halt()]))

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            text, sent = "", 0
            stopped = False
            for piece in streamer:
                text += piece
                cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                if cut >= 0:
                    text, stopped = text[:cut], True
                if len(text) > sent:
                    yield text[sent:], None, len(ids), 0
                    sent = len(text)
                if stopped:
                    halt.set()
                    break
            if stopped:
                for _ in streamer:  # the generation thread ends at its next step: read what it still streams
                    pass
            worker.join()
        n_new = int(result["out"].shape[1] - len(ids)) if "out" in result else 0
        finish = "stop" if stopped or n_new < max_tokens else "length"
        yield "", finish, len(ids), n_new


# vLLM allocates LoRA slots of these ranks (vllm.config.LoRAConfig); an adapter's rank must fit in the slot.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngine(Engine):
    """vLLM's offline engine (`vllm.LLM`) behind the same interface: the run's prompt and stops, one request at a time."""

    def __init__(self, llm, lora, tok, recipe, name: str):
        super().__init__(None, tok, recipe, name)
        self.llm, self.lora = llm, lora

    def stream(self, prompt: str, max_tokens: int, temperature: float, stop: list[str]) -> Iterator[tuple[str, str | None, int, int]]:
        from vllm import SamplingParams

        from .lm import stop_ids
        from .templates import token_ids

        ids = token_ids(self.tok, prompt, True)  # the run's own BOS handling, not vLLM's tokenizer call
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=[s for s in stop if s] or None,
                                stop_token_ids=stop_ids(self.tok), skip_special_tokens=True)
        with self.lock:
            done = self.llm.generate([{"prompt_token_ids": ids}], params, lora_request=self.lora, use_tqdm=False)
        out = done[0].outputs[0]
        if out.text:
            yield out.text, None, len(ids), len(out.token_ids)
        yield "", "length" if out.finish_reason == "length" else "stop", len(ids), len(out.token_ids)


def pick_engine(engine: str) -> str:
    """auto -> vllm when it is importable and CUDA is present, else transformers; an explicit vllm must be usable."""
    import importlib.util

    if engine not in ("auto", "vllm", "transformers"):
        raise UserError(f"--engine {engine!r}: auto, vllm or transformers")
    if engine == "transformers":
        return engine
    has_vllm = importlib.util.find_spec("vllm") is not None
    import torch

    gpu = torch.cuda.is_available()
    if engine == "vllm" and not (has_vllm and gpu):
        raise UserError("--engine vllm needs the vllm package (pip install vllm) and a CUDA GPU; "
                        f"here: vllm {'installed' if has_vllm else 'missing'}, GPU {'present' if gpu else 'missing'}")
    return "vllm" if has_vllm and gpu else "transformers"


def load_vllm_engine(run_dir: Path, which: str) -> VLLMEngine:
    from vllm import LLM

    from .chat import check_run
    from .evaluate import merged_to_score
    from .models import load_tokenizer

    run = check_run(run_dir)
    recipe, _ = run.load_recipe()
    base = recipe.base_model
    merged = merged_to_score(run) if which == "tuned" else None
    lora = None
    if merged is not None:
        llm = LLM(model=str(merged), tokenizer=str(merged), dtype=recipe.merge.dtype, trust_remote_code=base.trust_remote_code)
        tok = load_tokenizer(str(merged), recipe)
    else:
        rev = None if Path(base.id).exists() else base.revision
        kw: dict[str, Any] = {}
        if which == "tuned":
            from vllm.lora.request import LoRARequest

            from .runbase import extended

            if extended(run) or recipe.training.method == "block_expansion":  # the adapter needs a reshaped base (runbase.py)
                raise UserError(f"{run_dir}: this run grew the vocabulary or added blocks, which a LoRA on the plain base cannot carry "
                                "in vLLM; serve its merged model (finetune run completes the merge), or --engine transformers")

            rank = next((r for r in VLLM_LORA_RANKS if r >= recipe.lora.r), None)
            if rank is None:
                raise UserError(f"lora.r {recipe.lora.r} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}); merge the run, or --engine transformers")
            kw = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
            lora = LoRARequest(recipe.name, 1, str(run.final_adapter(recipe.stages).resolve()))
        # The base in its 16-bit dtype plus the adapter's update: what merge.base original_16bit (the default) writes;
        # the 4-bit rounding the adapter trained against is not applied (merge_check.json records that gap).
        llm = LLM(model=base.id, revision=rev, dtype=base.dtype, trust_remote_code=base.trust_remote_code, **kw)
        tok = load_tokenizer(base.id, recipe)
    return VLLMEngine(llm, lora, tok, recipe, recipe.name if which == "tuned" else f"{recipe.name}-base")


def load_engine(run_dir: Path, which: str) -> Engine:
    from .chat import check_run, load_run_model
    from .models import load_model, load_tokenizer

    run = check_run(run_dir)
    recipe, _ = run.load_recipe()
    if which == "tuned":
        model, tok, recipe = load_run_model(run_dir)
        return Engine(model, tok, recipe, recipe.name)
    tok = load_tokenizer(recipe.base_model.id, recipe)
    model = load_model(recipe.base_model.id, recipe, quantized=recipe.quantization.bits != 16)
    model.eval()
    return Engine(model, tok, recipe, f"{recipe.name}-base")


def build_app(engine: Engine, *, api_key_env: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        key = os.environ.get(api_key_env) if api_key_env else None
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > max_request_bytes:
            return error(413, f"request body of {size} bytes is over the limit of {max_request_bytes}")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "request body is not valid JSON" if first.get("type") == "json_invalid" else f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return error(400, msg)

    def check(req: Common):
        if req.model != engine.name:
            return error(404, f"model {req.model!r} is not served here; this server serves {engine.name!r}", code="model_not_found")
        if req.max_tokens > max_tokens:
            return error(400, f"max_tokens: {req.max_tokens} is over this server's limit of {max_tokens} (finetune serve --max-tokens)")
        return None

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "finetune"}]}

    def respond(req: Common, prompt: str, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        pieces = engine.stream(prompt, req.max_tokens, req.temperature, req.stops())
        if req.stream:
            def events():
                if chat:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                for text, finish, _, _ in pieces:
                    if chat:
                        delta = {"content": text} if text else {}
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                    else:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                                    "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, finish, n_prompt, n_new = "", None, 0, 0
        for piece, f, n_prompt, n_done in pieces:
            text += piece
            finish, n_new = f or finish, n_done or n_new
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "finish_reason": finish})
        return {"id": rid, "object": kind, "created": created, "model": engine.name, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        return check(req) or respond(req, engine.prompt_for([m.model_dump() for m in req.messages]), chat=True)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return check(req) or respond(req, req.prompt, chat=False)

    return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def check_port(host: str, port: int) -> None:
    """One clear message (exit 2) when the port is taken, before the model loads (seconds to minutes)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); is another server running? "
                            "Pick another --port") from None


def serve(run_dir: Path, which: str, host: str, port: int, api_key_env: str | None, max_tokens: int, max_request_bytes: int,
          engine_kind: str = "auto") -> None:
    import sys

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("finetune serve needs FastAPI and uvicorn: pip install 'finetune[serve]'") from None
    if which not in ("tuned", "base"):
        raise UserError(f"--model {which!r}: tuned or base")
    if max_tokens < 1 or max_request_bytes < 1:
        raise UserError("--max-tokens and --max-request-bytes must be at least 1")
    kind = pick_engine(engine_kind)
    check_port(host, port)
    engine = load_vllm_engine(run_dir, which) if kind == "vllm" else load_engine(run_dir, which)
    app = build_app(engine, api_key_env=api_key_env, max_tokens=max_tokens, max_request_bytes=max_request_bytes)
    keyed = " (API key required)" if api_key_env and os.environ.get(api_key_env) else ""
    sys.stderr.write(f"[finetune] serving {engine.name!r} ({kind}) on http://{host}:{port}/v1{keyed}; Ctrl-C or SIGTERM stops\n")
    uvicorn.run(app, host=host, port=port, log_level="warning")
