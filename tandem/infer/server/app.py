"""The ASGI app: `create_app` wires the model loader, the error handlers, the limits middleware
(API keys, body size) and the routes; requests are checked against the loaded model here, then
handed to `Run`."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from tandem.errors import TandemError
from tandem.infer.engine import Engine, SamplingParams
from tandem.infer.server.loop import EngineLoop
from tandem.infer.server.metrics import Metrics
from tandem.infer.server.protocol import (APIError, ChatRequest, CompletionRequest, _check_unsupported, _Sampling,
                                          _stops, error_body, install_error_handlers)
from tandem.infer.server.recovery import EngineFaults, RecoveryPolicy
from tandem.infer.server.run import EventStream, Run
from tandem.infer.server.text import TokenInfo

log = logging.getLogger("tandem.serve")
WEB = Path(__file__).resolve().parent.parent / "web"


@dataclass
class ServeConfig:
    name: str = "tandem"             # the model id clients send
    max_batch: int = 32              # sequences decoded together (engine cache slots)
    max_queue: int = 256             # sequences waiting for a slot; beyond: 429
    max_len: int | None = None       # context length; None: the model's, capped at 4096
    max_body_bytes: int = 1 << 20    # larger request bodies get 413
    seed: int = 0
    api_keys: tuple[str, ...] = ()   # when set, every /v1/ route wants `Authorization: Bearer <one of them>`
    step_timeout: float | None = 300.0   # an engine step running longer is a hang; None: no watchdog
    max_restarts: int = 2            # restarts of a request after engine faults before it ends with an error
    faults: str = ""                 # engine faults to inject (recovery.py), e.g. "hang@30"; never by default
    fault_mtbf: float = 0.0          # random engine faults every that many steps on average (0: none)
    fault_seed: int = 0


class ServerState:
    """What the handlers share: the loaded model (None while loading) and the admission count."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics(self.live)
        self.engine_loop: EngineLoop | None = None
        self.tokenizer = None
        self.token_info: TokenInfo | None = None
        self.max_len = 0
        self.load_error: str | None = None
        self.inflight = 0                # admitted sequences not yet finished (event loop only)
        self.closing = False
        self.created = int(time.time())

    def unavailable(self) -> APIError | None:
        """Why no request can be served now (a 503), or None."""
        if self.load_error:
            return APIError(503, f"the model failed to load: {self.load_error}", "service_unavailable",
                            code="model_load_failed")
        if self.closing:
            return APIError(503, "the server is shutting down; retry on another replica or once it is back",
                            "service_unavailable", code="shutting_down", headers={"retry-after": "5"})
        if self.engine_loop is not None and self.engine_loop.recovery.broken:
            return APIError(503, f"the engine is down: {self.engine_loop.recovery.broken}", "service_unavailable",
                            code="engine_failed")
        if self.engine_loop is None:
            return APIError(503, "the model is still loading; retry in a few seconds", "service_unavailable",
                            code="model_loading", headers={"retry-after": "2"})
        return None

    def ready(self) -> EngineLoop:
        error = self.unavailable()
        if error is not None:
            raise error
        return self.engine_loop

    def capacity(self) -> int:
        return self.config.max_batch + self.config.max_queue

    def load(self, load: Callable[[], Any], on_load_error: Callable[[Exception], None] | None) -> None:
        """Load the model and start the engine thread (in the loader thread); a failure is kept
        in `load_error`, which every endpoint but / then reports with a 503."""
        config = self.config
        try:
            loaded = load()
            ctx = loaded.model.config.max_position_embeddings
            max_len = min(config.max_len or min(ctx, 4096), ctx)
            if config.max_len and config.max_len > ctx:
                log.warning("--max-len %d is more than the model's context of %d tokens; using %d",
                            config.max_len, ctx, max_len)
            elif config.max_len is None and max_len < ctx:
                log.info("context %d of the model's %d tokens (raise it with --max-len)", max_len, ctx)
            engine = Engine(loaded.model, max_batch=config.max_batch, max_len=max_len, seed=config.seed)
            self.tokenizer, self.token_info, self.max_len = loaded.tokenizer, TokenInfo(loaded.tokenizer), max_len
            engine_loop = EngineLoop(engine, RecoveryPolicy(
                config.step_timeout, config.max_restarts,
                EngineFaults.parse(config.faults, config.fault_mtbf, config.fault_seed)))
            engine_loop.start()
            self.engine_loop = engine_loop          # last: this makes the server ready
            log.info("model %s ready (context %d, max batch %d)", config.name, max_len, config.max_batch)
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, TandemError) else f"{type(exc).__name__}: {exc}"
            if on_load_error is None:
                log.error("loading the model failed: %s", self.load_error)
            else:
                on_load_error(exc)

    def live(self) -> tuple[dict[str, tuple[str, float]], int]:
        """The gauges of /metrics, read when it is scraped, and the engine's step count."""
        engine_loop = self.engine_loop
        gauges = {"degraded": ("1 while the engine is rebuilt after a fault.",
                               int(bool(engine_loop and engine_loop.recovery.recovering))),
                  "requests_inflight": ("Admitted sequences not finished yet.", self.inflight),
                  "requests_running": ("Sequences holding an engine slot.", engine_loop.running if engine_loop else 0),
                  "queue_depth": ("Admitted sequences waiting for an engine slot.",
                                  max(0, self.inflight - engine_loop.running) if engine_loop else 0),
                  "model_loaded": ("1 once the model is ready.", int(engine_loop is not None))}
        return gauges, engine_loop


def create_app(load: Callable[[], Any], config: ServeConfig | None = None,
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The ASGI app. `load()` returns a LoadedModel (model, tokenizer, info); it runs in a thread at
    startup, and until it returns every endpoint but / answers 503."""
    state = ServerState(config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(load, on_load_error), name="tandem-load", daemon=True).start()
        yield
        state.closing = True
        if state.engine_loop is not None:
            state.engine_loop.stop()

    app = FastAPI(title="tandem", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat server for a tandem reasoning model.")
    app.state.tandem = state
    install_error_handlers(app)
    app.add_middleware(_Limits, state=state)
    _add_status_routes(app, state)
    _add_completion_routes(app, state)
    return app


def _add_status_routes(app: FastAPI, state: ServerState) -> None:
    """The chat page, /health, /metrics and /v1/models."""
    config = state.config

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/health", summary="200 with status ok, or degraded while the engine recovers from a failed step; "
                                "503 with status loading, draining or failed, and an OpenAI error. Needs no API key.")
    async def health():
        error = state.unavailable()
        if error is not None:
            status = {"model_load_failed": "failed", "engine_failed": "failed",
                      "shutting_down": "draining"}.get(error.code, "loading")
            return JSONResponse({"status": status, **error_body(error.message, error.type, error.param, error.code)},
                                503, headers=error.headers)
        engine_loop = state.engine_loop
        return {"status": "degraded" if engine_loop.recovery.recovering else "ok", "model": config.name,
                "running": engine_loop.running, "waiting": engine_loop.waiting, "inflight": state.inflight}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", summary="The one model this server serves")
    async def models():
        state.ready()
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": state.created,
                                            "owned_by": "tandem", "max_model_len": state.max_len}]}


def _add_completion_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/chat/completions and /v1/completions."""

    @app.post("/v1/chat/completions", summary="Chat completion; the thinking comes back as reasoning_content")
    async def chat_completions(body: ChatRequest, request: Request):
        engine_loop = _check_model(state, body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = state.tokenizer.encode_prompt(messages)
        max_new = body.max_completion_tokens or body.max_tokens
        params = _sampling(state, body, prompt, max_new, "messages", bool(body.logprobs or body.top_logprobs),
                           body.top_logprobs or 0)
        run = Run(state, engine_loop, [prompt], [params], body.n, _stops(body.stop), chat=True)
        return await _answer(run, body, request)

    @app.post("/v1/completions", summary="Text completion of a raw prompt (no chat template, tags kept)")
    async def completions(body: CompletionRequest, request: Request):
        engine_loop = _check_model(state, body)
        prompts = _prompt_ids(state, body.prompt)
        top_n = body.logprobs or 0
        params = [_sampling(state, body, p, body.max_tokens, "prompt", body.logprobs is not None, top_n)
                  for p in prompts]
        run = Run(state, engine_loop, prompts, params, body.n, _stops(body.stop), chat=False)
        return await _answer(run, body, request)


async def _answer(run: Run, body: _Sampling, request: Request):
    """The response: a stream of events, or the whole completion once it is done."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(run, include_usage)
    return await run.complete(request)


class _Limits:
    """ASGI middleware: 401 for a /v1/ request without a configured API key (before its body is
    read), 413 for bodies over max_body_bytes (read up front, then replayed), and the per-path
    response counts in /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit = scope["path"], self.state.config.max_body_bytes

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.response(path, message["status"])
            await send(message)

        if path.startswith("/v1/") and not _authorized(scope, self.state.config.api_keys):
            return await _BAD_KEY.response()(scope, receive, counted_send)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                                       code="request_too_large")
                    return await too_big.response()(scope, receive, counted_send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()
            return await self.app(scope, replay, counted_send)
        return await self.app(scope, receive, counted_send)


_BAD_KEY = APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>' with a "
                         "key the server was started with (--api-key or TANDEM_API_KEY)",
                    code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def _authorized(scope, keys: tuple[str, ...]) -> bool:
    """True without keys, else when the Authorization header is `Bearer <a key>`. Every key is
    compared, none skipped, with hmac.compare_digest: its time does not depend on where the bytes
    differ (it may still reveal a length mismatch, as the documentation of compare_digest says)."""
    if not keys:
        return True
    header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    matches = [hmac.compare_digest(token.strip(), key.encode()) for key in keys]
    return scheme.lower() == b"bearer" and any(matches)


def _check_model(state: ServerState, body: _Sampling) -> EngineLoop:
    engine_loop = state.ready()
    if body.model != state.config.name:
        raise APIError(400, f"unknown model '{body.model}'; this server serves '{state.config.name}' (see /v1/models)",
                       param="model", code="model_not_found")
    _check_unsupported(body)
    return engine_loop


def _prompt_ids(state: ServerState, prompt) -> list[list[int]]:
    """A completions prompt (text, texts, token ids, lists of token ids) as token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = state.engine_loop.engine.vocab_size
    for p in ids:
        if not p:
            raise APIError(400, "a prompt encodes to no tokens; send at least one character", param="prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise APIError(400, f"a prompt token id is outside the vocabulary [0, {vocab})", param="prompt")
    return ids


def _sampling(state: ServerState, body: _Sampling, prompt: list[int], max_new: int | None, where: str,
              logprobs: bool, top_n: int) -> SamplingParams:
    room = state.max_len - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens but the model's context is {state.max_len}; "
                            f"shorten the {where}", param=where, code="context_length_exceeded")
    if max_new is None:
        max_new = room
    elif max_new > room:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) + max_tokens ({max_new}) exceeds the model's context "
                            f"of {state.max_len} tokens; lower max_tokens to at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    return SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_k=max(body.top_k, 0),
                          top_p=body.top_p, seed=body.seed, logprobs=logprobs, top_logprobs=top_n,
                          stop_token_ids=() if body.ignore_eos else (state.tokenizer.eos_id,))


