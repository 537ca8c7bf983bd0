"""GRPO on unstable hardware: the guard skips non-finite updates and rolls back after repeated
trouble, silent corruption is found and repaired on one trainer (against a recomputation) and
across two data-parallel trainer ranks (by a vote on all-gathered fingerprints), and the guard's
state survives a resume; when every update fails, `tandem rl` gives up (exit 3). Sync mode with
colocated rollouts on the cpu, so runs compare bitwise."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, coin_flip_task
from tandem.config import load_config
from tandem.model import weights_fingerprint
from tandem.runs import prepare_run, read_metrics
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.train.grpo import train_grpo
from tandem.resilience.faults import FAULTS_FILE
from tandem.resilience.incidents import INCIDENTS_FILE, read_jsonl

RL = ["run.threads=1", "rl.mode=sync", "rl.steps=4", "rl.lr=0.001", "rl.max_new_tokens=16", "rollout.workers=0",
      "rl.checkpoint_every=1", "rl.keep_checkpoints=10", "rl.log_every=1"]


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    """A coin-flip JSONL task and a short SFT on it: the SFT model answers in the format often enough
    for group rewards to differ from the first GRPO step on, so the updates are not zero.
    Returns (the SFT run to start RL from, the overrides naming the task)."""
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.train.sft import train_sft
    root = tmp_path_factory.mktemp("coin")
    task = [coin_flip_task(root)]
    cfg = load_config(preset="smoke", overrides=task + ["run.threads=1", "sft.steps=60", "sft.lr=0.01"])
    init = prepare_run(root / "sft", cfg)
    tasks = build_tasks(cfg)
    train_sft(cfg, init, ensure_tokenizer(cfg, init, tasks), tasks, progress=False)
    return init, task


def _rl(run_dir, coin, overrides=(), stop_after=None):
    init, task = coin
    cfg = load_config(preset="smoke", overrides=RL + task + list(overrides))
    return train_grpo(cfg, prepare_run(run_dir, cfg), init, progress=False, stop_after=stop_after)


def _weights(run_dir, step=None):
    """SHA-256 of the RL checkpoint of `step` (default: the newest)."""
    root = run_dir / "checkpoints" / "rl"
    folder = root / f"step_{step:06d}" if step is not None else latest_valid(root)
    return weights_fingerprint(load_checkpoint(folder)["model"])


def _incidents(run_dir):
    return [(i["kind"], i["step"]) for i in read_jsonl(run_dir / INCIDENTS_FILE)]


@pytest.fixture(scope="module")
def clean(coin, tmp_path_factory):
    """The fault-free single-trainer run."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    stats = _rl(run_dir, coin)
    assert _weights(run_dir) != stats["init_fingerprint"]                  # the updates were not zero
    return _weights(run_dir)


def test_nonfinite_updates_are_skipped_and_the_guard_state_survives_a_resume(tmp_path, coin):
    faults = ['resilience.faults="nan@1,inf:grad@2"']
    _rl(tmp_path / "a", coin, faults)
    a = tmp_path / "a"
    assert _weights(a, 1) == _weights(a, 2) == _weights(a, 3) != _weights(a, 4)  # steps 1, 2: no change
    assert [m["skipped"] for m in read_metrics(a, "rl")] == [0, 1, 1, 0]
    incidents = read_jsonl(a / INCIDENTS_FILE)
    assert [(i["kind"], i["step"]) for i in incidents] == [("skip", 1), ("skip", 2)]
    assert "loss is nan" in incidents[0]["detail"] and "gradient norm is inf" in incidents[1]["detail"]
    guard = load_checkpoint(latest_valid(a / "checkpoints" / "rl"))["train_state"]["guard"]
    assert [s for s, _ in guard["skipped"]] == [1, 2] and len(guard["norms"]) == 2

    _rl(tmp_path / "b", coin, faults, stop_after=2)                        # interrupted between the faults
    _rl(tmp_path / "b", coin, faults)
    b = tmp_path / "b"
    assert _weights(b) == _weights(a)
    assert load_checkpoint(latest_valid(b / "checkpoints" / "rl"))["train_state"]["guard"] == guard
    assert [m["skipped"] for m in read_metrics(b, "rl")] == [0, 1, 1, 0]


def test_repeated_trouble_rolls_back_and_replays_to_the_fault_free_weights(tmp_path, coin, clean):
    faults = ['resilience.faults="nan@1,nan@2"', "resilience.rollback_after=2"]
    _rl(tmp_path / "sync", coin, faults)
    run = tmp_path / "sync"
    assert _incidents(run) == [("skip", 1), ("skip", 2), ("rollback", 2)]
    assert _weights(run) == clean                                          # the replay met no fault
    assert [(m["step"], m["skipped"]) for m in read_metrics(run, "rl")] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert load_checkpoint(latest_valid(run / "checkpoints" / "rl"))["train_state"]["guard"]["replay_until"] == 2
    # Async mode: the batch already generated for the abandoned step 3 is waited out and dropped.
    _rl(tmp_path / "async", coin, faults + ["rl.mode=async"])
    assert _incidents(tmp_path / "async") == [("skip", 1), ("skip", 2), ("rollback", 2)]
    assert [m["step"] for m in read_metrics(tmp_path / "async", "rl")] == [1, 2, 3, 4]


def test_one_trainer_finds_corruption_against_a_recomputation(tmp_path, coin, clean):
    """A flipped gradient bit loses the vote to two recomputations; a flipped weight bit has only
    the fingerprint recorded after the last update to disagree with (no majority): rollback."""
    _rl(tmp_path / "run", coin, ['resilience.faults="bitflip:grad@1,bitflip:weight@2"', "resilience.check_every=1"])
    run = tmp_path / "run"
    assert _incidents(run) == [("corruption", 1), ("corruption", 2), ("rollback", 2)]
    assert _weights(run) == clean


# -----------------------------------------------------------------------------------------------
# Data-parallel trainer ranks under torchrun (gloo on the cpu)


def _torchrun(out, coin, overrides, ranks=2):
    init, task = coin
    with socket.socket() as probe:                                              # a free port for the job's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sets = sum((["--set", o] for o in RL + task + [f"rl.trainers={ranks}", "resilience.check_every=1", *overrides]),
               [])
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                             "--master-port", str(port), "-m", "tandem.cli", "rl", "--init", str(init), "--out",
                             str(out), "--preset", "smoke", "--quiet", *sets],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert launch.returncode == 0, launch.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(coin, tmp_path_factory):
    """A fault-free run on 2 trainer ranks, checked at every step."""
    return _torchrun(tmp_path_factory.mktemp("two") / "clean", coin, [])


def test_a_clean_two_rank_run_raises_no_false_alarm(two_ranks, coin):
    assert _incidents(two_ranks) == []
    assert [(m["step"], m["skipped"]) for m in read_metrics(two_ranks, "rl")] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    sft = weights_fingerprint(load_checkpoint(latest_valid(coin[0] / "checkpoints" / "sft"))["model"])
    assert _weights(two_ranks) != sft                                          # the updates were not zero


def test_corruption_on_one_of_two_trainer_ranks_is_repaired(tmp_path, two_ranks, coin):
    """Fault seed 3 puts the gradient bit flip and the NaN gradient on rank 1 and the weight bit
    flip on rank 0 (repaired from rank 1). Every fault is found at its step and repaired without a
    skip or a rollback, and the final weights are the fault-free run's, bit for bit."""
    run = _torchrun(tmp_path / "faulty", coin, ['resilience.faults="bitflip:grad@1,bitflip:weight@2,nan:grad@3"',
                                                "resilience.fault_seed=3"])
    assert [(f["fault"], f["replica"]) for f in read_jsonl(run / FAULTS_FILE)] == [
        ("trainer/bitflip:grad@1", 1), ("trainer/bitflip:weight@2", 0), ("trainer/nan:grad@3", 1)]
    incidents = read_jsonl(run / INCIDENTS_FILE)
    assert [(i["kind"], i["step"]) for i in incidents] == [("corruption", 1), ("corruption", 2), ("corruption", 3)]
    assert "gradients of replica 1" in incidents[0]["detail"] and "restored from replica 1" in incidents[1]["detail"]
    assert _weights(run) == _weights(two_ranks)


def test_with_three_ranks_the_majority_repairs_a_gradient_by_broadcast(tmp_path, coin):
    """2 of 3 ranks outvote the third without recomputing: its gradient is overwritten by a
    broadcast. Had the repair failed, its weights would differ at the next step's check."""
    run = _torchrun(tmp_path / "three", coin, ['resilience.faults="bitflip:grad@1"', "rl.steps=3"], ranks=3)
    incidents = read_jsonl(run / INCIDENTS_FILE)
    victim = read_jsonl(run / FAULTS_FILE)[0]["replica"]
    assert [(i["kind"], i["step"]) for i in incidents] == [("corruption", 1)]
    assert incidents[0]["detail"] == (f"gradients of replica {victim} differed from the majority of 3 computations; "
                                      "repaired")


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A two-step smoke SFT: enough for GRPO to start from (a run whose updates all fail needs no
    useful model)."""
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.train.sft import train_sft
    cfg = load_config(preset="smoke", overrides=["run.threads=1", "sft.steps=2", "sft.checkpoint_every=2"])
    init = prepare_run(tmp_path_factory.mktemp("tiny") / "sft", cfg)
    tasks = build_tasks(cfg)
    train_sft(cfg, init, ensure_tokenizer(cfg, init, tasks), tasks, progress=False)
    return init


@pytest.mark.parametrize("rule,sets,incidents", [
    ("the last 2 updates were all skipped", ["resilience.rollback_after=0", "resilience.guard_window=2"], {"skip"}),
    ("1 rollback(s) in a row", ["resilience.rollback_after=1", "resilience.max_rollbacks=1"], {"skip", "rollback"}),
])
def test_tandem_rl_gives_up_when_every_update_fails(tmp_path, tiny_sft, rule, sets, incidents):
    """A NaN loss at every GRPO step (a persistent fault on the trainer): `tandem rl` gives up with
    one error line and exit 3 under either bound (only skipping, or rolling back), not "done"."""
    steps = 6
    faults = ",".join(f"trainer/nan@{k}" for k in range(steps + 1))
    overrides = RL[:-3] + [f"rl.steps={steps}", "rl.max_new_tokens=8", "rl.updates_per_batch=1",
                           f'resilience.faults="{faults}"', *sets]
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "rl", "--init", str(tiny_sft), "--out", str(tmp_path / "rl"),
         "--preset", "smoke", *sum((["--set", o] for o in overrides), [])],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"not making progress: {rule}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "done" not in result.stdout
    assert {kind for kind, _ in _incidents(tmp_path / "rl")} == incidents
