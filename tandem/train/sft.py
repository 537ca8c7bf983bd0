"""Supervised fine-tuning on worked solutions (loss on assistant tokens only), resumable exactly.

    python -m tandem.cli sft --preset smoke --out runs/sft-smoke

AdamW with linear warmup then cosine decay, global grad-norm clipping, gradient accumulation and
optional bf16 autocast (fp32 master weights). Examples are generated from (seed, index), so the
data position is just the step: a checkpoint holds weights, optimizer moments, the step and every
RNG state, and N steps + resume + M steps gives bitwise the same weights as N+M steps in one go
(same device and thread count; tests/test_sft.py proves it).

The loss is computed only where it is needed: logits are formed for the positions that predict an
assistant token, not for the whole padded batch (same loss, less work). With sft.packing the
examples of a micro-batch are packed into rows with no padding (tandem/train/packing.py): the same
loss and gradients up to float rounding, fewer pad tokens through the layers.

Unstable hardware (tandem/resilience/): every step rewrites a heartbeat for the supervisor, passes
the fault injector's points (tests and `tandem chaos`), lets the guard skip an update with a
non-finite or spiking gradient (rolling back after repeated trouble), and with
resilience.check_every votes on weight and gradient fingerprints across replicas to find and
repair silent corruption. Checkpoints hold the guard's state, so resume stays exact; with
resilience.async_checkpoint they are written in a background thread.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem import accel
from tandem.config import Config
from tandem.errors import ConfigError
from tandem.architectures import build_model
from tandem.model import Transformer, estimate_train_flops
from tandem.progress import Progress, log
from tandem.runs import append_metrics, truncate_metrics
from tandem.tasks import Task
from tandem.tokenizer import ChatTokenizer
from tandem.train import sharded_checkpoint
from tandem.train.balance import balance_experts, load_metrics
from tandem.train.parallel import Ranks
from tandem.train.packing import Layout, make_layout, target_hidden
from tandem.train.checkpoint import (AsyncCheckpointer, discard_newer, latest_valid, load_checkpoint,
                                     save_checkpoint)
from tandem.resilience.faults import DeviceFault, FaultInjector
from tandem.resilience.guard import StepGuard
from tandem.resilience.incidents import Heartbeat, Incidents
from tandem.resilience.replicas import CorruptionDetector


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to peak * min_ratio (a pure function of step)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def example_for(tasks: list[Task], index: int):
    """Example number `index` of the training stream: tasks interleaved round-robin."""
    return tasks[index % len(tasks)].example(index // len(tasks))


def check_fits(max_seq_len: int, tokenizer: ChatTokenizer, tasks: list[Task], sample: int = 64) -> None:
    """Refuse an sft.max_seq_len shorter than every example (of the first `sample` of the stream):
    truncated, none would keep an answer to learn from, and every loss would be nan."""
    lengths = [len(tokenizer.encode_chat(example_for(tasks, i).messages())[0]) for i in range(sample)]
    if max_seq_len < min(lengths):
        raise ConfigError(f"sft.max_seq_len = {max_seq_len} cannot hold one training example: they are "
                          f"{min(lengths)}-{max(lengths)} tokens; set sft.max_seq_len >= {max(lengths)}")


@dataclass
class Batch:
    layout: Layout            # the sequences as tensors: right-padded rows, or packed (sft.packing)
    targets: int              # assistant tokens to predict (known on the host)
    tokens: int               # real (non-pad) tokens in the batch


def make_batch(examples, tokenizer: ChatTokenizer, max_len: int, device, packed: bool = False) -> Batch:
    """The examples' chats, truncated to max_len tokens; targets: every assistant token."""
    rows, predicts = [], []
    for example in examples:
        ids, mask = tokenizer.encode_chat(example.messages())
        ids, mask = ids[:max_len], mask[:max_len]
        rows.append(ids)
        predicts.append([t for t in range(len(ids) - 1) if mask[t + 1]])
    layout = make_layout(rows, predicts, tokenizer.pad_id, device, packed)
    return Batch(layout, sum(map(len, predicts)), sum(map(len, rows)))


def assistant_loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over assistant tokens."""
    logits = model.lm_head(target_hidden(model, batch.layout))
    return F.cross_entropy(logits.float(), batch.layout.targets, reduction="sum")


def forward_backward(model: Transformer, micro: list[Batch], amp_dtype, n_targets: int,
                     corrupt_loss=lambda loss: loss) -> float:
    """Accumulate the gradients of the step's mean assistant-token loss over its micro-batches;
    returns the loss. corrupt_loss is the fault injector's hook (identity otherwise)."""
    device = micro[0].layout.input_ids.device
    loss_total = torch.zeros((), device=device)
    for batch in micro:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = corrupt_loss(assistant_loss_sum(model, batch) / n_targets)
        loss.backward()
        loss_total += loss.detach()     # on the device: read once, not once per micro-batch
    return float(loss_total)


def build_optimizer(model: Transformer, cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D tensors); fused or foreach kernels, as the
    model's device supports (accel.optimizer_options): build it after moving the model."""
    params = list({id(p): p for p in model.parameters()}.values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **accel.optimizer_options(params[0].device))


def new_model(cfg: Config, vocab_size: int, device, seed: int) -> Transformer:
    model_cfg = type(cfg.model)(**{**cfg.model.to_dict(), "vocab_size": vocab_size})
    model = build_model(model_cfg)
    model.reset_parameters(seed)
    return model.to(device)


def train_sft(cfg: Config, run_dir: Path, tokenizer: ChatTokenizer, tasks: list[Task],
              progress: bool = True, stop_after: int | None = None,
              init_weights: dict[str, torch.Tensor] | None = None, ranks: Ranks | None = None) -> dict:
    """Run (or resume) SFT in run_dir; returns timing/throughput figures for the summary.

    stop_after: return right after step `stop_after` is done and checkpointed, as if the process
    had been interrupted there (tests of exact resume use it).
    init_weights: the weights step 0 starts from (sft.init) instead of a seeded random init; the
    optimizer starts fresh and the schedule (warmup + cosine) spans this run's sft.steps.
    ranks: this process's place among data-parallel ranks under torchrun (tandem/train/parallel.py).
    """
    return SFTTrainer(cfg, Path(run_dir), tokenizer, tasks, init_weights, ranks).run(progress, stop_after)


class SFTTrainer:
    """An SFT run: `run()` repeats `train_step()` (vet the weights, forward/backward on every
    replica, vet the gradients, the guard's verdict, the update, metrics, checkpoint)."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer: ChatTokenizer, tasks: list[Task],
                 init_weights: dict[str, torch.Tensor] | None, ranks: Ranks | None = None):
        s, r = cfg.sft, cfg.resilience
        self.cfg, self.s, self.run_dir, self.tokenizer, self.tasks = cfg, s, run_dir, tokenizer, tasks
        self.init_weights, self.ranks, self.leader = init_weights, ranks, ranks is None or ranks.leader
        accel.set_threads(cfg.run.threads)
        self.device = device = ranks.device if ranks else accel.resolve_device(cfg.device_for("sft"))
        accel.set_device(device)
        accel.set_deterministic(device, cfg.run.deterministic)
        self.dtype = accel.choose_dtype(s.dtype, device)      # "auto" resolved: bf16 only where it is fast
        self.amp_dtype = accel.DTYPES[self.dtype]
        # Replica 0 is the model that is logged and checkpointed; more replicas exist only to be
        # compared with it (resilience.replicas: identical copies fed identical batches).
        self.models = [new_model(cfg, tokenizer.vocab_size, device, cfg.run.seed)]
        self.models += [copy.deepcopy(self.models[0]) for _ in range(r.replicas - 1)]
        if ranks is not None:
            ranks.shard(self.models[0])   # FSDP2 (before the optimizer sees the parameters)
        self.optimizers = [build_optimizer(m, s) for m in self.models]
        self.ckpt_root = run_dir / "checkpoints" / "sft"
        self.tokenizer_files = {n: run_dir / "tokenizer" / n for n in ("tokenizer.json", "tokenizer_config.json")}
        self.incidents = Incidents(run_dir, write=self.leader)
        self.expert_load = None     # MoE: the last applied step's router counts (balance.py), for metrics
        self.faults = FaultInjector.from_config(r, s.steps, run_dir, rank=ranks.rank if ranks else 0,
                                                ranks=ranks.world if ranks else 1)
        self.guard = StepGuard.from_config(r)
        self.detector = CorruptionDetector(r.check_every, self.incidents)
        self.heartbeat = Heartbeat(run_dir)
        self.saver = AsyncCheckpointer() if r.async_checkpoint and self.leader else None
        self.sharded = (sharded_checkpoint.ShardedSaver(r.async_checkpoint)
                        if ranks is not None and ranks.kind == "fsdp" else None)
        # Time spent in the steps of the run's surviving timeline, carried in checkpoints: steps redone
        # after a crash or a rollback count once (goodput = useful_seconds / wall time, tandem chaos).
        self.useful_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.tokens_total, self.busy_seconds = 0, 0.0

    def reject(self, folder: Path, reason: str) -> None:
        self.incidents.record("checkpoint_rejected", int(folder.name[5:]), reason)

    def restore(self, folder: Path | None) -> int:
        """Load a checkpoint into every replica (None: the initial state); returns its step."""
        cfg, device, guard = self.cfg, self.device, self.guard
        if folder is None:
            for model, optimizer in zip(self.models, self.optimizers):
                if self.ranks is not None and self.ranks.kind == "fsdp":  # each rank: its shard of the start
                    self.ranks.load_full_state(model, self.init_weights or new_model(
                        cfg, self.tokenizer.vocab_size, device, cfg.run.seed).checkpoint_state())
                elif self.init_weights is None:
                    model.reset_parameters(cfg.run.seed)
                else:
                    model.load_checkpoint_state({k: v.to(device) for k, v in self.init_weights.items()})
                optimizer.state.clear()
            accel.manual_seed(cfg.run.seed)
            guard.reset()
            step, self.useful_seconds = 0, 0.0
        elif sharded_checkpoint.is_sharded(folder):
            state = sharded_checkpoint.load_into(folder, self.models[0], self.optimizers[0])
        else:
            ckpt = load_checkpoint(folder)
            for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
                model.load_checkpoint_state({k: v.to(device) for k, v in ckpt["model"].items()})
                optimizer.load_state_dict(ckpt["optimizer"] if i == 0 else copy.deepcopy(ckpt["optimizer"]))
            state = ckpt["train_state"]
        if folder is not None:
            accel.set_rng_state(state["rng"], device)
            if "guard" in state:
                guard.load_state_dict(state["guard"])
            else:  # a checkpoint from before the guard existed
                guard.reset()
            step, self.useful_seconds = state["step"], state.get("useful_seconds", 0.0)
        self.detector.forget()
        if self.leader:
            truncate_metrics(self.run_dir, "sft", step)
        return step

    def rollback(self, step: int, at_most: int) -> int:
        """Back to the newest valid checkpoint of step <= at_most; later ones are discarded."""
        self.wait_for_checkpoints()
        back_to = self.restore(latest_valid(self.ckpt_root, at_most=at_most, on_skip=self.reject))
        if self.ranks is not None:
            self.ranks.barrier()   # every rank has read it before the leader deletes newer ones
        if self.leader:
            discard_newer(self.ckpt_root, back_to)
        self.guard.rolled_back(step)
        self.incidents.record("rollback", step, f"resuming from step {back_to}")
        self.bar.rewind(back_to)
        return back_to

    def wait_for_checkpoints(self) -> None:
        """Until every checkpoint write in flight is committed (on every rank)."""
        if self.saver is not None:
            self.saver.wait()
        if self.sharded is not None:
            self.sharded.wait()
        if self.ranks is not None:
            self.ranks.barrier()   # the leader's writes are done before any rank reads checkpoints

    def checkpoint(self, step: int) -> None:
        s, saver, models = self.s, self.saver, self.models
        started = time.perf_counter()
        train_state = {"phase": "sft", "data_position": step * s.batch_size * s.grad_accum,
                       "scheduler": {"kind": "warmup_cosine", "step": step}, "rng": accel.get_rng_state(self.device),
                       "guard": self.guard.state_dict(), "useful_seconds": self.useful_seconds}
        extra_files = {"model_config.json": json.dumps(models[0].config.to_dict()).encode(), **self.tokenizer_files}
        if self.ranks is not None:
            train_state["world_size"] = self.ranks.world
        if self.sharded is not None:   # every rank writes its shards
            self.sharded.save(self.ckpt_root, step, models[0], self.optimizers[0], train_state, extra_files,
                                    keep=s.keep_checkpoints, before_commit=self.faults.before_commit(step))
        elif self.leader:
            (saver.save if saver is not None else save_checkpoint)(
                self.ckpt_root, step, models[0].checkpoint_state(), train_state, self.optimizers[0].state_dict(),
                extra_files=extra_files, keep=s.keep_checkpoints, before_commit=self.faults.before_commit(step))
        self.checkpoint_seconds += time.perf_counter() - started

    def run(self, progress: bool, stop_after: int | None) -> dict:
        s = self.s
        latest = latest_valid(self.ckpt_root, on_skip=self.reject)
        self.step = start = self.restore(latest)
        if latest is not None:
            log(f"resuming SFT from {latest} (step {start})")
        self.bar = Progress(s.steps, "sft", start=start, every=s.log_every, enabled=progress and self.leader)
        for model in self.models:
            model.train()
        try:
            while self.step < s.steps:
                if not self.train_step():      # rolled back: the step starts over
                    continue
                if self.step % s.checkpoint_every == 0 or self.step == s.steps or self.step == stop_after:
                    self.checkpoint(self.step)
                if self.step == stop_after:
                    break
            if s.steps == 0 or (start == s.steps and latest is None):
                self.checkpoint(s.steps)
            self.wait_for_checkpoints()
        except DeviceFault as exc:
            self.incidents.record("device_fault", self.step, str(exc))
            raise
        finally:   # this process's own writer (no collective: other ranks may be gone)
            if self.saver is not None:
                self.saver.wait()
        self.bar.close()
        if self.leader:
            self.heartbeat.idle(self.step)
        return self.summary(start)

    def train_step(self) -> bool:
        """Step `self.step`; False if it rolled back instead (`self.step` is then the checkpoint's)."""
        s, step, models, faults, detector = self.s, self.step, self.models, self.faults, self.detector
        if self.leader:
            self.heartbeat.beat(step)
        t0 = accel.timer(self.device)
        faults.start_of_step(step, checkpoints=self.ckpt_root)
        faults.corrupt_weights(step, models, self.optimizers)
        if detector.check_weights(step, models, self.optimizers):
            self.step = self.rollback(step, detector.last_good)
            return False
        lr = lr_at(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        first = step * s.batch_size * s.grad_accum
        examples = [[example_for(self.tasks, first + m * s.batch_size + j) for j in range(s.batch_size)]
                    for m in range(s.grad_accum)]
        mine = [make_batch(self.ranks.local_rows(chunk) if self.ranks else chunk, self.tokenizer, s.max_seq_len,
                           self.device, s.packing) for chunk in examples]   # this rank's share of each micro-batch
        n_targets, n_tokens = sum(b.targets for b in mine), sum(b.tokens for b in mine)
        if self.ranks is not None:   # over the whole global batch: every rank's counts
            n_targets, n_tokens = int(self.ranks.sum(n_targets)), int(self.ranks.sum(n_tokens))
        losses = [0.0] * len(models)

        def compute(i: int) -> None:
            models[i].zero_grad(set_to_none=True)
            losses[i] = forward_backward(models[i], mine, self.amp_dtype, n_targets,
                                         lambda loss: faults.corrupt_loss(step, loss, i, len(models)))

        for i in range(len(models)):
            compute(i)
        if self.ranks is not None:   # one replica per rank, each with its rows: sum over the ranks
            self.ranks.reduce_grads(models[0])
            losses[0] = self.ranks.sum(losses[0])
        faults.mid_step(step)
        faults.corrupt_grads(step, models)
        if detector.check_grads(step, models, losses, compute):
            self.step = self.rollback(step, detector.last_good)
            return False
        grad_norm = self.apply(step, losses[0])
        if grad_norm is None:
            return False
        detector.remember_weights(step + 1, models, self.optimizers)
        self.record(step + 1, losses[0], lr, grad_norm, n_tokens, accel.timer(self.device) - t0)
        return True

    def apply(self, step: int, loss: float) -> float | None:
        """Clip, ask the guard, and update every replica (or skip); returns the gradient norm, or
        None when the guard rolled back."""
        clip = self.s.grad_clip if self.s.grad_clip > 0 else float("inf")
        norms = [self.ranks.clip_grad_norm(m, clip) if self.ranks else float(torch.nn.utils.clip_grad_norm_(
            m.parameters(), clip)) for m in self.models]
        grad_norm = norms[0]  # the same on every replica once the detector has had its say
        verdict = self.guard.check(step, loss, grad_norm)
        if verdict.action == "rollback":
            self.incidents.record("skip", step, verdict.reason)
            self.step = self.rollback(step, self.guard.trouble_start(step))
            return None
        if verdict.action == "update":
            self.faults.before_update(step, self.models)
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            self.incidents.record("skip", step, verdict.reason)
        for model in self.models:
            model.zero_grad(set_to_none=True)
        loads = [balance_experts(model, verdict.action == "update", self.ranks.group if self.ranks else None)
                 for model in self.models]
        self.expert_load = loads[0]        # the replicas route the same tokens
        return grad_norm

    def record(self, step: int, loss: float, lr: float, grad_norm: float, step_tokens: int, elapsed: float) -> None:
        """The step is done: totals, metrics, progress."""
        s = self.s
        self.tokens_total += step_tokens
        self.busy_seconds += elapsed
        self.useful_seconds += elapsed
        self.step = step
        if self.leader and (step % s.log_every == 0 or step == s.steps):
            append_metrics(self.run_dir, {"phase": "sft", "step": step, "loss": loss, "lr": lr,
                                          "grad_norm": grad_norm, "tokens_per_s": step_tokens / elapsed,
                                          **load_metrics(self.expert_load), "time": time.time()})
        self.bar.update(1, loss=loss, lr=lr)

    def summary(self, start: int) -> dict:
        s, config, busy = self.s, self.models[0].config, self.busy_seconds
        return {"steps": s.steps, "resumed_from": start, "device": str(self.device), "dtype": self.dtype,
                "device_kind": accel.device_kind(self.device), "seconds": busy, "tokens": self.tokens_total,
                "tokens_per_s": self.tokens_total / busy if busy else None,
                "flops": estimate_train_flops(config, self.tokens_total),
                "parameters": config.num_parameters(),
                "useful_seconds": self.useful_seconds, "checkpoint_seconds": self.checkpoint_seconds,
                "incidents": dict(self.incidents.counts)}
