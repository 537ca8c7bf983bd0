"""`tandem chaos` end to end: real subprocesses, real SIGKILLs and a real hang, next to a twin."""

import json

from conftest import coin_flip_task, run_tandem
from tandem.resilience.chaos import match_detections
from tandem.cli import main


def test_chaos_reports_every_fault_detected_and_identical_weights(tmp_path):
    result = run_tandem("chaos", "--preset", "smoke", "--out", tmp_path / "c", "--json",
                        "--faults", "kill@3,bitflip:weight@4,kill:ckpt@5,hang@7,device_error@9,ckpt_truncate@11",
                        "--set", "sft.steps=14", "--set", "sft.checkpoint_every=3", "--set", "run.threads=1",
                        "--set", "resilience.heartbeat_timeout=2", "--set", "resilience.replicas=2",
                        "--set", "resilience.check_every=1", timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["faults_injected"] == report["faults_detected"] == 6 and report["undetected"] == []
    assert report["restarts"] == 5 and report["identical"] and report["skipped_updates"] == 0
    # the hang alone keeps the job out of its steps for the 2 s timeout; each job's wall time includes its
    # own start-up, which a loaded machine varies by seconds between the two, so the job is judged by itself
    assert report["chaos_wall_s"] - report["useful_s"] > 2.0 and 0 < report["goodput"] < 1
    for name in ("twin.log", "chaos.log", "chaos/faults.jsonl", "chaos/incidents.jsonl", "chaos/supervisor.json"):
        assert (tmp_path / "c" / name).is_file()


def test_detections_are_matched_at_their_own_step_first():
    faults = [{"fault": "a", "kind": "bitflip", "role": "trainer", "step": 2, "attempt": 1, "time": 1.0},
              {"fault": "b", "kind": "nan", "role": "trainer", "step": 5, "attempt": 1, "time": 2.0}]
    incidents = [{"kind": "skip", "step": 5, "attempt": 1, "time": 2.1}]
    detected, undetected = match_detections(faults, incidents)
    assert [f["fault"] for f in detected] == ["b"] and [f["fault"] for f in undetected] == ["a"]


def test_a_detection_needs_a_causal_link_not_just_a_later_incident_of_its_kind():
    flip = {"fault": "f", "kind": "swap", "role": "trainer", "step": 4, "attempt": 1, "time": 1.0}
    kill = {"fault": "k", "kind": "kill", "role": "trainer", "step": 6, "attempt": 1, "time": 2.0}
    damaged = {"fault": "d", "kind": "ckpt_truncate", "role": "trainer", "step": 9, "attempt": 2, "time": 3.0,
               "damaged": "run/checkpoints/sft/step_8/model.safetensors"}
    unrelated = [{"kind": "corruption", "step": 9, "since": 6, "attempt": 1, "time": 1.5},   # window after the flip
                 {"kind": "crash", "step": 6, "attempt": 2, "time": 2.5},                    # another process
                 {"kind": "checkpoint_rejected", "step": 4, "attempt": 3, "time": 3.5}]      # another checkpoint
    detected, undetected = match_detections([flip, kill, damaged], unrelated)
    assert detected == [] and len(undetected) == 3
    causal = [{"kind": "corruption", "step": 6, "since": 3, "attempt": 1, "time": 1.5},
              {"kind": "crash", "step": 6, "attempt": 1, "time": 2.5},
              {"kind": "checkpoint_rejected", "step": 8, "attempt": 3, "time": 3.5}]
    detected, undetected = match_detections([flip, kill, damaged], causal)
    assert [(f["fault"], f["detected_by"], f["latency_steps"]) for f in detected] == [
        ("f", "corruption", 2), ("k", "crash", None), ("d", "checkpoint_rejected", None)] and undetected == []
    second = dict(flip, fault="g", step=5, time=1.2)   # in the same vote's window: that vote caught both
    detected, undetected = match_detections([flip, second], causal)
    assert [(f["fault"], f["latency_steps"]) for f in detected] == [("f", 2), ("g", 1)] and undetected == []


def test_chaos_mistakes_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args in (["--out", str(tmp_path / "a")],                                      # no faults at all
                 ["--out", str(tmp_path / "b"), "--faults", "explode@3"],             # unknown fault
                 ["--out", str(tmp_path / "full"), "--faults", "kill@3"]):           # not a new folder
        assert main(["chaos", "--preset", "smoke", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_grpo_survives_trainer_and_rollout_worker_kills(tmp_path):
    """Sync-mode GRPO: the trainer killed mid-step and mid-checkpoint-write, a rollout worker killed;
    the final weights equal the uninterrupted run's, and they did move (on the
    coin-flip task group rewards differ on any machine; on addition a smoke model's 4 steps had
    only uniform groups in a few percent of runs, so the weights did not move)."""
    from tandem.config import load_config
    from tandem.model import weights_fingerprint
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.runs import prepare_run
    from tandem.train.checkpoint import latest_valid, load_checkpoint
    from tandem.train.sft import train_sft
    task = coin_flip_task(tmp_path)
    cfg = load_config(preset="smoke", overrides=[task, "sft.steps=60", "sft.lr=0.01", "sft.checkpoint_every=60",
                                                 "run.threads=1"])
    init = prepare_run(tmp_path / "sft", cfg)
    train_sft(cfg, init, ensure_tokenizer(cfg, init, build_tasks(cfg)), build_tasks(cfg), progress=False)
    # The worker kill lands at the start of step 2: holding that step's work, or (on a busy machine)
    # already done with it, and then the trainer learns of the death when step 3's work reaches the
    # dead worker. So the trainer's checkpoint kill comes a step later (4), not right after it (3),
    # where a restart would replace the pool before anyone needed the dead worker.
    settings = [task, "rl.mode=sync", "rl.steps=5", "rl.checkpoint_every=1", "rl.prompts_per_step=2",
                "rl.group_size=4", "run.threads=1", "rollout.threads=1", "rollout.timeout=30"]
    result = run_tandem("chaos", "--init", init, "--preset", "smoke", "--out", tmp_path / "c", "--json",
                        "--faults", "kill@1,rollout/kill@2,kill:ckpt@4", *sum((["--set", s] for s in settings), []),
                        timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["job"] == "rl" and report["faults_injected"] == report["faults_detected"] == 3
    assert report["restarts"] == 2 and report["identical"]
    start = weights_fingerprint(load_checkpoint(latest_valid(init / "checkpoints" / "sft"))["model"])
    assert report["twin_fingerprint"] != start
