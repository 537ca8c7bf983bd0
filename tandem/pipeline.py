"""The whole pipeline on one preset: tokenizer -> SFT -> eval -> GRPO -> eval -> report.

    python -m tandem.cli pipeline --preset tiny --out runs/demo

Each stage is resumable: rerunning the same command in the same folder skips what is done
(tokenizer), resumes what was interrupted (SFT, GRPO: from their newest valid checkpoints) and redoes the
cheap tail (eval, report). Under --supervise the eval and export stages beat their own heartbeats while
they work (heartbeat-eval.json, heartbeat-export.json), so the watchdog covers them as it covers the
training steps.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path

from tandem import accel
from tandem.config import Config, config_diff
from tandem.errors import ConfigError
from tandem.evaluate import evaluate_task
from tandem.infer.engine import Engine
from tandem.ledger import Ledger
from tandem.loading import init_run, load_model, load_weights
from tandem.peak import run_peaks, utilisation
from tandem.progress import keep_alive, log
from tandem.report import write_report
from tandem.resilience.incidents import Heartbeat
from tandem.runs import prepare_run, read_summary, update_summary
from tandem.tasks import Task, get_task
from tandem.tokenizer import ChatTokenizer, train_tokenizer
from tandem.train.checkpoint import latest_valid
from tandem.train.parallel import join_sft_ranks
from tandem.train.sft import check_fits, train_sft


def build_tasks(cfg: Config) -> list[Task]:
    return [get_task(name, seed=cfg.run.seed, **cfg.data.task_params.get(name, {})) for name in cfg.data.tasks]


def run_tokenizer(cfg: Config, run_dir: Path, tasks: list[Task], init: ChatTokenizer | None = None) -> ChatTokenizer:
    """The run's tokenizer if it has one, else the init model's (sft.init) as is, else the BPE
    trained on the task corpus (not yet saved)."""
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return ChatTokenizer.load(folder)
    if init is not None:
        return init
    per_task = max(1, cfg.tokenizer.corpus_size // len(tasks))
    texts = [text for task in tasks for text in task.corpus(per_task)]
    return train_tokenizer(texts, cfg.tokenizer.vocab_size)


def save_tokenizer(tokenizer: ChatTokenizer, run_dir: Path) -> None:
    """Write the tokenizer once per run (to a temp folder, then renamed)."""
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return
    tmp = run_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    tmp.rename(folder)
    log(f"tokenizer: {tokenizer.vocab_size} tokens -> {folder}")


def ensure_tokenizer(cfg: Config, run_dir: Path, tasks: list[Task]) -> ChatTokenizer:
    """The run's tokenizer, trained and saved on first use."""
    tokenizer = run_tokenizer(cfg, run_dir, tasks)
    save_tokenizer(tokenizer, run_dir)
    return tokenizer


def check_runnable(cfg: Config) -> list[Task]:
    """Fail fast, before anything is written: devices, dtypes and tasks must all resolve."""
    accel.choose_dtype(cfg.sft.dtype, accel.resolve_device(cfg.device_for("sft")))
    accel.resolve_dtype(cfg.eval.dtype, accel.resolve_device(cfg.device_for("eval")))
    if cfg.rl.steps:
        from tandem.train.rollout import check_devices
        check_devices(cfg)  # the GRPO trainer and rollout roles
    return build_tasks(cfg)


def load_sft_init(cfg: Config) -> tuple[dict, ChatTokenizer, dict] | None:
    """(weights, tokenizer, info) of the model SFT starts from with sft.init (`tandem sft --init`),
    checked against the config before anything is written; None when SFT starts from scratch."""
    if not cfg.sft.init:
        return None
    _, checkpoint = init_run(cfg.sft.init)
    config, weights, tokenizer, info = load_weights(checkpoint)
    diffs = config_diff(config.to_dict(), dataclasses.replace(cfg.model, vocab_size=config.vocab_size).to_dict())
    if diffs:
        raise ConfigError(f"--init {cfg.sft.init} holds a model of another shape than the config "
                          f"(init -> config: {'; '.join(diffs[:3])}); use the init run's --preset and model settings")
    return weights, tokenizer, info


def run_sft_stage(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    tasks = check_runnable(cfg)
    init = load_sft_init(cfg)
    tokenizer = run_tokenizer(cfg, Path(out), tasks, init[1] if init else None)
    check_fits(cfg.sft.max_seq_len, tokenizer, tasks)  # before anything is written
    ranks = join_sft_ranks(cfg, Path(out))               # None in one process; checks its rules first
    run_dir = Path(out)
    if ranks is None or ranks.leader:                    # rank 0 alone writes the run folder
        run_dir = prepare_run(out, cfg)
        save_tokenizer(tokenizer, run_dir)
    if ranks is not None:
        ranks.barrier()
        tokenizer = run_tokenizer(cfg, run_dir, tasks, init[1] if init else None)   # the one rank 0 saved
    stats = train_sft(cfg, run_dir, tokenizer, tasks, progress=progress, init_weights=init[0] if init else None,
                      ranks=ranks)
    if ranks is not None:
        ranks.leave()
        if not ranks.leader:
            return run_dir
    if stats["resumed_from"] >= stats["steps"] and "sft" in read_summary(run_dir):
        return run_dir  # a rerun of a finished stage trained nothing: keep the figures of the run that did
    if init:
        stats["init"] = {"path": init[2]["path"], "step": init[2]["step"], "phase": init[2]["phase"]}
    peaks = run_peaks(run_dir, stats["device"], ["fp32", stats["dtype"]],
                      dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size),
                      tokens=cfg.sft.batch_size * cfg.sft.max_seq_len)
    stats["mfu"] = utilisation(stats["flops"], stats["seconds"], peaks)
    ledger = Ledger.from_dict(read_summary(run_dir).get("ledger"))
    ledger.add("sft", stats["device_kind"], stats["seconds"], stats["tokens"], stats["flops"],
               peak_flops=peaks[stats["dtype"]])
    update_summary(run_dir, parameters=stats["parameters"], sft=stats, ledger=ledger.to_dict())
    return run_dir


def run_eval_stage(cfg: Config, run_dir: Path, stage: str = "sft", progress: bool = True) -> dict:
    """Evaluate the model a stage produced (its newest checkpoint under checkpoints/STAGE, else the
    run's newest model) on every task; record under summary["evals"][stage]."""
    e = cfg.eval
    device = cfg.device_for("eval")
    model_path = latest_valid(Path(run_dir) / "checkpoints" / stage) or run_dir
    results, samples = {}, {}
    started = time.perf_counter()
    with Heartbeat(run_dir, role="eval").working():  # --supervise: a hang in eval is a hang too
        loaded = load_model(model_path, device=device, dtype=e.dtype)
        engine = Engine(loaded.model, max_batch=e.batch_size)
        keep_alive()
        for task in build_tasks(cfg):
            result = evaluate_task(engine, loaded.tokenizer, task, n=e.n, batch_size=e.batch_size,
                                   max_new_tokens=e.max_new_tokens, pass_k=e.pass_k, temperature=e.temperature,
                                   seed=cfg.run.seed, keep_samples=e.samples_in_report, progress=progress,
                                   split=e.split)
            samples[task.name] = result.pop("samples")
            results[task.name] = result
            log(f"eval [{stage}] {task.name}: accuracy {result['accuracy']:.1%}, "
                f"format {result['format_rate']:.1%} (n={result['n']})")
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
        from tandem.publish import run_export_stage
        run_export_stage(cfg, run_dir, progress)
    update_summary(run_dir, wall_seconds=time.perf_counter() - started)
    report = write_report(run_dir)
    log(f"report: {report}")
    return run_dir
