"""One HTTP request (`Run`): its choices' jobs in the engine, their tokens turned into text and
logprobs as they arrive (`Choice`), answered as one JSON body or as server-sent events
(`EventStream`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tandem.infer.engine import SamplingParams, StepOutput
from tandem.infer.server.loop import EngineLoop, Job
from tandem.infer.server.protocol import APIError, error_body
from tandem.infer.server.text import ReasoningSplitter, TextStream


DONE = "data: [DONE]\n\n"                                # the last event of every stream
_json = json.JSONEncoder(ensure_ascii=False).encode    # json.dumps(obj, ensure_ascii=False), one encoder
_ID_PREFIX, _ids = uuid.uuid4().hex[:16], itertools.count()    # response ids: unique per server, cheap


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
        metrics.generation_tokens.inc()
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
    """The sequences of one request (n choices per prompt): admitted at construction, or 429.
    `state` is the app's app.ServerState (not imported here: app imports this module)."""

    def __init__(self, state, engine_loop: EngineLoop, prompts: list[list[int]],
                 params: list[SamplingParams], n: int, stops: list[str], chat: bool):
        total = n * len(prompts)
        if total > state.capacity():
            raise APIError(400, f"{total} sequences (n x prompts) exceed this server's capacity of "
                                f"{state.capacity()}", param="n")
        if state.inflight + total > state.capacity():
            state.metrics.rejected.inc()
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
        state.metrics.prompt_tokens.inc(self.prompt_tokens)
        for choice in self.choices:
            engine_loop.submit(choice.job)

    # --- the event stream ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop every unfinished sequence now (client gone, error, or end of request)."""
        for choice in self.choices:
            if not choice.job.done:
                choice.job.release()
                self.engine_loop.cancel(choice.job)
                self.state.metrics.cancelled.inc()

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
