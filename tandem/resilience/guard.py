"""The NaN / spike guard: whether a step's update is applied, when to roll back, when to give up.

StepGuard: skips the update of a step whose loss or gradient norm is not finite, or whose
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
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tandem.errors import TrainingFailed


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
