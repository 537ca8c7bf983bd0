"""Supervised fine-tuning on worked solutions (loss on assistant tokens only), resumable exactly.

    python -m tandem.cli sft --preset smoke --out runs/sft-smoke

AdamW with linear warmup then cosine decay, global grad-norm clipping, gradient accumulation and
optional bf16 autocast (fp32 master weights). Examples are generated from (seed, index), so the
data position is just the step: a checkpoint holds weights, optimizer moments, the step and every
RNG state, and N steps + resume + M steps gives bitwise the same weights as N+M steps in one go
(same device and thread count; tests/test_sft.py proves it).

The loss is computed only where it is needed: logits are formed for the positions that predict an
assistant token, not for the whole padded batch (same loss, less work).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem import accel
from tandem.config import Config
from tandem.model import Transformer, estimate_train_flops
from tandem.progress import Progress, log
from tandem.runs import append_metrics, truncate_metrics
from tandem.tasks import Task
from tandem.tokenizer import ChatTokenizer
from tandem.train.checkpoint import latest_valid, load_checkpoint, save_checkpoint


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to peak * min_ratio (a pure function of step)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def example_for(tasks: list[Task], index: int):
    """Example number `index` of the training stream: tasks interleaved round-robin."""
    return tasks[index % len(tasks)].example(index // len(tasks))


@dataclass
class Batch:
    input_ids: torch.Tensor   # [B, T] right-padded
    target_mask: torch.Tensor # [B, T-1] True where position t predicts an assistant token t+1
    tokens: int               # real (non-pad) tokens in the batch


def make_batch(examples, tokenizer: ChatTokenizer, max_len: int, device) -> Batch:
    rows, masks = [], []
    for example in examples:
        ids, mask = tokenizer.encode_chat(example.messages())
        rows.append(ids[:max_len])
        masks.append(mask[:max_len])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return Batch(input_ids.to(device), loss_mask[:, 1:].to(device), sum(len(r) for r in rows))


def assistant_loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over assistant tokens."""
    hidden = model.hidden(batch.input_ids)[:, :-1][batch.target_mask]
    logits = model.lm_head(hidden)
    targets = batch.input_ids[:, 1:][batch.target_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def build_optimizer(model: Transformer, cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D tensors)."""
    params = {id(p): p for p in model.parameters()}.values()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def new_model(cfg: Config, vocab_size: int, device, seed: int) -> Transformer:
    model_cfg = type(cfg.model)(**{**cfg.model.to_dict(), "vocab_size": vocab_size})
    model = Transformer(model_cfg)
    model.reset_parameters(seed)
    return model.to(device)


def train_sft(cfg: Config, run_dir: Path, tokenizer: ChatTokenizer, tasks: list[Task],
              progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) SFT in run_dir; returns timing/throughput figures for the summary.

    stop_after: return right after step `stop_after` is done and checkpointed, as if the process
    had been interrupted there (tests of exact resume use it).
    """
    s = cfg.sft
    accel.set_threads(cfg.run.threads)
    device = accel.resolve_device(cfg.device_for("sft"))
    amp_dtype = accel.resolve_dtype(s.dtype, device)
    model = new_model(cfg, tokenizer.vocab_size, device, cfg.run.seed)
    optimizer = build_optimizer(model, s)
    ckpt_root = Path(run_dir) / "checkpoints" / "sft"
    tokenizer_files = {n: Path(run_dir) / "tokenizer" / n for n in ("tokenizer.json", "tokenizer_config.json")}

    start = 0
    latest = latest_valid(ckpt_root)
    if latest is not None:
        ckpt = load_checkpoint(latest)
        model.load_checkpoint_state({k: v.to(device) for k, v in ckpt["model"].items()})
        optimizer.load_state_dict(ckpt["optimizer"])
        accel.set_rng_state(ckpt["train_state"]["rng"])
        start = ckpt["train_state"]["step"]
        truncate_metrics(run_dir, "sft", start)
        log(f"resuming SFT from {latest} (step {start})")
    else:
        accel.manual_seed(cfg.run.seed)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_root, step, model.checkpoint_state(),
                        {"phase": "sft", "data_position": step * s.batch_size * s.grad_accum,
                         "scheduler": {"kind": "warmup_cosine", "step": step}, "rng": accel.get_rng_state()},
                        optimizer.state_dict(),
                        extra_files={"model_config.json": json.dumps(model.config.to_dict()).encode(), **tokenizer_files}, keep=s.keep_checkpoints)

    bar = Progress(s.steps, "sft", start=start, every=s.log_every, enabled=progress)
    tokens_total, busy_seconds = 0, 0.0
    model.train()
    for step in range(start, s.steps):
        t0 = accel.timer(device)
        lr = lr_at(step, s.lr, s.warmup_steps, s.steps, s.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = step * s.batch_size * s.grad_accum
        micro = [make_batch([example_for(tasks, first + m * s.batch_size + j) for j in range(s.batch_size)],
                            tokenizer, s.max_seq_len, device) for m in range(s.grad_accum)]
        n_targets = sum(int(b.target_mask.sum()) for b in micro)
        loss_total = 0.0
        for batch in micro:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                loss = assistant_loss_sum(model, batch) / n_targets
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip if s.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = accel.timer(device) - t0
        step_tokens = sum(b.tokens for b in micro)
        tokens_total += step_tokens
        busy_seconds += elapsed
        done = step + 1
        if done % s.log_every == 0 or done == s.steps:
            append_metrics(run_dir, {"phase": "sft", "step": done, "loss": loss_total, "lr": lr,
                                     "grad_norm": float(grad_norm), "tokens_per_s": step_tokens / elapsed,
                                     "time": time.time()})
        bar.update(1, loss=loss_total, lr=lr)
        if done % s.checkpoint_every == 0 or done == s.steps or done == stop_after:
            checkpoint(done)
        if done == stop_after:
            break
    bar.close()
    if s.steps == 0 or (start == s.steps and latest is None):
        checkpoint(s.steps)
    return {"steps": s.steps, "resumed_from": start, "device": str(device),
            "device_kind": accel.device_kind(device), "seconds": busy_seconds, "tokens": tokens_total,
            "tokens_per_s": tokens_total / busy_seconds if busy_seconds else None,
            "flops": estimate_train_flops(model.config, tokens_total), "parameters": model.config.num_parameters()}
