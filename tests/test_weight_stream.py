"""Streamed weight sync over TCP (tandem/train/weight_stream.py) with real receiver processes: every
receiver ends with the sender's weights, verified; a receiver killed mid-sync or one that stops
reading is dropped while the others finish, and a respawned receiver gets the whole version; a
damaged or truncated stream is refused.

    PYTHONPATH=. python -m pytest -q tests/test_weight_stream.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT
from tandem.errors import ConfigError
from tandem.model import ModelConfig, Transformer, weights_fingerprint
from tandem.train.rollout import WeightsMismatch
from tandem.train.weight_stream import accept_receivers, listen, named_weights, receive_version, send_version

# ~25 MB in fp32: more than loopback sockets buffer, so a receiver that stops reading stalls the sender.
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)
RECEIVER = """
import json, socket, sys, time
import torch
from tandem.model import ModelConfig, Transformer, weights_fingerprint
from tandem.train.weight_stream import receive_version
model = Transformer(ModelConfig(**json.loads(sys.argv[1])))
conn = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
if sys.argv[3] == "stall":
    conn.recv(8)
    print("started", flush=True)
    time.sleep(600)
version, fingerprint = receive_version(conn, model)
print(json.dumps({"version": version, "fingerprint": fingerprint,
                  "model": weights_fingerprint(model.checkpoint_state())}), flush=True)
"""


def sender_model(shape=SHAPE) -> Transformer:
    model = Transformer(ModelConfig(**shape))
    model.reset_parameters(0)
    return model


def receiver(port: int, mode: str = "load") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RECEIVER, json.dumps(SHAPE), str(port), mode], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def stream_in_thread(receivers, model, version, timeout):
    out = {}
    thread = threading.Thread(target=lambda: out.update(send_version(
        receivers, named_weights(model), version, torch.float32, bucket_bytes=1 << 20, timeout=timeout)))
    thread.start()
    return thread, out


def test_a_receiver_killed_mid_sync_is_dropped_and_its_respawn_gets_the_whole_version():
    model = sender_model()
    expected = weights_fingerprint(model.checkpoint_state())
    server = listen()
    port = server.getsockname()[1]
    good, victim = receiver(port), receiver(port, "stall")
    receivers = accept_receivers(server, 2, timeout=120)
    assert len(receivers) == 2
    thread, stats = stream_in_thread(receivers, model, 3, timeout=60)
    assert victim.stdout.readline().strip() == "started"                  # the victim is inside the stream
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    thread.join(timeout=60)
    assert not thread.is_alive()                                          # the trainer went on, well before 60 s
    answer = json.loads(good.communicate(timeout=120)[0])
    assert answer == {"version": 3, "fingerprint": expected, "model": expected}
    assert stats["fingerprint"] == expected and stats["buckets"] > 1 and len(stats["receivers"]) == 1
    respawned = receiver(port)                                            # the victim's respawn
    thread, stats = stream_in_thread(accept_receivers(server, 1, timeout=120), model, 3, timeout=60)
    thread.join(timeout=60)
    assert json.loads(respawned.communicate(timeout=120)[0])["model"] == expected
    server.close()


def test_a_receiver_that_stops_reading_costs_the_sender_at_most_the_timeout():
    model = sender_model()
    server = listen()
    stalled = receiver(server.getsockname()[1], "stall")
    receivers = accept_receivers(server, 1, timeout=120)
    started = time.monotonic()
    stats = send_version(receivers, named_weights(model), 1, torch.float32, bucket_bytes=1 << 20, timeout=2.0)
    assert stats["receivers"] == [] and time.monotonic() - started < 30
    stalled.kill()
    stalled.wait()
    server.close()


def _stream_bytes(model) -> bytes:
    ours, theirs = socket.socketpair()
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: theirs.recv(1 << 20), b"")))
    reader.start()
    send_version([ours], named_weights(model), 5, torch.float32, bucket_bytes=4096, timeout=10)
    ours.close()
    reader.join()
    return b"".join(chunks)


def _receive(data: bytes, model):
    ours, theirs = socket.socketpair()
    writer = threading.Thread(target=lambda: (ours.sendall(data), ours.close()))
    writer.start()
    try:
        return receive_version(theirs, model, timeout=10)
    finally:
        writer.join()


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_a_damaged_or_truncated_stream_is_refused(damage):
    tiny = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    data = _stream_bytes(sender_model(tiny))
    assert _receive(data, Transformer(ModelConfig(**tiny)))[0] == 5                 # intact: accepted
    if damage == "bitflip":
        broken = bytearray(data)
        broken[len(data) // 2] ^= 0x01
        data = bytes(broken)
    else:
        data = data[: len(data) * 2 // 3]
    with pytest.raises(WeightsMismatch):
        _receive(data, Transformer(ModelConfig(**tiny)))


def test_a_bucket_size_of_zero_is_refused_with_the_rule():
    with pytest.raises(ConfigError, match="bucket size = 0 bytes; it must be > 0"):
        send_version([], named_weights(sender_model()), 1, torch.float32, bucket_bytes=0, timeout=1)
