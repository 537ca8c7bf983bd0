"""The run folder: one run, one folder (`runs/NAME/`).

    config.json      the resolved config; a rerun with a different config is refused
    tokenizer/       tokenizer.json + tokenizer_config.json
    checkpoints/     PHASE/step_NNNNNN/ (see train/checkpoint.py)
    metrics.jsonl    one JSON record per logged step, {"phase": ..., "step": ..., ...}
    summary.json     accuracies, timings, parameter count, throughput, the compute ledger
    report.md        human-readable report with plots/ (see report.py)

A rerun into the same folder with the same config resumes where it stopped; only the fields in
RESUMABLE_FIELDS (log cadence, supervisor timeouts, ...) may differ, since none of them can change
the weights. A folder whose config.json is not a tandem config is not a run folder: never written
into, never deleted (remove_run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tandem.config import SECTIONS, Config, config_diff
from tandem.errors import ConfigError, ModelError, writing

# Config fields a rerun may change and still resume: none can change the weights the run produces,
# so the resumed run ends bitwise where a straight run with either value would.
RESUMABLE_FIELDS = frozenset({
    "sft.log_every",                 # how often a metrics line is written and the progress shown
    "rl.log_every",                  # the same for GRPO
    "eval.samples_in_report",        # how many eval completions the report shows (the eval is the same)
    "resilience.heartbeat_timeout",  # when the supervisor declares a job hung; a restart resumes
    "resilience.startup_timeout",    #   exactly from a checkpoint, like any crash
    "resilience.backoff",            # how long the supervisor waits before a restart
    "resilience.backoff_max",
    "rollout.port",                  # the TCP port of the job's local store
})
# Deliberately NOT resumable, though a fault-free run's weights do not depend on them:
# checkpoint_every and keep_checkpoints decide which checkpoints exist, and a guard rollback goes
# back to the newest one before the trouble, so under faults they do change the weights; GRPO's
# async mode is also only shown to resume exactly at the checkpoints it wrote itself.


def file_in_the_way(path: Path) -> Path | None:
    """`path` or the nearest of its parents that exists, if that one is a file (not a folder)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def read_run_config(run_dir: Path) -> dict | None:
    """runs/NAME/config.json if it is a tandem config (its keys are config sections), else None."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "model" in data and set(data) <= {"preset", *SECTIONS}:
        return data
    return None


def remove_run(run_dir: str | Path) -> None:
    """Delete a run folder tandem made (benchmarks start fresh runs); refuse any other folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if read_run_config(run_dir) is None:
        raise ModelError(f"{run_dir} is not a tandem run folder; refusing to delete it (move it away)")
    shutil.rmtree(run_dir)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def with_new_defaults(previous: dict) -> dict:
    """A run's config.json with the fields added to tandem since it was written, at their defaults
    (a run made before a field existed ran as if it had its default)."""
    defaults = Config().to_dict()
    return {key: {**defaults[key], **value} if isinstance(value, dict) and isinstance(defaults.get(key), dict)
            else value for key, value in previous.items()}


def prepare_run(out: str | Path, cfg: Config) -> Path:
    """Create runs/NAME (or check that it holds this same config) and write config.json."""
    run_dir = Path(out)
    config_path = run_dir / "config.json"
    resolved = cfg.to_dict()
    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        raise ConfigError(f"{blocker} is a file; --out must be a folder (a new one, or a run to resume)")
    if config_path.is_file():
        previous = read_run_config(run_dir)
        if previous is None:
            raise ConfigError(f"{run_dir} is not a tandem run folder (its config.json is not one); "
                              "choose another --out")
        previous = with_new_defaults(previous)
        diffs = config_diff(previous, resolved, ignore=RESUMABLE_FIELDS)
        if len(diffs) == 1 and diffs[0].startswith("sft.steps:") and resolved["sft"]["steps"] > previous["sft"]["steps"]:
            raise ConfigError(f"run folder {run_dir} holds a different config ({diffs[0]}); to train longer, use "
                              f"--init {run_dir} --out NEW (a new run from its last checkpoint)")
        if diffs:
            raise ConfigError(f"run folder {run_dir} holds a different config ({'; '.join(diffs[:3])}); "
                              "use a new --out, or rerun with the same settings to resume")
        if config_diff(previous, resolved):  # only resumable fields changed: record the new values
            with writing(run_dir):
                write_json_atomic(config_path, resolved)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not a tandem run folder; choose another --out")
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_path, resolved)
    return run_dir


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, phase: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if phase is None or record.get("phase") == phase:
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, phase: str, after_step: int) -> None:
    """On resume, drop records the interrupted run logged past the checkpoint it resumes from."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if not (r.get("phase") == phase and r.get("step", 0) > after_step)]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_summary(run_dir: Path, **fields) -> dict:
    summary = read_summary(run_dir)
    summary.update(fields)
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary
