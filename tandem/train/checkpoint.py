"""Atomic, verifiable checkpoints.

A checkpoint is a folder `checkpoints/PHASE/step_NNNNNN/` holding

    model.safetensors      weights, HF tensor names (lm_head dropped when tied)
    optimizer.safetensors  optimizer tensors (AdamW moments), flattened as state/<param>/<name>
    train_state.json       step, data position, scheduler, every RNG state, optimizer hyper-
                           parameters, and whatever else the trainer needs to resume exactly
    model_config.json      the ModelConfig
    tokenizer.json, tokenizer_config.json   so the folder alone is a usable model
    manifest.json          SHA-256 and size of every file above, written LAST

FSDP ranks write sharded checkpoints instead (tandem/train/sharded_checkpoint.py): the two
safetensors files are replaced by torch.distributed.checkpoint's shard files (one per rank) and its
.metadata index, under the same manifest and commit; load_checkpoint reads their whole weights in
one process (read_sharded_weights), so eval, export, serve and inspect take either kind.

It is written into a hidden temp folder, every file fsynced, the manifest written, then the folder
renamed into place (atomic on POSIX) and the parent fsynced. A folder without a manifest, or whose
files do not match it, is not a checkpoint: loading skips it with a warning and falls back to the
previous one. The manifest carries a SHA-256 of its own content, so a damaged manifest is caught
too. Only the newest `keep` committed checkpoints are kept. manifest.json is also tandem's mark on
the folder: a `step_N` folder without one was not written here (a commit always has one) and is
never deleted; a temp folder is deleted only once the process named in it is gone.

AsyncCheckpointer does the same write in a background thread: the trainer waits only for a copy of
the state to host memory, and the commit is the same manifest-last rename, so a crash mid-write
leaves an uncommitted temp folder exactly as a synchronous save would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from tandem.errors import CheckpointError

MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"   # the index torch.distributed.checkpoint writes beside its shard files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists: a temp folder named after a live process may still be in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def current_umask() -> int:
    """The process umask, read without setting it (os.umask can only read it by changing it, which
    would race with files the background checkpoint writer creates meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the racy way, the only one there is
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file mode every other file gets (0666 minus the umask):
    save_file writes through a private temp file and leaves it 0600, unreadable to other users."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


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


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict, optimizer_state: dict | None = None,
                    extra_files: dict[str, Path | bytes] | None = None, keep: int = 3,
                    before_commit: Callable[[], None] | None = None) -> Path:
    """Write and commit checkpoint `step` under `root`; returns its folder.

    extra_files: name -> a file to copy, or bytes to write (config, tokenizer).
    before_commit: called once the files are written and fsynced, before the manifest (fault
    injection kills the process here: the most dangerous moment of a write).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    state = dict(train_state, step=step)
    if optimizer_state is not None:
        tensors, meta = flatten_optimizer(optimizer_state)
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        state["optimizer"] = meta
    (tmp / "train_state.json").write_text(json.dumps(state))
    write_extra_files(tmp, extra_files)
    return commit(tmp, root, step, keep, before_commit)


def write_extra_files(folder: Path, extra_files: dict[str, Path | bytes] | None) -> None:
    for name, source in (extra_files or {}).items():
        if isinstance(source, bytes):
            (folder / name).write_bytes(source)
        else:
            shutil.copyfile(source, folder / name)


def file_entry(path: Path) -> dict:
    """A manifest entry: the file fsynced, then its SHA-256 and size."""
    _fsync_file(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def commit(tmp: Path, root: Path, step: int, keep: int, before_commit: Callable[[], None] | None = None,
           hashed: dict[str, dict] | None = None) -> Path:
    """Commit the files written in temp folder `tmp` as checkpoint `step`: fsync, the manifest LAST,
    the atomic rename, prune. hashed: entries already made by file_entry (by the ranks that wrote
    those files, in parallel); every other file of the folder is hashed here."""
    final = root / step_dir_name(step)
    files = dict(hashed or {})
    for name in sorted(p.name for p in tmp.iterdir()):
        if name not in files:
            files[name] = file_entry(tmp / name)
    if before_commit is not None:
        before_commit()
    manifest = {"step": step, "files": dict(sorted(files.items()))}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)
    if final.exists():  # a corrupt leftover of this run, superseded (a resume redoes the step)
        _remove_checkpoint(final)
    os.rename(tmp, final)
    fsync_dir(root)
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
        # Manifests written before self-checksums hold exactly "step" and "files".
        checked = (manifest["manifest_sha256"] == _manifest_digest(manifest) if "manifest_sha256" in manifest
                   else set(manifest) == {"step", "files"})
    except (ValueError, KeyError, TypeError, AttributeError):
        return "manifest.json is unreadable"
    if not checked:
        return "manifest.json does not match its own SHA-256 (corrupted)"
    if folder.name[:5] == "step_" and folder.name[5:].isdigit() and manifest["step"] != int(folder.name[5:]):
        return f"manifest.json is for step {manifest['step']}, not {folder.name}"
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


def latest_valid(root: str | Path, at_most: int | None = None,
                 on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer broken one is reported and skipped.

    at_most: only consider checkpoints of step <= at_most (a rollback to before some trouble).
    on_skip(folder, reason): also told about each broken one (the trainer logs it as an incident).
    """
    for folder in list_checkpoints(root):
        if at_most is not None and int(folder.name[5:]) > at_most:
            continue
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder
        warn(f"skipping checkpoint {folder}: {reason}")
        if on_skip is not None:
            on_skip(folder, reason)
    return None


def _remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder tandem wrote; refuse one without a manifest (not tandem's)."""
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder} is in the way of a checkpoint but was not written by tandem "
                              f"(no {MANIFEST}); move it out of {folder.parent}")
    shutil.rmtree(folder)


def discard_newer(root: str | Path, step: int) -> None:
    """Delete checkpoints newer than `step` (after a rollback they belong to an abandoned timeline)."""
    for folder in list_checkpoints(root):
        if int(folder.name[5:]) > step and (folder / MANIFEST).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` committed checkpoints; drop older ones and temp folders of dead
    processes. Folders without a manifest are not tandem's and are left alone."""
    kept = 0
    for folder in list_checkpoints(root):
        if not (folder / MANIFEST).is_file():
            continue
        if kept < keep:
            kept += 1
        else:
            shutil.rmtree(folder, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(folder: str | Path, verify: bool = True) -> dict:
    """{"model": tensors, "optimizer": state dict or None, "train_state": dict, "folder": Path}."""
    folder = Path(folder)
    if verify:
        reason = verify_checkpoint(folder)
        if reason:
            raise CheckpointError(f"checkpoint {folder} is not usable: {reason}")
    train_state = json.loads((folder / "train_state.json").read_text())
    if (folder / DCP_METADATA).is_file():   # written by FSDP ranks (tandem/train/sharded_checkpoint.py)
        return {"model": read_sharded_weights(folder), "optimizer": None, "train_state": train_state, "folder": folder}
    optimizer = None
    if (folder / "optimizer.safetensors").is_file() and "optimizer" in train_state:
        optimizer = unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), train_state["optimizer"])
    return {"model": load_file(str(folder / "model.safetensors")), "optimizer": optimizer,
            "train_state": train_state, "folder": folder}


def read_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded (torch.distributed.checkpoint) checkpoint, in this one
    process, whatever world size wrote it: each tensor is allocated whole from DCP's metadata and
    filled from the shards (the optimizer state is not read: eval, export and serve need none)."""
    import torch.distributed.checkpoint as dcp
    reader = dcp.FileSystemReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    weights = {key[len("model."):]: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in meta.items() if key.startswith("model.")}
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    return weights


def to_host(value):
    """A private host-memory copy of a state (tensors copied, containers rebuilt, scalars shared)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


class AsyncCheckpointer:
    """save_checkpoint in a background thread; the caller waits only for the copy to host memory.

        saver = AsyncCheckpointer()
        saver.save(root, step, model_state, train_state, optimizer_state, ...)  # same arguments
        saver.wait()   # before exiting, or before reading checkpoints back

    At most one write is in flight: a save waits for the previous one. An error in the writer is
    raised by the next save() or wait(). The copy to host is needed even on CPU, because the next
    optimizer step updates the live tensors in place while the writer is still reading them.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, root, step, model_state, train_state, optimizer_state=None, extra_files=None, keep=3,
             before_commit=None) -> None:
        self.wait()
        # Hundreds of small copies: one intra-op thread does them fastest (a parallel copy is a
        # fork-join per tensor, and on a busy machine each join can wait ~ms for a descheduled
        # thread: 470 ms against 10 ms for the tiny preset here). Copies are exact either way.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            args = (root, step, to_host(model_state), to_host(train_state), to_host(optimizer_state),
                    extra_files, keep, before_commit)
        finally:
            torch.set_num_threads(threads)
        self._thread = threading.Thread(target=self._write, args=args, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write(self, *args) -> None:
        try:
            save_checkpoint(*args)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
