"""SFT resumes exactly: N steps + resume + M steps == N+M steps, bitwise, in-process and after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_tandem
from tandem import accel
from tandem.config import load_config
from tandem.model import weights_fingerprint
from tandem.pipeline import build_tasks, ensure_tokenizer
from tandem.runs import prepare_run, read_metrics
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.train.sft import lr_at, train_sft

OVERRIDES = ["sft.steps=12", "sft.checkpoint_every=5", "sft.log_every=1", "run.threads=1"]


def _final_fingerprint(run_dir):
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / "sft"))["model"])


def _train(run_dir, cfg, stop_after=None):
    run_dir = prepare_run(run_dir, cfg)
    tasks = build_tasks(cfg)
    tokenizer = ensure_tokenizer(cfg, run_dir, tasks)
    return train_sft(cfg, run_dir, tokenizer, tasks, progress=False, stop_after=stop_after)


@pytest.mark.parametrize("dtype,accum", [("fp32", 1), ("bf16", 2)])
def test_resume_is_bitwise_exact(tmp_path, dtype, accum):
    cfg = load_config(preset="smoke", overrides=OVERRIDES + [f"sft.dtype={dtype}", f"sft.grad_accum={accum}"])
    _train(tmp_path / "straight", cfg)
    _train(tmp_path / "resumed", cfg, stop_after=7)      # "interrupted" after step 7 (mid-interval)
    stats = _train(tmp_path / "resumed", cfg)             # a rerun resumes from the step-7 checkpoint
    assert stats["resumed_from"] == 7
    assert _final_fingerprint(tmp_path / "straight") == _final_fingerprint(tmp_path / "resumed")
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight", "sft")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "resumed", "sft")]
    assert straight == resumed  # metrics logged past the checkpoint by the first attempt are dropped


def test_auto_dtype_trains_in_what_the_device_does_fast(tmp_path):
    """sft.dtype=auto: bf16 autocast only where accel finds bf16 units (fp32 on e.g. an AVX2 CPU);
    the summary records the dtype used."""
    cfg = load_config(preset="smoke", overrides=OVERRIDES + ["sft.dtype=auto", "sft.steps=1"])
    assert _train(tmp_path / "run", cfg)["dtype"] == accel.choose_dtype("auto", "cpu")


def test_training_reduces_loss(tmp_path):
    cfg = load_config(preset="smoke", overrides=["sft.steps=30", "sft.log_every=1", "run.threads=1"])
    _train(tmp_path / "run", cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run", "sft")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_sigkill_then_rerun_gives_identical_weights(tmp_path):
    """A real `tandem sft` process killed with SIGKILL after its first checkpoint, then rerun."""
    args = ["sft", "--preset", "smoke", "--quiet", *sum((["--set", o] for o in
            ["sft.steps=40", "sft.checkpoint_every=4", "run.threads=1"]), [])]
    assert run_tandem(*args, "--out", tmp_path / "straight").returncode == 0
    victim = subprocess.Popen([sys.executable, "-m", "tandem.cli", *args, "--out", str(tmp_path / "killed")],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and latest_valid(tmp_path / "killed" / "checkpoints" / "sft") is None:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    rerun = run_tandem(*args, "--out", tmp_path / "killed")
    assert rerun.returncode == 0, rerun.stderr
    assert _final_fingerprint(tmp_path / "straight") == _final_fingerprint(tmp_path / "killed")
    assert torch.equal(load_checkpoint(latest_valid(tmp_path / "straight" / "checkpoints" / "sft"))["model"]
                       ["model.norm.weight"],
                       load_checkpoint(latest_valid(tmp_path / "killed" / "checkpoints" / "sft"))["model"]
                       ["model.norm.weight"])
