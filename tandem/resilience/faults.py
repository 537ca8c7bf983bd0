"""Fault injection: crashes, hangs and silent corruptions on a schedule, at the points where the
trainer calls in.

    tandem sft --preset smoke --out runs/x --supervise --set resilience.faults="kill@7,nan@12"
    tandem chaos --preset smoke --out runs/chaos --faults kill@7,hang@12,bitflip:grad@15

The server's engine faults (`tandem serve --fault hang@30 --fault-mtbf 200`) use this syntax and
parser with their own kinds (infer/server/recovery.py). Both trainers (train/sft.py,
train/grpo.py) call the same hooks (and use resilience/guard.py,
resilience/replicas.py and resilience/incidents.py for what the faults do to them).

FaultInjector: injects the faults of a schedule, `[ROLE/]KIND[:TARGET]@STEP` joined by commas,
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
    bitflip[:grad|weight|adam|late]   flip one random bit of one element of a gradient (default,
                    after the backward pass), of a weight or of an Adam moment at rest before STEP,
                    or of a gradient late: after the corruption check, right before optimizer.step
    multiflip[:...] flip 2-8 random bits in random elements of one tensor (same targets)
    bitpair[:...]   flip the same bit position in two elements where it differs (0->1 and 1->0: an
                    integer sum of the bits is unchanged)
    swap[:...]      swap two different elements of one tensor (a permutation: every sum is unchanged)
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
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from tandem.errors import ConfigError
from tandem.progress import log
from tandem.resilience.incidents import append_jsonl, attempt_number, read_jsonl
from tandem.resilience.replicas import INT_VIEW, flip_bit
from tandem.train.checkpoint import MANIFEST, list_checkpoints

FAULTS_FILE = "faults.jsonl"

# kind -> allowed targets, the first being the default
SILENT_TARGETS = ("grad", "weight", "adam", "late")
SILENT_KINDS = ("bitflip", "multiflip", "bitpair", "swap")    # silent data corruption of one tensor
KINDS = {"kill": ("", "ckpt"), "hang": ("",), "device_error": ("",), "nan": ("loss", "grad"),
         "inf": ("loss", "grad"), "spike": ("grad",), **{kind: SILENT_TARGETS for kind in SILENT_KINDS},
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


def parse_fault(text: str, key: str = "resilience.faults", kinds: dict | None = None,
                default_role: str = "trainer") -> Fault:
    """One `[ROLE/]KIND[:TARGET]@STEP`; `kinds` (kind -> targets, the first the default) is the
    vocabulary: the trainer's KINDS unless given (the server passes its engine faults)."""
    kinds = KINDS if kinds is None else kinds
    spec, at, step = text.strip().partition("@")
    role, _, kind_target = spec.rpartition("/")
    kind, _, target = kind_target.partition(":")
    usage = ("write [ROLE/]KIND[:TARGET]@STEP, e.g. kill@37 or bitflip:weight@80; kinds: "
             + ", ".join(f"{k}[:{'|'.join(t for t in targets if t)}]" if any(targets) else k
                         for k, targets in kinds.items()))
    if not at or not step.strip().isdigit():
        raise ConfigError(f"bad fault '{text.strip()}' in {key}; {usage}")
    if kind not in kinds or (target or kinds[kind][0]) not in kinds[kind]:
        raise ConfigError(f"unknown fault '{text.strip()}' in {key}; {usage}")
    if role and not (role.rstrip("0123456789").isalpha() and role.islower()):
        raise ConfigError(f"bad role '{role}' in fault '{text.strip()}'; roles look like trainer, rollout, rollout1")
    return Fault(kind, int(step), target or kinds[kind][0], role or default_role)


def parse_schedule(text: str, key: str = "resilience.faults", kinds: dict | None = None,
                   default_role: str = "trainer") -> list[Fault]:
    """"kill@37,hang@50,nan@60" -> faults in step order (empty text: none); `key` names the config
    key in error messages, `kinds` and `default_role` are parse_fault's."""
    faults = [parse_fault(part, key, kinds, default_role) for part in text.split(",") if part.strip()]
    return sorted(set(faults), key=lambda f: (f.step, f.key))


def mtbf_faults(mtbf: float, seed: int, kinds: Iterable[str], vocabulary: dict | None = None,
                default_role: str = "trainer") -> Iterator[Fault]:
    """Random faults with exponential gaps of mean `mtbf` steps, in step order and without end,
    reproducible from `seed`; each is one of `kinds` (fault specs without @STEP, e.g. "kill",
    "bitflip:grad"), parsed against `vocabulary` (parse_fault's `kinds`)."""
    kinds = list(kinds)
    rng, step = random.Random(f"mtbf/{seed}"), 0
    while mtbf > 0 and kinds:
        step += max(1, round(rng.expovariate(1.0 / mtbf)))
        yield parse_fault(f"{rng.choice(kinds)}@{step}", kinds=vocabulary, default_role=default_role)


def mtbf_schedule(mtbf: float, seed: int, steps: int, kinds: Iterable[str]) -> list[Fault]:
    """mtbf_faults over steps 1..steps-1, as a list."""
    faults = list(itertools.takewhile(lambda f: f.step < steps, mtbf_faults(mtbf, seed, kinds)))
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
# Fault injection


class FaultInjector:
    """Injects a role's scheduled faults at the points where the trainer calls it.

        faults = FaultInjector.from_config(cfg.resilience, steps, run_dir)     # role "trainer"
        faults.start_of_step(step, checkpoints=ckpt_root)   hang, ckpt_truncate, ckpt_bitflip
        faults.corrupt_weights(step, models, optimizers)    bitflip:weight, bitflip:adam (and the
                                                            other silent kinds with these targets)
        loss = faults.corrupt_loss(step, loss, replica, n)  nan:loss, inf:loss
        faults.mid_step(step)                               kill, device_error
        faults.corrupt_grads(step, models)                  nan:grad, inf:grad, spike, bitflip:grad
        faults.before_update(step, models)                  bitflip:late (after the check)
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
        for fault in self._take(step, "nan:grad", "inf:grad", "spike:grad", *_silent("grad")):
            rng, hit = self._victim(fault, len(models))
            if hit is None:
                continue
            named = [(n, p.grad) for n, p in models[hit].named_parameters() if p.grad is not None]
            replica = self.rank * len(models) + hit
            if fault.kind == "spike":
                self._fire(fault, step, replica=replica, factor=SPIKE_FACTOR)
                for _, grad in named:
                    grad.mul_(SPIKE_FACTOR)
            elif fault.kind in SILENT_KINDS:
                self._corrupt_silently(fault, step, rng, replica, named)
            else:
                self._poison_element(fault, step, rng, replica, named)

    def corrupt_weights(self, step: int, models: list[torch.nn.Module], optimizers: list | None = None) -> None:
        """Weights (and, given the optimizers, Adam moments) at rest, before STEP's checks."""
        for fault in self._take(step, *_silent("weight"), *_silent("adam")):
            rng, hit = self._victim(fault, len(models))
            if hit is None:
                continue
            if fault.target == "weight":
                named = list(models[hit].named_parameters())
            else:
                names = {p: n for n, p in models[hit].named_parameters()}
                state = optimizers[hit].state if optimizers else {}
                named = [(f"{names[p]}.{key}", value) for p in names for key, value in sorted(state.get(p, {}).items())
                         if torch.is_tensor(value) and value.numel() > 1]
            self._corrupt_silently(fault, step, rng, self.rank * len(models) + hit, named)

    def before_update(self, step: int, models: list[torch.nn.Module]) -> None:
        """Gradients in the window after the corruption check and before optimizer.step (":late")."""
        for fault in self._take(step, *_silent("late")):
            rng, hit = self._victim(fault, len(models))
            if hit is not None:
                named = [(n, p.grad) for n, p in models[hit].named_parameters() if p.grad is not None]
                self._corrupt_silently(fault, step, rng, self.rank * len(models) + hit, named)

    def _corrupt_silently(self, fault, step, rng, replica, named: list[tuple[str, torch.Tensor]]) -> None:
        """A silent kind on one tensor of `named`; `replica` is the victim's number across the job,
        for the record. Nothing to corrupt (no Adam moments before the first update, a swap of equal
        elements) is recorded with damaged=None, which the chaos report leaves out."""
        if not named:
            self._fire(fault, step, replica=replica, damaged=None)
            return
        name, tensor = named[rng.randrange(len(named))]
        width, n = 8 * tensor.element_size(), tensor.numel()
        if fault.kind == "swap":
            i, j = _two_differing(rng, n, lambda a, b: bool(tensor.view(-1)[a] != tensor.view(-1)[b]))
            self._fire(fault, step, replica=replica, tensor=name, index=[i, j], damaged=name if i != j else None)
            with torch.no_grad():
                flat = tensor.view(-1)
                flat[[i, j]] = flat[[j, i]].clone()
            return
        if fault.kind == "bitpair":
            bit = rng.randrange(width)
            bits = tensor.detach().reshape(-1).view(INT_VIEW[tensor.element_size()])
            i, j = _two_differing(rng, n, lambda a, b: bool((bits[a] ^ bits[b]) >> bit & 1))
            flips = [(i, bit), (j, bit)]
        else:
            flips = [(rng.randrange(n), rng.randrange(width))
                     for _ in range(1 if fault.kind == "bitflip" else rng.randint(2, 8))]
        self._fire(fault, step, replica=replica, tensor=name, flips=flips)
        with torch.no_grad():
            for index, bit in flips:
                flip_bit(tensor, index, bit)

    def _poison_element(self, fault, step, rng, replica, named: list[tuple[str, torch.Tensor]]) -> None:
        """A NaN or inf in one element of one tensor (nan:grad, inf:grad)."""
        name, tensor = named[rng.randrange(len(named))]
        index = rng.randrange(tensor.numel())
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


def _silent(target: str) -> list[str]:
    """The "kind:target" names of every silent kind at one target."""
    return [f"{kind}:{target}" for kind in SILENT_KINDS]


def _two_differing(rng: random.Random, n: int, differ: Callable[[int, int], bool], tries: int = 64) -> tuple[int, int]:
    """Two element indices for which differ(i, j) holds, drawn at random (up to `tries` draws; the
    last draw otherwise, which may not differ)."""
    i = j = 0
    for _ in range(tries):
        i, j = rng.randrange(n), rng.randrange(n)
        if i != j and differ(i, j):
            break
    return i, j
