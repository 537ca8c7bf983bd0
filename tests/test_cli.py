"""The real `tandem` command in subprocesses: the smoke pipeline end to end, and bad input."""

import json
import re

import pytest

from conftest import run_tandem


def test_pipeline_writes_a_complete_run(smoke_run):
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.md", "plots/sft_loss.png",
                 "tokenizer/tokenizer.json"):
        assert (smoke_run / name).is_file(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    result = summary["evals"]["sft"]["addition"]
    assert result["n"] == 16 and result["split"] == "test" and (result["accuracy"] * 16).is_integer()
    assert summary["parameters"] > 0 and summary["sft"]["tokens_per_s"] > 0
    assert {row["phase"] for row in summary["ledger"]} >= {"sft", "eval"}
    assert "![SFT loss](plots/sft_loss.png)" in (smoke_run / "report.md").read_text()


def test_eval_json_rescores_the_pipelines_eval_exactly(smoke_run):
    """`tandem eval` on the SFT checkpoint, with the smoke preset's eval settings, gives exactly the
    figures the pipeline recorded for it (the same model, examples and greedy decoding, run twice)."""
    sft = smoke_run / "checkpoints" / "sft" / "step_000020"
    result = run_tandem("eval", "--model", sft, "--task", "addition", "--n", "16", "--batch-size", "16",
                        "--max-new-tokens", "48", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    recorded = json.loads((smoke_run / "summary.json").read_text())["evals"]["sft"]["addition"]
    assert data["task"] == "addition" and data["n"] == 16 and data["split"] == "test"
    assert {k: data[k] for k in ("accuracy", "format_rate", "avg_tokens")} == \
        {k: recorded[k] for k in ("accuracy", "format_rate", "avg_tokens")}
    other = json.loads(run_tandem("eval", "--model", sft, "--task", "addition", "--n", "16", "--batch-size", "16",
                                  "--max-new-tokens", "48", "--split", "validation", "--json").stdout)
    assert other["split"] == "validation" and other["n"] == 16


def test_inspect_json_matches_checkpoint(smoke_run):
    from tandem.loading import load_model
    result = run_tandem("inspect", smoke_run, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["phase"], data["step"]) == ("rl", 3)  # a run's newest model: RL's last checkpoint
    assert len(data["fingerprint"]) == 64 and data["fingerprint"] == load_model(smoke_run).info["fingerprint"]
    sft = run_tandem("inspect", smoke_run / "checkpoints" / "sft" / "step_000020", "--json")
    assert json.loads(sft.stdout)["step"] == 20


def test_generate_and_chat(smoke_run):
    result = run_tandem("generate", "--model", smoke_run, "--prompt", "What is 12 + 7?", "--json",
                        "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tokens"] >= 1 and data["finish_reason"] in ("stop", "length")
    import subprocess
    import sys
    from conftest import ROOT
    chat = subprocess.run([sys.executable, "-m", "tandem.cli", "chat", "--model", str(smoke_run),
                           "--max-new-tokens", "30"], input="What is 1 + 2?\n\n", capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert chat.returncode == 0 and "tandem>" in chat.stdout


def test_doctor():
    result = run_tandem("doctor", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert "cpu" in data["devices"] and "fp32" in data["devices"]["cpu"]["dtypes"]
    assert data["devices"]["cpu"]["dist_backend"] == "gloo"


@pytest.mark.parametrize("args,needle", [
    (["sft", "--preset", "nope", "--out", "{tmp}/a"], "known presets"),
    (["sft", "--preset", "smoke", "--set", "sft.stpes=1", "--out", "{tmp}/a"], "unknown config key 'sft.stpes'"),
    (["sft", "--preset", "smoke", "--set", "sft.steps=x", "--out", "{tmp}/a"], "'sft.steps' must be int"),
    (["sft", "--preset", "smoke", "--set", 'data.tasks=["chess"]', "--out", "{tmp}/a"], "known tasks"),
    (["sft", "--preset", "smoke", "--set", "run.device=cuda:7", "--out", "{tmp}/a"], "available here"),
    (["sft", "--preset", "smoke", "--set", 'data.tasks=["{tmp}/missing.jsonl"]', "--out", "{tmp}/a"],
     "not found"),
    (["sft", "--preset", "smoke", "--set", "sft.lr=inf", "--out", "{tmp}/a"], "'sft.lr' = inf"),
    (["sft", "--preset", "smoke", "--set", "sft.max_seq_len=10", "--out", "{tmp}/a"],
     "sft.max_seq_len = 10 cannot hold one training example"),
    (["eval", "--model", "{tmp}/nothing"], "model path not found"),
    (["eval", "--model", "{tmp}"], "not a tandem run"),
    (["inspect", "{tmp}"], "not a tandem run"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    result = run_tandem(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": 5}\n')
    result = run_tandem("sft", "--preset", "smoke", "--set", f'data.tasks=["{data}"]', "--out", tmp_path / "r")
    assert result.returncode == 2 and f"{data}:2" in result.stderr


def test_run_folder_with_a_different_config_is_refused(smoke_run, tmp_path):
    before = (smoke_run / "config.json").read_text()
    result = run_tandem("sft", "--preset", "smoke", "--set", "sft.steps=21", "--out", smoke_run)
    assert result.returncode == 2 and "different config" in result.stderr and "sft.steps" in result.stderr
    assert (smoke_run / "config.json").read_text() == before


def test_rerun_of_a_finished_run_resumes_and_changes_nothing(smoke_run):
    from tandem.loading import load_model
    before = load_model(smoke_run).info["fingerprint"]
    summary = (smoke_run / "summary.json").read_text()
    result = run_tandem("sft", "--preset", "smoke", "--out", smoke_run, "--quiet")
    assert result.returncode == 0, result.stderr
    assert load_model(smoke_run).info["fingerprint"] == before
    assert (smoke_run / "summary.json").read_text() == summary  # the figures of the run that trained stay


def test_generate_fits_its_reply_into_the_context(smoke_run):
    # the default reply length (256) is more than the smoke model's whole context (160): it is cut to fit
    assert run_tandem("generate", "--model", smoke_run, "--prompt", "What is 12 + 7?").returncode == 0
    too_long = run_tandem("generate", "--model", smoke_run, "--prompt", "What is 12 + 7?", "--max-new-tokens", "500")
    assert too_long.returncode == 2 and too_long.stderr.count("\n") == 1, too_long.stderr
    most = int(re.search(r"lower --max-new-tokens to at most (\d+)$", too_long.stderr.strip()).group(1))
    fits = run_tandem("generate", "--model", smoke_run, "--prompt", "What is 12 + 7?", "--max-new-tokens", most,
                      "--json")
    assert fits.returncode == 0, fits.stderr
    over = run_tandem("generate", "--model", smoke_run, "--prompt", "What is 12 + 7?", "--max-new-tokens", most + 1)
    assert over.returncode == 2 and f"at most {most}" in over.stderr


def test_eval_says_why_it_scores_fewer_than_asked(smoke_run, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(20)))
    common = ("eval", "--model", smoke_run, "--task", rows, "--n", "200", "--max-new-tokens", "4", "--json")
    held_out = run_tandem(*common)
    assert held_out.returncode == 0, held_out.stderr
    assert json.loads(held_out.stdout)["n"] == 2 and json.loads(held_out.stdout)["split"] == "test"
    assert "scored its held-out split, the last 2 of 20 rows" in held_out.stderr and "--split all" in held_out.stderr
    everything = run_tandem(*common, "--split", "all")
    assert everything.returncode == 0, everything.stderr
    assert json.loads(everything.stdout)["n"] == 20 and "has 20 rows, so n=20, not 200" in everything.stderr
    generated = run_tandem("eval", "--model", smoke_run, "--task", "addition", "--split", "all")
    assert generated.returncode == 2 and "--split all scores every row of a .jsonl file" in generated.stderr


def test_eval_of_an_export_uses_the_tasks_it_remembers(smoke_run, tmp_path):
    from tandem.cli.models import _eval_tasks
    from tandem.publish import export_model
    moved = tmp_path / "elsewhere"                   # an export copied away from its run
    export_model(smoke_run, moved, progress=False)
    assert not (moved / "checkpoints").exists()
    [task] = _eval_tasks(str(moved), None)
    trained = json.loads((smoke_run / "config.json").read_text())["data"]
    assert task.name == trained["tasks"][0] == "addition"
    assert task.params["max_digits"] == trained["task_params"]["addition"]["max_digits"] == 2   # not the default 3
