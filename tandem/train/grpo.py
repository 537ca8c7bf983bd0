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
from pathlib import Path

import torch
import torch.distributed as dist

from tandem import accel
from tandem.config import Config
from tandem.errors import ConfigError, DataError, ModelError
from tandem.ledger import Ledger
from tandem.loading import find_checkpoint, load_weights
from tandem.model import Transformer, estimate_train_flops, weights_fingerprint
from tandem.peak import run_peaks
from tandem.progress import Progress, log
from tandem.runs import append_metrics, read_summary, truncate_metrics, update_summary
from tandem.tasks import Example, RewardResult, Task, stable_seed
from tandem.train.checkpoint import discard_newer, latest_valid, load_checkpoint, save_checkpoint
from tandem.resilience.faults import FaultInjector
from tandem.resilience.guard import StepGuard
from tandem.resilience.incidents import Heartbeat, Incidents
from tandem.resilience.replicas import CorruptionDetector, RankCorruptionDetector
from tandem.train.sft import build_optimizer, example_for, lr_at

# -----------------------------------------------------------------------------------------------
# The loss, on flat token tensors (every completion token of the batch, sequence after sequence)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [n * G] (groups contiguous) -> advantages [n * G]: reward minus its group's mean,
    divided by the group's std (scale="group"), the batch's std ("batch") or nothing ("none")."""
    r = rewards.view(-1, group_size).double()
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    return centered.view(-1).float()


def informative(rewards: torch.Tensor, group_size: int) -> list[int]:
    """Indices of the samples whose group's rewards are not all equal (rl.filter_groups: a uniform
    group has zero advantage everywhere and adds nothing to the gradient)."""
    groups = rewards.view(-1, group_size)
    mixed = (groups != groups[:, :1]).any(dim=1)
    return [i for i in range(rewards.numel()) if mixed[i // group_size]]


def token_weights(lengths: list[int], loss_norm: str, max_new_tokens: int) -> torch.Tensor:
    """c_t for every completion token (flat): the loss is sum_t c_t * loss_t over the batch.

    grpo: 1 / (|o_i| * n_seqs); dapo: 1 / total tokens; dr_grpo: 1 / (n_seqs * max_new_tokens).
    Computed for the whole batch, so any micro-batch split sums to the same loss.
    """
    n = len(lengths)
    if loss_norm == "grpo":
        per_seq = [1.0 / (length * n) for length in lengths]
    elif loss_norm == "dapo":
        per_seq = [1.0 / sum(lengths)] * n
    elif loss_norm == "dr_grpo":
        per_seq = [1.0 / (n * max_new_tokens)] * n
    else:
        raise ConfigError(f"unknown rl.loss_norm '{loss_norm}'; use grpo, dapo or dr_grpo")
    return torch.tensor([w for w, length in zip(per_seq, lengths) for _ in range(length)])


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(p || ref) per token, from samples of p: e^(ref-p) - (ref-p) - 1."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


@dataclass
class LossTerms:
    """The loss and its statistics, all 0-dim tensors on the loss's device: the trainer sums them
    over micro-batches there and reads them once per step (a float() each would wait for the device)."""
    loss: torch.Tensor          # differentiable
    clip_frac: torch.Tensor     # share of tokens whose ratio was clipped (where the clip changed the value)
    kl_ref: torch.Tensor        # mean k3 KL to the reference (0 without one)
    tis_mean: torch.Tensor      # mean truncated importance weight
    tis_capped: torch.Tensor    # share of tokens whose weight hit the cap


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              weights: torch.Tensor, clip_eps: float, clip_eps_high: float = 0.0,
              logp_rollout: torch.Tensor | None = None, tis_cap: float = 0.0,
              logp_ref: torch.Tensor | None = None, kl_coef: float = 0.0) -> LossTerms:
    """The GRPO objective (module docstring) on flat per-token tensors of equal length N.

    logp: [N] current policy (with grad); logp_old: [N] policy before this batch's updates;
    advantages: [N] each token carries its sequence's advantage; weights: [N] the c_t of
    `token_weights`; logp_rollout: [N] what the rollout worker sampled with (for tis_cap);
    logp_ref: [N] frozen reference (for kl_coef).
    """
    high = clip_eps_high or clip_eps
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    tis = torch.ones_like(logp_old)
    if tis_cap and logp_rollout is not None:
        tis = torch.exp(logp_old - logp_rollout).clamp(max=tis_cap)
    per_token = -tis * surrogate
    kl = torch.zeros_like(logp_old)
    if kl_coef and logp_ref is not None:
        kl = k3(logp, logp_ref)
        per_token = per_token + kl_coef * kl
    loss = (weights * per_token).sum()
    with torch.no_grad():
        n = max(1, logp.numel())
        capped = (tis >= tis_cap).sum() / n if tis_cap else torch.zeros((), device=logp.device)
        return LossTerms(loss, (clipped < unclipped).sum() / n, kl.sum() / n, tis.sum() / n, capped)


def mismatch(logp_train: torch.Tensor, logp_rollout: torch.Tensor) -> dict:
    """How differently the two roles score the sampled tokens: mean |delta logprob|, the k3 estimate
    of KL(rollout || trainer) (the tokens were sampled by the rollout policy) and the largest |delta|."""
    d = (logp_train - logp_rollout).double()
    if not d.numel():
        return {"mismatch": 0.0, "mismatch_kl": 0.0, "mismatch_max": 0.0}
    return {"mismatch": float(d.abs().mean()), "mismatch_kl": float((torch.exp(d) - d - 1).mean()),
            "mismatch_max": float(d.abs().max())}


# -----------------------------------------------------------------------------------------------
# A batch of rollouts, as the trainer sees it


@dataclass
class Batch:
    input_ids: torch.Tensor     # [B, T] prompt + completion, right-padded
    target_mask: torch.Tensor   # [B, T-1] True where position t predicts completion token t+1
    lengths: list[int]          # completion length of each sequence
    logp_rollout: torch.Tensor  # [N] the rollout worker's logprob of each completion token (flat)
    advantages: torch.Tensor    # [N] each token's sequence advantage
    weights: torch.Tensor       # [N] loss normalisation c_t
    tokens: int                 # real tokens (prompt + completion) in the batch
    widths: list[int]           # prompt + completion length of each sequence (on the host: no device read)

    def select(self, rows: list[int]) -> "Batch":
        """The sub-batch of sequences `rows` (contiguous), flat tensors sliced to match."""
        offsets = [0]
        for length in self.lengths:
            offsets.append(offsets[-1] + length)
        lo, hi = offsets[rows[0]], offsets[rows[-1] + 1]
        widths = [self.widths[r] for r in rows]
        width = max(widths)
        return Batch(self.input_ids[rows, :width], self.target_mask[rows, :width - 1],
                     [self.lengths[r] for r in rows], self.logp_rollout[lo:hi], self.advantages[lo:hi],
                     self.weights[lo:hi], 0, widths)


def build_batch(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]],
                advantages: torch.Tensor, loss_norm: str, max_new_tokens: int, pad_id: int, device) -> Batch:
    """Sequences i = prompts[i] + completions[i] (one prompt entry per sample)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, len(p) - 1:len(row) - 1] = True
    lengths = [len(c) for c in completions]
    per_token_adv = torch.repeat_interleave(advantages, torch.tensor(lengths))
    return Batch(ids.to(device), mask.to(device), lengths,
                 torch.tensor([x for lp in logprobs for x in lp], dtype=torch.float32, device=device),
                 per_token_adv.to(device), token_weights(lengths, loss_norm, max_new_tokens).to(device),
                 sum(len(r) for r in rows), [len(r) for r in rows])


def token_logprobs(model: Transformer, batch: Batch) -> torch.Tensor:
    """[N] log p(completion token) under `model` (flat, sequence after sequence); logits are formed
    only at the positions that predict a completion token."""
    hidden = model.hidden(batch.input_ids)[:, :-1][batch.target_mask]
    logits = model.lm_head(hidden).float()
    targets = batch.input_ids[:, 1:][batch.target_mask]
    return logits.log_softmax(-1).gather(1, targets.view(-1, 1)).view(-1)


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
    from tandem.train.rollout import join_trainers, leave_trainers, start_rollouts

    r = cfg.rl
    run_dir = Path(run_dir)
    accel.set_threads(r.threads or cfg.run.threads)
    group, device = join_trainers(cfg)            # group: None for a single trainer
    accel.set_deterministic(device, cfg.run.deterministic)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    leader = rank == 0
    amp_dtype = accel.resolve_dtype(r.dtype, device)
    ckpt_root = run_dir / "checkpoints" / "rl"
    latest = latest_valid(ckpt_root)
    resumed = load_checkpoint(latest) if latest is not None else None
    init_path = Path(resumed["train_state"]["init"]) if resumed else resolve_init(init)
    model_config, init_weights, tokenizer, init_info = load_weights(init_path)
    if r.max_prompt_len + r.max_new_tokens > model_config.max_position_embeddings:
        raise ConfigError(f"rl.max_prompt_len + rl.max_new_tokens = {r.max_prompt_len + r.max_new_tokens} exceeds "
                          f"the model's max_position_embeddings ({model_config.max_position_embeddings}); lower them")
    model = Transformer.from_checkpoint_state(model_config, init_weights, dtype=torch.float32)
    init_fingerprint = weights_fingerprint(model.checkpoint_state())
    reference = None
    if r.kl_coef > 0:  # beta = 0 loads no reference at all
        reference = copy.deepcopy(model).to(device, amp_dtype).eval().requires_grad_(False)
    del init_weights
    model.to(device).train()
    optimizer = build_optimizer(model, r)

    tokenizer_dir = run_dir / "tokenizer"
    if leader and not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer.save(tokenizer_dir)
    tasks = rl_tasks(cfg)

    # Unstable hardware (train/resilience.py), as in SFT: a heartbeat per step for the supervisor;
    # injected faults (the trainer's own, data faults on one trainer rank, and rollout workers'
    # kills and hangs delivered to their processes); the guard; the corruption detector, whose
    # replicas are the trainer ranks (one rank: checked against a recomputation); the rollout faults
    # the worker pool handled, logged as incidents. Every trainer rank takes the same decisions;
    # the leader alone writes them down.
    faults = FaultInjector.from_config(cfg.resilience, r.steps, run_dir, rank=rank, ranks=world)
    heartbeat, incidents = Heartbeat(run_dir), Incidents(run_dir, write=leader)
    guard = StepGuard.from_config(cfg.resilience)
    detector = (RankCorruptionDetector(cfg.resilience.check_every, incidents, group, device) if group is not None
                else CorruptionDetector(cfg.resilience.check_every, incidents))

    # Time spent in the steps of the run's surviving timeline, carried in checkpoints: steps redone
    # after a crash or a rollback count once (goodput, tandem chaos). The totals count every step run.
    useful_seconds = 0.0

    def restore(ckpt: dict | None) -> int:
        """Trainer state as of an RL checkpoint, or of the start of RL (None); returns its step."""
        nonlocal useful_seconds
        if ckpt is None:
            model.load_checkpoint_state({k: v.to(device) for k, v in load_weights(init_path)[1].items()})
            optimizer.state.clear()
            accel.manual_seed(cfg.run.seed)
            guard.reset()
            step, useful_seconds = 0, 0.0
        else:
            model.load_checkpoint_state({k: v.to(device) for k, v in ckpt["model"].items()})
            optimizer.load_state_dict(ckpt["optimizer"])
            state = ckpt["train_state"]
            accel.set_rng_state(state["rng"], device)
            if "guard" in state:
                guard.load_state_dict(state["guard"])
            else:  # a checkpoint from before GRPO had a guard
                guard.reset()
            step, useful_seconds = state["step"], state.get("useful_seconds", 0.0)
        detector.forget()
        if leader:
            truncate_metrics(run_dir, "rl", step)
        return step

    def rollback(step: int, at_most: int) -> int:
        """Back to the newest valid RL checkpoint of step <= at_most, on every rank (the leader
        discards the newer ones); returns its step."""
        folder = latest_valid(ckpt_root, at_most=at_most)
        back_to = restore(load_checkpoint(folder) if folder is not None else None)
        if leader:
            discard_newer(ckpt_root, back_to)
        guard.rolled_back(step)
        incidents.record("rollback", step, f"resuming from step {back_to}")
        bar.rewind(back_to)
        return back_to

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_root, step, model.checkpoint_state(),
                        {"phase": "rl", "data_position": step * r.prompts_per_step, "init": str(init_path),
                         "init_fingerprint": init_fingerprint, "rng": accel.get_rng_state(device),
                         "guard": guard.state_dict(), "useful_seconds": useful_seconds},
                        optimizer.state_dict(),
                        extra_files={"model_config.json": json.dumps(model_config.to_dict()).encode(),
                                     **{n: tokenizer_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}},
                        keep=r.keep_checkpoints, before_commit=faults.before_commit(step))

    start = 0
    if resumed:
        start = restore(resumed)
        if leader:
            log(f"resuming GRPO from {latest} (step {start})")
    else:
        accel.manual_seed(cfg.run.seed)
        if leader:
            log(f"GRPO from {init_path} ({init_info.get('kind')}, fingerprint {init_fingerprint[:12]})")

    # The prompts of step k: prompts_per_step examples of the RL tasks, round-robin, from position
    # k * prompts_per_step of the train stream (so the data position is the step).
    def prompts_for(step: int) -> list[tuple[Task, Example, list[int]]]:
        picked = []
        for j in range(r.prompts_per_step):
            index = step * r.prompts_per_step + j
            task, example = tasks[index % len(tasks)], example_for(tasks, index)
            system = [{"role": "system", "content": r.system_prompt}] if r.system_prompt else []
            ids = tokenizer.encode_prompt(system + [{"role": "user", "content": example.prompt}])
            if len(ids) > r.max_prompt_len:
                raise DataError(f"a {task.name} prompt has {len(ids)} tokens, more than rl.max_prompt_len "
                                f"({r.max_prompt_len}); raise rl.max_prompt_len")
            picked.append((task, example, ids))
        return picked

    def submit(step: int, version: int) -> int:
        requests = [[ids, sample_seed(cfg.run.seed, step, j, g)]
                    for j, (_, _, ids) in enumerate(prompts_for(step)) for g in range(r.group_size)]
        return rollouts.submit(step, version, requests)

    summary = read_summary(run_dir)
    ledger = Ledger.from_dict(summary.get("ledger"))
    totals = dict.fromkeys(("samples", "seconds", "update_seconds", "wait_seconds", "sync_seconds",
                            "sync_bytes", "push_bytes", "reward_errors"), 0)
    prior_faults: dict[str, int] = {}
    if resumed:  # figures of the interrupted attempt, as of the checkpoint we resume from
        totals.update({k: v for k, v in summary.get("rl_totals", {}).items() if k in totals})
        prior_faults = dict(summary.get("rl_totals", {}).get("worker_faults", {}))

    def worker_faults() -> dict[str, int]:
        counts = rollouts.fault_counts() if rollouts is not None else {}
        return {k: prior_faults.get(k, 0) + counts.get(k, 0) for k in set(prior_faults) | set(counts)}

    def save_totals() -> None:
        update_summary(run_dir, ledger=ledger.to_dict(), rl_totals=dict(totals, worker_faults=worker_faults()))

    trainer_kind, flops_fwd = accel.device_kind(device), model_config.flops_per_token()
    rows = r.micro_batch_size or r.prompts_per_step * r.group_size
    peak = (run_peaks(run_dir, device, ["fp32", r.dtype], model_config,
                      tokens=rows * (r.max_prompt_len + r.max_new_tokens))[r.dtype] if leader else None)
    reported: set[str] = set()
    rollouts = None

    def rl_summary() -> dict:  # what summary.json records under "rl"
        return {"steps": r.steps, "resumed_from": start, "mode": r.mode, "device": str(device),
                "device_kind": trainer_kind, "dtype": r.dtype,
                "rollout": rollouts.describe() if rollouts is not None else summary.get("rl", {}).get("rollout", {}),
                "init": str(init_path),
                "init_fingerprint": init_fingerprint, **totals,
                "samples_per_s": totals["samples"] / totals["seconds"] if totals["seconds"] else None,
                "useful_seconds": useful_seconds, "worker_faults": worker_faults(), "incidents": dict(incidents.counts),
                "parameters": model_config.num_parameters()}

    def finish() -> dict:
        summary = rl_summary()
        if leader:
            save_totals()
            update_summary(run_dir, rl=summary, parameters=summary["parameters"])
        if group is not None:
            leave_trainers(group)  # after the leader's last write: nothing is lost if a rank dies leaving
        return summary

    if start == r.steps:  # nothing left to train (rl.steps = 0, or a rerun of a finished run)
        if latest is None and leader:
            checkpoint(r.steps)
        return finish()
    if leader:
        rollouts = start_rollouts(cfg, model_config, tokenizer, run_dir, device)

    def rewind(step: int, tickets: list[int]) -> int:
        """(Re)start the rollouts at `step`, the weights being that step's: wait out the batches
        still coming for an abandoned timeline, publish the weights as version `step` and ask for
        batch `step` (in async mode too: as after a resume, it is generated with weights `step`)."""
        for ticket in tickets:
            rollouts.collect(ticket)
        sync = rollouts.publish(step, model.checkpoint_state())
        ledger.add("weight_sync", trainer_kind, sync["seconds"])
        totals["push_bytes"] = sync["bytes"]      # the same every push: one model in the rollout dtype
        return submit(step, step)

    def train_on(update: PolicyUpdate, step: int) -> tuple[float, int, int | None]:
        """The batch's rl.updates_per_batch optimizer steps, each vetted as an SFT step is (injected
        faults, the corruption detector, the guard). Returns (the last gradient norm, the updates
        skipped, None or the step to roll back to at most)."""
        grad_norm, skipped = 0.0, 0
        for _ in range(r.updates_per_batch):
            losses = [update.accumulate()]

            def recompute(_replica: int) -> None:  # the detector's tie-break (every rank runs it)
                losses[0] = update.accumulate()

            if leader:
                faults.mid_step(step)
            faults.corrupt_grads(step, [model])
            if detector.check_grads(step, [model], losses, recompute):
                return grad_norm, skipped, detector.last_good
            grad_norm = update.clip()
            verdict = guard.check(step, losses[0], grad_norm)
            if verdict.action != "update":
                incidents.record("skip", step, verdict.reason)
                skipped += 1
            if verdict.action == "rollback":
                return grad_norm, skipped, guard.trouble_start(step)
            if verdict.action == "update":
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped, None

    bar = Progress(r.steps, "rl", start=start, every=r.log_every, enabled=progress and leader)
    try:
        if leader:
            pending = rewind(start, [])
        step = start
        while step < r.steps:
            t_step = time.perf_counter()
            shared = None
            if leader:
                heartbeat.beat(step)
                faults.start_of_step(step, checkpoints=ckpt_root)
                faults.strike(step, rollouts.pids())
            faults.corrupt_weights(step, [model])
            if detector.check_weights(step, [model], [optimizer]):
                step = rollback(step, detector.last_good)
                if leader:
                    pending = rewind(step, [pending])
                continue
            if leader:
                following = None
                if r.mode == "async" and step + 1 < r.steps:  # batch k+1 is generated with weights k
                    following = submit(step + 1, step)
                t_wait = time.perf_counter()
                result = rollouts.collect(pending)
                wait_seconds = time.perf_counter() - t_wait
                if result.faults:
                    incidents.record("worker_fault", step, f"{result.faults} rollout worker fault(s) handled")

                # Rewards and group-relative advantages (on the host).
                G, picked = r.group_size, prompts_for(step)
                rewards, correct, formatted, step_errors = [], 0, 0, 0
                for i, sample in enumerate(result.samples):
                    task, example, _ = picked[i // G]
                    text = tokenizer.decode([t for t in sample["tokens"] if t != tokenizer.eos_id])
                    scored, error = safe_reward(task, text, example, r.correctness_weight, r.format_weight)
                    if error:
                        step_errors += 1
                        if task.name not in reported:  # log the first failure of each task's reward
                            reported.add(task.name)
                            log(f"warning: a reward function raised, the sample scores 0 (counted): {error}")
                    rewards.append(scored.reward)
                    correct += scored.correct
                    formatted += scored.format_ok
                reward_t = torch.tensor(rewards)
                advantages = group_advantages(reward_t, G, r.scale_rewards)
                keep = informative(reward_t, G) if r.filter_groups else list(range(len(rewards)))
                shared = ([picked[i // G][2] for i in keep], [result.samples[i]["tokens"] for i in keep],
                          [result.samples[i]["logprobs"] for i in keep], advantages[keep])
            if group is not None:  # the leader's batch, to every trainer
                box = [shared]
                dist.broadcast_object_list(box, src=0, group=group, device=device)
                shared = box[0]
            prompts, completions, logprobs, advantages = shared
            n_seq = len(completions)

            # Policy update; with several trainers each takes a slice of the sequences.
            t_update = accel.timer(device)
            lr = lr_at(step, r.lr, r.warmup_steps, r.steps, r.min_lr_ratio)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            stats, old, grad_norm, skipped, back_to = {}, torch.zeros(0), 0.0, 0, None
            if n_seq:  # else every group was uniform (filtered): nothing to learn from this batch
                batch = build_batch(prompts, completions, logprobs, advantages, r.loss_norm, r.max_new_tokens,
                                    tokenizer.pad_id, device)
                rows = list(range(rank * n_seq // world, (rank + 1) * n_seq // world))
                update = PolicyUpdate(model, reference, batch, rows, r, amp_dtype, group,
                                      lambda loss: faults.corrupt_loss(step, loss))
                grad_norm, skipped, back_to = train_on(update, step)
                if back_to is None:
                    stats, old = update.stats(), update.logp_old()
            if back_to is not None:
                step = rollback(step, back_to)
                if leader:
                    pending = rewind(step, [following] if following is not None else [])
                continue
            detector.remember_weights(step + 1, [model])
            update_seconds = accel.timer(device) - t_update
            step = done = step + 1
            if not leader:
                if done == stop_after:
                    break
                continue
            gap = mismatch(old.float().cpu(), batch.logp_rollout.cpu() if n_seq else torch.zeros(0))

            sync = rollouts.publish(done, model.checkpoint_state())
            if following is None and done < r.steps:  # sync: batch k+1 with weights k+1
                following = submit(done, done)
            pending = following
            step_seconds = time.perf_counter() - t_step
            useful_seconds += step_seconds

            # Bookkeeping: ledger, totals, metrics, checkpoint. Work redone after a rollback counts
            # again here (it was spent); the metrics of the abandoned steps are dropped.
            batch_tokens = batch.tokens if n_seq else 0
            update_tokens = batch_tokens * r.updates_per_batch
            ledger.add("policy_update", trainer_kind, update_seconds * world, update_tokens,
                       estimate_train_flops(model_config, update_tokens)
                       + (flops_fwd * batch_tokens if reference is not None else 0), peak_flops=peak)
            ledger.add("weight_sync", trainer_kind, sync["seconds"])
            for kind, seconds in result.sync_seconds.items():
                ledger.add("weight_sync", kind, seconds)
            for kind, (seconds, tokens) in result.generate.items():
                ledger.add("rollout", kind, seconds, tokens, flops_fwd * tokens)
            n_samples = len(result.samples)
            for key, value in (("samples", n_samples), ("seconds", step_seconds), ("update_seconds", update_seconds),
                               ("wait_seconds", wait_seconds), ("sync_seconds", sync["seconds"]),
                               ("sync_bytes", sync["bytes"]), ("reward_errors", step_errors)):
                totals[key] += value
            if done % r.log_every == 0 or done == r.steps:
                append_metrics(run_dir, {
                    "phase": "rl", "step": done, "reward": float(reward_t.mean()), "accuracy": correct / n_samples,
                    "format_rate": formatted / n_samples, "trained_samples": n_seq, "lr": lr,
                    "response_length": sum(len(s["tokens"]) for s in result.samples) / n_samples,
                    "grad_norm": grad_norm, "skipped": skipped, **stats, **gap,
                    "samples_per_s": n_samples / step_seconds, "step_seconds": step_seconds,
                    "update_seconds": update_seconds, "wait_seconds": wait_seconds,
                    "sync_seconds": sync["seconds"], "sync_bytes": sync["bytes"], "weights_version": result.version,
                    "reward_errors": step_errors, "worker_faults": result.faults, "time": time.time()})
            bar.update(1, reward=float(reward_t.mean()), acc=correct / n_samples, mismatch=gap["mismatch"])
            if done % r.checkpoint_every == 0 or done == r.steps or done == stop_after:
                checkpoint(done)
                save_totals()
            if done == stop_after:
                break
        bar.close()
        if leader:
            heartbeat.idle(r.steps)
    finally:
        if rollouts is not None:
            rollouts.close()
    return finish()


class PolicyUpdate:
    """The gradient computations of one batch on this trainer: one per optimizer step
    (rl.updates_per_batch), plus any recomputation the corruption detector asks for. This trainer
    computes the sequences `rows` in micro-batches; with a trainer group (data parallel) each rank
    has its own rows and the gradients are summed over the group: the token weights c_t are global,
    so the sum is the full batch's gradient and every rank takes the same step.
    """

    KEYS = ("loss", "clip_frac", "kl_ref", "tis_mean", "tis_capped")

    def __init__(self, model: Transformer, reference: Transformer | None, batch: Batch, rows: list[int], r,
                 amp_dtype, group=None, corrupt_loss=lambda loss: loss):
        self.model, self.reference, self.batch, self.rows, self.r = model, reference, batch, rows, r
        self.amp_dtype, self.group, self.corrupt_loss = amp_dtype, group, corrupt_loss
        micro = r.micro_batch_size or max(1, len(rows))
        self.subs = [batch.select(rows[i:i + micro]) for i in range(0, len(rows), micro)]
        self.params = list({id(p): p for p in model.parameters()}.values())
        self.old: list[torch.Tensor] = []   # per micro-batch: logp_old, the policy before this batch's updates
        self.ref: list[torch.Tensor] = []   # per micro-batch: the reference's logprobs (kl_coef > 0)
        self.sums = torch.zeros(len(self.KEYS))

    def accumulate(self) -> float:
        """Fresh gradients of the batch's loss at the current weights (forward and backward over
        this trainer's rows, then the all-reduce); returns the batch's loss (over the group). The
        loss and its stats add up on the device, in fp32 (HCCL has no fp64), and come to the host
        once."""
        self.model.zero_grad(set_to_none=True)
        device = self.batch.input_ids.device
        total_tokens = max(1, self.batch.logp_rollout.numel())
        sums = torch.zeros(len(self.KEYS), device=device)
        for c, sub in enumerate(self.subs):
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                logp = token_logprobs(self.model, sub)
                if c == len(self.old):  # the first pass over the batch: the weights are still logp_old's
                    self.old.append(logp.detach())
                    if self.reference is not None:
                        with torch.no_grad():
                            self.ref.append(token_logprobs(self.reference, sub))
            r = self.r
            terms = grpo_loss(logp, self.old[c], sub.advantages, sub.weights, r.clip_eps, r.clip_eps_high,
                              sub.logp_rollout, r.tis_cap, self.ref[c] if self.ref else None, r.kl_coef)
            loss = self.corrupt_loss(terms.loss)
            loss.backward()
            share = logp.numel() / total_tokens  # per-token stats weighted by the micro-batch's share
            sums += torch.stack([loss.detach().float(), terms.clip_frac * share, terms.kl_ref * share,
                                 terms.tis_mean * share, terms.tis_capped * share])
        if self.group is not None:
            for p in self.params:
                if p.grad is None:  # this rank had no sequences (fewer kept than trainers)
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.group)
            dist.all_reduce(sums, group=self.group)
        self.sums = sums.cpu()
        return float(self.sums[0])

    def clip(self) -> float:
        """Clip the gradients to rl.grad_clip; returns their norm before clipping, as the guard
        reads it: averaged over the group (equal on healthy ranks; a NaN or a spike on one rank
        reaches every rank's guard, which must decide alike)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.r.grad_clip if self.r.grad_clip > 0 else float("inf"))
        if self.group is None:
            return float(norm)
        norm = norm.float()      # fp32: HCCL has no fp64
        dist.all_reduce(norm, group=self.group)
        return float(norm) / dist.get_world_size(self.group)

    def stats(self) -> dict:
        """Loss stats of the last computation, summed over the group."""
        return dict(zip(self.KEYS, self.sums.tolist()))

    def logp_old(self) -> torch.Tensor:
        """logp_old of every sequence of the batch, flat, gathered over the group."""
        device = self.batch.input_ids.device
        old = torch.cat(self.old) if self.old else torch.zeros(0, device=device)
        if self.group is None:
            return old
        full = torch.zeros(self.batch.logp_rollout.numel(), device=device, dtype=old.dtype)
        first = sum(self.batch.lengths[:self.rows[0]]) if self.rows else 0
        full[first:first + old.numel()] = old
        dist.all_reduce(full, group=self.group)
        return full


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
