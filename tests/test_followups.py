"""What a user does after a run, through the real `tandem` command: train it longer (sft --init),
GRPO from it with its own tasks (rl --init), read its compute ledger's utilisation."""

import json
import math
import shutil

import pytest

from conftest import run_tandem

TASK_PARAMS = "data.task_params={ addition = { max_digits = 3 } }"   # not the smoke preset's (2)
BASE = ("--preset", "smoke", "--set", TASK_PARAMS, "--set", "sft.checkpoint_every=3", "--quiet")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 6-step SFT run with task parameters of its own."""
    out = tmp_path_factory.mktemp("followups") / "a"
    result = run_tandem("sft", *BASE, "--set", "sft.steps=6", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_more_steps_on_a_finished_run_are_refused_with_the_way_to_train_longer(base_run):
    before = (base_run / "config.json").read_text()
    result = run_tandem("sft", *BASE, "--set", "sft.steps=8", "--out", base_run)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"to train longer, use --init {base_run} --out NEW" in result.stderr
    assert (base_run / "config.json").read_text() == before


def test_sft_init_trains_longer_from_the_last_checkpoint_and_resumes_exactly(base_run, tmp_path):
    from tandem.config import load_config
    from tandem.loading import load_model
    from tandem.runs import read_metrics, read_summary
    from tandem.train.sft import lr_at
    more = ("sft", "--preset", "smoke", "--init", base_run, "--set", "sft.steps=4", "--set", "sft.checkpoint_every=2",
            "--set", "sft.log_every=1", "--quiet")
    twin = run_tandem(*more, "--out", tmp_path / "twin")                  # uninterrupted
    assert twin.returncode == 0, twin.stderr
    crashed = [*more, "--set", "resilience.faults=kill@3", "--out", tmp_path / "a2"]
    assert run_tandem(*crashed).returncode != 0                            # SIGKILLed after step 3's backward
    rerun = run_tandem(*crashed)                                           # the same command resumes
    assert rerun.returncode == 0 and "resuming SFT" in rerun.stderr, rerun.stderr
    extended, start = load_model(tmp_path / "a2"), load_model(base_run)
    assert extended.info["step"] == 4 and extended.info["fingerprint"] == load_model(tmp_path / "twin").info["fingerprint"]
    assert extended.info["fingerprint"] != start.info["fingerprint"]
    assert read_summary(tmp_path / "a2")["sft"]["init"]["step"] == 6      # from the base run's last checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):             # the tokenizer is the base run's
        assert (tmp_path / "a2" / "tokenizer" / name).read_bytes() == (base_run / "tokenizer" / name).read_bytes()
    s = load_config(preset="smoke").sft                                   # a new schedule over its own 4 steps
    lrs = [r["lr"] for r in read_metrics(tmp_path / "a2", "sft")]
    assert lrs == pytest.approx([lr_at(i, s.lr, s.warmup_steps, 4, s.min_lr_ratio) for i in range(4)])
    other = run_tandem("sft", "--preset", "smoke", "--set", "sft.steps=4", "--out", tmp_path / "a2")   # no --init
    assert other.returncode == 2 and "sft.init" in other.stderr


def _without_config(base_run, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(base_run / "checkpoints", folder / "checkpoints")
    return [folder]


@pytest.mark.parametrize("init, extra, needle", [
    (lambda base, tmp: [tmp / "missing"], [], "is not a tandem run or checkpoint"),
    (lambda base, tmp: [(tmp / "empty").mkdir() or tmp / "empty"], [], "is not a tandem run or checkpoint"),
    (_without_config, [], "no config.json"),
    (lambda base, tmp: [base], ["--set", "model.hidden_size=32"], "another shape"),
])
def test_sft_init_bad_input_is_one_line_and_writes_nothing(base_run, tmp_path, init, extra, needle):
    out = tmp_path / "out"
    result = run_tandem("sft", "--preset", "smoke", "--init", *init(base_run, tmp_path), *extra, "--out", out)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert needle in result.stderr, result.stderr
    assert not out.exists()


def test_rl_init_inherits_the_runs_tasks_unless_set(base_run, tmp_path):
    from tandem.loading import load_model
    rl = ("rl", "--preset", "smoke", "--init", base_run, "--set", "rollout.workers=0", "--quiet")
    result = run_tandem(*rl, "--set", "rl.steps=1", "--out", tmp_path / "rl")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "rl" / "config.json").read_text())["data"]
    assert data == json.loads((base_run / "config.json").read_text())["data"]
    assert data["task_params"] == {"addition": {"max_digits": 3}} and load_model(tmp_path / "rl").info["phase"] == "rl"
    given = run_tandem(*rl, "--set", "rl.steps=0", "--set", "data.task_params={ addition = { max_digits = 1 } }",
                       "--out", tmp_path / "rl-set")
    assert given.returncode == 0, given.stderr
    data = json.loads((tmp_path / "rl-set" / "config.json").read_text())["data"]
    assert data["task_params"] == {"addition": {"max_digits": 1}} and data["tasks"] == ["addition"]


def test_ledger_reports_a_measured_utilisation_on_this_device(base_run):
    from tandem.report import write_report
    from tandem.runs import read_summary
    summary = read_summary(base_run)
    row = next(r for r in summary["ledger"] if r["phase"] == "sft")
    assert row["device_kind"] == summary["sft"]["device"] == "cpu"
    assert row["peak_flops"] > 0 and math.isfinite(row["utilisation"]) and 0 < row["utilisation"] <= 1.5
    (key, peaks), = summary["device_peaks"].items()
    assert key.startswith("cpu|") and peaks["fp32"] == row["peak_flops"]
    report = write_report(base_run).read_text()
    assert f"{row['utilisation']:.1%}" in report and "n/a |" not in report.split("## Compute ledger")[1]


def test_matmul_peak_in_another_dtype():
    from conftest import tiny_model_config
    from tandem.peak import layer_shapes, matmul_peak
    config = tiny_model_config()
    assert set(layer_shapes(config)) == {(32, 32), (32, 16), (32, 64), (64, 32)}   # q/o, kv, up/head, down
    assert matmul_peak("cpu", "bf16", config, tokens=64, budget_s=0.02) > 0
