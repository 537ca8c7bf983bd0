"""`tandem chaos`: a training job under injected faults, next to a fault-free twin.

    tandem chaos --preset smoke --out runs/chaos --faults kill@7,hang@12,nan@15,kill:ckpt@16 \\
        --set resilience.heartbeat_timeout=3
    tandem chaos --preset tiny --out runs/chaos --mtbf 50 --fault-seed 1 --kinds kill,device_error
    tandem chaos --init runs/demo --preset smoke --out runs/chaos-rl --faults kill@2,rollout1/kill@1 \
        --set rl.mode=sync --set rollout.timeout=10                                      (GRPO)

Both jobs are the real CLI in subprocesses, one after the other: `tandem sft ... --supervise` (with
--init: `tandem rl --init ... --supervise`) into OUT/twin, then the same command with the faults
added to its config into OUT/chaos. The report:

    faults injected   what faults.jsonl says fired (a scheduled fault may never come due)
    faults detected   injected faults matched to what they caused (incidents.jsonl; caused_by): a
                      kill to the crash of its process, a hang to the watchdog's, a device error to
                      the trainer's DeviceFault at its step, NaN/inf/spike to a guard skip at its
                      step (or a corruption vote), a silent corruption (bit flips, swaps) to the
                      vote whose window holds its step, a damaged checkpoint to the rejection of that
                      checkpoint, a rollout worker's kill or hang to the worker pool's handling
    detection latency the steps from a data fault to the vote or skip that found it
    restarts          the supervisor's restarts
    goodput           useful step time / wall time, each job its own: useful step time is the time
                      spent in the steps of the final timeline (a step redone after a crash counts
                      once; carried in checkpoints), wall time runs from the launch of the command
                      to its exit (interpreter start, imports and tokenizer training included: a
                      restart pays part of them again, and a user waits for all of them)
    time lost         the job's wall time not spent in useful steps, minus the twin's
    final weights     SHA-256 fingerprints of both final checkpoints; identical unless the guard
                      skipped updates (a skipped update is a different, deliberate trajectory)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tandem.config import load_config
from tandem.errors import ConfigError, ModelError
from tandem.model import weights_fingerprint
from tandem.progress import log
from tandem.runs import read_summary
from tandem.resilience.supervisor import SUPERVISOR_FILE
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.resilience.faults import FAULTS_FILE, SILENT_KINDS, configured_faults, schedule_text
from tandem.resilience.incidents import INCIDENTS_FILE, read_jsonl

PROCESS_FAULTS = ("kill", "hang", "device_error", "ckpt_truncate", "ckpt_bitflip")  # each costs a restart
DETECTED_BY = {"kill": ("crash",), "hang": ("hang",), "device_error": ("device_fault", "crash"),
               "nan": ("skip", "corruption"), "inf": ("skip", "corruption"), "spike": ("skip", "corruption"),
               **{kind: ("corruption", "skip") for kind in SILENT_KINDS}, "ckpt_truncate": ("checkpoint_rejected",),
               "ckpt_bitflip": ("checkpoint_rejected",)}
WORKER_DETECTED_BY = ("worker_fault",)  # any fault of a rollout worker (roles other than the trainer)


@dataclass
class JobResult:
    folder: Path
    returncode: int
    wall: float                        # seconds, launch of the command -> its exit
    useful: float                      # seconds in the steps of the final timeline
    restarts: int
    fingerprint: str | None
    skipped_updates: int
    faults: list[dict] = field(default_factory=list)     # faults.jsonl
    incidents: list[dict] = field(default_factory=list)  # incidents.jsonl


def run_job(job: list[str], folder: Path, overrides: list[str], max_restarts: int,
            during: Callable[[subprocess.Popen], object] | None = None) -> JobResult:
    """`tandem JOB --out FOLDER --supervise` in a subprocess, e.g. JOB = ["sft", "--preset", "smoke"];
    its output goes to FOLDER.log. `during(process)`, if given, runs while the job does (faults sent
    from outside: resilience/outside.py). A pipeline's weights are those of its last training phase."""
    command = [sys.executable, "-m", "tandem.cli", *job, *sum((["--set", o] for o in overrides), []),
               "--out", str(folder), "--quiet", "--supervise", "--max-restarts", str(max_restarts)]
    started = time.time()
    with open(folder.with_name(folder.name + ".log"), "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(process)
        except BaseException:
            process.terminate()  # the supervisor ends its child's process group on SIGTERM
            process.wait()
            raise
        returncode = process.wait()
    wall = time.time() - started
    phase = job[0] if job[0] != "pipeline" else "rl" if (folder / "checkpoints" / "rl").is_dir() else "sft"
    supervision = json.loads((folder / SUPERVISOR_FILE).read_text()) if (folder / SUPERVISOR_FILE).is_file() else {}
    latest = latest_valid(folder / "checkpoints" / phase)
    final = load_checkpoint(latest) if latest else None
    stats = read_summary(folder).get(phase, {})
    return JobResult(folder, returncode, wall, stats.get("useful_seconds", stats.get("seconds", 0.0)),
                     supervision.get("restarts", 0), weights_fingerprint(final["model"]) if final else None,
                     len(final["train_state"].get("guard", {}).get("skipped", [])) if final else 0,
                     read_jsonl(folder / FAULTS_FILE), read_jsonl(folder / INCIDENTS_FILE))


def caused_by(fault: dict, incident: dict) -> bool:
    """Whether `incident` can be the detection of `fault`, by a causal link, not just its kind:
    - a kill, hang or device error: an incident of the process (attempt) the fault struck;
    - a data fault (NaN, spike, bit flips...): a skip at the fault's own step, or a corruption vote
      of the same attempt whose window (the last check that passed, `since`, up to the vote's step)
      holds the fault's step;
    - a damaged checkpoint: the rejection of that very checkpoint by a later attempt;
    - a rollout worker's fault: the trainer's worker-fault incident in that attempt, at or after it."""
    kinds = DETECTED_BY[fault["kind"]] if fault["role"] == "trainer" else WORKER_DETECTED_BY
    if incident["kind"] not in kinds:
        return False
    same_attempt = incident.get("attempt") == fault.get("attempt")
    if fault["role"] != "trainer":
        return same_attempt and (incident["step"] or 0) >= fault["step"]
    if fault["kind"] in ("ckpt_truncate", "ckpt_bitflip"):
        damaged = Path(fault.get("damaged") or "").parent.name
        return (incident.get("attempt", 0) > fault.get("attempt", 0) and damaged.startswith("step_")
                and incident["step"] == int(damaged[5:]))
    if fault["kind"] in PROCESS_FAULTS:
        return same_attempt and (incident["kind"] != "device_fault" or incident["step"] == fault["step"])
    if incident["kind"] == "corruption" and "since" in incident:
        return same_attempt and incident["since"] <= fault["step"] <= incident["step"]
    return same_attempt and incident["step"] == fault["step"]


def match_detections(faults: list[dict], incidents: list[dict]) -> tuple[list[dict], list[dict]]:
    """Pair each injected fault (in time order) with the first still unpaired incident that it
    caused (caused_by); a corruption vote covers its whole window (since, step], so it may be paired
    with every fault in it (a repair or rollback undoes them all). Returns (detected, undetected) faults, each detected one with "detected_by"
    and, for faults inside a training step, "latency_steps" (the step of the detection minus the
    fault's)."""
    pairs: dict[int, int] = {}
    for f, fault in sorted(enumerate(faults), key=lambda item: item[1]["time"]):
        match = next((i for i, inc in enumerate(incidents)
                      if (i not in pairs.values() or "since" in inc) and inc["time"] >= fault["time"]
                      and caused_by(fault, inc)), None)
        if match is not None:
            pairs[f] = match
    detected = []
    for f, fault in enumerate(faults):
        if f in pairs:
            incident = incidents[pairs[f]]
            latency = incident["step"] - fault["step"] if fault["kind"] not in PROCESS_FAULTS else None
            detected.append(dict(fault, detected_by=incident["kind"], latency_steps=latency))
    return detected, [fault for f, fault in enumerate(faults) if f not in pairs]


@dataclass
class ChaosReport:
    job: str
    preset: str
    steps: int
    schedule: str
    twin: JobResult
    chaos: JobResult
    injected: list[dict]
    detected: list[dict]
    undetected: list[dict]

    @property
    def time_lost(self) -> float:
        return (self.chaos.wall - self.chaos.useful) - (self.twin.wall - self.twin.useful)

    @property
    def identical(self) -> bool:
        return self.twin.fingerprint is not None and self.twin.fingerprint == self.chaos.fingerprint

    def to_dict(self) -> dict:
        return {"job": self.job, "preset": self.preset, "steps": self.steps, "schedule": self.schedule,
                "faults_injected": len(self.injected), "faults_detected": len(self.detected),
                "undetected": [f["fault"] for f in self.undetected],
                "latency_steps": [f["latency_steps"] for f in self.detected if f["latency_steps"] is not None], "restarts": self.chaos.restarts,
                "twin_wall_s": self.twin.wall, "chaos_wall_s": self.chaos.wall,
                "time_lost_s": self.time_lost, "twin_useful_s": self.twin.useful, "useful_s": self.chaos.useful,
                "twin_goodput": self.twin.useful / self.twin.wall if self.twin.wall else None,
                "goodput": self.chaos.useful / self.chaos.wall if self.chaos.wall else None,
                "skipped_updates": self.chaos.skipped_updates, "identical": self.identical,
                "twin_fingerprint": self.twin.fingerprint, "chaos_fingerprint": self.chaos.fingerprint,
                "chaos_exit": self.chaos.returncode}

    def text(self) -> str:
        d = self.to_dict()
        kinds = Counter(f["kind"] for f in self.injected)
        by = Counter(f["detected_by"] for f in self.detected)
        causes = [f"the guard skipped {self.chaos.skipped_updates} update(s)"] if self.chaos.skipped_updates else []
        causes += [f"{len(self.undetected)} fault(s) went undetected"] if self.undetected else []
        if self.identical:
            verdict = "identical"
        else:
            verdict = f"differ ({'; '.join(causes)})" if causes else "DIFFER (unexplained)"
        rows = [("wall time", f"{d['twin_wall_s']:.1f} s", f"{d['chaos_wall_s']:.1f} s", ""),
                ("restarts", "0", str(d["restarts"]), ""),
                ("faults injected", "-", str(len(self.injected)), ", ".join(f"{k} {n}" for k, n in kinds.items())),
                ("faults detected", "-", f"{len(self.detected)} / {len(self.injected)}",
                 ", ".join(f"{k} {n}" for k, n in by.items())),
                ("detection latency", "-", _latency_text(d["latency_steps"]), "steps, data faults"),
                ("time lost", "-", f"{d['time_lost_s']:.1f} s", ""),
                ("goodput", f"{d['twin_goodput']:.1%}", f"{d['goodput']:.1%}", "useful step time / wall time"),
                ("final weights", (self.twin.fingerprint or "-")[:12], (self.chaos.fingerprint or "-")[:12], verdict)]
        lines = [f"chaos: {self.job}, preset {self.preset}, {self.steps} steps; faults {self.schedule or '(none)'}",
                 f"  {'':18s}{'fault-free twin':>16s}{'under faults':>16s}"]
        lines += [f"  {name:18s}{a:>16s}{b:>16s}   {note}".rstrip() for name, a, b, note in rows]
        if self.undetected:
            lines.append(f"  undetected: {', '.join(f['fault'] for f in self.undetected)}")
        if self.chaos.returncode != 0:
            lines.append(f"  the job under faults did not finish (exit {self.chaos.returncode}); see "
                         f"{self.chaos.folder}.log")
        return "\n".join(lines)


def _latency_text(latencies: list[int]) -> str:
    return f"max {max(latencies)}" if latencies else "-"


def run_chaos(preset: str | None, config: str | None, overrides: list[str], out: Path, faults: str = "",
              mtbf: float = 0.0, fault_seed: int = 0, kinds: list[str] | None = None,
              max_restarts: int | None = None, init: str | None = None) -> ChaosReport:
    """The twin, then the job under faults: SFT, or GRPO from `init`; preset/config/overrides
    (--set) are given to both jobs."""
    out = Path(out)
    job = ["rl", "--init", str(Path(init).resolve())] if init else ["sft"]
    job += ["--preset", preset] if preset else ["--config", str(config)] if config else []
    fault_overrides = [f"resilience.faults={json.dumps(faults)}", f"resilience.mtbf={mtbf}",
                       f"resilience.fault_seed={fault_seed}"]
    if kinds:
        fault_overrides.append(f"resilience.mtbf_kinds={json.dumps(kinds)}")
    cfg = load_config(preset, config, overrides + fault_overrides)  # the job's own checks, before any work
    if init and not Path(init).exists():
        raise ModelError(f"--init path not found: {init}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; tandem chaos needs a new --out (it runs two jobs from scratch)")
    steps = cfg.rl.steps if init else cfg.sft.steps
    schedule = configured_faults(cfg.resilience, steps)
    if max_restarts is None:
        max_restarts = sum(f.kind in PROCESS_FAULTS for f in schedule) + 3
    out.mkdir(parents=True, exist_ok=True)
    log(f"chaos: fault-free twin -> {out / 'twin'}")
    twin = run_job(job, out / "twin", overrides, max_restarts)
    if twin.returncode != 0:
        raise ConfigError(f"the fault-free twin failed (exit {twin.returncode}); see {out / 'twin.log'}")
    log(f"chaos: {len(schedule)} scheduled fault(s) -> {out / 'chaos'}")
    chaos = run_job(job, out / "chaos", overrides + fault_overrides, max_restarts)
    injected = [f for f in chaos.faults if f.get("damaged", "") is not None]  # nothing to damage: a no-op
    detected, undetected = match_detections(injected, chaos.incidents)
    return ChaosReport(job[0], cfg.preset or "custom", steps, schedule_text(schedule), twin, chaos, injected,
                       detected, undetected)
