"""The OpenAI-compatible server: chat and text completions (streaming or not), metrics, web chat.

    tandem serve --model runs/demo                 # then open http://127.0.0.1:8000/
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 12 + 7?"}]}'

    app = create_app(lambda: load_model("runs/demo"), ServeConfig(name="demo"))   # any ASGI server
    uvicorn_server(app, shutdown_timeout=10, port=8000).run()       # with a draining Ctrl-C

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET / (the chat page in web/), GET /openapi.json. Beyond
OpenAI's parameters: top_k and ignore_eos (as vLLM). Errors are OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}}: 400 bad body / parameter / model name / prompt
longer than the context, 404/405 wrong route, 413 body over max_body_bytes, 429 full, 503 while
the model loads or the server stops (requests still running when a shutdown's grace period ends
get it too, as JSON or as a stream's error event before `data: [DONE]`: see drain), 500 only if
generation itself fails.

How a request flows. The handler (asyncio) validates the body, renders the ChatML prompt, and
turns each of the `n` choices into a `Job`. ONE background thread owns the engine: it takes jobs
and cancellations from a thread-safe inbox between decode steps, runs `engine.step()` while there
is work, and hands every step's new tokens back to the event loop in one `call_soon_threadsafe`,
which appends them to each request's inbox and wakes its handler once. The handler takes all
that has arrived: each choice detokenizes incrementally (`TextStream`: multi-byte characters split
across BPE tokens come out whole), checks stop strings on the decoded text, and, for chat, routes
the text through `ReasoningSplitter`; a stream then writes one chunk per choice (per run of
reasoning or content: a delta carries one of the two), so tokens that piled up while the handler
was behind (the engine thread and the event loop share one GIL) go out coalesced; usage and
logprobs still count every token. A client that disconnects cancels its jobs, which frees their
cache slots before the next step. Admission is bounded: at most max_batch running + max_queue
waiting sequences (an n=4 request counts 4); beyond that the answer is an immediate 429.

Reasoning (DeepSeek's convention). Chat replies carry the model's thinking separately: text
inside <think>…</think> goes to `reasoning_content`, everything else to `content`; the four tags
<think> </think> <answer> </answer> are dropped, and the blank space next to each tag is trimmed
(so "<think>\\nA\\n</think>\\n<answer>19</answer>" gives reasoning "A", content "19"). The
streamed deltas concatenate to exactly the non-streamed message. Text completions are raw text
with the tags in place. Assistant turns sent back in `messages` are used verbatim as history.

Counting. usage.completion_tokens counts every token the model generated, the closing
<|im_end|> included (it is a sampled token; so is a token that completed a stop string); chat
logprobs list the same tokens, so len(logprobs.content) == completion_tokens. Logprobs are the
engine's: log-softmax of the raw logits (temperature 1, before top-k/top-p), not of the
distribution actually sampled from. With `n` > 1 and a seed, choice i uses seed + i.

Simplifications, stated: if `engine.step()` itself raises (a bug, out of memory), every request
running in that step ends with a 500-style error, because the engine cannot say which one caused
it; the loop carries on with new requests. Unsupported parameters that would change the output
(penalties, logit_bias, tools, echo, suffix) are refused with 400 rather than ignored; other
unknown fields are ignored. One model per server.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import json
import logging
import queue
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers.decoders import DecodeStream

from tandem import accel
from tandem.errors import TandemError
from tandem.infer.engine import Engine, SamplingParams, StepOutput
from tandem.reasoning import REASONING_TAGS, THINK_CLOSE, THINK_OPEN

log = logging.getLogger("tandem.serve")
WEB = Path(__file__).resolve().parent / "web"
MAX_STOPS = 16
DONE = "data: [DONE]\n\n"                                # the last event of every stream
_json = json.JSONEncoder(ensure_ascii=False).encode    # json.dumps(obj, ensure_ascii=False), one encoder
_ID_PREFIX, _ids = uuid.uuid4().hex[:16], itertools.count()    # response ids: unique per server, cheap


# -----------------------------------------------------------------------------------------------
# Errors: every non-2xx answer is {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -----------------------------------------------------------------------------------------------
# Request bodies (OpenAI's schema, the fields tandem implements; unknown fields are ignored)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off (vLLM's extension)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="keep generating past <|im_end|> (vLLM's extension; benchmarks)")
    frequency_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    presence_penalty: float | None = Field(None, description="not supported: must be 0 or absent")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty or absent")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be absent")


def _check_unsupported(body: _Sampling) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by tandem serve; leave it out or set it to 0", param=name)
    checks = [("logit_bias", bool(body.logit_bias)), ("tools", bool(getattr(body, "tools", None))),
              ("echo", getattr(body, "echo", False)), ("suffix", getattr(body, "suffix", None) is not None)]
    for name, used in checks:
        if used:
            raise APIError(400, f"{name} is not supported by tandem serve; leave it out", param=name)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
                       param="stop")
    return stops


# -----------------------------------------------------------------------------------------------
# Text: incremental detokenization, stop strings, thinking vs answer


class TextStream:
    """One choice's decoded text, released piece by piece as tokens arrive.

    Incremental detokenization is `tokenizers`' DecodeStream (the prefix-window scheme vLLM uses,
    in Rust): text comes out only as whole characters, so a character split over several
    byte-level tokens is released once, whole; an incomplete character at the very end of a
    generation is dropped. Text that could be the start of a stop string is held back until it is
    ruled out; when a stop string appears, the text is cut before it and `stopped` is set.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer.tokenizer, stops
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.held = ""                    # decoded, not released: it could start a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text this token releases. Work per token is bounded by the longest stop string:
        a stop string can only begin inside the held text, so only that is searched."""
        if self.stopped:
            return ""
        piece = self.decoder.step(self.tok, token_id) or ""
        if not self.stops:
            return piece
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[:min(hits)]
        keep = len(text) - _held(text, self.stops)
        self.held = text[keep:]
        return text[:keep]

    def flush(self) -> str:
        """The held-back rest, at the end of the generation."""
        out, self.held = self.held, ""
        return out


def _held(text: str, words) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `words`."""
    best = 0
    for word in words:
        i = text.find(word[0], max(0, len(text) - len(word) + 1))
        while i >= 0 and len(text) - i > best:
            if word.startswith(text[i:]):
                best = len(text) - i
                break
            i = text.find(word[0], i + 1)
    return best


class ReasoningSplitter:
    """Routes streamed text: inside <think>…</think> to reasoning, the rest to content.

    Tags are dropped and each segment between tags is trimmed at both ends (a trailing blank is
    held until more text shows it is interior), so pushing text in any pieces gives the same
    result as pushing it whole.
    """

    def __init__(self):
        self.buf = ""              # text not routed yet: a possible partial tag, trailing blanks
        self.thinking = False
        self.fresh = True          # at the start of a segment: drop leading blanks

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) released by this text."""
        out = {True: "", False: ""}
        self.buf += text
        while "<" in self.buf:                                   # every tag starts with "<"
            found = [(i, tag) for tag in REASONING_TAGS if (i := self.buf.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            out[self.thinking] += self._segment(self.buf[:i], end=True)
            self.thinking = tag == THINK_OPEN if tag in (THINK_OPEN, THINK_CLOSE) else False
            self.buf, self.fresh = self.buf[i + len(tag):], True
        if final:
            out[self.thinking] += self._segment(self.buf, end=True)
            self.buf = ""
        else:
            keep = len(self.buf) - (_held(self.buf, REASONING_TAGS) if "<" in self.buf else 0)
            body = self.buf[:keep]
            ready = len(body.rstrip())
            out[self.thinking] += self._segment(body[:ready], end=False)
            self.buf = self.buf[ready:]
        return out[True], out[False]

    def _segment(self, text: str, end: bool) -> str:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        return text.rstrip() if end else text


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning_content, content) of a whole completion, as the stream would give them."""
    return ReasoningSplitter().push(text, final=True)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


class TokenInfo:
    """Token id -> (display string, bytes) for logprobs, cached. A token that is only part of a
    UTF-8 character is displayed as "bytes:\\xe6\\x97" (as OpenAI does); `bytes` is always exact."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tok.tokenizer.id_to_token(token_id) or ""
            if piece and all(c in BYTE_DECODER for c in piece):       # byte-level BPE (tandem, Qwen2)
                raw = bytes(BYTE_DECODER[c] for c in piece)
            else:
                raw = self.tok.decode([token_id], skip_special=False).encode()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:        # part of a character: OpenAI's "bytes:\\x.." spelling
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]


# -----------------------------------------------------------------------------------------------
# The engine thread


class Job:
    """One sequence (one choice of one HTTP request), shared by the event loop and the engine thread."""
    __slots__ = ("prompt", "params", "index", "run", "loop", "state", "rid", "done")

    def __init__(self, prompt, params, index, run, loop, state):
        self.prompt, self.params, self.index = prompt, params, index
        self.run, self.loop, self.state = run, loop, state
        self.rid: int | None = None      # the engine's request id (engine thread only)
        self.done = False                # finished, failed or cancelled (event loop only)

    def release(self) -> None:
        """Give back its admission slot, once (event loop only)."""
        if not self.done:
            self.done = True
            self.state.inflight -= 1


class EngineLoop:
    """The one thread that drives `engine.step()`; everything else talks to it through `inbox`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.running = self.waiting = 0          # snapshots for /metrics and /health
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def halt(self) -> None:
        """Ask the thread to end every job still in the engine (with a 503 event) and stop."""
        self.inbox.put(("stop", None))

    def stop(self, timeout: float = 10.0) -> None:
        """halt(), and wait for the thread to end."""
        self.halt()
        self.thread.join(timeout)

    def _run(self) -> None:
        jobs: dict[int, Job] = {}
        while True:
            engine = self.engine
            try:
                commands = [self.inbox.get(block=not engine.has_work())]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for command, job in commands:
                if command == "stop":
                    self._fail(jobs.values(), APIError(503, "the server is shutting down", "service_unavailable",
                                                       code="shutting_down"))
                    self._drop(jobs)
                    return
                if command == "add":
                    try:
                        job.rid = engine.add(job.prompt, job.params)
                        jobs[job.rid] = job
                    except Exception as exc:        # validated earlier; still, never kill the loop
                        self._fail([job], _as_api_error(exc))
                elif job.rid is not None and jobs.pop(job.rid, None) is not None:
                    engine.cancel(job.rid)
            if engine.has_work():
                failure = None
                try:
                    outputs = engine.step()
                except Exception as exc:
                    log.error("engine step failed; ending the %d requests in it:\n%s", len(jobs),
                              traceback.format_exc())
                    failure, outputs = APIError(500, f"generation failed: {exc}", "server_error"), []
                if failure is not None:  # outside the except: its traceback no longer pins the step's tensors
                    engine = None        # nor does this frame pin the engine, should _drop rebuild it
                    self._fail(jobs.values(), failure)
                    self._drop(jobs)
                self.steps += 1
                now = time.perf_counter()
                batch = []
                for out in outputs:
                    job = jobs.pop(out.request_id) if out.finished else jobs.get(out.request_id)
                    if job is not None:
                        batch.append((job, (out, now)))
                self._deliver(batch)
            self.running, self.waiting = self.engine.num_active, self.engine.num_waiting

    def _drop(self, jobs: dict[int, Job]) -> None:
        """Cancel every job in the engine; if even that fails, start over with a fresh engine."""
        try:
            for rid in jobs:
                self.engine.cancel(rid)
            broken = False
        except Exception:
            log.error("cancelling after a failed step failed too; rebuilding the engine:\n%s", traceback.format_exc())
            broken = True
        jobs.clear()
        if broken:  # outside the except, whose traceback would keep the old engine alive
            self._rebuild()

    def _rebuild(self) -> None:
        """Replace the engine by a fresh one of the same shape, freeing the old KV cache first (the
        failure was typically out-of-memory): no reference may survive, then the allocator lets go."""
        e = self.engine
        model, shape = e.model, dict(max_batch=e.max_batch, max_len=e.max_len, seed=e.seed)
        self.engine = e = None
        gc.collect()
        accel.empty_cache(model.lm_head.weight.device)
        self.engine = Engine(model, **shape)

    def _fail(self, jobs, error: APIError) -> None:
        self._deliver([(job, error) for job in jobs])

    @staticmethod
    def _deliver(batch: list) -> None:
        """Hand (job, event) pairs to their event loops, one callback per loop per step."""
        by_loop: dict[Any, list] = {}
        for job, event in batch:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_events, items)
            except RuntimeError:          # that event loop has closed (server shutting down)
                pass


def _put_events(items) -> None:
    """Post each event to its request; a sequence's last event also frees its admission slot
    here, so the count stays right even if no handler ever reads the events (a stream whose
    client left before its first byte)."""
    for job, event in items:
        if not job.done:
            job.run.post(job.index, event)
            if isinstance(event, APIError) or event[0].finished:
                job.release()


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TandemError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {exc}", "server_error")


# -----------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: a few counters, gauges and two histograms)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)        # per bucket, not cumulative; the last is +Inf
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.counts[bisect.bisect_left(self.buckets, value)] += 1

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = itertools.accumulate(self.counts)
        lines += [f'{self.name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.buckets, cumulative)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.count}"]
        return "\n".join(lines)


class Metrics:
    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self):
        self.responses: dict[tuple[str, int], int] = {}
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "requests_cancelled_total": 0,
                         "requests_rejected_total": 0}
        self.counter_help = {"prompt_tokens_total": "Prompt tokens of admitted requests.",
                             "generation_tokens_total": "Tokens generated.",
                             "requests_cancelled_total": "Sequences ended early (client gone, error, shutdown).",
                             "requests_rejected_total": "Requests answered 429 (server full)."}
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Request arrival to its first generated token.",
                              (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                             (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def response(self, path: str, status: int) -> None:
        key = (path if path in self.PATHS else "other", status)
        self.responses[key] = self.responses.get(key, 0) + 1

    def render(self, gauges: dict[str, tuple[str, float]], steps: int) -> str:
        parts = ["# HELP tandem_http_responses_total HTTP responses by path and status.",
                 "# TYPE tandem_http_responses_total counter"]
        parts += [f'tandem_http_responses_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.responses.items())]
        counters = dict(self.counters, engine_steps_total=steps)
        helps = dict(self.counter_help, engine_steps_total="Engine decode steps run.")
        for name, value in counters.items():
            parts += [f"# HELP tandem_{name} {helps[name]}", f"# TYPE tandem_{name} counter", f"tandem_{name} {value}"]
        for name, (help, value) in gauges.items():
            parts += [f"# HELP tandem_{name} {help}", f"# TYPE tandem_{name} gauge", f"tandem_{name} {value}"]
        parts += [self.ttft.render(), self.itl.render()]
        return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------------------------
# The app


@dataclass
class ServeConfig:
    name: str = "tandem"             # the model id clients send
    max_batch: int = 32              # sequences decoded together (engine cache slots)
    max_queue: int = 256             # sequences waiting for a slot; beyond: 429
    max_len: int | None = None       # context length; None: the model's, capped at 4096
    max_body_bytes: int = 1 << 20    # larger request bodies get 413
    seed: int = 0


class _State:
    """What the handlers share: the loaded model (None while loading) and the admission count."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine_loop: EngineLoop | None = None
        self.tokenizer = None
        self.token_info: TokenInfo | None = None
        self.max_len = 0
        self.load_error: str | None = None
        self.inflight = 0                # admitted sequences not yet finished (event loop only)
        self.closing = False
        self.created = int(time.time())

    def ready(self) -> EngineLoop:
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "service_unavailable",
                           code="model_load_failed")
        if self.closing:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
        if self.engine_loop is None:
            raise APIError(503, "the model is still loading; retry in a few seconds", "service_unavailable",
                           code="model_loading", headers={"retry-after": "2"})
        return self.engine_loop

    def capacity(self) -> int:
        return self.config.max_batch + self.config.max_queue


def create_app(load: Callable[[], Any], config: ServeConfig | None = None,
               on_load_error: Callable[[Exception], None] | None = None) -> FastAPI:
    """The ASGI app. `load()` returns a LoadedModel (model, tokenizer, info); it runs in a thread at
    startup, and until it returns every endpoint but / answers 503."""
    config = config or ServeConfig()
    state = _State(config)

    def load_in_background() -> None:
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
            state.tokenizer, state.token_info, state.max_len = loaded.tokenizer, TokenInfo(loaded.tokenizer), max_len
            engine_loop = EngineLoop(engine)
            engine_loop.start()
            state.engine_loop = engine_loop          # last: this makes the server ready
            log.info("model %s ready (context %d, max batch %d)", config.name, max_len, config.max_batch)
        except Exception as exc:
            state.load_error = str(exc) if isinstance(exc, TandemError) else f"{type(exc).__name__}: {exc}"
            if on_load_error is None:
                log.error("loading the model failed: %s", state.load_error)
            else:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="tandem-load", daemon=True).start()
        yield
        state.closing = True
        if state.engine_loop is not None:
            state.engine_loop.stop()

    app = FastAPI(title="tandem", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat server for a tandem reasoning model.")
    app.state.tandem = state
    _install_errors(app)
    app.add_middleware(_Limits, state=state)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/health", summary="200 when the model is loaded and serving, 503 otherwise")
    async def health():
        engine_loop = state.ready()
        return {"status": "ok", "model": config.name, "running": engine_loop.running,
                "waiting": engine_loop.waiting, "inflight": state.inflight}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        engine_loop = state.engine_loop
        gauges = {"requests_inflight": ("Admitted sequences not finished yet.", state.inflight),
                  "requests_running": ("Sequences holding an engine slot.", engine_loop.running if engine_loop else 0),
                  "queue_depth": ("Admitted sequences waiting for an engine slot.",
                                  max(0, state.inflight - engine_loop.running) if engine_loop else 0),
                  "model_loaded": ("1 once the model is ready.", int(engine_loop is not None))}
        text = state.metrics.render(gauges, engine_loop.steps if engine_loop else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", summary="The one model this server serves")
    async def models():
        state.ready()
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": state.created,
                                            "owned_by": "tandem", "max_model_len": state.max_len}]}

    @app.post("/v1/chat/completions", summary="Chat completion; the thinking comes back as reasoning_content")
    async def chat_completions(body: ChatRequest, request: Request):
        engine_loop = _check_model(state, body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt = state.tokenizer.encode_prompt(messages)
        max_new = body.max_completion_tokens or body.max_tokens
        params = _sampling(state, body, prompt, max_new, "messages", bool(body.logprobs or body.top_logprobs),
                           body.top_logprobs or 0)
        run = Run(state, engine_loop, [prompt], [params], body.n, _stops(body.stop), chat=True)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(run, include_usage)
        return await run.complete(request)

    @app.post("/v1/completions", summary="Text completion of a raw prompt (no chat template, tags kept)")
    async def completions(body: CompletionRequest, request: Request):
        engine_loop = _check_model(state, body)
        prompts = _prompt_ids(state, body.prompt)
        top_n = body.logprobs or 0
        params = [_sampling(state, body, p, body.max_tokens, "prompt", body.logprobs is not None, top_n)
                  for p in prompts]
        run = Run(state, engine_loop, prompts, params, body.n, _stops(body.stop), chat=False)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(run, include_usage)
        return await run.complete(request)

    return app


async def drain(app: FastAPI, timeout: float) -> None:
    """A graceful stop: admit nothing new (503), give the running requests `timeout` seconds to
    finish, then end the rest with a 503: an OpenAI JSON error, or on a stream an error event and
    `data: [DONE]`. Returns once every request has had its answer handed over."""
    state: _State = app.state.tandem
    state.closing = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight and state.engine_loop is not None:
        log.info("shutting down: ending the %d sequence(s) still running with 503", state.inflight)
        state.engine_loop.halt()
        deadline = loop.time() + 10       # the engine thread ends them after its current step
        while state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.02)


def uvicorn_server(app: FastAPI, shutdown_timeout: float, **config):
    """A uvicorn.Server for create_app()'s app whose Ctrl-C stops listening, then drains (above):
    uvicorn alone would cancel the requests still running at its timeout, answering a plain-text
    500 or cutting a stream short, and log each cancelled task's traceback."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()
            await drain(app, shutdown_timeout)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout, **config))


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif not loc:
            message = "the request body must be a JSON object (send Content-Type: application/json)"
        else:
            message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}"
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.error("unhandled error on %s:\n%s", request.url.path, traceback.format_exc())
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


class _Limits:
    """ASGI middleware: 413 for bodies over max_body_bytes (read up front, then replayed), and the
    per-path response counts in /metrics."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit = scope["path"], self.state.config.max_body_bytes

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.response(path, message["status"])
            await send(message)

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


def _check_model(state: _State, body: _Sampling) -> EngineLoop:
    engine_loop = state.ready()
    if body.model != state.config.name:
        raise APIError(400, f"unknown model '{body.model}'; this server serves '{state.config.name}' (see /v1/models)",
                       param="model", code="model_not_found")
    _check_unsupported(body)
    return engine_loop


def _prompt_ids(state: _State, prompt) -> list[list[int]]:
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


def _sampling(state: _State, body: _Sampling, prompt: list[int], max_new: int | None, where: str,
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


class EventStream(Response):
    """The server-sent events of one Run, written straight to the connection.

    Leaner than Starlette's StreamingResponse (no task group per request): a client that goes
    away is noticed by `Run._watch`, as for non-streamed requests, which ends the stream and
    cancels its sequences at once."""

    def __init__(self, run: "Run", include_usage: bool):
        self.run, self.include_usage = run, include_usage
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.create_task(self.run._watch(receive))
        try:
            async for text in self.run.stream(self.include_usage):      # the last one ends with [DONE]
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": not text.endswith(DONE)})
        except _ClientGone:
            pass
        finally:
            watcher.cancel()


def _data(obj) -> str:
    return f"data: {_json(obj)}\n\n"


# -----------------------------------------------------------------------------------------------
# One HTTP request: its jobs, streamed or collected


class _ClientGone(Exception):
    pass


class Choice:
    """One sequence's text, logprobs and counts as its tokens arrive."""

    def __init__(self, run: "Run", index: int, job: Job):
        self.run, self.index, self.job = run, index, job
        self.stream = TextStream(run.state.tokenizer, run.stops)
        self.splitter = ReasoningSplitter() if run.chat else None
        self.pieces: list[tuple[bool, str]] = []   # the text released so far, in order: (is reasoning, text)
        self.streamed = 0                          # pieces already sent as deltas
        self.finish_sent = False
        self.tokens = 0
        self.logprobs: list = []               # one entry per token, in the endpoint's format
        self.sent_lp = 0                       # entries already streamed
        self.text_offset = 0                   # completions logprobs: characters before the next token
        self.finish_reason: str | None = None
        self.t_last: float | None = None

    def on_token(self, out: StepOutput, now: float) -> None:
        """Account one token: counts, logprobs, and the text it released (appended to `pieces`)."""
        metrics = self.run.state.metrics
        metrics.counters["generation_tokens_total"] += 1
        if self.t_last is None:
            metrics.ttft.observe(now - self.run.t0)
        else:
            metrics.itl.observe(now - self.t_last)
        self.t_last = now
        self.tokens += 1
        if self.job.params.logprobs:
            self.logprobs.append(self._logprob(out))
        text = self.stream.push(out.token_id)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason = out.finish_reason
        if self.finish_reason:
            text += self.stream.flush()
        if self.splitter is None:
            reasoning, content = "", text
        else:
            reasoning, content = self.splitter.push(text, final=self.finish_reason is not None)
        if reasoning:
            self.pieces.append((True, reasoning))
        if content:
            self.pieces.append((False, content))

    def text(self, reasoning: bool = False) -> str:
        """All the reasoning (or content) released so far."""
        return "".join(text for is_reasoning, text in self.pieces if is_reasoning == reasoning)

    def take_deltas(self) -> list[tuple[bool, str]]:
        """The pieces not streamed yet, consecutive ones of a kind joined: (is reasoning, text)."""
        deltas: list[tuple[bool, list[str]]] = []
        for is_reasoning, text in self.pieces[self.streamed:]:
            if not deltas or deltas[-1][0] != is_reasoning:
                deltas.append((is_reasoning, []))
            deltas[-1][1].append(text)
        self.streamed = len(self.pieces)
        return [(is_reasoning, "".join(parts)) for is_reasoning, parts in deltas]

    def _logprob(self, out: StepOutput):
        info = self.run.state.token_info
        token, raw = info(out.token_id)
        tops = [(info(t), lp) for t, lp in (out.top_logprobs or [])]
        if self.run.chat:
            return {"token": token, "logprob": out.logprob, "bytes": raw,
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for (t, b), lp in tops]}
        entry = (token, out.logprob, {t: lp for (t, _), lp in tops}, self.text_offset)
        self.text_offset += len(token)
        return entry

    def take_logprobs(self):
        """The logprob entries not streamed yet, in the endpoint's format (None when not requested)."""
        if not self.job.params.logprobs:
            return None
        entries, self.sent_lp = self.logprobs[self.sent_lp:], len(self.logprobs)
        if self.run.chat:
            return {"content": entries}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries] if self.job.params.top_logprobs else None,
                "text_offset": [e[3] for e in entries]}


class Run:
    """The sequences of one request (n choices per prompt): admitted at construction, or 429."""

    def __init__(self, state: _State, engine_loop: EngineLoop, prompts: list[list[int]],
                 params: list[SamplingParams], n: int, stops: list[str], chat: bool):
        total = n * len(prompts)
        if total > state.capacity():
            raise APIError(400, f"{total} sequences (n x prompts) exceed this server's capacity of "
                                f"{state.capacity()}", param="n")
        if state.inflight + total > state.capacity():
            state.metrics.counters["requests_rejected_total"] += 1
            raise APIError(429, f"the server is at capacity ({state.inflight} sequences running or queued); "
                                f"retry shortly", "rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"retry-after": "1"})
        self.state, self.engine_loop, self.stops, self.chat = state, engine_loop, stops, chat
        self.t0 = time.perf_counter()
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{_ID_PREFIX}{next(_ids):08x}"
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.inbox: list = []                 # (choice index, event) posted and not taken yet
        self.wakeup: asyncio.Future | None = None
        kind = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id": "{self.id}", "object": "{kind}", "created": {self.created}, '
                      f'"model": {json.dumps(state.config.name)}, "choices": [')
        self.choices: list[Choice] = []
        loop = asyncio.get_running_loop()
        for prompt, p in zip(prompts, params):
            for i in range(n):
                seeded = p if p.seed is None or i == 0 else \
                    SamplingParams(**{**p.__dict__, "seed": (p.seed + i) % 2**63})
                job = Job(prompt, seeded, len(self.choices), self, loop, state)
                self.choices.append(Choice(self, len(self.choices), job))
        self.open = total                     # choices without a finish_reason yet
        state.inflight += total
        state.metrics.counters["prompt_tokens_total"] += self.prompt_tokens
        for choice in self.choices:
            engine_loop.submit(choice.job)

    # --- the event stream ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop every unfinished sequence now (client gone, error, or end of request)."""
        for choice in self.choices:
            if not choice.job.done:
                choice.job.release()
                self.engine_loop.cancel(choice.job)
                self.state.metrics.counters["requests_cancelled_total"] += 1

    def unfinished(self) -> bool:
        return self.open > 0

    def post(self, index: int, event) -> None:
        """An event for choice `index` (event loop only): (StepOutput, time), an APIError, or the
        client-gone sentinel (index -1). Wakes the handler if it waits."""
        self.inbox.append((index, event))
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def take(self) -> None:
        """Wait for events and account every one posted so far: one engine step's tokens, or
        several steps' when this handler fell behind. Raises the APIError of a sequence that
        failed, or _ClientGone."""
        while not self.inbox:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        events, self.inbox = self.inbox, []
        for index, event in events:
            self._take(index, event)

    def _take(self, index: int, event) -> None:
        if index < 0:
            raise _ClientGone()
        choice = self.choices[index]
        if choice.finish_reason is not None:          # a token queued before a stop string ended it
            return
        if isinstance(event, APIError):
            choice.job.release()
            raise event
        out, now = event
        choice.on_token(out, now)
        if choice.finish_reason is not None:
            self.open -= 1
            if not out.finished:                      # ended by a stop string: free its slot now
                self.engine_loop.cancel(choice.job)
            choice.job.release()

    async def _watch(self, receive) -> None:
        """Wake `take()` (with the sentinel event) when the client goes away."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.post(-1, None)

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # --- not streamed ----------------------------------------------------------------------------

    async def complete(self, request: Request) -> JSONResponse:
        watcher = asyncio.create_task(self._watch(request.receive))
        try:
            while self.unfinished():
                await self.take()
        except _ClientGone:
            return JSONResponse(error_body("the client disconnected", "invalid_request_error"), 499)
        except APIError as exc:
            return exc.response()
        finally:
            watcher.cancel()
            self.cancel()
        if self.chat:
            choices = [{"index": c.index, "finish_reason": c.finish_reason, "logprobs": c.take_logprobs(),
                        "message": {"role": "assistant", "content": c.text(), "reasoning_content": c.text(True)}}
                       for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text(), "finish_reason": c.finish_reason,
                        "logprobs": c.take_logprobs()} for c in self.choices]
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.state.config.name, "choices": choices,
                             "usage": self.usage()})

    # --- streamed (server-sent events) ----------------------------------------------------------

    def _chunk(self, choice: dict | None, usage_field: str) -> str:
        """One SSE event (the fixed part of the envelope is formatted once per request)."""
        return self._head + (_json(choice) if choice else "") + "]" + usage_field + "}\n\n"

    def _choice_events(self, choice: Choice, usage_field: str) -> list[str]:
        """The events for a choice's text released since its last events (one chunk per run of
        reasoning or content: a delta carries one field), then its finish once it has one."""
        body = "delta" if self.chat else "text"
        out = []
        for is_reasoning, text in choice.take_deltas():
            delta = {"reasoning_content" if is_reasoning else "content": text} if self.chat else text
            out.append(self._chunk({"index": choice.index, body: delta, "logprobs": choice.take_logprobs(),
                                    "finish_reason": None}, usage_field))
        if choice.finish_reason is not None and not choice.finish_sent:
            choice.finish_sent = True
            out.append(self._chunk({"index": choice.index, body: {} if self.chat else "",
                                    "logprobs": choice.take_logprobs(), "finish_reason": choice.finish_reason},
                                   usage_field))
        return out

    async def stream(self, include_usage: bool):
        """SSE events, one write per wake-up. The tokens that piled up for a choice since its
        last chunk go out as one chunk (their text concatenated, their logprobs together): a
        handler that falls behind the engine sends fewer, larger chunks instead of falling
        further behind, and nothing is held back once it has caught up."""
        usage_field = ', "usage": null' if include_usage else ""
        pending = [self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}, usage_field) for c in self.choices] if self.chat else []
        failed = False
        try:
            while self.unfinished():
                if pending:
                    yield "".join(pending)
                    pending = []
                error = None
                try:
                    await self.take()
                except APIError as exc:         # the stream has started: report in-band, then end it
                    error = exc
                for choice in self.choices:
                    pending += self._choice_events(choice, usage_field)
                if error is not None:
                    pending.append(_data(error_body(error.message, error.type, error.param, error.code)))
                    failed = True
                    break
            if include_usage and not failed:
                pending.append(self._chunk(None, f', "usage": {_json(self.usage())}'))
            yield "".join(pending) + DONE
        finally:
            self.cancel()
