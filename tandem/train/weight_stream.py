"""Streamed weight sync over plain TCP sockets: a trainer sends a weights version bucket by bucket
to every receiver at once; a receiver loads each bucket into its model as it arrives and verifies the
SHA-256 fingerprint of the whole (model.weights_fingerprint, computed as the buckets go by) before
the version may be used.

    sender (trainer rank 0; under FSDP every trainer rank iterates named_weights together, the
    others with no receivers, since each parameter is gathered from its shards by a collective):
        server = listen("0.0.0.0", port)
        receivers = accept_receivers(server, count=2, timeout=30)
        stats = send_version(receivers, named_weights(model), version=7, dtype=torch.bfloat16,
                             bucket_bytes=256 << 20, timeout=30)
    receiver (a rollout worker, on this machine or another):
        version, fingerprint = receive_version(socket.create_connection((host, port)), model, expected)

Wire format: b"TWS1", a length-prefixed JSON header {"version"}; then buckets, each an 8-byte length
and safetensors bytes (no pickle: nothing executable crosses), tensors in sorted name order across
and within buckets; then a zero length and a length-prefixed JSON trailer {"fingerprint", "tensors"}.

Memory: the sender forms one bucket at a time (each parameter gathered from its FSDP shards when its
turn comes, cast to the wire dtype) and sends it to every receiver before forming the next; a
receiver holds one bucket and copies it into its parameters. Neither side holds a second full copy.
The bytes go over one socket per receiver, not through the c10d store's single server thread.

Faults: every socket has a timeout. A receiver that dies (reset, broken pipe) or stalls a send for
longer than `timeout` is dropped and the others go on, so a dead or hung worker costs the trainer at
most `timeout`. A receiver whose stream breaks or does not hash to the fingerprint raises
WeightsMismatch: its model then holds a partial version and must not be used (the caller treats it as
holding none and asks again, e.g. after a respawn); only a verified version is returned.

Simplification: not wired into tandem/train/rollout.py yet. The rollout workers still receive
weights through the c10d store; the job protocol naming a stream address, and async mode's previous
version (which the sender would have to keep as a wire-dtype snapshot), remain to be built.
benchmarks/bench_scale.py measures this path against raw loopback TCP.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tandem.errors import ConfigError
from tandem.model import fingerprint_update
from tandem.train.rollout import WeightsMismatch

MAGIC = b"TWS1"
LENGTH = struct.Struct(">Q")


def check_bucket_bytes(bucket_bytes: int) -> None:
    if bucket_bytes <= 0:
        raise ConfigError(f"weight sync bucket size = {bucket_bytes} bytes; it must be > 0 (e.g. 268435456 = 256 MB)")


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) in sorted name order, as checkpoint_state names them (the LM head left
    out when tied); an FSDP parameter is gathered from its shards when its turn comes."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name in sorted(state):
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    server = socket.create_server((host, port))
    server.listen()
    return server


def accept_receivers(server: socket.socket, count: int, timeout: float) -> list[socket.socket]:
    """Up to `count` receivers that connect within `timeout` seconds."""
    server.settimeout(timeout)
    receivers = []
    try:
        while len(receivers) < count:
            receivers.append(server.accept()[0])
    except TimeoutError:
        pass
    return receivers


def _frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


def _send_all(receivers: list[socket.socket], data: bytes) -> list[socket.socket]:
    """Send to each receiver; the ones that fail or time out are closed and left out."""
    alive = []
    for conn in receivers:
        try:
            conn.sendall(data)
            alive.append(conn)
        except OSError:
            conn.close()
    return alive


def send_version(receivers: list[socket.socket], weights: Iterable[tuple[str, torch.Tensor]], version: int,
                 dtype: torch.dtype, bucket_bytes: int, timeout: float) -> dict:
    """Stream `weights` (named_weights) as version `version` in `dtype` to every receiver; returns
    {"fingerprint", "bytes" (per receiver), "buckets", "receivers" (still alive at the end)}."""
    check_bucket_bytes(bucket_bytes)
    for conn in receivers:
        conn.settimeout(timeout)
    alive = _send_all(receivers, MAGIC + _frame(json.dumps({"version": version}).encode()))
    digest, sent, buckets, count = hashlib.sha256(), 0, 0, 0
    bucket: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        wire = tensor.to("cpu", dtype).contiguous()
        fingerprint_update(digest, name, wire)
        count += 1
        if bucket and sum(t.nbytes for t in bucket.values()) + wire.nbytes > bucket_bytes:
            data = _frame(st_save(bucket))
            alive, sent, buckets, bucket = _send_all(alive, data), sent + len(data), buckets + 1, {}
        bucket[name] = wire
    if bucket:
        data = _frame(st_save(bucket))
        alive, sent, buckets = _send_all(alive, data), sent + len(data), buckets + 1
    fingerprint = digest.hexdigest()
    alive = _send_all(alive, LENGTH.pack(0) + _frame(json.dumps({"fingerprint": fingerprint, "tensors": count}).encode()))
    return {"fingerprint": fingerprint, "bytes": sent, "buckets": buckets, "receivers": alive}


def _read_exact(conn: socket.socket, size: int) -> bytes:
    """`size` bytes, read as they come (nothing allocated ahead: a damaged length cannot ask for more
    memory than the bytes that actually arrive)."""
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 22))
        if not chunk:
            raise WeightsMismatch(f"the stream ended after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(conn: socket.socket) -> bytes:
    return _read_exact(conn, LENGTH.unpack(_read_exact(conn, LENGTH.size))[0])


def receive_version(conn: socket.socket, model, expected: str | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """Load a streamed version into `model` bucket by bucket; returns (version, fingerprint) once it
    verifies (against the sender's trailer, and `expected` when given), else WeightsMismatch (the
    model then holds a partial version: do not use it)."""
    conn.settimeout(timeout)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    digest, loaded = hashlib.sha256(), 0
    try:
        if _read_exact(conn, len(MAGIC)) != MAGIC:
            raise WeightsMismatch("not a tandem weight stream")
        version = json.loads(_read_frame(conn))["version"]
        while (size := LENGTH.unpack(_read_exact(conn, LENGTH.size))[0]) > 0:
            bucket = st_load(_read_exact(conn, size))
            with torch.no_grad():
                for name in sorted(bucket):
                    if name not in params:
                        raise WeightsMismatch(f"the stream holds {name}, which this model does not have")
                    fingerprint_update(digest, name, bucket[name])
                    params[name].copy_(bucket[name])
                    loaded += 1
        trailer = json.loads(_read_frame(conn))
    except (OSError, ValueError, KeyError, struct.error, SafetensorError) as exc:
        raise WeightsMismatch(f"weight stream broken ({type(exc).__name__}: {exc})") from None
    fingerprint = digest.hexdigest()
    for want, what in ((trailer["fingerprint"], "the sender's"), (expected, "the expected")):
        if want is not None and fingerprint != want:
            raise WeightsMismatch(f"sha256 {fingerprint[:12]} != {what} {want[:12]}")
    if loaded != trailer["tensors"] or loaded != len(params):   # named_parameters lists a tied head once
        raise WeightsMismatch(f"{loaded} tensors received, the model has {len(params)}")
    return version, fingerprint
