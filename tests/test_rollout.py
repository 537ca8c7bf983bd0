"""Rollout roles: weight verification, malformed answers, killed and hung worker processes, bad config."""

import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import run_tandem, tiny_model_config
from tandem import accel
from tandem.config import load_config
from tandem.model import Transformer, weights_fingerprint
from tandem.runs import prepare_run, read_metrics, read_summary
from tandem.train.checkpoint import latest_valid
from tandem.train.rollout import (WorkerPool, Generator, connect, get_blob, make_spec, put_blob, receive_weights,
                                  serve)

pytest_plugins = ["test_grpo"]  # the init_model fixture (a smoke SFT checkpoint)


def _pool(tmp_path, ranks, overrides=()):
    cfg = load_config(preset="smoke", overrides=["rollout.threads=1", "rl.max_new_tokens=8", "rl.max_prompt_len=8",
                                                 *overrides])
    spec = make_spec(cfg, tiny_model_config(), SimpleNamespace(eos_id=1))
    store = connect("127.0.0.1", 0, is_master=True)
    return WorkerPool(cfg, spec, store, ranks, None, tmp_path), store, spec


def test_a_worker_refuses_weights_that_fail_their_fingerprint_and_retries(tmp_path, capfd):
    pool, store, _ = _pool(tmp_path, ranks=[])
    published = pool.publish(1, Transformer(tiny_model_config()).checkpoint_state())
    blob = bytearray(store.get("weights/1/0"))
    blob[-1] ^= 0x01                                        # one bit flipped in host memory / on the wire
    store.set("weights/1/0", bytes(blob))
    received = {}
    worker_store = connect("127.0.0.1", store.port, is_master=False)
    worker = threading.Thread(target=lambda: received.update(
        receive_weights(worker_store, 1, published["fingerprint"], "test worker", backoff=0.05)))
    worker.start()
    while worker.is_alive():                                # the trainer's poll loop notices and resends
        pool._poll()
        time.sleep(0.01)
    assert weights_fingerprint(received) == published["fingerprint"]
    assert pool.faults["refused_weights"] >= 1
    err = capfd.readouterr().err
    assert "weights v1 fail verification" in err and "refusing them" in err and "resending" in err


def _malformed_worker(port: int, rank: int) -> None:
    """Says hello like a worker, then answers its first job with a token id outside the vocabulary."""
    store = connect("127.0.0.1", port, is_master=False)
    incarnation = store.add(f"hello/{rank}", 1)
    key = f"job/{rank}/{incarnation}/0"
    while not store.check([key]):
        time.sleep(0.005)
    job = json.loads(get_blob(store, key))
    samples = [{"tokens": [10 ** 6], "logprobs": [-0.1], "finish": "length"} for _ in job["requests"]]
    put_blob(store, f"result/{rank}/{incarnation}/0", json.dumps({"version": job["version"], "samples": samples,
                                                                    "device_kind": "cpu", "seconds": 0, "tokens": 0}).encode())


def test_malformed_rollouts_are_rejected_and_regenerated_elsewhere(tmp_path, capfd):
    pool, store, spec = _pool(tmp_path, ranks=[1, 2])
    model = Transformer(tiny_model_config())
    pool.publish(0, model.checkpoint_state())
    threading.Thread(target=serve, args=("127.0.0.1", store.port, 1), daemon=True).start()
    threading.Thread(target=_malformed_worker, args=(store.port, 2), daemon=True).start()
    requests = [[[3, 4, 5, 6], seed] for seed in range(6)]
    result = pool.collect(pool.submit(0, 0, requests))
    pool.close()
    assert pool.faults["malformed"] == 1 and result.faults == 1
    assert "rollout worker 2 returned malformed rollouts" in capfd.readouterr().err
    # Every sample is the healthy worker's, and equals what a lone generator makes of the same seeded
    # requests: reassigned prompts yield the same tokens.
    reference = Generator(spec)
    reference.load(0, {k: v.clone() for k, v in model.checkpoint_state().items()})
    expected = reference.run({"version": 0, "requests": requests})["samples"]
    assert [s["tokens"] for s in result.samples] == [s["tokens"] for s in expected]


def test_a_generator_applies_run_deterministic():
    """Rollout workers (and the colocated generator) switch deterministic kernels as the trainers do."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for on in (False, True):
            cfg = load_config(preset="smoke", overrides=[f"run.deterministic={str(on).lower()}"])
            Generator(make_spec(cfg, tiny_model_config(), SimpleNamespace(eos_id=1)))
            assert torch.are_deterministic_algorithms_enabled() is on
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


def _worker_pids(rank: int) -> list[int]:
    """Live rollout worker processes of `rank` started by this test process."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if fields[0] not in "ZX" and int(fields[1]) == os.getpid() and b"tandem.train.rollout" in argv \
                and argv[argv.index(b"--rank") + 1] == str(rank).encode():
            found.append(int(pid))
    return found


def test_killed_and_hung_workers_lose_no_step(tmp_path, init_model):
    """Two real worker processes: rank 1 is SIGKILLed after step 2, rank 2 is frozen (SIGSTOP) after
    step 4; both are detected, killed, respawned, their prompts reassigned; every step trains once."""
    from tandem.train.grpo import train_grpo
    cfg = load_config(preset="smoke", overrides=[
        "run.threads=1", "rollout.threads=1", "rl.steps=8", "rl.prompts_per_step=2", "rl.group_size=4",
        "rl.max_new_tokens=12", "rl.max_prompt_len=32", "rl.checkpoint_every=4", "rollout.workers=2",
        "rollout.timeout=4", "rl.mode=async"])
    run_dir = prepare_run(tmp_path / "run", cfg)
    done = []

    def saboteur():
        for after, rank, sig in ((2, 1, signal.SIGKILL), (4, 2, signal.SIGSTOP)):
            while not done and len(read_metrics(run_dir, "rl")) < after:
                time.sleep(0.02)
            for pid in _worker_pids(rank):
                os.kill(pid, sig)

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    try:
        stats = train_grpo(cfg, run_dir, init_model, progress=False)
    finally:
        done.append(True)
    thread.join()
    assert [m["step"] for m in read_metrics(run_dir, "rl")] == list(range(1, 9))      # none lost, none doubled
    assert latest_valid(run_dir / "checkpoints" / "rl").name == "step_000008"
    faults = stats["worker_faults"]
    assert faults["died"] >= 1 and faults["hung"] >= 1 and faults["respawned"] >= 2, faults
    assert read_summary(run_dir)["rl_totals"]["samples"] == 8 * 8
    assert not _worker_pids(1) and not _worker_pids(2)                                 # nothing left running


@pytest.mark.parametrize("args,needle", [
    (["--set", "rl.group_size=1"], "'rl.group_size' = 1 is out of range; allowed: >= 2"),
    (["--set", "rl.device=cuda:3"], "rl.device = 'cuda:3' (rl role): device 'cuda:3' is not available"),
    (["--set", "rollout.dtype=fp8"], "'rollout.dtype'"),
    (["--set", "rl.loss_norm=mean"], "'rl.loss_norm'"),
    (["--init", "{tmp}/nothing"], "--init path not found"),
])
def test_bad_rl_input_is_one_line_and_exit_2(tmp_path, init_model, capsys, args, needle):
    from tandem.cli import main
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    init = [] if "--init" in args else ["--init", str(init_model)]
    assert main(["rl", *init, "--out", str(tmp_path / "rl"), "--preset", "smoke", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "rl").exists()                                               # nothing written


def test_missing_rollout_device_from_the_real_command(tmp_path, init_model):
    result = run_tandem("rl", "--init", init_model, "--out", tmp_path / "rl", "--preset", "smoke",
                        "--set", "rollout.device=npu")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "rollout.device = 'npu' (rollout role): device 'npu' is not available" in lines[0]
    assert not (tmp_path / "rl").exists()


def test_two_data_parallel_trainers_match_one(tmp_path):
    """torchrun with rl.trainers = 2 (gloo on the cpu) + 1 rollout worker takes the same steps as one
    trainer: each trainer computes half the sequences and the gradients are summed. A coin-flip
    JSONL task makes rewards vary from the first step, so the gradients are not zero."""
    import socket
    import subprocess
    import sys
    from conftest import ROOT, coin_flip_task
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.train.checkpoint import load_checkpoint
    from tandem.train.grpo import train_grpo
    from tandem.train.sft import train_sft
    common = [coin_flip_task(tmp_path), "run.threads=1", "rollout.threads=1", "rl.mode=sync", "rl.lr=0.001",
              "rl.max_new_tokens=16", "rl.steps=3"]
    sft_cfg = load_config(preset="smoke", overrides=common + ["sft.steps=60", "sft.lr=0.01"])
    init = prepare_run(tmp_path / "sft", sft_cfg)
    tasks = build_tasks(sft_cfg)
    train_sft(sft_cfg, init, ensure_tokenizer(sft_cfg, init, tasks), tasks, progress=False)

    one = load_config(preset="smoke", overrides=common)
    train_grpo(one, prepare_run(tmp_path / "one", one), init, progress=False)
    with socket.socket() as probe:                                              # a free port for the job's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
                             "--master-port", str(port), "-m", "tandem.cli", "rl", "--init", str(init), "--out",
                             str(tmp_path / "two"), "--preset", "smoke", "--quiet", "--set", "rl.trainers=2",
                             *sum((["--set", o] for o in common), [])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})   # a crash shows its Python stack
    assert launch.returncode == 0, launch.stderr[-3000:]
    a, b = (read_metrics(tmp_path / run, "rl") for run in ("one", "two"))
    assert [m["step"] for m in b] == [1, 2, 3] and a[0]["reward"] == b[0]["reward"]
    wa, wb = (load_checkpoint(latest_valid(tmp_path / run / "checkpoints" / "rl"))["model"] for run in ("one", "two"))
    start = load_checkpoint(latest_valid(init / "checkpoints" / "sft"))["model"]
    assert weights_fingerprint(wa) != weights_fingerprint(start)                # the gradients were not zero
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4        # same steps, up to summation order


def test_rollout_dtype_auto_is_decided_once_by_the_rollout_device(monkeypatch):
    """rollout.dtype = "auto" (the tiny and moe presets) becomes bf16 only where the rollout device
    has bf16 units, fp32 elsewhere; the spec carries the decided name, so the trainer encodes the
    weights it publishes in the dtype the workers compute in."""
    cfg = load_config(preset="tiny", overrides=["rollout.device=cpu"])
    assert cfg.rollout.dtype == "auto"
    for fast in (True, False):
        monkeypatch.setattr(accel, "fast_bf16", lambda device, fast=fast: fast)
        spec = make_spec(cfg, tiny_model_config(), SimpleNamespace(eos_id=1))
        assert spec["dtype"] == ("bf16" if fast else "fp32")
        assert Generator(spec).dtype == accel.DTYPES[spec["dtype"]]
