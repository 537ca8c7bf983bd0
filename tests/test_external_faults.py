"""Faults from outside the job, at moments the trainer does not choose: a SIGKILL sent by another
process at a random time, a SIGSTOP (a hang) during eval, a hang in the middle of a backward pass.
Real `tandem ... --supervise` subprocesses, real signals (tandem/resilience/outside.py)."""

import json
import random
import signal
import subprocess
import sys

from conftest import ROOT
from tandem.config import load_config
from tandem.model import weights_fingerprint
from tandem.pipeline import build_tasks, ensure_tokenizer
from tandem.resilience.incidents import read_jsonl
from tandem.resilience.outside import strike_at_random, strike_once
from tandem.runs import prepare_run
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.train.sft import train_sft

TIMEOUT = 2.0
SETTINGS = ["sft.steps=30", "sft.checkpoint_every=3", "run.threads=1", f"resilience.heartbeat_timeout={TIMEOUT}"]


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _cli(command: str, out, settings) -> list[str]:
    return ["-m", "tandem.cli", command, "--preset", "smoke", "--quiet", "--out", str(out), "--supervise",
            *sum((["--set", s] for s in settings), [])]


def _fingerprint(run_dir, phase="sft"):
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / phase))["model"])


def _hang_incidents(run_dir):
    return [i for i in read_jsonl(run_dir / "incidents.jsonl") if i["kind"] == "hang"]


def test_sigkills_at_random_times_from_outside_then_resume_identical(tmp_path):
    cfg = load_config(preset="smoke", overrides=SETTINGS)
    tasks = build_tasks(cfg)
    twin = prepare_run(tmp_path / "twin", cfg)
    train_sft(cfg, twin, ensure_tokenizer(cfg, twin, tasks), tasks, progress=False)
    seed = random.randrange(1 << 30)  # a new moment every run: the claim is "wherever it lands"
    job = _start(*_cli("sft", tmp_path / "run", SETTINGS))
    strikes = strike_at_random(job, tmp_path / "run", random.Random(seed), [signal.SIGKILL] * 2, max_step=25)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, f"seed {seed}: {err}"
    assert len(strikes) == 2, f"seed {seed}: the job ended before both kills were sent"
    outcomes = [a["outcome"] for a in json.loads((tmp_path / "run" / "supervisor.json").read_text())["attempts"]]
    assert outcomes == ["crashed", "crashed", "done"], f"seed {seed}: {outcomes}"
    assert _fingerprint(tmp_path / "run") == _fingerprint(twin), f"seed {seed}: {strikes}"


def test_a_hang_during_eval_is_detected_and_the_pipeline_finishes(tmp_path):
    # a longer timeout than the training tests': loading the model for eval is one silent phase, which a
    # loaded machine can stretch past 2 s
    timeout = 3 * TIMEOUT
    settings = ["sft.steps=4", "sft.checkpoint_every=2", "run.threads=1", "rl.steps=0", "export.formats=[]",
                "eval.n=300", f"resilience.heartbeat_timeout={timeout}"]
    job = _start(*_cli("pipeline", tmp_path / "run", settings))
    strike = strike_once(job, tmp_path / "run", random.Random(), signal.SIGSTOP, roles=("eval",))
    _, err = job.communicate(timeout=300)
    assert strike is not None and strike.role == "eval", err
    assert job.returncode == 0, err
    attempts = json.loads((tmp_path / "run" / "supervisor.json").read_text())["attempts"]
    assert [a["outcome"] for a in attempts] == ["hung", "done"]
    hung = _hang_incidents(tmp_path / "run")
    assert len(hung) == 1 and 0 < hung[0]["time"] - strike.time <= timeout + 1.0  # + scheduling slack
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["evals"]["sft"]["addition"]["n"] == 300


HANG_IN_BACKWARD = """
import os, sys, time, torch
from pathlib import Path
from tandem.cli import main
backwards, modules = [0], [0]
original = torch.autograd.backward
def counted(*args, **kwargs):
    backwards[0] += 1
    modules[0] = 0
    return original(*args, **kwargs)
def hook(module, grad_input, grad_output):  # runs inside the autograd engine, mid-backward
    modules[0] += 1
    if os.environ.get("TANDEM_SUPERVISED_ATTEMPT") == "1" and backwards[0] == 5 and modules[0] == 3:
        Path(sys.argv[1]).write_text(str(time.time()))
        while True:
            time.sleep(3600)
torch.autograd.backward = counted
torch.nn.modules.module.register_module_full_backward_hook(hook)
sys.exit(main(sys.argv[2:]))
"""


def test_a_hang_in_the_middle_of_a_backward_is_detected(tmp_path):
    marker = tmp_path / "hung-at"
    job = _start("-c", HANG_IN_BACKWARD, str(marker), *_cli("sft", tmp_path / "run", SETTINGS)[2:])
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert marker.is_file(), "the hook never hung: the test did not test anything"
    attempts = json.loads((tmp_path / "run" / "supervisor.json").read_text())["attempts"]
    assert [a["outcome"] for a in attempts] == ["hung", "done"]
    hung = _hang_incidents(tmp_path / "run")
    assert len(hung) == 1 and 0 < hung[0]["time"] - float(marker.read_text()) <= TIMEOUT + 1.0
    assert hung[0]["step"] is not None and hung[0]["step"] >= 4  # the 5th backward is step 4's (from 0)
