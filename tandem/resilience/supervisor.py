"""Run a training job as a child process and keep it going: restart it after a crash or a hang.

    tandem sft      --preset tiny --out runs/x --supervise [--max-restarts 3]
    tandem pipeline --preset tiny --out runs/x --supervise
    tandem rl --init runs/x --out runs/x-rl --supervise

The child runs the same command without supervision and, like any rerun into the same folder,
resumes from the newest valid checkpoint. It is a fork of the supervisor, which has imported torch
and tandem but never touched a device (so forking is safe: device runtimes start in the child),
so a restart costs a checkpoint load, not the 2-4 s of a fresh interpreter and torch import.
The child gets its own process group, and everything it started is killed with it.

Watchdog: the trainer rewrites runs/NAME/heartbeat-ROLE.json at every step, and the pipeline's
eval and export stages rewrite theirs (step null) at least once a second while they work (at each
decode step, prompt or phase: tandem.progress.keep_alive). When no heartbeat has been written for
resilience.heartbeat_timeout seconds (resilience.startup_timeout before the first one of an
attempt), the job is hung, wherever it stopped (mid-backward, in eval, in export): its process
group gets SIGKILL and it is restarted. A heartbeat marked idle (a phase is over, the next one is
starting: loading a model, spawning workers) disarms the watchdog until the next beat; only that
start-up gap is unwatched.

Restarts follow a crash (any exit status but 0, 2, 3 and 130) or a hang. A restart that follows
progress (a step beyond any reached before) is immediate; restarts without progress in between
back off: resilience.backoff seconds, doubling, capped at resilience.backoff_max. After
--max-restarts restarts in all (as torchrun counts them) the supervisor gives up and prints every
attempt. Exit status 2 (a user mistake: bad config, missing file), 3 (training failed: it kept
rolling back without progress, errors.TrainingFailed) and 130 (interrupted) are not retried: a
restart cannot fix them. Attempts go to runs/NAME/supervisor.json, crashes and hangs to
runs/NAME/incidents.jsonl.

Across machines, torchrun plays this role: `torchrun --max-restarts 3 ... -m tandem.cli rl ...`
restarts the whole group after a rank dies, and every rank resumes from the same run folder (on a
shared filesystem). torchrun has no step heartbeat; a rank stuck in a collective is ended by the
process group's timeout. Simplification: this supervisor needs os.fork (Linux, macOS).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tandem.errors import TandemError
from tandem.progress import log
from tandem.runs import read_run_config, write_json_atomic
from tandem.resilience.incidents import ATTEMPT_ENV, HEARTBEAT_GLOB, INCIDENTS_FILE, append_jsonl

SUPERVISOR_FILE = "supervisor.json"
NOT_RETRIED = {0: "done", 2: "user_error", 3: "failed", 130: "interrupted"}


@dataclass
class Policy:
    max_restarts: int = 3
    heartbeat_timeout: float = 30.0
    startup_timeout: float = 300.0
    backoff: float = 1.0
    backoff_max: float = 30.0

    @classmethod
    def from_config(cls, r, max_restarts: int) -> "Policy":
        return cls(max_restarts, r.heartbeat_timeout, r.startup_timeout, r.backoff, r.backoff_max)


@dataclass
class Attempt:
    number: int
    started: float                 # time.time()
    waited: float = 0.0            # backoff before it started, seconds
    detected: float = 0.0          # when the supervisor saw it exit, or declared it hung
    ended: float = 0.0             # when it and its process group were gone
    outcome: str = ""              # done | crashed | hung | user_error | failed | interrupted
    detail: str = ""               # "killed by SIGKILL", "exit status 1", "no heartbeat for 30.0 s"
    first_step: int | None = None  # first and last step it reported in a heartbeat
    last_step: int | None = None
    first_beat: float | None = None  # when it started its first step

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Supervision:
    attempts: list[Attempt] = field(default_factory=list)
    gave_up: bool = False

    @property
    def restarts(self) -> int:
        return len(self.attempts) - 1

    @property
    def exit_code(self) -> int:
        last = self.attempts[-1].outcome
        return {outcome: code for code, outcome in NOT_RETRIED.items()}.get(last, 1)

    def to_dict(self) -> dict:
        return {"restarts": self.restarts, "gave_up": self.gave_up, "outcome": self.attempts[-1].outcome,
                "attempts": [dict(asdict(a), seconds=a.seconds) for a in self.attempts]}

    def report(self) -> str:
        """What happened, one line per attempt when there was more than one."""
        last = self.attempts[-1]
        if self.gave_up:
            head = f"supervisor: gave up after {self.restarts} restart(s)"
        else:
            head = f"supervisor: {last.outcome} after {self.restarts} restart(s)"
        if len(self.attempts) == 1:
            return head
        lines = [head + ":"]
        for a in self.attempts:
            steps = f"steps {a.first_step}-{a.last_step}" if a.last_step is not None else "no step"
            waited = f", after {a.waited:.1f} s backoff" if a.waited else ""
            lines.append(f"  #{a.number:<3d}{a.outcome:9s}{a.detail:28s}{steps:16s}{a.seconds:7.1f} s{waited}")
        if self.gave_up:
            lines.append("the run folder keeps its valid checkpoints: fix the cause, then rerun the same command "
                         "to resume")
        return "\n".join(lines)


def backoff_delay(restarts_without_progress: int, base: float, cap: float) -> float:
    """0 for a restart right after progress, then base, 2 base, 4 base, ... capped at cap."""
    if restarts_without_progress <= 0:
        return 0.0
    return min(cap, base * 2 ** (restarts_without_progress - 1))


def preload() -> None:
    """Import what a training child needs, once, so every fork starts warm. torch.optim imports
    torch._dynamo lazily on first use (seconds), hence the explicit import; the caller has imported
    its job's own modules (the CLI imports tandem.pipeline before it supervises a command)."""
    import torch._dynamo  # noqa: F401


def latest_heartbeat(run_dir: Path, since: float) -> dict | None:
    """The newest heartbeat of any role written after `since`."""
    newest = None
    for path in Path(run_dir).glob(HEARTBEAT_GLOB):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if beat["time"] >= since and (newest is None or beat["time"] > newest["time"]):
            newest = beat
    return newest


def _start(job: Callable[[], int], attempt: int) -> int:
    """Fork; the child runs job() in its own process group and exits with its status."""
    if not hasattr(os, "fork"):
        raise TandemError("--supervise needs os.fork (Linux or macOS); elsewhere use torchrun --max-restarts")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        os.environ[ATTEMPT_ENV] = str(attempt)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        code = int(job() or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _outcome(status: int) -> tuple[str, str]:
    code = os.waitstatus_to_exitcode(status)
    if code in NOT_RETRIED:
        return NOT_RETRIED[code], f"exit status {code}"
    if code < 0:
        return "crashed", f"killed by {signal.Signals(-code).name}"
    return "crashed", f"exit status {code}"


def _watch(pid: int, attempt: Attempt, run_dir: Path, policy: Policy, poll: float) -> tuple[str, str]:
    """Wait for the child to exit or to stop beating; returns (outcome, detail)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        beat = latest_heartbeat(run_dir, attempt.started)
        if beat is not None and beat["step"] is not None:  # eval and export beat with no step
            if attempt.first_step is None:
                attempt.first_step, attempt.first_beat = beat["first_step"], beat["first_time"]
            attempt.last_step = beat["step"]
        if done:
            attempt.detected = time.time()
            return _outcome(status)
        if beat is not None and beat["idle"]:
            deadline = None
        else:
            deadline = beat["time"] + policy.heartbeat_timeout if beat else attempt.started + policy.startup_timeout
        now = time.time()
        if deadline is not None and now >= deadline:
            attempt.detected = now
            _kill_group(pid)
            os.waitpid(pid, 0)
            silent = now - (beat["time"] if beat else attempt.started)
            return "hung", f"no heartbeat for {silent:.1f} s"
        time.sleep(poll if deadline is None else max(0.001, min(poll, deadline - now)))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _record(run_dir: Path, supervision: Supervision, attempt: Attempt) -> None:
    """supervisor.json and the incident log, once the child has created the run folder (a folder
    with a config.json that is not tandem's was refused by the child, and is left untouched)."""
    if read_run_config(run_dir) is None:
        return
    write_json_atomic(run_dir / SUPERVISOR_FILE, supervision.to_dict())
    if attempt.outcome in ("crashed", "hung"):
        append_jsonl(run_dir / INCIDENTS_FILE, {
            "kind": "hang" if attempt.outcome == "hung" else "crash", "step": attempt.last_step,
            "detail": attempt.detail, "role": "supervisor", "time": attempt.detected, "pid": os.getpid(),
            "attempt": attempt.number})


def supervise(job: Callable[[], int], run_dir: str | Path, policy: Policy, poll: float = 0.02) -> Supervision:
    """Run job() in forked children until one finishes (or the policy gives up)."""
    preload()
    run_dir = Path(run_dir)
    supervision = Supervision()
    best, without_progress = -1, 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            waited = backoff_delay(without_progress, policy.backoff, policy.backoff_max)
            if waited:
                log(f"supervisor: no progress since the last restart; waiting {waited:.1f} s")
                time.sleep(waited)
            attempt = Attempt(len(supervision.attempts) + 1, time.time(), waited)
            supervision.attempts.append(attempt)
            pid = _start(job, attempt.number)
            try:
                attempt.outcome, attempt.detail = _watch(pid, attempt, run_dir, policy, poll)
            except KeyboardInterrupt:
                _kill_group(pid, signal.SIGTERM)
                deadline = time.time() + 10
                while time.time() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0:
                    time.sleep(0.05)
                attempt.outcome, attempt.detail, attempt.detected = "interrupted", "by the user", time.time()
            _kill_group(pid)  # anything the child left running
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # already reaped
            attempt.ended = time.time()
            restarts_left = policy.max_restarts - supervision.restarts
            supervision.gave_up = attempt.outcome in ("crashed", "hung") and restarts_left <= 0
            _record(run_dir, supervision, attempt)
            if attempt.outcome not in ("crashed", "hung") or supervision.gave_up:
                return supervision
            progressed = attempt.last_step is not None and attempt.last_step > best
            best = max(best, attempt.last_step if attempt.last_step is not None else -1)
            without_progress = 0 if progressed else without_progress + 1
            log(f"supervisor: attempt {attempt.number} {attempt.outcome} ({attempt.detail}) at step "
                f"{attempt.last_step}; restarting ({supervision.restarts + 1}/{policy.max_restarts})")
    finally:
        signal.signal(signal.SIGTERM, previous)
