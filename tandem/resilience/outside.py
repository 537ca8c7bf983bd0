"""Faults sent from outside a supervised job, as an operator's `kill -9` or a frozen chip would land:
at a random wall-clock time, wherever the process happens to be.

    job = subprocess.Popen([... "tandem", "sft", ..., "--supervise"])
    strikes = strike_at_random(job, run_dir, random.Random(seed), [signal.SIGKILL, signal.SIGSTOP])

faults.py injects at fixed points of the trainer's own code (after the backward, between fsync and
manifest, at the start of a step); here a trial loop in another process picks the moment: it waits
for the job's training child to reach a random step, then for a random fraction of a step's
duration more, and sends the signal to the process named by the newest working heartbeat
(heartbeat-ROLE.json, resilience/incidents.py). So a SIGKILL may land inside save_file, the
rename, pruning, optimizer.step or the metrics write, and a SIGSTOP (a hang: the process is frozen,
as a hung device leaves it) mid-backward or between heartbeats, not right after one. With
roles=("eval",) or ("export",) it waits for that stage of the pipeline instead, then strikes a random
fraction of a second into it. Between strikes it waits for the supervisor's restart (a heartbeat
from another process).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.resilience.incidents import HEARTBEAT_GLOB


@dataclass
class Strike:
    signal: str           # SIGKILL | SIGSTOP
    time: float           # time.time() when it was sent
    pid: int
    role: str             # whose heartbeat named the process: trainer, eval, export
    step: int | None      # the step of that heartbeat (None for eval and export)


def working_beat(run_dir: Path, roles: tuple[str, ...]) -> dict | None:
    """The newest heartbeat of one of `roles` that is not idle, with its role added."""
    newest = None
    for path in Path(run_dir).glob(HEARTBEAT_GLOB):
        role = path.stem.removeprefix("heartbeat-")
        try:
            beat = dict(json.loads(path.read_text()), role=role)
        except (OSError, ValueError):
            continue  # being replaced right now
        if role in roles and not beat["idle"] and (newest is None or beat["time"] > newest["time"]):
            newest = beat
    return newest


def _wait_for(job: subprocess.Popen, ready, poll: float = 0.01) -> dict | None:
    """Poll until ready() returns a beat (returned) or the job has exited (None)."""
    while job.poll() is None:
        beat = ready()
        if beat:
            return beat
        time.sleep(poll)
    return None


def strike_once(job: subprocess.Popen, run_dir: Path, rng: random.Random, sig: int,
                roles: tuple[str, ...] = ("trainer",), max_step: int = 1 << 30) -> Strike | None:
    """One signal at a random moment of the job's current child (None: the job ended first).
    Training: a random step in 1..max_step of those still ahead, then a random fraction of the
    measured step time. Eval or export: a random 0..1 s into the stage."""
    first = _wait_for(job, lambda: working_beat(run_dir, roles))
    if first is None:
        return None
    if first["step"] is None:
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        target = rng.randint(first["step"] + 1, max(first["step"] + 1, max_step))
        reached = _wait_for(job, lambda: (b := working_beat(run_dir, roles)) and b["step"] is not None
                            and b["step"] >= target and b)
        if reached is None:
            return None
        step_seconds = (reached["time"] - first["time"]) / max(1, reached["step"] - first["step"])
        time.sleep(rng.uniform(0.0, step_seconds))
    beat = working_beat(run_dir, roles)
    if job.poll() is not None or beat is None:
        return None
    try:
        os.kill(beat["pid"], sig)
    except ProcessLookupError:
        return None  # that child ended between the read and the signal
    return Strike(signal.Signals(sig).name, time.time(), beat["pid"], beat["role"], beat["step"])


def strike_at_random(job: subprocess.Popen, run_dir: Path, rng: random.Random, signals: list[int],
                     roles: tuple[str, ...] = ("trainer",), max_step: int = 1 << 30) -> list[Strike]:
    """Each of `signals` in turn at a random moment (strike_once), waiting for the supervisor's
    restart between them; stops early if the job ends. Returns what was sent."""
    sent = []
    for sig in signals:
        strike = strike_once(job, Path(run_dir), rng, sig, roles, max_step)
        if strike is None:
            break
        sent.append(strike)
        _wait_for(job, lambda: (b := working_beat(run_dir, ("trainer", "eval", "export"))) and b["pid"] != strike.pid
                  and b["time"] > strike.time and b)
    return sent
