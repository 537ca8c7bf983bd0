"""Silent-corruption detection: exact fingerprints of replicas, a vote, a repair or a rollback.

CorruptionDetector: every `check_every` steps, compares fingerprints of the weights (with the
optimizer's moments) and of the gradients (a BLAKE2b hash of their bytes: any change of any bits
changes it) across replicas, and with one replica against a recomputation of the same step. Each
incident it records carries `since`, the last check that passed (the fault came after it: the
detection latency is at most step - since). A vote finds the bad replica (weights: against the
fingerprint recorded after the previous update; gradients: against a recomputation), which is
repaired from a healthy one; with no majority the trainer rolls back to the last checkpoint. The replicas are either
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
"""

from __future__ import annotations

import copy
import hashlib
import struct
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from tandem.errors import CorruptionError
from tandem.resilience.incidents import Incidents


# -----------------------------------------------------------------------------------------------
# Bits and fingerprints

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit `bit` of element `index` (row-major) of a contiguous tensor, in place, on its device."""
    ints = tensor.detach().view(-1).view(INT_VIEW[tensor.element_size()])
    width = 8 * tensor.element_size()
    mask = -(1 << bit) if bit == width - 1 else 1 << bit  # the sign bit, as the signed type holds it
    ints[index:index + 1].bitwise_xor_(torch.tensor([mask], dtype=ints.dtype, device=ints.device))


def fingerprint(tensors: Iterable[torch.Tensor | None]) -> bytes:
    """BLAKE2b digest of the tensors' raw bytes, in order (a missing gradient counts as a marker).
    Any change of the bits is caught with certainty for practical purposes: a flipped bit, several,
    two opposite flips of one bit position in two elements, or two elements swapped (an integer sum
    of the bits, used before, missed the last two). Simplification: the bytes are hashed on the
    host, so on an accelerator each check copies the weights (or gradients) off the device."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            digest.update(b"\0none")
            continue
        ints = t.detach().contiguous().reshape(-1).view(INT_VIEW[t.element_size()])
        digest.update(ints.cpu().numpy().tobytes())
    return digest.digest()


def weight_fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bytes:
    """A replica's state at rest: its weights and its optimizer's tensors (Adam moments), which a
    fault corrupts as silently as a weight."""
    params = list(model.parameters())
    state = optimizer.state if optimizer is not None else {}
    moments = [v for p in params for _, v in sorted(state.get(p, {}).items()) if torch.is_tensor(v)]
    return fingerprint(params + moments)


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
        self.last_checked = 0                       # the newest step whose check (weights or gradients) passed
        self.rollbacks: dict[int, int] = {}         # step -> rollbacks it caused (this process's life)

    def detected(self, step: int, message: str) -> None:
        """An incident: corruption found at `step`, which happened after step `since` (the last check
        that passed; the detection latency is at most step - since)."""
        self.incidents.record("corruption", step, message, since=self.last_checked)

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
        self.detected(step, message)
        return True

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def forget(self) -> None:
        """After a restore from a checkpoint: the recorded fingerprints no longer apply."""
        self.reference = None

    def remember_weights(self, next_step: int, models: list, optimizers: list) -> None:
        """After an update: record each replica's state fingerprint if `next_step` is checked."""
        self.reference = ([weight_fingerprint(m, o) for m, o in zip(models, optimizers)]
                          if self.due(next_step) else None)

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
        now = self.gather([weight_fingerprint(m, o) for m, o in zip(models, optimizers)])
        votes = list(now)
        reference = self.gather(self.reference) if self.reference is not None else None
        if reference is not None and len(set(reference)) == 1:
            votes.append(reference[0])
        if len(set(votes)) == 1:
            self.last_good = self.last_checked = step
            return False
        winner = majority(votes)
        if winner is None:
            return self.roll_back(step, f"weights of {len(now)} replica(s) disagree with no majority; "
                                  "rolling back to the last checkpoint")
        good = now.index(winner)
        bad = [r for r, fp in enumerate(now) if fp != winner]
        self.copy_state(models, optimizers, good, bad)
        self.detected(step, f"weights or optimizer state of replica {', '.join(map(str, bad))} changed at rest; "
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
            self.last_checked = step
            return False
        winner = majority(votes)
        good = current.index(winner)
        self.copy_result(models, losses, good, [r for r, fp in enumerate(current) if fp != winner])
        wrong = [str(r) for r, fp in enumerate(first) if fp != winner]
        what = f"replica {', '.join(wrong)}" if wrong else "a recomputation"
        self.detected(step, f"gradients of {what} differed from the majority of {len(votes)} computations; repaired")
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
