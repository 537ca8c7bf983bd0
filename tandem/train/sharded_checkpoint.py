"""Sharded checkpoints for FSDP2 ranks: torch.distributed.checkpoint (DCP) writes every rank's
shards in parallel, under tandem's checkpoint guarantees (tandem/train/checkpoint.py).

    checkpoints/sft/step_NNNNNN/
        __0_0.distcp, __1_0.distcp, ...  each rank's shards: weights ("model.*", checkpoint_state
                                         names) and AdamW state ("optim.*"), written by that rank
        .metadata                        DCP's index of the shards (rank 0)
        train_state.json, model_config.json, tokenizer files                  (rank 0)
        manifest.json                    SHA-256 of every file above, written LAST (rank 0)

The commit: rank 0 names the temp folder (its pid, as checkpoint.py does), every rank writes its
shards there (dcp.save), fsyncs and hashes its own shard files in parallel, the entries are
gathered to rank 0, which hashes the rest, writes the manifest and renames the folder into place
(checkpoint.commit); a barrier then lets nobody read before the commit. A crash anywhere leaves a
temp folder without a manifest, which is not a checkpoint. A damaged shard fails the manifest check
like any damaged file (latest_valid falls back to the previous checkpoint).

Resume (same world size: the shards are this world size's): dcp.load into the model's and the
optimizer's sharded state dicts. Any world size, one process included, can read the whole weights
(checkpoint.read_sharded_weights): eval, export, serve and `tandem inspect` do.

With resilience.async_checkpoint the shards are written in DCP's background thread and committed
at the next collective point (ShardedSaver).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from tandem.errors import CheckpointError
from tandem.train.checkpoint import (DCP_METADATA, commit, file_entry, step_dir_name, verify_checkpoint,
                                     write_extra_files)


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def _states(model, optimizer) -> dict:
    """The model's and the optimizer's sharded state dicts, as DCP saves and loads them (the LM
    head is left out when tied: it is the embedding)."""
    weights = get_model_state_dict(model)
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return {"model": weights, "optim": get_optimizer_state_dict(model, optimizer)}


def _temp_folder(root: Path, step: int) -> Path:
    """The temp folder every rank writes into: named by rank 0 (its pid), created empty by it."""
    box = [f".tmp-{step_dir_name(step)}-{os.getpid()}"]
    dist.broadcast_object_list(box, src=0)
    tmp = root / box[0]
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return tmp


def _commit(tmp: Path, root: Path, step: int, train_state: dict, extra_files: dict, keep: int,
            before_commit: Callable[[], None] | None) -> None:
    """Once every rank's shards are written: each hashes its own, rank 0 commits, all wait for it."""
    rank = dist.get_rank()
    mine = {p.name: file_entry(p) for p in tmp.glob(f"__{rank}_*.distcp")}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps(dict(train_state, step=step)))
        write_extra_files(tmp, extra_files)
        hashed = {name: entry for entries in gathered for name, entry in entries.items()}
        commit(tmp, root, step, keep, before_commit, hashed)
    dist.barrier()


class ShardedSaver:
    """Checkpoints of FSDP ranks; every rank calls save() and wait() together.

    Synchronous: save() returns once the checkpoint is committed. Async (resilience.async_checkpoint):
    the step waits only while DCP stages the shards to host memory; the writes go on in DCP's
    background thread over a gloo group of their own (the writer's collectives must not interleave
    with training's), and the commit (hashes, manifest, rename) happens at the next wait(): the next
    save, a rollback, the end of the run, which every rank reaches together. A crash before it
    leaves an uncommitted temp folder, as a synchronous save would. One write in flight at a time.
    """

    def __init__(self, async_save: bool = False):
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.pending: tuple | None = None

    def save(self, root: Path, step: int, model, optimizer, train_state: dict, extra_files: dict,
             keep: int = 3, before_commit: Callable[[], None] | None = None) -> None:
        self.wait()
        root = Path(root)
        tmp = _temp_folder(root, step)
        commit_args = (tmp, root, step, train_state, extra_files, keep, before_commit)
        if self.group is None:
            dcp.save(_states(model, optimizer), checkpoint_id=str(tmp))
            _commit(*commit_args)
        else:
            future = dcp.async_save(_states(model, optimizer), checkpoint_id=str(tmp), process_group=self.group)
            self.pending = (future, commit_args)

    def wait(self) -> None:
        """Finish and commit the write in flight, if any."""
        if self.pending is not None:
            (future, commit_args), self.pending = self.pending, None
            future.result()
            _commit(*commit_args)


def load_into(folder: Path, model, optimizer) -> dict:
    """Restore the sharded model and optimizer from `folder` (verified first); returns its train_state."""
    reason = verify_checkpoint(folder)
    if reason:
        raise CheckpointError(f"checkpoint {folder} is not usable: {reason}")
    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(folder))
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, states["optim"])
    return json.loads((Path(folder) / "train_state.json").read_text())
