"""Data-parallel SFT ranks under torchrun: DDP (replicated weights, summed gradients) or FSDP2
(weights, gradients and AdamW state sharded over the ranks), chosen by run.parallel.

    torchrun --nproc-per-node 2 -m tandem.cli sft --preset smoke --out runs/s2
    torchrun --nproc-per-node 2 -m tandem.cli sft --preset smoke --out runs/s2f --set run.parallel=fsdp

The batch. Every rank builds the step's whole global batch from (seed, index) as a single process
would (tokenising is cheap) and trains on its contiguous share of each micro-batch's rows: rank r of
W takes rows [r*B/W, (r+1)*B/W). Each rank's loss is its token-loss sum divided by the GLOBAL number
of target tokens, so the SUM of the ranks' gradients is the one-process gradient (up to summation
order). DDP sums them with all-reduces of flat buckets after the backward pass; FSDP2 reduce-scatters
them during it, forced to SUM (set_force_sum_reduction_for_comms): its default AVG would divide by W
once more, and gloo's AVG reduce-scatter sums anyway (pytorch#162338), as HCCL (no AVG) would.

FSDP2: fully_shard on every decoder layer and on the Transformer (the root holds the embedding, tied
to the LM head, and the final norm). The loss calls `Transformer.hidden` and then `lm_head`, not
`forward`, so `hidden` is registered as an FSDP forward method; the root's parameters stay
gathered after the forward (FSDP2 never reshards the root there), which is what the LM head needs.
With sft.dtype = bf16 a MixedPrecisionPolicy computes in bf16 and reduces in fp32.

The run folder: rank 0 alone writes it (config, tokenizer, metrics, incidents, heartbeat, DDP
checkpoints); FSDP checkpoints are written by every rank (tandem/train/sharded_checkpoint.py). A
resume must use the world size that wrote the newest checkpoint (the data position and FSDP's
shards depend on it).

Simplifications: the in-process replicas and the corruption vote (resilience.replicas,
resilience.check_every) are refused with several SFT ranks (a vote across SFT ranks is not built;
GRPO's trainer ranks have one), and weight/gradient fault injection is refused under FSDP (its
targets are local shards). The guard and loss faults work with both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tandem import accel
from tandem.errors import ConfigError

BUCKET_ELEMENTS = 1 << 24   # DDP all-reduce bucket: 64 MB of fp32 gradients


def launched_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one rank, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def check_sft_ranks(cfg, world: int, device) -> None:
    """The rules SFT ranks must keep, checked by every rank before anything is written."""
    s, r, kind = cfg.sft, cfg.resilience, cfg.run.parallel
    if s.batch_size % world:
        raise ConfigError(f"sft.batch_size = {s.batch_size} does not divide over {world} ranks; set "
                          f"sft.batch_size to a multiple of {world} or launch a divisor of it")
    if r.replicas > 1 or r.check_every > 0:
        raise ConfigError("resilience.replicas / resilience.check_every are for one SFT process; set "
                          "resilience.replicas=1 resilience.check_every=0 with several ranks")
    if kind == "fsdp" and not accel.can_shard(device):
        raise ConfigError(f"run.parallel = 'fsdp' cannot run on {torch.device(device).type} "
                          f"({accel.dist_backend(device)} lacks reduce-scatter); use run.parallel=ddp")
    if kind == "fsdp" and any(f.split("@")[0].endswith((":grad", ":weight")) for f in str(r.faults).split(",")):
        raise ConfigError("grad/weight fault injection is not built for run.parallel = 'fsdp' "
                          "(its tensors are shards); use loss faults or run.parallel=ddp")


def check_resume_world(newest_train_state: dict | None, world: int) -> None:
    """Refuse to resume a run whose newest checkpoint was written by another world size."""
    if newest_train_state is None:
        return
    before = newest_train_state.get("world_size", 1)
    if before != world:
        raise ConfigError(f"this run's checkpoints were written by {before} rank(s), not {world}: resume with "
                          f"{before} rank(s) (torchrun --nproc-per-node {before}) or use a new --out")


def newest_train_state(ckpt_root) -> dict | None:
    """train_state.json of the newest valid checkpoint under ckpt_root (None: no checkpoint)."""
    from tandem.train.checkpoint import latest_valid
    folder = latest_valid(ckpt_root)
    return None if folder is None else json.loads((folder / "train_state.json").read_text())


def join_sft_ranks(cfg, out: Path) -> "Ranks | None":
    """Under torchrun with several ranks: check the rules (before anything is written), then join
    the group; None in a single process (which may not resume a run of several ranks either)."""
    launched = launched_world()
    check_resume_world(newest_train_state(out / "checkpoints" / "sft"), launched[1] if launched else 1)
    if launched is None:
        return None
    device = accel.local_device(accel.resolve_device(cfg.device_for("sft")), int(os.environ.get("LOCAL_RANK", "0")),
                                launched[1])
    check_sft_ranks(cfg, launched[1], device)
    accel.set_device(device)
    return Ranks.join(cfg, device, accel.resolve_dtype(cfg.sft.dtype, device))


class Ranks:
    """This process's place among the SFT ranks and the collectives the trainer needs."""

    def __init__(self, rank: int, world: int, kind: str, device: torch.device, dtype: torch.dtype):
        self.rank, self.world, self.kind, self.device, self.dtype = rank, world, kind, device, dtype
        self.leader = rank == 0
        self.mesh = None

    @classmethod
    def join(cls, cfg, device: torch.device, dtype: torch.dtype) -> "Ranks":
        """Join the process group torchrun describes (env://), over the device's backend."""
        rank, world = launched_world()
        if not dist.is_initialized():
            dist.init_process_group(accel.dist_backend(device), rank=rank, world_size=world)
        ranks = cls(rank, world, cfg.run.parallel, device, dtype)
        if ranks.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            ranks.mesh = init_device_mesh(device.type, (world,))
        return ranks

    @property
    def group(self):
        """The process group every SFT rank is in (for collectives such as the expert-load sum)."""
        return dist.group.WORLD

    def barrier(self) -> None:
        dist.barrier()

    def leave(self) -> None:
        dist.barrier()
        dist.destroy_process_group()

    def local_rows(self, rows):
        """This rank's contiguous share of a batch's rows (a list of examples or a tensor)."""
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def shard(self, model) -> None:
        """FSDP2 in place: each decoder layer, then the root (no-op for DDP)."""
        if self.kind != "fsdp":
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        policy = (MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
                  if self.dtype != torch.float32 else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        register_fsdp_forward_method(model, "hidden")
        for module in [model, *model.model.layers]:
            module.set_force_sum_reduction_for_comms(True)

    def reduce_grads(self, model) -> None:
        """DDP: sum every gradient over the ranks, in flat buckets (FSDP2 did it in backward)."""
        if self.kind == "fsdp":
            return
        params = list(model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            bucket, size = [], 0
            while start < len(params) and (not bucket or size + params[start].numel() <= BUCKET_ELEMENTS):
                bucket.append(params[start].grad)
                size += params[start].numel()
                start += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                             device=self.device)
        dist.all_reduce(total)
        return float(total)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """clip_grad_norm_ over the whole model: FSDP2's gradients are shards, whose norm is a
        partial sum until it is reduced (full_tensor)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
        return float(norm)

    def load_full_state(self, model, state: dict[str, torch.Tensor]) -> None:
        """Full (unsharded) weights into the model: every rank keeps its shard of them."""
        if self.kind != "fsdp":
            model.load_checkpoint_state({k: v.to(self.device) for k, v in state.items()})
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        state = dict(state)
        if model.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def full_state(self, model) -> dict[str, torch.Tensor]:
        """Every weight, whole, on the host, named as Transformer.checkpoint_state names them."""
        if self.kind != "fsdp":
            return model.checkpoint_state()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in state.items()}
