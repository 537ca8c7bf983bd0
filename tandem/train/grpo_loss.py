"""GRPO's arithmetic, on the trainer: advantages, the clipped and importance-weighted loss with its
KL term, the rollout/trainer mismatch, the batch of rollouts as tensors, and `PolicyUpdate`, the
gradient computations of one batch (micro-batches, data-parallel all-reduce). The algorithm and
where each option comes from are in tandem/train/grpo.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.errors import ConfigError
from tandem.model import Transformer
from tandem.train.packing import Layout, packed_layout, target_hidden

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


def sequence_ratio(logp: torch.Tensor, logp_old: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """GSPO's importance ratio in its per-token form (Zheng et al. 2025, "Group Sequence Policy
    Optimization", eq. 13): every token of sequence i carries s_i = exp(mean_t(logp - logp_old)),
    the geometric mean of its tokens' ratios, as a value; its gradient is s_i times the token's own
    d logp, so averaging over the sequence's tokens gives the sequence-level objective's gradient."""
    index = torch.repeat_interleave(torch.arange(len(lengths), device=logp.device),
                                    torch.tensor(lengths, device=logp.device))
    counts = torch.tensor(lengths, device=logp.device, dtype=logp.dtype).clamp_min(1)
    mean = torch.zeros(len(lengths), device=logp.device, dtype=logp.dtype).index_add_(
        0, index, (logp - logp_old).detach()) / counts
    return torch.exp(mean[index] + logp - logp.detach())


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              weights: torch.Tensor, clip_eps: float, clip_eps_high: float = 0.0,
              logp_rollout: torch.Tensor | None = None, tis_cap: float = 0.0,
              logp_ref: torch.Tensor | None = None, kl_coef: float = 0.0,
              sequence_lengths: list[int] | None = None) -> LossTerms:
    """The GRPO objective (module docstring) on flat per-token tensors of equal length N.

    logp: [N] current policy (with grad); logp_old: [N] policy before this batch's updates;
    advantages: [N] each token carries its sequence's advantage; weights: [N] the c_t of
    `token_weights`; logp_rollout: [N] what the rollout worker sampled with (for tis_cap);
    logp_ref: [N] frozen reference (for kl_coef); sequence_lengths: GSPO (rl.loss = "gspo"): the
    tokens per sequence, for one clipped ratio per sequence (sequence_ratio) instead of per token.
    """
    high = clip_eps_high or clip_eps
    ratio = torch.exp(logp - logp_old) if sequence_lengths is None else sequence_ratio(logp, logp_old, sequence_lengths)
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
    """A batch of rollouts; `layout(packed)` is what the model reads (rl.packing: no pads)."""
    input_ids: torch.Tensor     # [B, T] prompt + completion, right-padded
    target_mask: torch.Tensor   # [B, T-1] True where position t predicts completion token t+1
    lengths: list[int]          # completion length of each sequence
    logp_rollout: torch.Tensor  # [N] the rollout worker's logprob of each completion token (flat)
    advantages: torch.Tensor    # [N] each token's sequence advantage
    weights: torch.Tensor       # [N] loss normalisation c_t
    tokens: int                 # real tokens (prompt + completion) in the batch
    widths: list[int]           # prompt + completion length of each sequence (on the host: no device read)
    sequences: list[list[int]]  # prompt + completion of each sequence (on the host)
    prompt_lens: list[int]

    def layout(self, packed: bool) -> Layout:
        """The batch as the model reads it (tandem/train/packing.py): these padded rows, or packed."""
        predicts = [list(range(p - 1, len(s) - 1)) for s, p in zip(self.sequences, self.prompt_lens)]
        device = self.input_ids.device
        if packed:
            return packed_layout(self.sequences, predicts, device)
        width = self.input_ids.shape[1]
        predict = torch.tensor([i * width + t for i, p in enumerate(predicts) for t in p], device=device)
        return Layout(self.input_ids, None, None, predict, self.input_ids.view(-1)[predict + 1])

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
                     self.weights[lo:hi], 0, widths, [self.sequences[r] for r in rows],
                     [self.prompt_lens[r] for r in rows])


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
                 sum(len(r) for r in rows), [len(r) for r in rows], rows, [len(p) for p in prompts])


def token_logprobs(model: Transformer, layout: Layout) -> torch.Tensor:
    """[N] log p(completion token) under `model` (flat, sequence after sequence); logits are formed
    only at the positions that predict a completion token."""
    logits = model.lm_head(target_hidden(model, layout)).float()
    return logits.log_softmax(-1).gather(1, layout.targets.view(-1, 1)).view(-1)


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
        self.layouts = [sub.layout(r.packing) for sub in self.subs]
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
        for c, (sub, layout) in enumerate(zip(self.subs, self.layouts)):
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                logp = token_logprobs(self.model, layout)
                if c == len(self.old):  # the first pass over the batch: the weights are still logp_old's
                    self.old.append(logp.detach())
                    if self.reference is not None:
                        with torch.no_grad():
                            self.ref.append(token_logprobs(self.reference, layout))
            r = self.r
            gspo = r.loss == "gspo"
            terms = grpo_loss(logp, self.old[c], sub.advantages, sub.weights,
                              r.gspo_clip if gspo else r.clip_eps, r.gspo_clip_high if gspo else r.clip_eps_high,
                              sub.logp_rollout, r.tis_cap, self.ref[c] if self.ref else None, r.kl_coef,
                              sub.lengths if gspo else None)
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
