"""The supervisor on real subprocesses: real SIGKILLs (mid-step and mid-checkpoint-write), a device
error, a damaged checkpoint and a hang, all survived with bitwise-identical final weights."""

import json
import time

import pytest

from conftest import run_tandem
from tandem.cli import main
from tandem.config import load_config
from tandem.model import weights_fingerprint
from tandem.pipeline import build_tasks, ensure_tokenizer
from tandem.runs import prepare_run
from tandem.resilience.supervisor import Policy, backoff_delay, supervise
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.resilience.incidents import read_jsonl
from tandem.train.sft import train_sft

SETTINGS = ["sft.steps=14", "sft.checkpoint_every=3", "run.threads=1", "resilience.heartbeat_timeout=2"]


def _sft(out, *extra, faults=""):
    args = ["sft", "--preset", "smoke", "--quiet", "--out", out]
    for override in SETTINGS + ([f"resilience.faults={json.dumps(faults)}"] if faults else []):
        args += ["--set", override]
    return run_tandem(*args, *extra, timeout=120)


def _fingerprint(run_dir):
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / "sft"))["model"])


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The fault-free run (in-process, to save an interpreter start; same weights as the CLI's)."""
    out = tmp_path_factory.mktemp("twin") / "run"
    cfg = load_config(preset="smoke", overrides=SETTINGS)
    tasks = build_tasks(cfg)
    run_dir = prepare_run(out, cfg)
    train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False)
    return _fingerprint(out)


def test_crashes_and_a_damaged_checkpoint_are_survived_exactly(tmp_path, twin):
    result = _sft(tmp_path / "run", "--supervise", "--max-restarts", "5",
                  faults="kill@2,kill:ckpt@5,device_error@8,ckpt_bitflip@11,kill@12")
    assert result.returncode == 0, result.stderr
    supervision = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    assert [a["outcome"] for a in supervision["attempts"]] == ["crashed"] * 5 + ["done"]
    assert [a["detail"] for a in supervision["attempts"]][2] == "exit status 1"   # the DeviceFault traceback
    incidents = [i["kind"] for i in read_jsonl(tmp_path / "run" / "incidents.jsonl")]
    assert incidents.count("crash") == 5 and "device_fault" in incidents and "checkpoint_rejected" in incidents
    assert "supervisor: done after 5 restart(s)" in result.stderr
    assert _fingerprint(tmp_path / "run") == twin


def test_a_hang_is_killed_within_the_heartbeat_timeout(tmp_path, twin):
    result = _sft(tmp_path / "run", "--supervise", faults="hang@4")
    assert result.returncode == 0, result.stderr
    hang = read_jsonl(tmp_path / "run" / "faults.jsonl")[0]
    detected = [i for i in read_jsonl(tmp_path / "run" / "incidents.jsonl") if i["kind"] == "hang"]
    assert len(detected) == 1 and detected[0]["time"] - hang["time"] <= 2.0 + 0.1  # + scheduling slack
    assert _fingerprint(tmp_path / "run") == twin


def test_gives_up_after_max_restarts_with_a_report(tmp_path):
    result = _sft(tmp_path / "run", "--supervise", "--max-restarts", "1", faults="kill@2,kill@3")
    assert result.returncode == 1
    assert "gave up after 1 restart(s)" in result.stderr and "#2  crashed  killed by SIGKILL" in result.stderr
    assert "rerun the same command to resume" in result.stderr


def test_backoff_without_progress_and_no_retry_of_user_errors(tmp_path):
    assert [backoff_delay(n, 1.0, 5.0) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 5.0]
    (tmp_path / "config.json").write_text(json.dumps(load_config().to_dict()))  # a run folder: recorded into
    started = time.time()
    supervision = supervise(lambda: 1, tmp_path, Policy(max_restarts=2, backoff=0.1, backoff_max=1.0), poll=0.01)
    assert [a.waited for a in supervision.attempts] == [0.0, 0.1, 0.2] and supervision.gave_up
    assert time.time() - started >= 0.3 and supervision.exit_code == 1
    assert json.loads((tmp_path / "supervisor.json").read_text())["restarts"] == 2
    user_error = supervise(lambda: 2, tmp_path, Policy(max_restarts=5), poll=0.01)
    assert [a.outcome for a in user_error.attempts] == ["user_error"] and user_error.exit_code == 2


def test_flag_mistakes_are_one_line_errors(tmp_path, capsys):
    for args in (["--max-restarts", "2"], ["--supervise", "--max-restarts", "-1"]):
        assert main(["sft", "--preset", "smoke", "--out", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
