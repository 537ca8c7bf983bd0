"""GRPO: reinforcement learning on verifiable rewards, with the trainer and the rollouts on
different devices.

    tandem rl --init runs/demo --out runs/demo-rl --preset tiny      (tandem/cli/train.py)
    tandem pipeline --preset tiny --out runs/demo                     SFT -> eval -> GRPO -> eval

The algorithm (Group Relative Policy Optimization: Shao et al. 2024, "DeepSeekMath"; used for
DeepSeek-R1, DeepSeek-AI 2025). Each step takes `rl.prompts_per_step` prompts, samples
G = `rl.group_size` completions per prompt from the rollout workers, scores each with the task's
verifiable reward (correctness of the <answer> + a bonus for the <think>/<answer> format), and
pushes up the log-probability of the completions that beat their group's average:

    A_i     = (r_i - mean(r_group)) / scale          scale: `rl.scale_rewards` (below)
    ratio   = exp(logp_new - logp_old)               logp_old: the trainer's policy before this batch
    surr    = min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    w       = min(exp(logp_old - logp_rollout), C)   truncated importance weight (rl.tis_cap)
    loss_t  = -w * surr + beta * k3(logp_new, logp_ref)
    loss    = sum_t c_t * loss_t                     c_t: `rl.loss_norm` (below)

Options and where they come from:

* `clip_eps` / `clip_eps_high`: the PPO clip (Schulman et al. 2017) as GRPO uses it; an upper
  bound above the lower one is DAPO's "clip-higher" (Yu et al. 2025, eps_high = 0.28), which lets
  unlikely tokens of good answers grow and keeps the policy from collapsing its entropy.
* `kl_coef` (beta): DeepSeekMath's KL penalty to a frozen reference policy (the initial weights),
  estimated per token with Schulman's k3 estimator, exp(ref - new) - (ref - new) - 1 (unbiased,
  always >= 0; Schulman 2020, "Approximating KL divergence"). beta = 0 (DAPO and Dr. GRPO drop the
  term) loads no reference model at all. The reference is kept in the compute dtype (rl.dtype):
  in bf16 it takes half the memory of fp32 weights; its matmuls run in bf16 under autocast anyway,
  but its norms and residual stream round to bf16 too, so at step 0 the KL is small, not zero.
* `loss_norm`: how token losses are averaged. "grpo": mean over each sequence's tokens, then over
  sequences (DeepSeekMath), which weighs a token of a short answer more than one of a long answer;
  "dapo": one mean over every token of the batch (DAPO's token-level loss); "dr_grpo": a sum
  divided by a constant, sequences x max_new_tokens (Liu et al. 2025, "Understanding R1-Zero-Like
  Training: A Critical Perspective", which shows both per-sequence normalisations bias lengths).
* `loss = "gspo"`: Group Sequence Policy Optimization (Zheng et al. 2025): one importance ratio
  per sequence, s_i = exp(mean_t(logp_new - logp_old)), clipped to [1 - gspo_clip, 1 +
  gspo_clip_high] (the paper's 3e-4 / 4e-4: a sequence ratio moves far less than a token's), each
  sequence's tokens averaged (as loss_norm "grpo", whatever loss_norm says). A sequence-level ratio
  is less sensitive to single tokens whose probability differs between the rollout and the trainer,
  which for MoE models includes tokens routed to other experts (the paper's motivation).
* `scale_rewards`: "group" divides the advantage by the group's reward std (GRPO), "batch" by the
  std of the whole batch, "none" not at all (Dr. GRPO: the std term over-weights prompts that are
  almost always solved or almost never). A group whose rewards are all equal has A = 0 everywhere.
* `updates_per_batch` (mu): optimizer steps on each batch (DeepSeekMath's mu). logp_old is the
  trainer's policy before the first of them, so with mu = 1 the ratio is exactly 1 and the clip
  never bites; the clip matters from the second update on.
* `filter_groups`: DAPO's dynamic sampling (Yu et al. 2025) drops groups whose rewards are all
  equal (all right or all wrong: zero advantage, no gradient) and resamples until the batch is full.
  We drop them without resampling: the update runs on the informative groups only, which costs
  less and, with a per-token normalisation, does not dilute the step with zero-advantage tokens.
  The logged reward/accuracy still cover every sample; the mismatch covers the trained ones.
* `tis_cap` (C): truncated importance sampling for the rollout/trainer mismatch (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; truncation as in
  IMPALA's V-trace, Espeholt et al. 2018). The rollout workers sample from a policy that is not
  quite the trainer's: another chip and dtype (bf16 worker, fp32 trainer) and, in async mode, the
  weights of one step earlier. Every token's loss is re-weighted by the ratio between the trainer's
  probability and the probability the rollout actually sampled with, capped at C. C = 0 turns the
  correction off. Simplification: the weight uses logp_old (the trainer's policy before the
  update), as Yao et al. do; tokens are never dropped, only re-weighted.

Modes (`rl.mode`). "sync": the rollouts of step k are generated with weights k, strictly
on-policy up to numerics; the trainer waits for them. "async" (default): while the trainer trains
on batch k, the workers already generate batch k+1 with weights k, so generation and training
overlap and each batch is one step stale, which the truncated importance weight corrects. Every
step logs the mismatch between the two roles: mean |logp_train - logp_rollout| over the batch's
tokens and a KL estimate, k3 of the rollout policy vs the trainer's (that is the "the model answers
differently on the other chip" number, plus staleness in async mode).

Sampling temperature (simplification). Rollouts sample at `rl.temperature` / `rl.top_p`, but the
policy trained, the trainer's logprobs and the worker's logprobs are all of the raw logits
(temperature 1: the engine returns raw-logit logprobs). With a temperature or top_p other than 1
the samples come from a sharper or truncated policy than the one optimised, a bias the importance
weight cannot see (TRL and verl instead train the tempered policy); the presets keep 1.0.

Roles. Rollouts come from worker processes on their own device and dtype, fed with verified weights
over the job's c10d store; several trainer ranks can train data-parallel under torchrun. All of
that, and what happens when a worker dies, hangs or answers garbage, is in tandem/train/rollout.py.

Rewards come from the task (tandem/tasks): correctness_weight * correct + format_weight *
format_ok. A reward function that raises scores that sample 0; the error is counted, the first
message of each kind logged, and training goes on.

Unstable hardware (tandem/resilience/), as in SFT. Each optimizer step (mu per batch) is
vetted before it is applied. Injected data faults strike (resilience.faults): a nan/inf loss in the
forward pass; nan/inf/spike/bitflip gradients after the gradient all-reduce, on one trainer rank;
bitflip:weight at the start of a step. Every resilience.check_every steps the corruption detector
votes on weight and gradient fingerprints all-gathered over the trainer ranks: a rank outvoted is
repaired by a broadcast from a healthy one (with 2 ranks the weights' tie is broken by the
fingerprint recorded after the last update, the gradients' by a recomputation on every rank), and
no majority rolls back. A single trainer is checked as SFT's single replica is: its gradients
against a recomputation, its weights against that recorded fingerprint (a mismatch rolls back).
The guard skips an update whose loss or gradient norm is not finite or spikes (`skipped` in
metrics.jsonl, an incident in incidents.jsonl) and rolls back to the last RL checkpoint after
resilience.rollback_after skips; when no update gets through it gives up as SFT's does
(TrainingFailed, exit 3: resilience/guard.py, StepGuard). A rollback restores every rank from that
checkpoint and restarts the rollouts there: the batches of abandoned steps are waited out and
thrown away, and the restored weights are published again under their step's version. GRPO's
replicas are its trainer ranks (resilience.replicas is SFT's in-process replication).

Resume. RL checkpoints go to runs/NAME/checkpoints/rl/ (weights, AdamW moments, step, data
position = step x prompts_per_step, every RNG state, the guard's state, and the init checkpoint the
reference model comes from). In sync mode a resumed run is bitwise identical to an uninterrupted
one: rollouts depend only on (weights, step, prompt index, sample index) through per-request
sampling seeds.
In async mode the first batch after a resume is generated with the checkpoint's weights rather
than the one-step-older weights an uninterrupted run would have used (those are not in the
checkpoint), so async resume is exact from the second step on, not bitwise.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import torch.distributed as dist

from tandem import accel
from tandem.config import Config
from tandem.errors import ConfigError, DataError, ModelError
from tandem.ledger import Ledger
from tandem.architectures import model_from_state
from tandem.loading import find_checkpoint, load_weights
from tandem.model import estimate_train_flops, weights_fingerprint
from tandem.peak import run_peaks, utilisation
from tandem.progress import Progress, log
from tandem.runs import append_metrics, read_summary, truncate_metrics, update_summary
from tandem.tasks import Example, RewardResult, Task, stable_seed
from tandem.train.balance import balance_experts, load_metrics
from tandem.train.checkpoint import discard_newer, latest_valid, load_checkpoint, save_checkpoint
from tandem.resilience.faults import FaultInjector
from tandem.resilience.guard import StepGuard
from tandem.resilience.incidents import Heartbeat, Incidents
from tandem.resilience.replicas import CorruptionDetector, RankCorruptionDetector
from tandem.train.grpo_loss import Batch, PolicyUpdate, build_batch, group_advantages, informative, mismatch
from tandem.train.sft import build_optimizer, example_for, lr_at

if TYPE_CHECKING:
    from tandem.train.rollout import RolloutResult

# -----------------------------------------------------------------------------------------------
# Rewards


def safe_reward(task: Task, text: str, example: Example, correctness_weight: float,
                format_weight: float) -> tuple[RewardResult, str | None]:
    """The task's reward, or (0 reward, the error) when the reward function raises."""
    try:
        return task.reward(text, example, correctness_weight, format_weight), None
    except Exception as exc:  # a user reward function must not stop training: score 0, count it
        return RewardResult(False, False, 0.0), f"{task.name}: {type(exc).__name__}: {exc}"


def rl_tasks(cfg: Config) -> list[Task]:
    from tandem.tasks import get_task
    names = cfg.rl.tasks or cfg.data.tasks
    return [get_task(name, seed=cfg.run.seed, **cfg.data.task_params.get(name, {})) for name in names]


def sample_seed(run_seed: int, step: int, prompt: int, sample: int) -> int:
    """The sampling seed of one rollout: fixed by (run seed, step, prompt, sample), so a batch's
    tokens do not depend on which worker made them, or on a resume."""
    return stable_seed("rollout", run_seed, step, prompt, sample) >> 1


# -----------------------------------------------------------------------------------------------
# The trainer


def resolve_init(init: str | Path) -> Path:
    """The concrete folder RL starts from: a checkpoint folder (a run's newest) or an HF folder."""
    path = Path(init)
    found = find_checkpoint(path) if path.exists() else None
    return found if found is not None else path


def train_grpo(cfg: Config, run_dir: Path, init: str | Path, progress: bool = True,
               stop_after: int | None = None) -> dict:
    """Run (or resume) GRPO in run_dir starting from `init` (a run, checkpoint or HF folder).

    Returns the figures summary.json records under "rl" (the leader writes them). stop_after: return
    right after step `stop_after` is done and checkpointed, as if interrupted there (tests of exact
    resume use it).
    """
    return GRPOTrainer(cfg, Path(run_dir), init, progress, stop_after).run()


@dataclass
class Scored:
    """The leader's view of one step's rollouts once rewarded: what it logs, and the kept samples
    every trainer trains on."""
    result: RolloutResult
    wait_seconds: float
    rewards: torch.Tensor
    correct: int
    formatted: int
    errors: int                 # reward functions that raised
    shared: tuple               # (prompts, completions, logprobs, advantages) of the kept samples


@dataclass
class Update:
    """One trainer's policy update on a batch."""
    lr: float
    batch: Batch | None         # None: every group was uniform (filtered), nothing to learn from
    stats: dict
    old: torch.Tensor           # logp_old of the whole batch (empty without a batch)
    grad_norm: float
    skipped: int
    back_to: int | None         # None, or the step to roll back to at most


class GRPOTrainer:
    """One trainer rank of a GRPO run. `run()` repeats `train_step()`: collect -> score -> update ->
    publish -> checkpoint. The leader (rank 0) alone owns the rollout workers, scores and writes;
    the other ranks take its batch and train on their slice of it."""

    def __init__(self, cfg: Config, run_dir: Path, init: str | Path, progress: bool, stop_after: int | None):
        from tandem.train.rollout import join_trainers

        self.cfg, self.r, self.run_dir, self.progress, self.stop_after = cfg, cfg.rl, run_dir, progress, stop_after
        accel.set_threads(self.r.threads or cfg.run.threads)
        self.group, self.device = join_trainers(cfg)            # group: None for a single trainer
        accel.set_deterministic(self.device, cfg.run.deterministic)
        self.rank, self.world = ((dist.get_rank(self.group), dist.get_world_size(self.group)) if self.group is not None
                                 else (0, 1))
        self.leader = self.rank == 0
        self.dtype = accel.choose_dtype(self.r.dtype, self.device)   # "auto" resolved: bf16 only where fast
        self.amp_dtype = accel.DTYPES[self.dtype]
        self.ckpt_root = run_dir / "checkpoints" / "rl"
        self.latest = latest_valid(self.ckpt_root)
        self.resumed = load_checkpoint(self.latest) if self.latest is not None else None
        self._load_model(init)
        self._guard_hardware()
        self.rollouts = None
        self._resume()
        self._start_accounting()

    def _load_model(self, init: str | Path) -> None:
        """The policy (fp32, on the device), its optimizer, the frozen reference (kl_coef > 0), the
        tokenizer (saved into the run) and the RL tasks."""
        r, device = self.r, self.device
        self.init_path = Path(self.resumed["train_state"]["init"]) if self.resumed else resolve_init(init)
        self.model_config, init_weights, self.tokenizer, self.init_info = load_weights(self.init_path)
        limit = self.model_config.max_position_embeddings
        if r.max_prompt_len + r.max_new_tokens > limit:
            raise ConfigError(f"rl.max_prompt_len + rl.max_new_tokens = {r.max_prompt_len + r.max_new_tokens} exceeds "
                              f"the model's max_position_embeddings ({limit}); lower them")
        model = model_from_state(self.model_config, init_weights, dtype=torch.float32)
        self.init_fingerprint = weights_fingerprint(model.checkpoint_state())
        self.reference = None
        self.expert_load = None     # MoE: the step's router counts (balance.py), for metrics
        if r.kl_coef > 0:  # beta = 0 loads no reference at all
            self.reference = copy.deepcopy(model).to(device, self.amp_dtype).eval().requires_grad_(False)
        del init_weights
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(model, r)
        self.tokenizer_dir = self.run_dir / "tokenizer"
        if self.leader and not (self.tokenizer_dir / "tokenizer.json").is_file():
            self.tokenizer.save(self.tokenizer_dir)
        self.tasks = rl_tasks(self.cfg)

    def _guard_hardware(self) -> None:
        """Unstable hardware (tandem/resilience/), as in SFT: a heartbeat per step for the supervisor;
        injected faults (the trainer's own, data faults on one trainer rank, and rollout workers'
        kills and hangs delivered to their processes); the guard; the corruption detector, whose
        replicas are the trainer ranks (one rank: checked against a recomputation); the rollout faults
        the worker pool handled, logged as incidents. Every trainer rank takes the same decisions;
        the leader alone writes them down."""
        res = self.cfg.resilience
        self.faults = FaultInjector.from_config(res, self.r.steps, self.run_dir, rank=self.rank, ranks=self.world)
        self.heartbeat, self.incidents = Heartbeat(self.run_dir), Incidents(self.run_dir, write=self.leader)
        self.guard = StepGuard.from_config(res)
        self.detector = (RankCorruptionDetector(res.check_every, self.incidents, self.group, self.device)
                         if self.group is not None else CorruptionDetector(res.check_every, self.incidents))
        # Time spent in the steps of the run's surviving timeline, carried in checkpoints: steps redone
        # after a crash or a rollback count once (goodput, tandem chaos). The totals count every step run.
        self.useful_seconds = 0.0

    def _resume(self) -> None:
        self.start = 0
        if self.resumed:
            self.start = self.restore(self.resumed)
            if self.leader:
                log(f"resuming GRPO from {self.latest} (step {self.start})")
        else:
            accel.manual_seed(self.cfg.run.seed)
            if self.leader:
                log(f"GRPO from {self.init_path} ({self.init_info.get('kind')}, "
                    f"fingerprint {self.init_fingerprint[:12]})")

    def _start_accounting(self) -> None:
        """The ledger and the run's totals (carried over from the interrupted attempt on a resume)."""
        r = self.r
        self.summary = read_summary(self.run_dir)
        self.ledger = Ledger.from_dict(self.summary.get("ledger"))
        self.totals = dict.fromkeys(("samples", "seconds", "update_seconds", "wait_seconds", "sync_seconds",
                                     "sync_bytes", "push_bytes", "reward_errors"), 0)
        self.prior_faults: dict[str, int] = {}
        if self.resumed:  # figures of the interrupted attempt, as of the checkpoint we resume from
            rl_totals = self.summary.get("rl_totals", {})
            self.totals.update({k: v for k, v in rl_totals.items() if k in self.totals})
            self.prior_faults = dict(rl_totals.get("worker_faults", {}))
        self.trainer_kind, self.flops_fwd = accel.device_kind(self.device), self.model_config.flops_per_token()
        rows = r.micro_batch_size or r.prompts_per_step * r.group_size
        self.peaks = (run_peaks(self.run_dir, self.device, ["fp32", self.dtype], self.model_config,
                                tokens=rows * (r.max_prompt_len + r.max_new_tokens)) if self.leader else {})
        self.peak = self.peaks.get(self.dtype)
        self.reported: set[str] = set()

    # --- state: restore, roll back, checkpoint ---------------------------------------------------

    def restore(self, ckpt: dict | None) -> int:
        """Trainer state as of an RL checkpoint, or of the start of RL (None); returns its step."""
        model, device, guard = self.model, self.device, self.guard
        if ckpt is None:
            model.load_checkpoint_state({k: v.to(device) for k, v in load_weights(self.init_path)[1].items()})
            self.optimizer.state.clear()
            accel.manual_seed(self.cfg.run.seed)
            guard.reset()
            step, self.useful_seconds = 0, 0.0
        else:
            model.load_checkpoint_state({k: v.to(device) for k, v in ckpt["model"].items()})
            self.optimizer.load_state_dict(ckpt["optimizer"])
            state = ckpt["train_state"]
            accel.set_rng_state(state["rng"], device)
            if "guard" in state:
                guard.load_state_dict(state["guard"])
            else:  # a checkpoint from before GRPO had a guard
                guard.reset()
            step, self.useful_seconds = state["step"], state.get("useful_seconds", 0.0)
        self.detector.forget()
        if self.leader:
            truncate_metrics(self.run_dir, "rl", step)
        return step

    def rollback(self, step: int, at_most: int) -> int:
        """Back to the newest valid RL checkpoint of step <= at_most, on every rank (the leader
        discards the newer ones); returns its step."""
        folder = latest_valid(self.ckpt_root, at_most=at_most)
        back_to = self.restore(load_checkpoint(folder) if folder is not None else None)
        if self.leader:
            discard_newer(self.ckpt_root, back_to)
        self.guard.rolled_back(step)
        self.incidents.record("rollback", step, f"resuming from step {back_to}")
        self.bar.rewind(back_to)
        return back_to

    def checkpoint(self, step: int) -> None:
        r = self.r
        save_checkpoint(self.ckpt_root, step, self.model.checkpoint_state(),
                        {"phase": "rl", "data_position": step * r.prompts_per_step, "init": str(self.init_path),
                         "init_fingerprint": self.init_fingerprint, "rng": accel.get_rng_state(self.device),
                         "guard": self.guard.state_dict(), "useful_seconds": self.useful_seconds},
                        self.optimizer.state_dict(),
                        extra_files={"model_config.json": json.dumps(self.model_config.to_dict()).encode(),
                                     **{n: self.tokenizer_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}},
                        keep=r.keep_checkpoints, before_commit=self.faults.before_commit(step))

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        from tandem.train.rollout import start_rollouts

        r = self.r
        if self.start == r.steps:  # nothing left to train (rl.steps = 0, or a rerun of a finished run)
            if self.latest is None and self.leader:
                self.checkpoint(r.steps)
            return self.finish()
        if self.leader:
            self.rollouts = start_rollouts(self.cfg, self.model_config, self.tokenizer, self.run_dir, self.device)
        self.bar = Progress(r.steps, "rl", start=self.start, every=r.log_every, enabled=self.progress and self.leader)
        try:
            if self.leader:
                self.pending = self.rewind(self.start, [])
            self.step = self.start
            while self.step < r.steps and self.train_step():
                pass
            self.bar.close()
            if self.leader:
                self.heartbeat.idle(r.steps)
        finally:
            if self.rollouts is not None:
                self.rollouts.close()
        return self.finish()

    def train_step(self) -> bool:
        """One step (or a rollback): collect -> score -> update -> publish -> checkpoint. False once
        step `stop_after` is done."""
        t_step = time.perf_counter()
        if not self.weights_ok():
            return True
        following = scored = None
        if self.leader:
            if self.r.mode == "async" and self.step + 1 < self.r.steps:  # batch k+1 is generated with weights k
                following = self.submit(self.step + 1, self.step)
            scored = self.score(*self.collect())
        t_update = accel.timer(self.device)
        update = self.update(self.share(scored.shared if scored else None))
        if update.back_to is not None:
            self.step = self.rollback(self.step, update.back_to)
            if self.leader:
                self.pending = self.rewind(self.step, [following] if following is not None else [])
            return True
        self.detector.remember_weights(self.step + 1, [self.model], [self.optimizer])
        update_seconds = accel.timer(self.device) - t_update
        self.step = done = self.step + 1
        if not self.leader:
            return done != self.stop_after
        sync = self.publish(done, following)
        step_seconds = time.perf_counter() - t_step
        self.useful_seconds += step_seconds
        self.record(done, scored, update, sync, step_seconds, update_seconds)
        if done % self.r.checkpoint_every == 0 or done == self.r.steps or done == self.stop_after:
            self.checkpoint(done)
            self.save_totals()
        return done != self.stop_after

    def weights_ok(self) -> bool:
        """The start of a step: heartbeat, injected faults, the detector's vote on the weights.
        False when it rolled back (the step then starts over from the checkpoint's)."""
        step = self.step
        if self.leader:
            self.heartbeat.beat(step)
            self.faults.start_of_step(step, checkpoints=self.ckpt_root)
            self.faults.strike(step, self.rollouts.pids())
        self.faults.corrupt_weights(step, [self.model], [self.optimizer])
        if not self.detector.check_weights(step, [self.model], [self.optimizer]):
            return True
        self.step = self.rollback(step, self.detector.last_good)
        if self.leader:
            self.pending = self.rewind(self.step, [self.pending])
        return False

    def collect(self) -> tuple[RolloutResult, float]:
        """This step's rollouts (leader), and the seconds spent waiting for them."""
        t_wait = time.perf_counter()
        result = self.rollouts.collect(self.pending)
        wait_seconds = time.perf_counter() - t_wait
        if result.faults:
            self.incidents.record("worker_fault", self.step, f"{result.faults} rollout worker fault(s) handled")
        return result, wait_seconds

    def score(self, result: RolloutResult, wait_seconds: float) -> Scored:
        """Rewards and group-relative advantages (on the host, leader)."""
        r, tokenizer = self.r, self.tokenizer
        G, picked = r.group_size, self.prompts_for(self.step)
        rewards, correct, formatted, step_errors = [], 0, 0, 0
        for i, sample in enumerate(result.samples):
            task, example, _ = picked[i // G]
            text = tokenizer.decode([t for t in sample["tokens"] if t != tokenizer.eos_id])
            scored, error = safe_reward(task, text, example, r.correctness_weight, r.format_weight)
            if error:
                step_errors += 1
                if task.name not in self.reported:  # log the first failure of each task's reward
                    self.reported.add(task.name)
                    log(f"warning: a reward function raised, the sample scores 0 (counted): {error}")
            rewards.append(scored.reward)
            correct += scored.correct
            formatted += scored.format_ok
        reward_t = torch.tensor(rewards)
        advantages = group_advantages(reward_t, G, r.scale_rewards)
        keep = informative(reward_t, G) if r.filter_groups else list(range(len(rewards)))
        shared = ([picked[i // G][2] for i in keep], [result.samples[i]["tokens"] for i in keep],
                  [result.samples[i]["logprobs"] for i in keep], advantages[keep])
        return Scored(result, wait_seconds, reward_t, correct, formatted, step_errors, shared)

    def share(self, shared: tuple | None) -> tuple:
        """The leader's batch, on every trainer."""
        if self.group is not None:
            box = [shared]
            dist.broadcast_object_list(box, src=0, group=self.group, device=self.device)
            shared = box[0]
        return shared

    def update(self, shared: tuple) -> Update:
        """Policy update; with several trainers each takes a slice of the sequences."""
        r, step = self.r, self.step
        prompts, completions, logprobs, advantages = shared
        n_seq = len(completions)
        lr = lr_at(step, r.lr, r.warmup_steps, r.steps, r.min_lr_ratio)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.expert_load = None             # set by train_on (MoE models): this step's router counts
        if not n_seq:  # every group was uniform (filtered): nothing to learn from this batch
            return Update(lr, None, {}, torch.zeros(0), 0.0, 0, None)
        norm = "grpo" if r.loss == "gspo" else r.loss_norm     # GSPO averages each sequence's tokens
        batch = build_batch(prompts, completions, logprobs, advantages, norm, r.max_new_tokens,
                            self.tokenizer.pad_id, self.device)
        rows = list(range(self.rank * n_seq // self.world, (self.rank + 1) * n_seq // self.world))
        policy = PolicyUpdate(self.model, self.reference, batch, rows, r, self.amp_dtype, self.group,
                              lambda loss: self.faults.corrupt_loss(step, loss))
        grad_norm, skipped, back_to = self.train_on(policy, step)
        if back_to is not None:
            return Update(lr, batch, {}, torch.zeros(0), grad_norm, skipped, back_to)
        return Update(lr, batch, policy.stats(), policy.logp_old(), grad_norm, skipped, None)

    def train_on(self, update: PolicyUpdate, step: int) -> tuple[float, int, int | None]:
        """The batch's rl.updates_per_batch optimizer steps, each vetted as an SFT step is (injected
        faults, the corruption detector, the guard). Returns (the last gradient norm, the updates
        skipped, None or the step to roll back to at most)."""
        model, optimizer = self.model, self.optimizer
        grad_norm, skipped = 0.0, 0
        for _ in range(self.r.updates_per_batch):
            losses = [update.accumulate()]

            def recompute(_replica: int) -> None:  # the detector's tie-break (every rank runs it)
                losses[0] = update.accumulate()

            if self.leader:
                self.faults.mid_step(step)
            self.faults.corrupt_grads(step, [model])
            if self.detector.check_grads(step, [model], losses, recompute):
                return grad_norm, skipped, self.detector.last_good
            grad_norm = update.clip()
            verdict = self.guard.check(step, losses[0], grad_norm)
            if verdict.action != "update":
                self.incidents.record("skip", step, verdict.reason)
                skipped += 1
            if verdict.action == "rollback":
                return grad_norm, skipped, self.guard.trouble_start(step)
            if verdict.action == "update":
                self.faults.before_update(step, [model])
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.expert_load = balance_experts(model, verdict.action == "update", update.group)
        return grad_norm, skipped, None

    def publish(self, done: int, following: int | None) -> dict:
        """The new weights to the rollout workers (leader); in sync mode, ask for the next batch now."""
        sync = self.rollouts.publish(done, self.model.checkpoint_state())
        if following is None and done < self.r.steps:  # sync: batch k+1 with weights k+1
            following = self.submit(done, done)
        self.pending = following
        return sync

    def record(self, done: int, scored: Scored, update: Update, sync: dict, step_seconds: float,
               update_seconds: float) -> None:
        """Bookkeeping (leader): ledger, totals, metrics, progress. Work redone after a rollback
        counts again here (it was spent); the metrics of the abandoned steps are dropped."""
        r, result, batch = self.r, scored.result, update.batch
        gap = mismatch(update.old.float().cpu(), batch.logp_rollout.cpu() if batch is not None else torch.zeros(0))
        batch_tokens = batch.tokens if batch is not None else 0
        update_tokens = batch_tokens * r.updates_per_batch
        self.ledger.add("policy_update", self.trainer_kind, update_seconds * self.world, update_tokens,
                        estimate_train_flops(self.model_config, update_tokens)
                        + (self.flops_fwd * batch_tokens if self.reference is not None else 0), peak_flops=self.peak)
        self.ledger.add("weight_sync", self.trainer_kind, sync["seconds"])
        for kind, seconds in result.sync_seconds.items():
            self.ledger.add("weight_sync", kind, seconds)
        for kind, (seconds, tokens) in result.generate.items():
            self.ledger.add("rollout", kind, seconds, tokens, self.flops_fwd * tokens)
        n_samples = len(result.samples)
        for key, value in (("samples", n_samples), ("seconds", step_seconds), ("update_seconds", update_seconds),
                           ("wait_seconds", scored.wait_seconds), ("sync_seconds", sync["seconds"]),
                           ("sync_bytes", sync["bytes"]), ("reward_errors", scored.errors)):
            self.totals[key] += value
        reward, accuracy = float(scored.rewards.mean()), scored.correct / n_samples
        if done % r.log_every == 0 or done == r.steps:
            append_metrics(self.run_dir, {
                "phase": "rl", "step": done, "reward": reward, "accuracy": accuracy,
                "format_rate": scored.formatted / n_samples, "trained_samples": len(scored.shared[1]),
                "trained_tokens": sum(len(tokens) for tokens in scored.shared[1]), "lr": update.lr,
                "response_length": sum(len(s["tokens"]) for s in result.samples) / n_samples,
                "grad_norm": update.grad_norm, "skipped": update.skipped, **update.stats, **gap,
                "samples_per_s": n_samples / step_seconds, "step_seconds": step_seconds,
                "update_seconds": update_seconds, "wait_seconds": scored.wait_seconds,
                "sync_seconds": sync["seconds"], "sync_bytes": sync["bytes"], "weights_version": result.version,
                "reward_errors": scored.errors, "worker_faults": result.faults, **load_metrics(self.expert_load),
                "time": time.time()})
        self.bar.update(1, reward=reward, acc=accuracy, mismatch=gap["mismatch"])

    # --- rollouts -------------------------------------------------------------------------------

    def prompts_for(self, step: int) -> list[tuple[Task, Example, list[int]]]:
        """The prompts of step k: prompts_per_step examples of the RL tasks, round-robin, from
        position k * prompts_per_step of the train stream (so the data position is the step)."""
        r, tasks, picked = self.r, self.tasks, []
        for j in range(r.prompts_per_step):
            index = step * r.prompts_per_step + j
            task, example = tasks[index % len(tasks)], example_for(tasks, index)
            system = [{"role": "system", "content": r.system_prompt}] if r.system_prompt else []
            ids = self.tokenizer.encode_prompt(system + [{"role": "user", "content": example.prompt}])
            if len(ids) > r.max_prompt_len:
                raise DataError(f"a {task.name} prompt has {len(ids)} tokens, more than rl.max_prompt_len "
                                f"({r.max_prompt_len}); raise rl.max_prompt_len")
            picked.append((task, example, ids))
        return picked

    def submit(self, step: int, version: int) -> int:
        r = self.r
        requests = [[ids, sample_seed(self.cfg.run.seed, step, j, g)]
                    for j, (_, _, ids) in enumerate(self.prompts_for(step)) for g in range(r.group_size)]
        return self.rollouts.submit(step, version, requests)

    def rewind(self, step: int, tickets: list[int]) -> int:
        """(Re)start the rollouts at `step`, the weights being that step's: wait out the batches
        still coming for an abandoned timeline, publish the weights as version `step` and ask for
        batch `step` (in async mode too: as after a resume, it is generated with weights `step`)."""
        for ticket in tickets:
            self.rollouts.collect(ticket)
        sync = self.rollouts.publish(step, self.model.checkpoint_state())
        self.ledger.add("weight_sync", self.trainer_kind, sync["seconds"])
        self.totals["push_bytes"] = sync["bytes"]      # the same every push: one model in the rollout dtype
        return self.submit(step, step)

    # --- the end --------------------------------------------------------------------------------

    def worker_faults(self) -> dict[str, int]:
        counts = self.rollouts.fault_counts() if self.rollouts is not None else {}
        prior = self.prior_faults
        return {k: prior.get(k, 0) + counts.get(k, 0) for k in set(prior) | set(counts)}

    def save_totals(self) -> None:
        update_summary(self.run_dir, ledger=self.ledger.to_dict(),
                       rl_totals=dict(self.totals, worker_faults=self.worker_faults()))

    def rl_summary(self) -> dict:
        """What summary.json records under "rl"."""
        r, totals, rollouts = self.r, self.totals, self.rollouts
        return {"steps": r.steps, "resumed_from": self.start, "mode": r.mode, "device": str(self.device),
                "device_kind": self.trainer_kind, "dtype": self.dtype,
                "rollout": (rollouts.describe() if rollouts is not None
                            else self.summary.get("rl", {}).get("rollout", {})),
                "init": str(self.init_path), "init_fingerprint": self.init_fingerprint, **totals,
                "samples_per_s": totals["samples"] / totals["seconds"] if totals["seconds"] else None,
                "useful_seconds": self.useful_seconds, "worker_faults": self.worker_faults(),
                "incidents": dict(self.incidents.counts), "parameters": self.model_config.num_parameters(),
                "mfu": self.update_mfu()}

    def update_mfu(self) -> dict:
        """The policy update's utilisation against the fp32 peak and the run's dtype's (the ledger's
        policy_update row: every update of the run, resumed attempts included)."""
        row = self.ledger.rows.get(("policy_update", self.trainer_kind))
        return utilisation(row["flops"], row["seconds"], self.peaks) if row and self.peaks else {}

    def finish(self) -> dict:
        from tandem.train.rollout import leave_trainers

        summary = self.rl_summary()
        if self.leader:
            self.save_totals()
            update_summary(self.run_dir, rl=summary, parameters=summary["parameters"])
        if self.group is not None:
            leave_trainers(self.group)  # after the leader's last write: nothing is lost if a rank dies leaving
        return summary


def run_rl_stage(cfg: Config, init: str | Path, out: str | Path, progress: bool = True) -> Path:
    """`tandem rl` and the pipeline's GRPO stage: check devices, then train into out/checkpoints/rl."""
    from tandem.runs import prepare_run
    from tandem.train.rollout import check_devices, torchrun_env
    check_devices(cfg)
    rl_tasks(cfg)                       # unknown task names fail before anything is written
    if not Path(init).exists():
        raise ModelError(f"--init path not found: {init}")
    launched = torchrun_env()
    leader = launched is None or launched[0] == 0
    run_dir = prepare_run(out, cfg) if leader else Path(out)   # other trainer ranks wait for it
    train_grpo(cfg, run_dir, init, progress=progress)
    return run_dir
