"""Surviving engine faults: injecting them, detecting them, rebuilding the engine, and restarting
the requests it held so that clients see the answer they would have seen without the fault.

    tandem serve --model runs/demo --fault device_error@40,hang@90,nan@150 --step-timeout 5
    tandem serve --model runs/demo --fault-mtbf 200 --fault-seed 1      # random faults, for chaos runs

Injection (never on by default). The schedule is resilience/faults.py's syntax and parser, with
the engine's own vocabulary (SERVE_FAULTS) and role `engine`: KIND@STEP, STEP counting the engine
steps that computed logits since the server started (a step that faults counts too). `--fault-mtbf`
draws random faults of every kind with exponential gaps of that many steps (mean), from
`--fault-seed`. They strike inside `Engine.step`, through its `logits_hook`, where a device fault
lands: after the forward pass, before sampling.

    device_error    raise DeviceFault (as a flaky chip's runtime error does)
    hang            block the step (as a hung device call does) until the watchdog gives up on it
    nan[:logits]    NaN logits in one row of the step (as an overflow does)

Detection. An exception out of `engine.step()`; non-finite logits (StepGuard checks every step's
logits: one reduction and one host sync per step); a step running longer than `--step-timeout`
seconds (EngineLoop's watchdog thread).

Recovery (EngineLoop calls Recovery). The faulted engine is thrown away and a fresh one of the
same shape is built (new KV cache, new fused weight copies) after the model's weights are restored
from a pristine host copy taken at load (a fault may have corrupted them on the device; memory:
one more copy of the weights in host RAM). Every request the engine held is added to the fresh
engine from its prompt, with the same sampling parameters: the server gives every sampled request
an explicit seed when it is first admitted, so the replay draws the same tokens. The tokens a
client already has are swallowed as they are replayed (each compared with the one sent), so a
stream continues where it stopped, without duplicated text. A request restarted more than
`--request-restarts` times, or whose replay diverges from what was sent (a near-tied logit rounding
the other way in a differently composed batch), ends with an OpenAI-style 500 `engine_fault`: the
JSON error of a non-streamed request, an error event then `data: [DONE]` on a stream. Never a
truncated answer marked `stop`. /health says `degraded` while an engine is rebuilt; if even the
rebuild fails, the server says `failed` (503) and fails every request it held.

Simplification, stated: a hung step runs in a thread that Python cannot kill. The watchdog
abandons it (a newer thread takes the requests over with a fresh engine; whatever the old one
computes later is dropped); an injected hang is released once abandoned, but a really hung device
call would keep its thread, and its engine's memory, until it returns. A device whose context is
lost for good needs a fresh process (run the server under a supervisor that restarts it); an engine
child process would isolate it, at the cost of copying every step's tokens between processes.
Restarts re-run the whole prompt and the tokens already sent: recovery costs one prefill plus
as many decode steps as the longest restarted answer had reached.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from tandem import accel
from tandem.errors import ConfigError
from tandem.infer.engine import Engine
from tandem.infer.server.protocol import APIError
from tandem.resilience.faults import DeviceFault, Fault, mtbf_faults, parse_schedule

log = logging.getLogger("tandem.serve")

SERVE_FAULTS = {"device_error": ("",), "hang": ("",), "nan": ("logits",)}   # kind -> targets, as faults.KINDS
ROLE = "engine"


class NonFiniteLogits(RuntimeError):
    """A step's logits hold NaN or infinity."""


# -----------------------------------------------------------------------------------------------
# Injection and detection inside the step


class EngineFaults:
    """The faults to inject: a schedule plus MTBF-drawn ones, fired once each by step number."""

    def __init__(self, scheduled: list[Fault], mtbf: float = 0.0, seed: int = 0):
        self.pending = list(scheduled)
        self.random: Iterator[Fault] = mtbf_faults(mtbf, seed, SERVE_FAULTS, SERVE_FAULTS, ROLE)
        self.next_random = next(self.random, None)
        self.step = 0
        self.lock = threading.Lock()
        self.hangs: list[threading.Event] = []         # injected hangs waiting to be released

    @classmethod
    def parse(cls, schedule: str, mtbf: float = 0.0, seed: int = 0) -> "EngineFaults | None":
        """From `--fault` text (ConfigError, one line, if it does not parse), `--fault-mtbf` and
        `--fault-seed`; None when neither asks for a fault."""
        faults = parse_schedule(schedule, "--fault", SERVE_FAULTS, ROLE)
        for fault in faults:
            if fault.role != ROLE:
                raise ConfigError(f"fault '{fault.key}' in --fault names role '{fault.role}'; the server's "
                                  f"faults hit its engine: write KIND@STEP, e.g. hang@30")
        if not mtbf >= 0:
            raise ConfigError(f"--fault-mtbf must be >= 0 engine steps (0: no random faults), got {mtbf}")
        return cls(faults, mtbf, seed) if faults or mtbf > 0 else None

    def due(self) -> list[Fault]:
        """Count one step; the faults due at it."""
        with self.lock:
            self.step += 1
            due = [f for f in self.pending if f.step == self.step]
            self.pending = [f for f in self.pending if f.step > self.step]
            while self.next_random is not None and self.next_random.step <= self.step:
                due.append(self.next_random)
                self.next_random = next(self.random, None)
        return due

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        for fault in self.due():
            log.warning("fault injected: %s (engine step %d)", fault.key, self.step)
            if fault.kind == "device_error":
                raise DeviceFault(f"injected device error at engine step {self.step}")
            if fault.kind == "hang":
                released = threading.Event()
                with self.lock:
                    self.hangs.append(released)
                released.wait()
            else:
                row = random.Random(f"{fault.key}").randrange(logits.shape[0])
                logits = logits.index_fill(0, torch.tensor([row], device=logits.device), float("nan"))
        return logits

    def release_hangs(self) -> None:
        """Let the injected hangs return (their steps have been abandoned)."""
        with self.lock:
            hangs, self.hangs = self.hangs, []
        for event in hangs:
            event.set()


class StepGuard:
    """The engine's logits_hook: inject the faults due at this step, then refuse non-finite logits."""

    def __init__(self, faults: EngineFaults | None):
        self.faults = faults

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.faults is not None:
            logits = self.faults(logits)
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("the engine step produced non-finite logits")
        return logits


# -----------------------------------------------------------------------------------------------
# Recovery


@dataclass
class RecoveryPolicy:
    step_timeout: float | None = 300.0   # seconds a step may run before it counts as hung; None: no watchdog
    max_restarts: int = 2                # restarts of one request before it ends with an error
    faults: EngineFaults | None = None


class Recovery:
    """Builds the engines and restarts their requests; keeps the fault counts /metrics reports."""

    def __init__(self, engine: Engine, policy: RecoveryPolicy):
        self.policy = policy
        self.model = engine.model
        self.shape = dict(max_batch=engine.max_batch, max_len=engine.max_len, seed=engine.seed)
        self.pristine = _host_copy(engine.model)
        self.guard = StepGuard(policy.faults)
        engine.logits_hook = self.guard
        self.faults = 0                           # faults detected, and by kind
        self.kinds = {"device_error": 0, "hang": 0, "nonfinite": 0}
        self.restarted = self.failed = 0          # sequences restarted, sequences ended with an error
        self.rebuilds, self.rebuild_seconds = 0, 0.0
        self.recovering = False                   # between a fault and a fresh engine taking over
        self.broken: str | None = None            # why even rebuilding failed (the server is then down)
        self.seeds = random.Random(f"serve/{engine.seed}")

    def fix_seed(self, job) -> None:
        """A sampled job without a seed gets one now, so that a restart draws the same tokens."""
        if job.params.temperature > 0 and job.params.seed is None:
            job.params = dataclasses.replace(job.params, seed=self.seeds.getrandbits(63))

    def rebuild(self) -> Engine:
        """A fresh engine of the same shape over the restored weights. The caller has dropped every
        reference to the old engine (unless a hung thread still holds it), so its cache is freed
        first: the fault may have been out-of-memory."""
        t0 = time.perf_counter()
        gc.collect()
        accel.empty_cache(self.model.lm_head.weight.device)
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():      # in place, one tensor at a time
                tensor.copy_(self.pristine[name])
        engine = Engine(self.model, **self.shape)
        engine.logits_hook = self.guard
        self.rebuilds, self.rebuild_seconds = self.rebuilds + 1, self.rebuild_seconds + time.perf_counter() - t0
        return engine

    def restart(self, job, engine: Engine, reason: str) -> APIError | None:
        """Add `job` again to the fresh engine (its tokens already sent will be swallowed), or the
        error that ends it once it has used up its restarts."""
        if job.restarts >= self.policy.max_restarts:
            self.failed += 1
            return APIError(500, f"generation failed: the engine faulted ({reason}) and this request was already "
                                 f"restarted {job.restarts} time(s), the server's limit (--request-restarts)",
                            "server_error", code="engine_fault")
        job.restarts += 1
        job.skip = len(job.sent)
        job.rid = engine.add(job.prompt, job.params)
        self.restarted += 1
        return None

    def replay(self, job, token: int) -> APIError | bool:
        """Whether a restarted job's token is one the client already has (True: swallow it), or
        the error ending a replay that diverged from what was sent."""
        if not job.skip:
            return False
        expected = job.sent[len(job.sent) - job.skip]
        job.skip -= 1
        if token == expected:
            return True
        self.failed += 1
        return APIError(500, "generation failed: after an engine fault the restarted answer diverged from the part "
                             "already sent, so it cannot be continued", "server_error", code="engine_fault")

    def release_hangs(self) -> None:
        if self.policy.faults is not None:
            self.policy.faults.release_hangs()


def _host_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights copied to host memory, tied tensors copied once."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out
