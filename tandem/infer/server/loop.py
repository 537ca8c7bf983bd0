"""The engine thread (`EngineLoop`): the one thread that runs `engine.step()`, with a watchdog on
its steps and recovery from engine faults (recovery.py: a fresh engine, the requests restarted),
and the server's graceful stop (`drain`, `uvicorn_server`: on Ctrl-C or SIGTERM) that ends the
requests it still runs."""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
import time
import traceback
from typing import Any

from fastapi import FastAPI

from tandem.errors import TandemError
from tandem.infer.engine import Engine
from tandem.infer.server.protocol import APIError
from tandem.infer.server.recovery import NonFiniteLogits, Recovery, RecoveryPolicy
from tandem.resilience.faults import DeviceFault


log = logging.getLogger("tandem.serve")


class Job:
    """One sequence (one choice of one HTTP request), shared by the event loop and the engine thread."""
    __slots__ = ("prompt", "params", "index", "run", "loop", "state", "rid", "done", "sent", "skip", "restarts")

    def __init__(self, prompt, params, index, run, loop, state):
        self.prompt, self.params, self.index = prompt, params, index
        self.run, self.loop, self.state = run, loop, state
        self.rid: int | None = None      # the engine's request id (engine thread only, as the three below)
        self.sent: list[int] = []        # tokens handed to the event loop
        self.skip = 0                    # after a restart: replayed tokens still to swallow
        self.restarts = 0
        self.done = False                # finished, failed or cancelled (event loop only)

    def release(self) -> None:
        """Give back its admission slot, once (event loop only)."""
        if not self.done:
            self.done = True
            self.state.inflight -= 1


class EngineLoop:
    """The thread that drives `engine.step()`; everything else talks to it through `inbox`.

    A step that raises or yields non-finite logits, or that outlasts policy.step_timeout (the
    watchdog thread notices), is a fault: the engine is rebuilt and its requests restarted
    (recovery.py). A hung step's thread is abandoned: `generation` moves on, a new thread takes
    over, and the old one, should its step ever return, drops what it computed and ends."""

    def __init__(self, engine: Engine, policy: RecoveryPolicy | None = None):
        self.engine: Engine | None = engine
        self.recovery = Recovery(engine, policy or RecoveryPolicy())
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}           # by engine request id (the owning thread only)
        self.running = self.waiting = 0          # snapshots for /metrics and /health
        self.steps = 0
        self.sequence_steps = 0                  # sequences advanced, summed over steps: / steps = mean batch
        self.lock = threading.Lock()             # guards generation and step_started
        self.generation = 0                      # which thread owns the engine
        self.step_started: float | None = None   # monotonic time the current step began
        self.stopped = False
        self.thread = threading.Thread(target=self._run, args=(0,), name="tandem-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()
        if self.recovery.policy.step_timeout:
            threading.Thread(target=self._watchdog, name="tandem-watchdog", daemon=True).start()

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

    def _run(self, generation: int, hung: float | None = None) -> None:
        if hung is not None:
            self._recover("hang", f"an engine step ran longer than {hung:g} s")
        while self.engine is not None:
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
            if not self._obey(engine, commands):
                return
            if engine.has_work():
                outputs, fault = self._step(engine, generation)
                if outputs is None:
                    return                          # abandoned while hung: a newer thread owns the jobs
                if fault is not None:               # (a failed step's traceback is gone by now)
                    engine = None                   # this frame must not pin the old engine
                    self._recover(*fault)
                    continue
                self.steps += 1
                self.sequence_steps += len({out.request_id for out in outputs})
                self._deliver_outputs(outputs)
            self.running, self.waiting = engine.num_active, engine.num_waiting
        down = APIError(503, f"the engine is down: {self.recovery.broken}", "service_unavailable", code="engine_failed")
        self._fail(self.jobs.values(), down)
        while True:                             # and the jobs sent before the server said it is down
            try:
                command, job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._fail([job], down)

    def _obey(self, engine: Engine, commands: list) -> bool:
        """Add and cancel jobs; False on "stop", after ending every job with a 503."""
        for command, job in commands:
            if command == "stop":
                self.stopped = True
                self._fail(self.jobs.values(), APIError(503, "the server is shutting down", "service_unavailable",
                                                        code="shutting_down"))
                try:
                    for rid in self.jobs:
                        engine.cancel(rid)
                except Exception:                   # a faulted engine; it is going away anyway
                    pass
                self.jobs.clear()
                return False
            if command == "add":
                try:
                    self.recovery.fix_seed(job)
                    job.rid = engine.add(job.prompt, job.params)
                    self.jobs[job.rid] = job
                except Exception as exc:        # validated earlier; still, never kill the loop
                    self._fail([job], _as_api_error(exc))
            elif job.rid is not None and self.jobs.get(job.rid) is job:
                del self.jobs[job.rid]
                engine.cancel(job.rid)
        return True

    def _step(self, engine: Engine, generation: int) -> tuple[list | None, tuple[str, str] | None]:
        """One step under the watchdog: (outputs, None), ([], (fault kind, reason)), or (None, None)
        when the watchdog abandoned this thread meanwhile."""
        with self.lock:
            self.step_started = time.monotonic()
        outputs, fault = [], None
        try:
            outputs = engine.step()
        except NonFiniteLogits as exc:
            fault = ("nonfinite", str(exc))
        except Exception as exc:           # an injected DeviceFault says enough in one line
            fault = ("device_error", f"{type(exc).__name__}: {exc}")    # strings only: a log record keeping
            detail = "" if isinstance(exc, DeviceFault) else "\n" + traceback.format_exc()   # exc would pin the engine
            log.error("engine step failed: %s%s", fault[1], detail)
        with self.lock:
            if self.generation != generation:
                return None, None
            self.step_started = None
        return outputs, fault

    def _deliver_outputs(self, outputs) -> None:
        """Hand a step's tokens over, swallowing the replayed ones a restarted client already has."""
        now = time.perf_counter()
        batch = []
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:
                continue
            if out.finished:
                del self.jobs[out.request_id]
            replayed = self.recovery.replay(job, out.token_id)
            if isinstance(replayed, APIError):
                if not out.finished:
                    del self.jobs[out.request_id]
                    self.engine.cancel(out.request_id)
                batch.append((job, replayed))
            elif not replayed:
                job.sent.append(out.token_id)
                batch.append((job, (out, now)))
        self._deliver(batch)

    def _recover(self, kind: str, reason: str) -> None:
        """After a fault: a fresh engine, and every job restarted on it (or ended, past its limit)."""
        recovery = self.recovery
        recovery.recovering = True
        recovery.faults, recovery.kinds[kind] = recovery.faults + 1, recovery.kinds[kind] + 1
        jobs = list(self.jobs.values())
        log.error("engine fault (%s): %s; rebuilding the engine and restarting its %d sequence(s)",
                  kind, reason, len(jobs))
        self.jobs.clear()
        self.engine = None
        try:
            engine = self.engine = recovery.rebuild()
        except Exception as exc:
            recovery.broken = f"rebuilding it after a fault failed: {type(exc).__name__}: {exc}"
            log.error("%s\n%s", recovery.broken, traceback.format_exc())
            recovery.failed += len(jobs)
            self.jobs = {i: job for i, job in enumerate(jobs)}
            return
        failed = []
        for job in jobs:
            error = recovery.restart(job, engine, reason)
            if error is None:
                self.jobs[job.rid] = job
            else:
                failed.append((job, error))
        self._deliver(failed)
        recovery.recovering = False

    def _watchdog(self) -> None:
        """Declare a step that outlasts step_timeout hung: abandon its thread, start a new one."""
        timeout = self.recovery.policy.step_timeout
        while not self.stopped:
            time.sleep(min(0.1, timeout / 10))
            with self.lock:
                started = self.step_started
                if started is None or time.monotonic() - started <= timeout:
                    continue
                self.generation += 1
                self.step_started = None
                self.recovery.recovering = True
                generation = self.generation
            self.thread = threading.Thread(target=self._run, args=(generation, timeout), name="tandem-engine",
                                           daemon=True)
            self.thread.start()
            self.recovery.release_hangs()

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
