"""Atomic, verifiable checkpoints.

A checkpoint is a folder `checkpoints/PHASE/step_NNNNNN/` holding

    model.safetensors      weights, HF tensor names (lm_head dropped when tied)
    optimizer.safetensors  optimizer tensors (AdamW moments), flattened as state/<param>/<name>
    train_state.json       step, data position, scheduler, every RNG state, optimizer hyper-
                           parameters, and whatever else the trainer needs to resume exactly
    model_config.json      the ModelConfig
    tokenizer.json, tokenizer_config.json   so the folder alone is a usable model
    manifest.json          SHA-256 and size of every file above, written LAST

It is written into a hidden temp folder, every file fsynced, the manifest written, then the folder
renamed into place (atomic on POSIX) and the parent fsynced. A folder without a manifest, or whose
files do not match it, is not a checkpoint: loading skips it with a warning and falls back to the
previous one. Only the newest `keep` committed checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tandem.errors import CheckpointError

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_id, slots in state_dict["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state/{param_id}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}/{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split("/", 2)
        state.setdefault(int(param_id), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        param_id, name = key.split("/", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict, optimizer_state: dict | None = None,
                    extra_files: dict[str, Path | bytes] | None = None, keep: int = 3) -> Path:
    """Write and commit checkpoint `step` under `root`; returns its folder.

    extra_files: name -> a file to copy, or bytes to write (config, tokenizer).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    state = dict(train_state, step=step)
    if optimizer_state is not None:
        tensors, meta = flatten_optimizer(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer"] = meta
    (tmp / "train_state.json").write_text(json.dumps(state))
    for name, source in (extra_files or {}).items():
        if isinstance(source, bytes):
            (tmp / name).write_bytes(source)
        else:
            shutil.copyfile(source, tmp / name)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync_file(tmp / name)
    manifest = {"step": step, "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
                                        for n in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():  # an uncommitted or corrupt leftover from an interrupted run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if the checkpoint is complete and matches its manifest, else the reason it is not."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write never committed)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 (corrupted)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under root, newest step first (committed or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint that verifies; each newer broken one is reported and skipped."""
    for folder in list_checkpoints(root):
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder
        warn(f"skipping checkpoint {folder}: {reason}")
    return None


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints; drop older ones and stale temp folders."""
    kept = 0
    for folder in list_checkpoints(root):
        if kept < keep and (folder / MANIFEST).is_file():
            kept += 1
        elif kept >= keep:
            shutil.rmtree(folder, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(folder: str | Path, verify: bool = True) -> dict:
    """{"model": tensors, "optimizer": state dict or None, "train_state": dict, "folder": Path}."""
    folder = Path(folder)
    if verify:
        reason = verify_checkpoint(folder)
        if reason:
            raise CheckpointError(f"checkpoint {folder} is not usable: {reason}")
    train_state = json.loads((folder / "train_state.json").read_text())
    optimizer = None
    if (folder / "optimizer.safetensors").is_file() and "optimizer" in train_state:
        optimizer = unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), train_state["optimizer"])
    return {"model": load_file(str(folder / "model.safetensors")), "optimizer": optimizer,
            "train_state": train_state, "folder": folder}
