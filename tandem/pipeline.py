"""The whole pipeline on one preset: tokenizer -> SFT -> eval -> GRPO -> eval -> report.

    python -m tandem.cli pipeline --preset tiny --out runs/demo

Each stage is resumable: rerunning the same command in the same folder skips what is done
(tokenizer), resumes what was interrupted (SFT, GRPO: from their newest valid checkpoints) and redoes the
cheap tail (eval, report).
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

from tandem import accel
from tandem.config import Config
from tandem.evaluate import evaluate_task
from tandem.infer.engine import Engine
from tandem.ledger import Ledger
from tandem.loading import load_model
from tandem.progress import log
from tandem.report import write_report
from tandem.runs import prepare_run, read_summary, update_summary
from tandem.tasks import Task, get_task
from tandem.tokenizer import ChatTokenizer, train_tokenizer
from tandem.train.checkpoint import latest_valid
from tandem.train.sft import train_sft


def build_tasks(cfg: Config) -> list[Task]:
    return [get_task(name, seed=cfg.run.seed, **cfg.data.task_params.get(name, {})) for name in cfg.data.tasks]


def ensure_tokenizer(cfg: Config, run_dir: Path, tasks: list[Task]) -> ChatTokenizer:
    """Train the BPE on the task corpus once per run (written to a temp folder, then renamed)."""
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return ChatTokenizer.load(folder)
    per_task = max(1, cfg.tokenizer.corpus_size // len(tasks))
    texts = [text for task in tasks for text in task.corpus(per_task)]
    tokenizer = train_tokenizer(texts, cfg.tokenizer.vocab_size)
    tmp = run_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    tmp.rename(folder)
    log(f"tokenizer: {tokenizer.vocab_size} tokens -> {folder}")
    return tokenizer


def check_runnable(cfg: Config) -> list[Task]:
    """Fail fast, before anything is written: devices, dtypes and tasks must all resolve."""
    for section in ("sft", "eval"):
        device = accel.resolve_device(cfg.device_for(section))
        accel.resolve_dtype(getattr(cfg, section).dtype, device)
    if cfg.rl.steps:
        from tandem.train.rollout import check_devices
        check_devices(cfg)  # the GRPO trainer and rollout roles
    return build_tasks(cfg)


def run_sft_stage(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    tasks = check_runnable(cfg)
    run_dir = prepare_run(out, cfg)
    tokenizer = ensure_tokenizer(cfg, run_dir, tasks)
    stats = train_sft(cfg, run_dir, tokenizer, tasks, progress=progress)
    ledger = Ledger.from_dict(read_summary(run_dir).get("ledger"))
    ledger.add("sft", stats["device_kind"], stats["seconds"], stats["tokens"], stats["flops"])
    update_summary(run_dir, parameters=stats["parameters"], sft=stats, ledger=ledger.to_dict())
    return run_dir


def run_eval_stage(cfg: Config, run_dir: Path, stage: str = "sft", progress: bool = True) -> dict:
    """Evaluate the model a stage produced (its newest checkpoint under checkpoints/STAGE, else the
    run's newest model) on every task; record under summary["evals"][stage]."""
    e = cfg.eval
    device = cfg.device_for("eval")
    model_path = latest_valid(Path(run_dir) / "checkpoints" / stage) or run_dir
    loaded = load_model(model_path, device=device, dtype=e.dtype)
    engine = Engine(loaded.model, max_batch=e.batch_size)
    results, samples = {}, {}
    started = time.perf_counter()
    for task in build_tasks(cfg):
        result = evaluate_task(engine, loaded.tokenizer, task, n=e.n, batch_size=e.batch_size,
                               max_new_tokens=e.max_new_tokens, pass_k=e.pass_k, temperature=e.temperature,
                               seed=cfg.run.seed, keep_samples=e.samples_in_report, progress=progress)
        samples[task.name] = result.pop("samples")
        results[task.name] = result
        log(f"eval [{stage}] {task.name}: accuracy {result['accuracy']:.1%}, format {result['format_rate']:.1%} "
            f"(n={result['n']})")
    summary = read_summary(run_dir)
    ledger = Ledger.from_dict(summary.get("ledger"))
    ledger.add("eval", accel.device_kind(accel.resolve_device(device)), time.perf_counter() - started)
    evals = dict(summary.get("evals", {}), **{stage: results})
    update_summary(run_dir, evals=evals, samples=samples, ledger=ledger.to_dict())
    return results


def release_devices(cfg: Config) -> None:
    """Between stages sharing a device: return the finished stage's cached memory (its model,
    optimizer, KV cache are unreferenced by now) before the next stage allocates its own."""
    gc.collect()
    for section in ("sft", "eval") + (("rl",) if cfg.rl.steps else ()):
        accel.empty_cache(accel.resolve_device(cfg.device_for(section)))


def run_pipeline(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    started = time.perf_counter()
    run_dir = run_sft_stage(cfg, out, progress)
    release_devices(cfg)
    run_eval_stage(cfg, run_dir, "sft", progress)
    release_devices(cfg)
    if cfg.rl.steps:  # GRPO from the SFT model, then the same eval (tandem/train/grpo.py, [rl])
        from tandem.train.grpo import run_rl_stage
        run_rl_stage(cfg, run_dir, run_dir, progress)
        release_devices(cfg)
        run_eval_stage(cfg, run_dir, "rl", progress)
        release_devices(cfg)
    if cfg.export.formats:  # export + parity gate (tandem/export/__init__.py, [export] in the config)
        from tandem.export import run_export_stage
        run_export_stage(cfg, run_dir, progress)
    update_summary(run_dir, wall_seconds=time.perf_counter() - started)
    report = write_report(run_dir)
    log(f"report: {report}")
    return run_dir
