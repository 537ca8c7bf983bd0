"""The run folder: one run, one folder (`runs/NAME/`).

    config.json      the resolved config; a rerun with a different config is refused
    tokenizer/       tokenizer.json + tokenizer_config.json
    checkpoints/     PHASE/step_NNNNNN/ (see train/checkpoint.py)
    metrics.jsonl    one JSON record per logged step, {"phase": ..., "step": ..., ...}
    summary.json     accuracies, timings, parameter count, throughput, the compute ledger
    report.md        human-readable report with plots/ (see report.py)

A rerun into the same folder with the same config resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tandem.config import Config, config_diff
from tandem.errors import ConfigError


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
    if config_path.is_file():
        previous = with_new_defaults(json.loads(config_path.read_text()))
        diffs = config_diff(previous, resolved)
        if len(diffs) == 1 and diffs[0].startswith("sft.steps:") and resolved["sft"]["steps"] > previous["sft"]["steps"]:
            raise ConfigError(f"run folder {run_dir} holds a different config ({diffs[0]}); to train longer, use "
                              f"--init {run_dir} --out NEW (a new run from its last checkpoint)")
        if diffs:
            raise ConfigError(f"run folder {run_dir} holds a different config ({'; '.join(diffs[:3])}); "
                              "use a new --out, or rerun with the same settings to resume")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not a tandem run folder; choose another --out")
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
