"""Fault injection, the NaN/spike guard, silent-corruption detection and async checkpoints, in-process.

Faults that end the process (kill, hang, device errors, damaged checkpoints) are tested on real
subprocesses in test_supervisor.py and test_chaos.py.
"""

import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tandem.config import load_config
from tandem.errors import ConfigError, TrainingFailed
from tandem.model import weights_fingerprint
from tandem.pipeline import build_tasks, ensure_tokenizer
from tandem.runs import prepare_run
from tandem.train.checkpoint import (AsyncCheckpointer, latest_valid, list_checkpoints, load_checkpoint,
                                     save_checkpoint, verify_checkpoint)
from tandem.resilience.faults import FaultInjector, mtbf_schedule, parse_schedule, schedule_text
from tandem.resilience.guard import StepGuard
from tandem.resilience.incidents import INCIDENTS_FILE, read_jsonl
from tandem.resilience.replicas import fingerprint, flip_bit
from tandem.train.sft import train_sft

BASE = ["sft.steps=12", "sft.checkpoint_every=4", "sft.log_every=1", "run.threads=1"]


def _train(run_dir, overrides, stop_after=None):
    cfg = load_config(preset="smoke", overrides=BASE + overrides)
    run_dir = prepare_run(run_dir, cfg)
    tasks = build_tasks(cfg)
    stats = train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False,
                      stop_after=stop_after)
    final = load_checkpoint(latest_valid(run_dir / "checkpoints" / "sft"))
    return weights_fingerprint(final["model"]), final["train_state"], stats


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The fault-free run every faulty run is compared with."""
    return _train(tmp_path_factory.mktemp("clean") / "run", [])[0]


def test_schedule_syntax_and_mtbf():
    faults = parse_schedule("nan@60, kill@37,rollout/hang@50,bitflip:weight@80,kill:ckpt@90")
    assert [f.key for f in faults] == ["trainer/kill@37", "rollout/hang@50", "trainer/nan:loss@60",
                                       "trainer/bitflip:weight@80", "trainer/kill:ckpt@90"]
    assert schedule_text(faults) == "kill@37,rollout/hang@50,nan@60,bitflip:weight@80,kill:ckpt@90"
    for bad in ("kill", "kill@x", "melt@3", "nan:weight@3", "Bad/kill@3"):
        with pytest.raises(ConfigError) as err:
            parse_schedule(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="resilience.faults"):
        load_config(preset="smoke", overrides=['resilience.faults="hang@soon"'])
    drawn = mtbf_schedule(20, seed=3, steps=20_000, kinds=["kill", "bitflip:grad"])
    assert drawn == mtbf_schedule(20, seed=3, steps=20_000, kinds=["kill", "bitflip:grad"])
    assert 800 < len(drawn) < 1200 and {f.kind for f in drawn} == {"kill", "bitflip"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
    tensor = torch.randn(3, 5).to(dtype)
    before, reference = fingerprint([tensor]), tensor.clone()
    for bit in range(8 * tensor.element_size()):
        flip_bit(tensor, 7, bit)
        changed = (tensor.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
                   != reference.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert changed.sum() == 1 and changed[7] and fingerprint([tensor]) != before
        flip_bit(tensor, 7, bit)
        assert fingerprint([tensor]) == before


def test_the_fingerprint_catches_what_a_sum_of_the_bits_missed():
    """Two opposite flips of one bit position, and a swap of two elements: the integer sum of the
    bits (the fingerprint before BLAKE2b) is unchanged by both, the fingerprint is not."""
    def bit_sum(t):
        return int(t.view(torch.int32).sum(dtype=torch.int64))

    tensor = torch.tensor([1.0, 3.0, -2.5, 0.75])
    before = fingerprint([tensor])
    bits = tensor.view(torch.int32)
    bit = next(b for b in range(32) if (int(bits[0]) ^ int(bits[1])) >> b & 1)   # differs in elements 0, 1
    opposite = tensor.clone()
    flip_bit(opposite, 0, bit)
    flip_bit(opposite, 1, bit)
    swapped = tensor[[2, 1, 0, 3]].contiguous()
    for changed in (opposite, swapped):
        assert not torch.equal(changed, tensor) and bit_sum(changed) == bit_sum(tensor)
        assert fingerprint([changed]) != before


def test_guard_skips_nonfinite_and_spikes_then_rolls_back():
    guard = StepGuard(window=10, zscore=6.0, min_history=4, rollback_after=3)
    norms = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert all(guard.check(s, 2.0, n).action == "update" for s, n in enumerate(norms))
    assert guard.check(5, float("nan"), 1.0).action == "skip"
    assert guard.check(6, 2.0, float("inf")).action == "skip"
    assert guard.check(7, 2.0, 1.3).action == "update"           # an ordinary wobble
    state = json.loads(json.dumps(guard.state_dict()))            # survives train_state.json
    verdict = guard.check(8, 2.0, 1e4)                            # a spike, the third skip in the window
    assert verdict.action == "rollback" and "std above" in verdict.reason
    assert guard.trouble_start(8) == 5
    guard.load_state_dict(state)
    guard.rolled_back(8)
    assert guard.check(8, 2.0, 1e4).action == "skip"              # recurring while replaying: not transient


def test_guard_gives_up_after_max_rollbacks_without_progress():
    guard = StepGuard(min_history=4, rollback_after=1, max_rollbacks=2)
    assert guard.check(0, 2.0, 1.0).action == "update"
    for step in (1, 2):                                           # each rollback comes back to the same wall
        assert guard.check(step, float("nan"), 1.0).action == "rollback"
        guard.reset()                                             # restoring the checkpoint of step 0
        guard.rolled_back(step)
        assert guard.check(0, 2.0, 1.0).action == "update"        # a replayed update is not progress
    with pytest.raises(TrainingFailed, match="not making progress: 2 rollback") as err:
        guard.check(3, float("nan"), 1.0)
    assert "\n" not in str(err.value)
    guard = StepGuard(min_history=4, rollback_after=1, max_rollbacks=1)
    assert guard.check(1, float("nan"), 1.0).action == "rollback"
    guard.rolled_back(1)
    assert guard.check(2, 2.0, 1.0).action == "update"            # past the rollback: progress
    assert guard.check(3, float("nan"), 1.0).action == "rollback" # so this is the first in a row again


def test_guard_that_only_skips_gives_up_after_a_window_of_skips():
    guard = StepGuard(window=3, rollback_after=0)
    assert [guard.check(s, float("nan"), 1.0).action for s in (1, 2)] == ["skip", "skip"]
    assert guard.check(3, 2.0, 1.0).action == "update"                # an applied update ends the streak
    assert [guard.check(s, float("nan"), 1.0).action for s in (4, 5)] == ["skip", "skip"]
    state = guard.state_dict()
    resumed = StepGuard(window=3, rollback_after=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))              # as train_state.json holds it
    for g in (guard, resumed):                                          # so a resume decides alike
        with pytest.raises(TrainingFailed, match="the last 3 updates were all skipped") as err:
            g.check(6, float("nan"), 1.0)
        assert "\n" not in str(err.value)
    patient = StepGuard(window=3, rollback_after=0, max_rollbacks=0)    # 0 = never give up
    assert [patient.check(s, float("inf"), 1.0).action for s in range(10)] == ["skip"] * 10


def _sft_cli(out, *overrides):
    sets = sum((["--set", o] for o in overrides), [])
    return subprocess.run([sys.executable, "-m", "tandem.cli", "sft", "--preset", "smoke", "--out", str(out), *sets],
                          capture_output=True, text=True, timeout=300)


def test_persistent_nan_without_rollbacks_gives_up_with_exit_3(tmp_path):
    """rollback_after = 0: the guard only skips, so without a bound a run whose every update fails
    would say done. It gives up once a window's worth of updates in a row was skipped."""
    faults = ",".join(f"nan@{k}" for k in range(20))
    result = _sft_cli(tmp_path / "run", "resilience.rollback_after=0", "resilience.guard_window=5",
                      "sft.checkpoint_every=2", f'resilience.faults="{faults}"')
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the last 5 updates were all skipped" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "done" not in result.stdout
    skips = [i for i in read_jsonl(tmp_path / "run" / INCIDENTS_FILE) if i["kind"] == "skip"]
    assert len(skips) == 4                                   # the fifth skip is the one that gives up


def test_persistent_nan_gives_up_with_exit_3_and_is_not_retried(tmp_path):
    """Every update fails (a nan fault at every step): the run gives up instead of saying done, the
    supervisor does not restart it, and no checkpoint claims the steps that were never trained."""
    out = tmp_path / "run"
    faults = ",".join(f"nan@{k}" for k in range(20))
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "sft", "--preset", "smoke", "--out", str(out), "--supervise",
         "--set", "sft.log_every=1", "--set", "sft.checkpoint_every=4", "--set", f'resilience.faults="{faults}"'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not making progress: 3 rollback(s)" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "done" not in result.stdout
    supervision = json.loads((out / "supervisor.json").read_text())
    assert [a["outcome"] for a in supervision["attempts"]] == ["failed"]
    steps = [int(p.name[5:]) for p in list_checkpoints(out / "checkpoints" / "sft")]
    assert steps and max(steps) < 20                                # the run never reached its end
    shown = [line.split()[1].split("/") for line in result.stderr.splitlines() if line.startswith("[sft]")]
    assert shown and all(int(n) <= int(total) == 20 for n, total in shown)  # never more steps than the total
    assert any("redone=" in line for line in result.stderr.splitlines())


def test_a_fault_fires_once_per_run_folder(tmp_path):
    loss = torch.tensor(1.5)
    injector = FaultInjector(parse_schedule("nan@3"), tmp_path)
    assert injector.corrupt_loss(2, loss) is loss
    assert math.isnan(float(injector.corrupt_loss(3, loss)))
    assert [r["fault"] for r in read_jsonl(tmp_path / "faults.jsonl")] == ["trainer/nan:loss@3"]
    again = FaultInjector(parse_schedule("nan@3"), tmp_path)  # a restarted process
    assert again.corrupt_loss(3, loss) is loss
    assert FaultInjector(parse_schedule("rollout/nan@3"), tmp_path).corrupt_loss(3, loss) is loss  # not its role


def test_strike_delivers_rollout_faults_to_their_processes(tmp_path):
    workers = {f"rollout{rank}": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
               for rank in (1, 2)}
    injector = FaultInjector(parse_schedule("rollout2/hang@1,rollout/kill@2"), tmp_path)
    pids = {role: proc.pid for role, proc in workers.items()}
    injector.strike(1, pids)
    state = lambda pid: open(f"/proc/{pid}/stat").read().split()[2]  # noqa: E731  (Linux)
    deadline = time.time() + 5
    while state(pids["rollout2"]) != "T" and time.time() < deadline:
        time.sleep(0.01)
    assert state(pids["rollout2"]) == "T" and workers["rollout1"].poll() is None  # frozen, not dead
    injector.strike(2, pids)                                  # "rollout": the lowest-ranked worker
    assert workers["rollout1"].wait(timeout=10) == -signal.SIGKILL
    workers["rollout2"].kill()
    workers["rollout2"].wait()
    assert [r["fault"] for r in read_jsonl(tmp_path / "faults.jsonl")] == ["rollout2/hang@1", "rollout/kill@2"]


def test_two_replicas_detect_and_repair_every_flip(tmp_path, clean):
    faults = "bitflip:grad@2,bitflip:weight@3,nan@5,bitflip:weight@6,nan:grad@7,spike@8,bitflip:grad@9"
    fp, _, stats = _train(tmp_path / "run", ["resilience.replicas=2", "resilience.check_every=1",
                                             f"resilience.faults={json.dumps(faults)}"])
    assert stats["incidents"] == {"corruption": 7}
    assert fp == clean  # every corruption repaired from the healthy replica: the fault-free weights


def test_one_replica_recomputes_and_rolls_back(tmp_path, clean):
    fp, _, stats = _train(tmp_path / "run", ["resilience.check_every=2",
                                             'resilience.faults="bitflip:grad@4,bitflip:weight@6"'])
    # the gradient flip is outvoted by two recomputations; the weight flip (no second replica to
    # restore from) sends the run back to the step-4 checkpoint
    assert stats["incidents"] == {"corruption": 2, "rollback": 1} and fp == clean


def test_two_replicas_repair_adam_moments_multi_bit_pairs_and_swaps(tmp_path, clean):
    faults = "bitflip:adam@3,multiflip:grad@4,bitpair:weight@5,swap:adam@6,swap:grad@7,bitpair:grad@9"
    fp, _, stats = _train(tmp_path / "run", ["resilience.replicas=2", "resilience.check_every=1",
                                             f"resilience.faults={json.dumps(faults)}"])
    assert stats["incidents"] == {"corruption": 6} and fp == clean
    fired = read_jsonl(tmp_path / "run" / "faults.jsonl")
    assert len(fired) == 6 and all(f.get("damaged", "") is not None for f in fired)
    detections = read_jsonl(tmp_path / "run" / "incidents.jsonl")
    assert [(d["step"], d["since"]) for d in detections] == [(3, 2), (4, 4), (5, 4), (6, 5), (7, 7), (9, 9)]


def test_a_late_flip_and_sparse_checks_are_caught_later_with_their_latency(tmp_path, clean):
    """A gradient flipped after the check (right before optimizer.step) and a weight flipped between
    checks every 3 steps: both are found at the next check (no majority: back to the last
    checkpoint), the incident's `since` bounds the latency, and the replay gives the clean weights."""
    fp, _, stats = _train(tmp_path / "run", ["resilience.replicas=2", "resilience.check_every=3",
                                             'resilience.faults="bitflip:late@4,bitflip:weight@7"'])
    detections = [d for d in read_jsonl(tmp_path / "run" / "incidents.jsonl") if d["kind"] == "corruption"]
    assert [(d["step"], d["since"]) for d in detections] == [(6, 3), (9, 6)] and fp == clean


def test_guard_decisions_are_checkpointed_and_resume_exactly(tmp_path):
    overrides = ['resilience.faults="nan@3,spike@9"', "resilience.guard_min_history=3"]
    straight, state, stats = _train(tmp_path / "straight", overrides)
    assert stats["incidents"] == {"skip": 2} and [s for s, _ in state["guard"]["skipped"]] == [3, 9]
    _train(tmp_path / "resumed", overrides, stop_after=6)
    resumed, resumed_state, _ = _train(tmp_path / "resumed", overrides)
    assert resumed == straight and resumed_state["guard"] == state["guard"]


def test_rollback_after_transient_trouble_recovers_the_fault_free_weights(tmp_path, clean):
    fp, state, stats = _train(tmp_path / "run", ['resilience.faults="nan@6,nan@7,inf:grad@8"'])
    assert stats["incidents"] == {"skip": 3, "rollback": 1}
    assert fp == clean and state["guard"]["skipped"] == []  # the replay was clean: nothing skipped in the end


def test_async_checkpoints_match_sync_ones(tmp_path, clean):
    fp, _, stats = _train(tmp_path / "run", ["resilience.async_checkpoint=true"])
    assert fp == clean and stats["checkpoint_seconds"] > 0
    _train(tmp_path / "resumed", ["resilience.async_checkpoint=true"], stop_after=5)
    assert _train(tmp_path / "resumed", ["resilience.async_checkpoint=true"])[0] == clean
    saver = AsyncCheckpointer()
    saver.save(tmp_path / "ckpts", 1, {"w": torch.ones(2)}, {"phase": "sft"}, extra_files={"x": tmp_path / "nope"})
    with pytest.raises(FileNotFoundError):  # the writer's error reaches the training thread
        saver.wait()
    assert list_checkpoints(tmp_path / "ckpts") == []


def test_every_damaged_checkpoint_file_is_rejected(tmp_path):
    folder = save_checkpoint(tmp_path, 3, {"w": torch.randn(64)}, {"phase": "sft"},
                             extra_files={"model_config.json": b'{"hidden_size": 8}'})
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}
    rng = random.Random(0)
    for trial in range(200):
        name = sorted(pristine)[trial % len(pristine)]
        data = bytearray(pristine[name])
        if trial % 2:
            del data[rng.randrange(len(data)):]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (folder / name).write_bytes(bytes(data))
        assert verify_checkpoint(folder) is not None, (name, trial)
        (folder / name).write_bytes(pristine[name])
    assert verify_checkpoint(folder) is None
    manifest = json.loads(pristine["manifest.json"])
    del manifest["manifest_sha256"]  # as written before manifests carried their own checksum
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(folder) is None


def test_a_step_that_keeps_disagreeing_stops_the_rollbacks(tmp_path):
    """A nondeterministic recomputation (what a GPU without deterministic kernels gives) disagrees
    every time: the detector rolls back twice, then raises instead of looping."""
    from tandem.errors import CorruptionError
    from tandem.resilience.incidents import Incidents
    from tandem.resilience.replicas import CorruptionDetector
    model = torch.nn.Linear(3, 2)
    noise = torch.Generator().manual_seed(0)

    def recompute(replica: int) -> None:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=noise)
    recompute(0)
    detector = CorruptionDetector(1, Incidents(tmp_path))
    assert detector.check_grads(5, [model], [0.0], recompute)
    assert detector.check_grads(5, [model], [0.0], recompute)
    with pytest.raises(CorruptionError, match="step 5: .* run.deterministic = true") as info:
        detector.check_grads(5, [model], [0.0], recompute)
    assert "\n" not in str(info.value)
    assert [i["step"] for i in read_jsonl(tmp_path / "incidents.jsonl")] == [5, 5]


def test_nondeterministic_kernels_refuse_the_corruption_votes(tmp_path):
    with pytest.raises(ConfigError, match="run.deterministic = true") as info:
        load_config("tiny", overrides=["run.deterministic=false", "resilience.check_every=1"])
    assert "\n" not in str(info.value)
    assert not load_config("tiny", overrides=["run.deterministic=false"]).run.deterministic
