"""Training on hardware that crashes, hangs or silently corrupts data: fault injection, a NaN/spike
guard, silent-corruption detection, heartbeats and the run folder's fault and incident logs.

    tandem sft --preset smoke --out runs/x --supervise --set resilience.faults="kill@7,nan@12"
    tandem chaos --preset smoke --out runs/chaos --faults kill@7,hang@12,bitflip:grad@15

Both trainers (train/sft.py, train/grpo.py) call the same hooks and use five pieces:

* FaultInjector: injects the faults of a schedule, `[ROLE/]KIND[:TARGET]@STEP` joined by commas,
  or random ones at a mean time between faults (resilience.mtbf, seeded):

      kill            SIGKILL after the backward pass of STEP
      kill:ckpt       SIGKILL inside the first checkpoint write at or after STEP (files written,
                      manifest not yet): the most dangerous moment of a write
      hang            stop making progress at the start of STEP (sleep forever)
      device_error    raise DeviceFault after the backward pass, as a flaky chip does mid-step
      nan[:loss|grad] a NaN loss (default; multiplied in, so every gradient is NaN too, as with
                      a real overflow) or NaN in one gradient element
      inf[:loss|grad] the same with +inf
      spike           multiply every gradient by 1e4
      bitflip[:grad|weight]   flip one random bit of one element of a gradient (default), or of a
                      weight at rest before STEP
      ckpt_truncate   cut a file of the newest checkpoint short, then SIGKILL (the restart must
                      reject that checkpoint and resume from the one before)
      ckpt_bitflip    flip one bit in a file of the newest checkpoint, then SIGKILL

  ROLE is `trainer` (default) or a rollout worker: `rolloutR` for worker rank R (GRPO: ranks
  rl.trainers and up), or `rollout` for the lowest-ranked live one. A process injects its own
  role's faults; a rollout worker's kill and hang are delivered by the trainer that owns it
  (SIGKILL, SIGSTOP: see FaultInjector.strike). A data fault (nan, inf, spike, bitflip) hits one
  replica of the model, drawn from the fault's seed: one of SFT's in-process replicas, or the model
  of one GRPO trainer rank (rl.trainers > 1), where a gradient fault strikes after the gradient
  all-reduce (a NaN/inf loss before it, so the all-reduce spreads it to every rank).
  A fault fires ONCE per run folder: it is appended to runs/NAME/faults.jsonl (fsynced) before it
  acts, and a restarted process skips every fault found there, so kill@37 cannot loop forever.
  Simplification: a fault that fired in a stretch of steps later lost to a crash is not replayed
  (it happened once, in a timeline that was thrown away). Injection draws from its own seeded
  random.Random and never touches the training RNG streams.

* StepGuard: skips the update of a step whose loss or gradient norm is not finite, or whose
  gradient norm spikes (log norm more than `guard_zscore` std above the mean of the last
  `guard_window` accepted steps). `rollback_after` skips within the window roll back to the last
  checkpoint from before the trouble; if trouble recurs while replaying those steps it is not
  transient, so the guard only skips. When `max_rollbacks` rollbacks follow each other without
  progress (no update applied past the step the previous rollback left), the run gives up: it
  raises TrainingFailed (CLI exit 3) rather than rolling back forever and calling a run that never
  trained "done". It also gives up when it has skipped each of the last `guard_window` updates it
  was asked about (the bound that remains with rollback_after = 0, where it only skips);
  max_rollbacks = 0 turns both off. Its window and every decision are checkpointed
  (train_state.json), so a resumed run decides exactly like an uninterrupted one. GRPO asks it once
  per optimizer step (rl.updates_per_batch of them per batch); its trainer ranks feed it the loss
  and the gradient norm agreed over the group, so every rank decides alike.

* CorruptionDetector: every `check_every` steps, compares fingerprints of the weights and of the
  gradients (an integer checksum per tensor, computed on the device: any single flipped bit changes
  it) across replicas, and with one replica against a recomputation of the same step. A vote finds
  the bad replica (weights: against the fingerprint recorded after the previous update; gradients:
  against a recomputation), which is repaired from a healthy one; with no majority the trainer
  rolls back to the last checkpoint. The replicas are either
  - in-process model copies fed identical batches (SFT's resilience.replicas: dual modular
    redundancy, 2x compute), or
  - GRPO's data-parallel trainer ranks (RankCorruptionDetector, rl.trainers >= 2): after the
    gradient all-reduce every rank must hold the same gradient, and the same weights after the
    update, so the votes run on fingerprints all-gathered over the trainer group at no extra
    compute; a repair is a broadcast of weights and optimizer state (or of the gradient) from a
    healthy rank, and a recomputation is done by every rank (the all-reduce needs them all).
  One GRPO trainer rank is one replica, checked against a recomputation as SFT's single replica is.
  Fingerprints are exact, so the compared computations must be deterministic (same device kind,
  deterministic kernels: run.deterministic = true, which config validation requires for the
  detector; on CPU kernels always are). A step that rolls back more than `max_rollbacks` times
  raises CorruptionError instead of looping (a TrainingFailed: one line, exit 3, the supervisor does not retry it).

* Heartbeat: the trainer rewrites runs/NAME/heartbeat-ROLE.json at every step; the supervisor
  (tandem/supervisor.py) declares the job hung when none has been written for a while.

* Incidents: what was detected (skips, rollbacks, corruption, rejected checkpoints, device faults,
  and the supervisor's crashes and hangs) goes to runs/NAME/incidents.jsonl; `tandem chaos` matches
  it against faults.jsonl.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from tandem.errors import ConfigError, CorruptionError, TrainingFailed
from tandem.progress import log
from tandem.train.checkpoint import MANIFEST, list_checkpoints

FAULTS_FILE = "faults.jsonl"
INCIDENTS_FILE = "incidents.jsonl"
HEARTBEAT_GLOB = "heartbeat-*.json"
ATTEMPT_ENV = "TANDEM_SUPERVISED_ATTEMPT"  # set by the supervisor in each child: its attempt number

# kind -> allowed targets, the first being the default
KINDS = {"kill": ("", "ckpt"), "hang": ("",), "device_error": ("",), "nan": ("loss", "grad"),
         "inf": ("loss", "grad"), "spike": ("grad",), "bitflip": ("grad", "weight"),
         "ckpt_truncate": ("",), "ckpt_bitflip": ("",)}
SPIKE_FACTOR = 1e4


class DeviceFault(RuntimeError):
    """The accelerator failed mid-step (injected here; real ones are the vendor runtime's errors).

    Not a TandemError: it is not the user's mistake. The process exits with a traceback and the
    supervisor restarts it from the last checkpoint: after a real device error the device context
    is usually unusable, so a fresh process is the only safe recovery.
    """


# -----------------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    target: str = ""
    role: str = "trainer"

    @property
    def key(self) -> str:
        """Canonical name, e.g. "trainer/bitflip:grad@70": a fault with this key fires once per run."""
        return f"{self.role}/{self.kind}{':' + self.target if self.target else ''}@{self.step}"


def parse_fault(text: str, key: str = "resilience.faults") -> Fault:
    spec, at, step = text.strip().partition("@")
    role, _, kind_target = spec.rpartition("/")
    kind, _, target = kind_target.partition(":")
    usage = ("write [ROLE/]KIND[:TARGET]@STEP, e.g. kill@37 or bitflip:weight@80; kinds: "
             + ", ".join(f"{k}[:{'|'.join(t for t in targets if t)}]" if any(targets) else k
                         for k, targets in KINDS.items()))
    if not at or not step.strip().isdigit():
        raise ConfigError(f"bad fault '{text.strip()}' in {key}; {usage}")
    if kind not in KINDS or (target or KINDS[kind][0]) not in KINDS[kind]:
        raise ConfigError(f"unknown fault '{text.strip()}' in {key}; {usage}")
    if role and not (role.rstrip("0123456789").isalpha() and role.islower()):
        raise ConfigError(f"bad role '{role}' in fault '{text.strip()}'; roles look like trainer, rollout, rollout1")
    return Fault(kind, int(step), target or KINDS[kind][0], role or "trainer")


def parse_schedule(text: str, key: str = "resilience.faults") -> list[Fault]:
    """"kill@37,hang@50,nan@60" -> faults in step order (empty text: none); `key` names the config
    key in error messages."""
    faults = [parse_fault(part, key) for part in text.split(",") if part.strip()]
    return sorted(set(faults), key=lambda f: (f.step, f.key))


def mtbf_schedule(mtbf: float, seed: int, steps: int, kinds: Iterable[str]) -> list[Fault]:
    """Random faults with exponential gaps of mean `mtbf` steps over steps 1..steps-1, reproducible
    from `seed`; each is one of `kinds` (fault specs without @STEP, e.g. "kill", "bitflip:grad")."""
    kinds = list(kinds)
    rng, faults, step = random.Random(f"mtbf/{seed}"), [], 0
    while mtbf > 0 and kinds:
        step += max(1, round(rng.expovariate(1.0 / mtbf)))
        if step >= steps:
            break
        faults.append(parse_fault(f"{rng.choice(kinds)}@{step}"))
    return sorted(set(faults), key=lambda f: (f.step, f.key))


def configured_faults(r, steps: int) -> list[Fault]:
    """A ResilienceConfig's faults: its explicit schedule plus the MTBF-drawn ones."""
    return sorted(set(parse_schedule(r.faults) + mtbf_schedule(r.mtbf, r.fault_seed, steps, r.mtbf_kinds)),
                  key=lambda f: (f.step, f.key))


def schedule_text(faults: Iterable[Fault]) -> str:
    """Faults back to schedule syntax (the `trainer/` prefix and default targets left out)."""
    parts = []
    for f in faults:
        role = "" if f.role == "trainer" else f"{f.role}/"
        target = f":{f.target}" if f.target and f.target != KINDS[f.kind][0] else ""
        parts.append(f"{role}{f.kind}{target}@{f.step}")
    return ",".join(parts)


# -----------------------------------------------------------------------------------------------
# The run folder's logs: faults.jsonl, incidents.jsonl, heartbeat-ROLE.json


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

    def record(self, kind: str, step: int | None, detail: str) -> None:
        self.counts[kind] += 1
        if not self.write:
            return
        append_jsonl(self.path, {"kind": kind, "step": step, "detail": detail, "role": self.role,
                                 "time": time.time(), "pid": os.getpid(), "attempt": attempt_number()})
        log(f"resilience: {kind} at step {step}: {detail}")


class Heartbeat:
    """runs/NAME/heartbeat-ROLE.json, rewritten every step (temp file + rename, no fsync: it only has
    to be visible to the supervisor on this machine)."""

    def __init__(self, run_dir: Path, role: str = "trainer"):
        self.path = Path(run_dir) / f"heartbeat-{role}.json"
        self.first: tuple[int, float] | None = None  # step and time of this process's first beat

    def beat(self, step: int, idle: bool = False) -> None:
        now = time.time()
        self.first = self.first or (step, now)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "time": now, "first_step": self.first[0],
                                   "first_time": self.first[1], "pid": os.getpid(), "idle": idle}))
        os.replace(tmp, self.path)

    def idle(self, step: int) -> None:
        """No more steps for now (the phase is over): the supervisor stops watching for a hang."""
        self.beat(step, idle=True)


# -----------------------------------------------------------------------------------------------
# Bits and fingerprints

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit `bit` of element `index` (row-major) of a contiguous tensor, in place, on its device."""
    ints = tensor.detach().view(-1).view(_INT_VIEW[tensor.element_size()])
    width = 8 * tensor.element_size()
    mask = -(1 << bit) if bit == width - 1 else 1 << bit  # the sign bit, as the signed type holds it
    ints[index:index + 1].bitwise_xor_(torch.tensor([mask], dtype=ints.dtype, device=ints.device))


def fingerprint(tensors: Iterable[torch.Tensor | None]) -> bytes:
    """Exact integer checksum of each tensor's bits (summed as integers on the device, so the order
    of summation cannot matter), as bytes. A single flipped bit anywhere changes it; it is not a
    cryptographic hash (the weight SHA-256 of a checkpoint is model.weights_fingerprint)."""
    sums = [t.detach().reshape(-1).view(_INT_VIEW[t.element_size()]).sum(dtype=torch.int64)
            for t in tensors if t is not None]
    return torch.stack(sums).cpu().numpy().tobytes() if sums else b""


def weight_fingerprint(model: torch.nn.Module) -> bytes:
    return fingerprint(model.parameters())


def result_fingerprint(model: torch.nn.Module, loss: float) -> bytes:
    """A step's result on one replica: its gradients and its loss."""
    return fingerprint(p.grad for p in model.parameters()) + struct.pack("<d", loss)


def majority(votes: list[bytes]) -> bytes | None:
    """The value held by more than half of the votes, else None."""
    if not votes:
        return None
    value, count = Counter(votes).most_common(1)[0]
    return value if count * 2 > len(votes) else None


# -----------------------------------------------------------------------------------------------
# Fault injection


class FaultInjector:
    """Injects a role's scheduled faults at the points where the trainer calls it.

        faults = FaultInjector.from_config(cfg.resilience, steps, run_dir)     # role "trainer"
        faults.start_of_step(step, checkpoints=ckpt_root)   hang, ckpt_truncate, ckpt_bitflip
        faults.corrupt_weights(step, models)                bitflip:weight
        loss = faults.corrupt_loss(step, loss, replica, n)  nan:loss, inf:loss
        faults.mid_step(step)                               kill, device_error
        faults.corrupt_grads(step, models)                  nan:grad, inf:grad, spike, bitflip:grad
        save_checkpoint(..., before_commit=faults.before_commit(step))         kill:ckpt
        faults.strike(step, {"rollout1": pid})              another role's kill, hang

    `models` are this process's replicas (a list of one model without replication); a data fault
    hits one replica, chosen from the fault's seed. In a data-parallel group every rank builds its
    injector with its `rank` and the group's `ranks` and calls the same hooks: replicas are numbered
    across the ranks, and only the rank holding the chosen one injects (and records) the fault.
    """

    def __init__(self, faults: Iterable[Fault], run_dir: Path, role: str = "trainer", seed: int = 0,
                 rank: int = 0, ranks: int = 1):
        self.path = Path(run_dir) / FAULTS_FILE
        self.role, self.seed, self.rank, self.ranks = role, seed, rank, ranks
        fired = {r.get("fault") for r in read_jsonl(self.path)}
        self.pending = [f for f in faults if f.key not in fired]

    @classmethod
    def from_config(cls, r, steps: int, run_dir: Path, role: str = "trainer", rank: int = 0,
                    ranks: int = 1) -> "FaultInjector":
        return cls(configured_faults(r, steps), run_dir, role, r.fault_seed, rank, ranks)

    def _take(self, step: int, *kinds: str, at_or_after: bool = False,
              roles: Iterable[str] | None = None) -> list[Fault]:
        """Unfired faults of these "kind:target"s and roles (default: this process's role) due at
        `step`, removed from the pending list."""
        roles = {self.role} if roles is None else set(roles)
        due = [f for f in self.pending if f"{f.kind}:{f.target}".rstrip(":") in kinds and f.role in roles
               and (f.step == step or (at_or_after and f.step <= step))]
        self.pending = [f for f in self.pending if f not in due]
        return due

    def _rng(self, fault: Fault) -> random.Random:
        return random.Random(f"{self.seed}/{fault.key}")

    def _victim(self, fault: Fault, here: int) -> tuple[random.Random, int | None]:
        """The fault's random stream and the replica it hits, as an index into this process's `here`
        replicas (None: one on another rank; rank R holds replicas R * here .. R * here + here - 1)."""
        rng = self._rng(fault)
        hit = rng.randrange(self.ranks * here) - self.rank * here
        return rng, (hit if 0 <= hit < here else None)

    def _fire(self, fault: Fault, step: int, **detail) -> None:
        """Record the fault in faults.jsonl (durably) before it acts."""
        append_jsonl(self.path, {"fault": fault.key, "kind": fault.kind, "target": fault.target, "role": fault.role,
                                 "step": step, "time": time.time(), "pid": os.getpid(),
                                 "attempt": attempt_number(), **detail})
        log(f"fault injected: {fault.key}" + "".join(f" {k}={v}" for k, v in detail.items()))

    def start_of_step(self, step: int, checkpoints: Path | None = None) -> None:
        for fault in self._take(step, "ckpt_truncate", "ckpt_bitflip"):
            self._damage_checkpoint(fault, step, checkpoints)
        for fault in self._take(step, "hang"):
            self._fire(fault, step)
            while True:  # a hang: only the supervisor's SIGKILL ends this
                time.sleep(3600)

    def mid_step(self, step: int) -> None:
        for fault in self._take(step, "kill", "device_error"):
            self._fire(fault, step)
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise DeviceFault(f"injected device error at step {step} ({fault.key})")

    def before_commit(self, step: int) -> Callable[[], None] | None:
        """A save_checkpoint hook that SIGKILLs mid-write, if a kill:ckpt fault is due by `step`."""
        due = self._take(step, "kill:ckpt", at_or_after=True)
        if not due:
            return None

        def kill() -> None:
            for fault in due:
                self._fire(fault, step, checkpoint_step=step)
            os.kill(os.getpid(), signal.SIGKILL)
        return kill

    def strike(self, step: int, pids: dict[str, int]) -> None:
        """Other roles' kill and hang faults due at `step`, delivered from outside to their process
        (role -> pid): SIGKILL for kill, SIGSTOP for hang (frozen, as a hung chip leaves a worker).
        For processes without injection points of their own, such as GRPO's rollout workers; role
        "rollout" means the lowest-ranked one."""
        workers = sorted((int(role.removeprefix("rollout")), pid) for role, pid in pids.items()
                         if role.removeprefix("rollout").isdigit())
        if workers:
            pids = dict(pids, rollout=workers[0][1])
        for fault in self._take(step, "kill", "hang", roles=pids):
            self._fire(fault, step, pid=pids[fault.role])
            os.kill(pids[fault.role], signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)

    def corrupt_loss(self, step: int, loss: torch.Tensor, replica: int = 0, replicas: int = 1) -> torch.Tensor:
        for fault in [f for f in self.pending if f.step == step and f.target == "loss" and f.role == self.role]:
            if self._victim(fault, replicas)[1] == replica:
                self._take(step, f"{fault.kind}:loss")
                self._fire(fault, step, replica=self.rank * replicas + replica)
                loss = loss * (float("nan") if fault.kind == "nan" else float("inf"))
        return loss

    def corrupt_grads(self, step: int, models: list[torch.nn.Module]) -> None:
        for fault in self._take(step, "nan:grad", "inf:grad", "spike:grad", "bitflip:grad"):
            rng, hit = self._victim(fault, len(models))
            if hit is None:
                continue
            named = [(n, p.grad) for n, p in models[hit].named_parameters() if p.grad is not None]
            replica = self.rank * len(models) + hit
            if fault.kind == "spike":
                self._fire(fault, step, replica=replica, factor=SPIKE_FACTOR)
                for _, grad in named:
                    grad.mul_(SPIKE_FACTOR)
            else:
                self._corrupt_element(fault, step, rng, replica, named)

    def corrupt_weights(self, step: int, models: list[torch.nn.Module]) -> None:
        for fault in self._take(step, "bitflip:weight"):
            rng, hit = self._victim(fault, len(models))
            if hit is not None:
                self._corrupt_element(fault, step, rng, self.rank * len(models) + hit,
                                      list(models[hit].named_parameters()))

    def _corrupt_element(self, fault, step, rng, replica, named: list[tuple[str, torch.Tensor]]) -> None:
        """One element of one tensor: a flipped bit (bitflip) or a NaN/inf (nan:grad, inf:grad);
        `replica` is the victim's number across the job, for the record."""
        name, tensor = named[rng.randrange(len(named))]
        index = rng.randrange(tensor.numel())
        if fault.kind == "bitflip":
            bit = rng.randrange(8 * tensor.element_size())
            self._fire(fault, step, replica=replica, tensor=name, index=index, bit=bit)
            with torch.no_grad():
                flip_bit(tensor, index, bit)
        else:
            self._fire(fault, step, replica=replica, tensor=name, index=index)
            with torch.no_grad():
                tensor.view(-1)[index] = float("nan") if fault.kind == "nan" else float("inf")

    def _damage_checkpoint(self, fault: Fault, step: int, checkpoints: Path | None) -> None:
        """Truncate or bit-flip one file of the newest committed checkpoint, then crash."""
        committed = [p for p in list_checkpoints(checkpoints) if (p / MANIFEST).is_file()] if checkpoints else []
        if not committed:
            self._fire(fault, step, damaged=None)  # nothing written yet: nothing to damage, no crash
            return
        rng = self._rng(fault)
        files = sorted(p.name for p in committed[0].iterdir())
        target = committed[0] / files[rng.randrange(len(files))]
        size = target.stat().st_size
        offset = rng.randrange(max(1, size))
        self._fire(fault, step, damaged=str(target), offset=offset)
        with open(target, "r+b") as handle:
            if fault.kind == "ckpt_truncate":
                handle.truncate(offset)
            elif size:
                handle.seek(offset)
                byte = handle.read(1)[0] ^ (1 << rng.randrange(8))
                handle.seek(offset)
                handle.write(bytes([byte]))
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


# -----------------------------------------------------------------------------------------------
# The NaN / spike guard

STD_FLOOR = 0.1  # in log space: without it a very steady window would flag a 1.01x wobble


@dataclass
class Verdict:
    action: str          # "update" | "skip" | "rollback"
    reason: str = ""


class StepGuard:
    """Decides, from a step's loss and pre-clip gradient norm, whether its update is applied."""

    def __init__(self, enabled: bool = True, window: int = 50, zscore: float = 8.0, min_history: int = 20,
                 rollback_after: int = 3, max_rollbacks: int = 3):
        self.enabled, self.window, self.zscore = enabled, window, zscore
        self.min_history, self.rollback_after, self.max_rollbacks = min_history, rollback_after, max_rollbacks
        # Rollbacks in a row without progress. Not part of the checkpointed state, so restoring the
        # checkpoint a rollback goes back to keeps the count (simplification: a crash and resume
        # starts it again; the supervisor bounds crashes itself).
        self.futile_rollbacks = 0
        self.reset()

    def reset(self) -> None:
        """The state of a run that has not started."""
        self.norms: deque = deque(maxlen=self.window)  # grad norms of recently applied updates
        self.skipped: list = []                        # [step, reason] of every skipped update
        self.skips_in_a_row = 0                        # updates skipped since the last one applied
        self.replay_until = -1                         # steps <= this are a replay after a rollback

    @classmethod
    def from_config(cls, r) -> "StepGuard":
        return cls(r.guard, r.guard_window, r.guard_zscore, r.guard_min_history, r.rollback_after, r.max_rollbacks)

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """The verdict on one update; raises TrainingFailed instead of a rollback too many or of the
        skip that makes the last `window` updates all skipped."""
        reason = self._trouble(loss, grad_norm) if self.enabled else ""
        if not reason:
            self.norms.append(grad_norm)
            self.skips_in_a_row = 0
            if step > self.replay_until:
                self.futile_rollbacks = 0  # progress past the last rollback
            return Verdict("update")
        self.skipped.append([step, reason])
        self.skips_in_a_row += 1
        recent = [s for s, _ in self.skipped if s > step - self.window]
        if self.rollback_after and len(recent) >= self.rollback_after and step > self.replay_until:
            self.futile_rollbacks += 1
            if self.max_rollbacks and self.futile_rollbacks > self.max_rollbacks:
                raise TrainingFailed(
                    f"training is not making progress: {self.max_rollbacks} rollback(s) in a row and the "
                    f"updates still fail at step {step} (last: {reason}); the checkpoints of the steps done "
                    "are kept. Lower the learning rate or check the data, or raise resilience.max_rollbacks")
            return Verdict("rollback", f"{len(recent)} skipped updates in {self.window} steps (last: {reason})")
        if self.max_rollbacks and self.skips_in_a_row >= self.window:
            raise TrainingFailed(
                f"training is not making progress: the last {self.window} updates were all skipped (at step "
                f"{step}: {reason}); the checkpoints of the steps done are kept. Lower the learning rate or "
                "check the data, or raise resilience.guard_window")
        return Verdict("skip", reason)

    def _trouble(self, loss: float, grad_norm: float) -> str:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if len(self.norms) < self.min_history or grad_norm <= 0:
            return ""
        logs = [math.log(n) for n in self.norms if n > 0]
        mean = sum(logs) / len(logs)
        std = max(STD_FLOOR, math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs)))
        z = (math.log(grad_norm) - mean) / std
        if z <= self.zscore:
            return ""
        return f"gradient norm {grad_norm:.4g} is {z:.1f} std above the last {len(logs)} updates"

    def trouble_start(self, step: int) -> int:
        """First step of the skips that triggered a rollback at `step` (roll back to before it)."""
        return min([s for s, _ in self.skipped if s > step - self.window], default=step)

    def rolled_back(self, from_step: int) -> None:
        """After a rollback (and reloading this guard's state): the steps up to `from_step` are a replay."""
        self.replay_until = from_step

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "skipped": [list(s) for s in self.skipped],
                "replay_until": self.replay_until, "skips_in_a_row": self.skips_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.norms = deque(state["norms"], maxlen=self.window)
        self.skipped = [list(s) for s in state["skipped"]]
        self.replay_until = state["replay_until"]
        self.skips_in_a_row = state.get("skips_in_a_row", 0)  # absent in checkpoints from before it


# -----------------------------------------------------------------------------------------------
# Silent-corruption detection


def copy_replica(src_model, src_optimizer, dst_model, dst_optimizer) -> None:
    """Make a replica an exact copy of another: weights and optimizer state (deep-copied, so the two
    optimizers never share a moment tensor)."""
    dst_model.load_state_dict(src_model.state_dict())
    dst_optimizer.load_state_dict(copy.deepcopy(src_optimizer.state_dict()))


def copy_grads(src_model, dst_model) -> None:
    with torch.no_grad():
        for src, dst in zip(src_model.parameters(), dst_model.parameters()):
            dst.grad.copy_(src.grad)


class CorruptionDetector:
    """Votes on weight and gradient fingerprints every `every` steps; repairs what it can.

    `models` (and their optimizers, their losses) are this process's replicas; here every replica
    lives in this process (SFT's resilience.replicas). check_weights / check_grads return True when
    the replicas cannot be repaired and the caller must roll back to the last checkpoint from at most
    step `last_good` (the newest step whose check passed: a checkpoint written after an undetected
    corruption may hold it).
    """

    max_rollbacks = 2                               # per step, before giving up with CorruptionError

    def __init__(self, every: int, incidents: Incidents):
        self.every, self.incidents = every, incidents
        self.reference: list[bytes] | None = None   # this process's weight fingerprints after the last update
        self.last_good = 0
        self.rollbacks: dict[int, int] = {}         # step -> rollbacks it caused (this process's life)

    def roll_back(self, step: int, message: str) -> bool:
        """Record a rollback decided at `step` (returns True), or raise CorruptionError when that step
        already caused max_rollbacks of them: replaying it keeps disagreeing, so the computation is
        not deterministic or the hardware is persistently bad, and rolling back again would loop.
        Simplification: the count lives in this process; a restart starts it over."""
        self.rollbacks[step] = self.rollbacks.get(step, 0) + 1
        if self.rollbacks[step] > self.max_rollbacks:
            raise CorruptionError(f"step {step}: fingerprints disagree again after {self.max_rollbacks} rollbacks; "
                                  "the computation is not reproducible (set run.deterministic = true) or this "
                                  "device keeps corrupting data (run elsewhere)")
        self.incidents.record("corruption", step, message)
        return True

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def forget(self) -> None:
        """After a restore from a checkpoint: the recorded fingerprints no longer apply."""
        self.reference = None

    def remember_weights(self, next_step: int, models: list) -> None:
        """After an update: record each replica's weight fingerprint if `next_step` is checked."""
        self.reference = [weight_fingerprint(m) for m in models] if self.due(next_step) else None

    # Where the replicas are: the three methods RankCorruptionDetector replaces.

    def gather(self, local: list[bytes]) -> list[bytes]:
        """Fingerprints of this process's replicas -> those of every replica, in replica order."""
        return local

    def copy_state(self, models: list, optimizers: list, good: int, bad: list[int]) -> None:
        for r in bad:
            copy_replica(models[good], optimizers[good], models[r], optimizers[r])

    def copy_result(self, models: list, losses: list[float], good: int, bad: list[int]) -> None:
        for r in bad:
            copy_grads(models[good], models[r])
            losses[r] = losses[good]

    def check_weights(self, step: int, models: list, optimizers: list) -> bool:
        """Weights at rest: each replica against the others and against the fingerprint they all
        agreed on after the last update (a vote of its own, so 2 replicas can outvote 1)."""
        if not self.due(step):
            return False
        now = self.gather([weight_fingerprint(m) for m in models])
        votes = list(now)
        reference = self.gather(self.reference) if self.reference is not None else None
        if reference is not None and len(set(reference)) == 1:
            votes.append(reference[0])
        if len(set(votes)) == 1:
            self.last_good = step
            return False
        winner = majority(votes)
        if winner is None:
            return self.roll_back(step, f"weights of {len(now)} replica(s) disagree with no majority; "
                                  "rolling back to the last checkpoint")
        good = now.index(winner)
        bad = [r for r, fp in enumerate(now) if fp != winner]
        self.copy_state(models, optimizers, good, bad)
        self.incidents.record("corruption", step, f"weights of replica {', '.join(map(str, bad))} changed at rest; "
                              f"restored from replica {good}")
        self.last_good = step
        return False

    def check_grads(self, step: int, models: list, losses: list[float], recompute: Callable[[int], None]) -> bool:
        """Gradients and losses against each other; on disagreement (always, with one replica)
        replica 0 recomputes the step for a tie-breaking vote, at most twice. recompute(0) redoes
        replica 0's forward and backward and stores its loss in losses[0]."""
        if not self.due(step):
            return False

        def results() -> list[bytes]:
            return self.gather([result_fingerprint(m, loss) for m, loss in zip(models, losses)])

        current = first = results()
        votes = list(current)
        while majority(votes) is None or len(votes) == 1:
            if len(votes) >= len(first) + 2:
                return self.roll_back(step, "gradients disagree and recomputing does not settle it; "
                                      "rolling back to the last checkpoint")
            recompute(0)
            current = results()
            votes.append(current[0])
        if len(set(votes)) == 1:
            return False
        winner = majority(votes)
        good = current.index(winner)
        self.copy_result(models, losses, good, [r for r, fp in enumerate(current) if fp != winner])
        wrong = [str(r) for r, fp in enumerate(first) if fp != winner]
        what = f"replica {', '.join(wrong)}" if wrong else "a recomputation"
        self.incidents.record("corruption", step, f"gradients of {what} differed from the majority of "
                              f"{len(votes)} computations; repaired")
        return False


class RankCorruptionDetector(CorruptionDetector):
    """The same votes with one replica per rank of a data-parallel group (GRPO's trainer ranks):
    `models` is [this rank's model]. Every rank of the group calls every method at the same point
    (they are collectives) and, voting on the same gathered fingerprints, decides alike.

    Fingerprints travel as byte tensors on `device` (all_gather works on every backend); a repair
    broadcasts from the healthy rank to all (the others already hold the same values); recompute(0)
    must run on every rank, since a step's gradient needs the all-reduce of all of them.
    """

    def __init__(self, every: int, incidents: Incidents, group, device: torch.device):
        super().__init__(every, incidents)
        self.group, self.device = group, device

    def gather(self, local: list[bytes]) -> list[bytes]:
        mine = torch.frombuffer(bytearray(b"".join(local)), dtype=torch.uint8).to(self.device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return [bytes(part.cpu().numpy()) for part in parts]

    def _broadcast(self, tensors: Iterable[torch.Tensor], good: int) -> None:
        src = dist.get_global_rank(self.group, good)
        with torch.no_grad():
            for tensor in tensors:
                buffer = tensor.to(self.device)  # an optimizer's step counter may live on the host
                dist.broadcast(buffer, src, group=self.group)
                tensor.copy_(buffer)

    def copy_state(self, models: list, optimizers: list, good: int, bad: list[int]) -> None:
        if bad:
            params = list(models[0].parameters())
            state = [v for p in params for _, v in sorted(optimizers[0].state.get(p, {}).items())
                     if torch.is_tensor(v)]
            self._broadcast(params + state, good)

    def copy_result(self, models: list, losses: list[float], good: int, bad: list[int]) -> None:
        if bad:   # the loss travels as its float64 bits in an int64 (HCCL has no fp64): exact
            bits = torch.tensor([losses[0]], dtype=torch.float64).view(torch.int64)
            self._broadcast([p.grad for p in models[0].parameters()] + [bits], good)
            losses[0] = float(bits.view(torch.float64))
