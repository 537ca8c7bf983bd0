"""The run folder's resilience logs: incidents.jsonl, heartbeat-ROLE.json, and the JSON-lines helpers that
faults.jsonl (resilience/faults.py) uses too.

Heartbeat: the trainer rewrites runs/NAME/heartbeat-ROLE.json at every step, and the pipeline's eval
and export stages rewrite theirs while they work (heartbeat-eval.json, heartbeat-export.json, through
tandem.progress.keep_alive); the supervisor (resilience/supervisor.py) declares the job hung when
none has been written for a while.

Incidents: what was detected (skips, rollbacks, corruption, rejected checkpoints, device faults,
and the supervisor's crashes and hangs) goes to runs/NAME/incidents.jsonl; `tandem chaos` matches
it against faults.jsonl.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from tandem.progress import keeping_alive, log

INCIDENTS_FILE = "incidents.jsonl"
HEARTBEAT_GLOB = "heartbeat-*.json"
ATTEMPT_ENV = "TANDEM_SUPERVISED_ATTEMPT"  # set by the supervisor in each child: its attempt number


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it: it must survive the SIGKILL that may follow at once."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return records


def attempt_number() -> int:
    """Which attempt of a supervised job this process is (1 when not supervised)."""
    return int(os.environ.get(ATTEMPT_ENV, "1"))


class Incidents:
    """Append-only log of what was detected and done about it (runs/NAME/incidents.jsonl).

    write=False only counts: a follower rank of a data-parallel group, whose leader records the same
    decisions (every rank decides alike)."""

    def __init__(self, run_dir: Path, role: str = "trainer", write: bool = True):
        self.path, self.role, self.write = Path(run_dir) / INCIDENTS_FILE, role, write
        self.counts: Counter = Counter()

    def record(self, kind: str, step: int | None, detail: str, **fields) -> None:
        """One incident; `fields` add to the record (a corruption's `since`: its last passing check)."""
        self.counts[kind] += 1
        if not self.write:
            return
        append_jsonl(self.path, {"kind": kind, "step": step, "detail": detail, "role": self.role,
                                 "time": time.time(), "pid": os.getpid(), "attempt": attempt_number(), **fields})
        log(f"resilience: {kind} at step {step}: {detail}")


class Heartbeat:
    """runs/NAME/heartbeat-ROLE.json, rewritten every step (temp file + rename, no fsync: it only has
    to be visible to the supervisor on this machine). Work that has no steps (eval, export) beats
    with step None: it proves the process is alive, not that training progressed."""

    def __init__(self, run_dir: Path, role: str = "trainer"):
        self.path = Path(run_dir) / f"heartbeat-{role}.json"
        self.first: tuple[int | None, float] | None = None  # step and time of this process's first beat
        self.last = 0.0                                      # time of the latest beat

    def beat(self, step: int | None, idle: bool = False) -> None:
        now = self.last = time.time()
        self.first = self.first or (step, now)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "time": now, "first_step": self.first[0],
                                   "first_time": self.first[1], "pid": os.getpid(), "idle": idle}))
        os.replace(tmp, self.path)

    def idle(self, step: int | None) -> None:
        """No more steps for now (the phase is over): the supervisor stops watching for a hang."""
        self.beat(step, idle=True)

    @contextmanager
    def working(self, every: float = 1.0):
        """While the block runs, every tandem.progress.keep_alive() call beats (step None), at most
        once per `every` seconds; the block's start beats, its end marks the heartbeat idle. For
        work between training phases (eval, export), which the watchdog must cover too: a hang
        there stops the calls, and with them the beats."""
        def alive() -> None:
            if time.time() - self.last >= every:
                self.beat(None)

        self.beat(None)
        try:
            with keeping_alive(alive):
                yield
        finally:
            self.idle(None)
