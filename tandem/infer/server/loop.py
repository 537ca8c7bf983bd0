"""The engine thread (`EngineLoop`): the one thread that runs `engine.step()`, rebuilding the
engine when a failed step leaves it broken (and counting those faults for /metrics and /health),
and the server's graceful stop (`drain`, `uvicorn_server`: on Ctrl-C or SIGTERM) that ends the
requests it still runs."""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import signal
import threading
import time
import traceback
from typing import Any

from fastapi import FastAPI

from tandem import accel
from tandem.errors import TandemError
from tandem.infer.engine import Engine
from tandem.infer.server.protocol import APIError


log = logging.getLogger("tandem.serve")


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
        self.sequence_steps = 0                  # sequences advanced, summed over steps: / steps = mean batch
        self.faults = self.failed = 0            # failed steps, and the sequences they ended
        self.rebuilds, self.rebuild_seconds = 0, 0.0     # engines rebuilt, and the seconds that took
        self.recovering = False                  # between a failed step and the loop being able to serve again
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
                    self.faults, self.failed, self.recovering = self.faults + 1, self.failed + len(jobs), True
                    self._fail(jobs.values(), failure)
                    self._drop(jobs)
                    self.recovering = False
                self.steps += 1
                self.sequence_steps += len({out.request_id for out in outputs})
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
            t0 = time.perf_counter()
            self._rebuild()
            self.rebuilds, self.rebuild_seconds = self.rebuilds + 1, self.rebuild_seconds + time.perf_counter() - t0

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
# Graceful stop


async def drain(app: FastAPI, timeout: float) -> None:
    """A graceful stop: admit nothing new (503 with Retry-After), give the running requests
    `timeout` seconds to finish, then end the rest with a 503: an OpenAI JSON error, or on a stream
    an error event and `data: [DONE]`. Returns once every request has had its answer handed over."""
    state = app.state.tandem  # app.ServerState (not imported: app imports this module)
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
    """A uvicorn.Server for create_app()'s app whose Ctrl-C or SIGTERM drains (above) while still
    listening, so a request that arrives meanwhile gets a 503 it can retry elsewhere rather than a
    refused connection, then stops listening. uvicorn alone would stop listening at once, cancel
    the requests still running at its timeout (a plain-text 500, or a stream cut short) and log
    each cancelled task's traceback. SIGTERM (what orchestrators send) is handled as Ctrl-C, so
    that `tandem serve` exits 0 after it (uvicorn re-raises the signal once it has stopped)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(signal.SIGINT if sig == signal.SIGTERM else sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await drain(app, shutdown_timeout)
            await super().shutdown(sockets)           # stops listening, closes idle connections

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout, **config))
