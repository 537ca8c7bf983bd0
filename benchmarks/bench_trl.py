"""Side by side with TRL's GRPOTrainer, equal work: same model, task, G, batch, steps, samples trained
on and learning-rate schedule; samples/s, trained tokens/s and reward.

    python benchmarks/bench_trl.py [--init runs/bench/demo] [--steps 20] [--threads 2] [--write]

Both start from the same weights: tandem trains the newest SFT checkpoint of --init, TRL its HF export
(tandem.export: the same tensors, loaded by transformers.AutoModelForCausalLM). Same prompts in the
same order (the tiny preset's RL task, its train stream), G = 8 samples for each of 8 prompts per
step, <= 48 new tokens, temperature 1, DAPO token-level loss, group-std advantages, no KL, one
optimizer step per batch, AdamW with the same betas and a constant learning rate (rl.lr, no
warmup, no decay: TRL's lr_scheduler_type="constant", tandem's rl.min_lr_ratio = 1), fp32 on the
cpu with --threads torch threads. Equal work: tandem trains on every sample, as TRL does
(rl.filter_groups = false: the preset's filter drops groups whose rewards are all equal, which
cuts the update's work by a varying factor). TRL generates with transformers' generate() (vLLM
needs a GPU); tandem runs both roles in one process (the headline pairing: same process and
thread count, sync mode) and, as an extra row, async with a separate rollout worker process (one
thread each). A last row runs the tiny preset's own RL settings (uniform groups filtered, learning
rate decaying to 0): what a user of the preset gets, not the same work as TRL's.

Reported: samples/s (generated samples / step time) and trained tokens/s (completion tokens the
loss is computed on, eos included / step time) over the steps after the first two (warm-up), each
as a ratio to TRL, and the mean reward over the first and last 5 steps (same reward function: the
task's correctness + format). Target: tandem colocated >= 2x TRL's samples/s at equal work, reward
no worse. `make bench` installs trl (the `bench` extra); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_grpo import BENCH, ensure_sft  # noqa: E402
from benchmarks.common import environment, rel, table, write_section  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.peak import describe_mfu  # noqa: E402
from tandem.runs import read_metrics, read_summary, remove_run  # noqa: E402

PROMPTS, G, MAX_NEW = 8, 8, 48


def run_trl(hf_dir: Path, task, examples, steps: int, lr: float, beta2: float, workdir: Path) -> dict:
    """TRL's GRPOTrainer: seconds, mean reward and trained (completion) tokens per step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, index, **_):
        return [task.reward(c[0]["content"], examples[i]).reward for c, i in zip(completions, index)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], 0.0

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "index": i}
                              for i, e in enumerate(examples)])
    args = GRPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, temperature=1.0, learning_rate=lr, lr_scheduler_type="constant",
                      warmup_steps=0, adam_beta2=beta2, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                      scale_rewards="group", num_iterations=1, max_steps=steps, logging_steps=1, save_strategy="no",
                      report_to="none", use_cpu=True, shuffle_dataset=False, seed=0, disable_tqdm=True)
    clock = Clock()
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(hf_dir), callbacks=[clock])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"seconds": clock.seconds, "rewards": [entry["reward"] for entry in logged],
            "tokens": [entry["completions/mean_length"] * PROMPTS * G for entry in logged]}


def tandem_run(init: Path, overrides: list[str], name: str) -> dict:
    """One tandem GRPO run: the same per-step series as run_trl's, from its metrics."""
    from tandem.train.grpo import run_rl_stage
    out = BENCH / f"trl-{name}"
    remove_run(out)
    run_rl_stage(load_config(preset="tiny", overrides=overrides), init, out, progress=False)
    records = read_metrics(out, "rl")
    return {"seconds": [r["step_seconds"] for r in records], "rewards": [r["reward"] for r in records],
            "tokens": [r["trained_tokens"] for r in records], "mfu": describe_mfu(read_summary(out)["rl"].get("mfu"))}


def steady(series: dict) -> tuple[float, float]:
    """(samples/s, trained tokens/s) over the steps after the first two."""
    seconds = sum(series["seconds"][2:])
    return PROMPTS * G * len(series["seconds"][2:]) / seconds, sum(series["tokens"][2:]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", default=str(BENCH / "demo"), help="tandem run to start from (SFT'd)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        print("skipped: trl is not installed here (pip install -e '.[bench]'); nothing to compare against")
        return
    from tandem.publish import export_model
    from tandem.train.grpo import rl_tasks
    torch.set_num_threads(args.threads)
    init = ensure_sft(Path(args.init))
    base = [f"rl.steps={args.steps}", f"rl.prompts_per_step={PROMPTS}", f"rl.group_size={G}",
            f"rl.max_new_tokens={MAX_NEW}", "rl.loss_norm=dapo", "rl.scale_rewards=group", "rl.kl_coef=0",
            "rl.updates_per_batch=1", "rl.checkpoint_every=1000", "rollout.dtype=fp32", "rl.warmup_steps=0"]
    equal = base + ["rl.filter_groups=false", "rl.min_lr_ratio=1"]   # TRL's work: every sample, constant lr
    cfg = load_config(preset="tiny", overrides=equal)
    if len(rl_tasks(cfg)) != 1:
        sys.exit("bench_trl compares on one task; set the tiny preset's rl.tasks to one task")
    task = rl_tasks(cfg)[0]
    examples = [task.example(i) for i in range(args.steps * PROMPTS)]   # tandem's prompt stream, in order
    sync = ["rl.mode=sync", "rollout.workers=0", f"rl.threads={args.threads}"]
    runs = {f"tandem, colocated sync ({args.threads} threads, one process)": ("sync", equal + sync),
            "tandem, async + 1 rollout worker process (1 thread each)":
                ("async", equal + ["rl.mode=async", "rollout.workers=1", "rl.threads=1", "rollout.threads=1"]),
            f"tandem, colocated sync, the tiny preset's RL settings (uniform groups filtered, lr decaying to "
            f"{load_config(preset='tiny').rl.min_lr_ratio:g} x): NOT equal work": ("preset", base + sync)}
    trl_label = "TRL GRPOTrainer (transformers generate)"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        export_model(init, hf_dir, fmt="hf", progress=False)
        series = {trl_label: run_trl(hf_dir, task, examples, args.steps, cfg.rl.lr, cfg.rl.beta2, Path(tmp))}
        for label, (name, overrides) in runs.items():
            series[label] = tandem_run(init, overrides, name)
    reference = steady(series[trl_label])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = []
    for label, runs_series in series.items():
        samples, tokens = steady(runs_series)
        rows.append([label, f"{samples:.0f}", f"**{samples / reference[0]:.2f}x**", f"{tokens:.0f}",
                     f"**{tokens / reference[1]:.2f}x**", f"{mean(runs_series['rewards'][:5]):.3f}",
                     f"{mean(runs_series['rewards'][-5:]):.3f}", runs_series.get("mfu", "not measured")])
    body = table(["implementation", "samples/s", "vs TRL", "trained tokens/s", "vs TRL", "reward, first 5 steps",
                  "reward, last 5 steps", "policy update MFU"], rows)
    body += (f"\n\nSame start ({rel(init)}, exported to HF for TRL), task `{task.name}`, {PROMPTS} prompts x G={G}, "
             f"<= {MAX_NEW} new tokens, {args.steps} steps, constant lr {cfg.rl.lr:g} on both sides, every sample "
             f"trained on (rl.filter_groups = false), fp32, trl {trl.__version__}; rates over steps 3..{args.steps}. "
             f"Trained tokens: completion tokens the loss covers (eos included); TRL's from its "
             f"completions/mean_length. The last row is the preset as shipped: it trains only on groups whose "
             f"rewards differ, so its samples/s counts samples it generated but did not train on. "
             f"Target: >= 2x TRL at equal work. {environment(args.threads)}.")
    print(body)
    if args.write:
        write_section("bench_trl", "GRPO vs TRL's GRPOTrainer (equal work: same model, task, G, batch, lr)", body)

if __name__ == "__main__":
    main()
