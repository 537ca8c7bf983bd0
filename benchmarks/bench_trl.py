"""Side by side with TRL's GRPOTrainer: same model, task, G, batch and steps; samples/s and reward.

    python benchmarks/bench_trl.py [--init runs/bench/demo] [--steps 20] [--threads 2] [--write]

Both start from the same weights: tandem trains the newest SFT checkpoint of --init, TRL its HF export
(tandem.export: the same tensors, loaded by transformers.AutoModelForCausalLM). Same prompts in the
same order (the tiny preset's RL task, its train stream), G = 8 samples for each of 8 prompts per
step, <= 48 new tokens, temperature 1, same learning rate and AdamW betas, DAPO token-level loss,
group-std advantages, no KL, one optimizer step per batch, fp32 on the cpu with --threads torch
threads. TRL generates with transformers' generate() (vLLM needs a GPU); tandem runs both roles in
one process (the fair pairing: same process and thread count, sync mode) and, as an extra row,
async with a separate rollout worker process (one thread each).

Reported: samples/s over the steps after the first two (warm-up), the ratio to TRL, and the mean
reward over the first and last 5 steps (same reward function: the task's correctness + format).
Target: tandem colocated >= 2x TRL's samples/s, reward no worse. If trl is not installed the script
says so and exits 0 (pip install trl).
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

from benchmarks.bench_grpo import BENCH, ensure_sft, steady_rate  # noqa: E402
from benchmarks.common import environment, rel, table, write_section  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.peak import describe_mfu  # noqa: E402
from tandem.runs import read_metrics, read_summary, remove_run  # noqa: E402

PROMPTS, G, MAX_NEW = 8, 8, 48


def run_trl(hf_dir: Path, task, examples, steps: int, lr: float, beta2: float, workdir: Path) -> tuple[list, list]:
    """(seconds per step, mean reward per step) of TRL's GRPOTrainer."""
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
                      adam_beta2=beta2, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                      scale_rewards="group", num_iterations=1, max_steps=steps, logging_steps=1, save_strategy="no",
                      report_to="none", use_cpu=True, shuffle_dataset=False, seed=0, disable_tqdm=True)
    clock = Clock()
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[reward], args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(hf_dir), callbacks=[clock])
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return clock.seconds, rewards


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
        print("skipped: trl is not installed here (pip install trl); nothing to compare against")
        return
    from tandem.publish import export_model
    from tandem.train.grpo import rl_tasks, run_rl_stage
    torch.set_num_threads(args.threads)
    init = ensure_sft(Path(args.init))
    base = [f"rl.steps={args.steps}", f"rl.prompts_per_step={PROMPTS}", f"rl.group_size={G}",
            f"rl.max_new_tokens={MAX_NEW}", "rl.loss_norm=dapo", "rl.scale_rewards=group", "rl.kl_coef=0",
            "rl.updates_per_batch=1", "rl.checkpoint_every=1000", "rollout.dtype=fp32", "rl.warmup_steps=0"]
    cfg = load_config(preset="tiny", overrides=base)
    task = rl_tasks(cfg)[0]
    if len(rl_tasks(cfg)) != 1:
        sys.exit("bench_trl compares on one task; set the tiny preset's rl.tasks to one task")
    examples = [task.example(i) for i in range(args.steps * PROMPTS)]   # tandem's prompt stream, in order

    rows, rates, rewards, mfu = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        export_model(init, hf_dir, fmt="hf", progress=False)
        seconds, trl_rewards = run_trl(hf_dir, task, examples, args.steps, cfg.rl.lr, cfg.rl.beta2, Path(tmp))
        steady = seconds[2:]
        rates["TRL GRPOTrainer (transformers generate)"] = PROMPTS * G * len(steady) / sum(steady)
        rewards["TRL GRPOTrainer (transformers generate)"] = trl_rewards
        runs = {f"tandem, colocated sync ({args.threads} threads, one process)":
                ["rl.mode=sync", "rollout.workers=0", f"rl.threads={args.threads}"],
                "tandem, async + 1 rollout worker process (1 thread each)":
                ["rl.mode=async", "rollout.workers=1", "rl.threads=1", "rollout.threads=1"]}
        for label, overrides in runs.items():
            out = BENCH / f"trl-{overrides[0].split('=')[1]}"
            remove_run(out)
            run_rl_stage(load_config(preset="tiny", overrides=base + overrides), init, out, progress=False)
            rates[label] = steady_rate(out)
            mfu[label] = describe_mfu(read_summary(out)["rl"].get("mfu"))
            rewards[label] = [r["reward"] for r in read_metrics(out, "rl")]
    reference = rates["TRL GRPOTrainer (transformers generate)"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for label, rate in rates.items():
        rows.append([label, f"{rate:.0f}", f"**{rate / reference:.2f}x**", f"{mean(rewards[label][:5]):.3f}",
                     f"{mean(rewards[label][-5:]):.3f}", mfu.get(label, "not measured")])
    body = table(["implementation", "samples/s", "vs TRL", "reward, first 5 steps", "reward, last 5 steps",
                  "policy-update MFU"], rows)
    body += (f"\n\nSame start ({rel(init)}, exported to HF for TRL), task `{task.name}`, {PROMPTS} prompts x G={G}, <= {MAX_NEW} new tokens, "
             f"{args.steps} steps, lr {cfg.rl.lr:g}, fp32, trl {trl.__version__}; samples/s over steps 3..{args.steps}; MFU: tandem's "
             f"policy update against the matmul peak measured in its run (TRL's is not measured). "
             f"Target: >= 2x TRL. {environment(args.threads)}.")
    print(body)
    if args.write:
        write_section("bench_trl", "GRPO vs TRL's GRPOTrainer (same model, task, G, batch)", body)


if __name__ == "__main__":
    main()
