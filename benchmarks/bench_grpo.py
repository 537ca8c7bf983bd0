"""GRPO targets on the `tiny` preset: what RL buys, what disaggregation buys, what bf16 rollouts cost.

    python benchmarks/bench_grpo.py demo   [--seeds 0,1,2] [--rl-seeds 1,2] [--write]   the demo, SFT + GRPO, per seed
    python benchmarks/bench_grpo.py bf16   [--seeds 0,1] [--write]   the demo with bf16 trainers vs fp32, per seed
    python benchmarks/bench_grpo.py modes  [--init RUN] [--write]    async disaggregated vs sync colocated
    python benchmarks/bench_grpo.py ab --baseline REF [--steps 30] [--write]   the preset's RL, this tree vs REF
    python benchmarks/bench_grpo.py parity [--init RUN] [--seeds 0,1] [--reuse] [--write]   async bf16 vs sync fp32

demo: runs `tandem pipeline --preset tiny` (what `make demo` runs) once per seed (runs/bench/demo for
seed 0) and reports test-split greedy accuracy per task before RL (evals["sft"]) and after
(evals["rl"]), same eval set and decoding, the mean and spread over seeds of the hardest task's
gain, and the wall time. --rl-seeds adds GRPO runs (seeds as listed) from the first demo's SFT
checkpoint, each scored like the demo: the spread of RL alone, for a fraction of a whole demo's
time (its SFT accuracy is the first demo's). Targets: the hardest task (lowest SFT accuracy) gains
>= 10 points on average; the whole demo takes <= 15 minutes on 2 cores.

bf16: per seed, the demo as above (its folder reused when the demo part made it) and again with
both trainers in bf16 (sft.dtype = rl.dtype = bf16: autocast over fp32 master weights), into
runs/bench/demo-bf16[-sSEED]; test-split accuracy after SFT and after GRPO side by side, and each
trainer's throughput. Target: within 1 point of fp32 after GRPO (two seeds). Meaningful where the
CPU has bf16 units (accel.fast_bf16), else bf16 is only emulated and slow.

ab: the preset's RL (async, the worker pinned to bf16 so both sides run the same job) for --steps
steps on this tree and on a git worktree of --baseline REF, interleaved in fresh processes
(benchmarks/ab.py); steady samples/s of each and the ratio. Target: >= 1.5x the commit before the
performance work (issue 15).

modes and parity start from the newest SFT checkpoint of --init (default runs/bench/demo; trained with the
tiny preset's SFT first if missing) and run the tiny preset's RL section with one change each:
* modes: `rl.steps` steps (default 30) three times, with and without the preset's group filter:
  async disaggregated (trainer and one worker, in the preset's rollout dtype, in separate processes, one torch thread each),
  sync colocated with two threads (one process whose roles take turns, each using both threads),
  and sync colocated with one thread. Samples/s over the steady steps (the first two, which include
  the worker's start, are left out). Headline: async against colocated on the same two cores
  (equal hardware). The one-thread row says what a second device buys: colocated on one device
  against async on two (double the hardware, so not a like-for-like speed-up).
* parity: the full RL schedule twice: async with a bf16 worker and sync with an fp32 worker (on a CPU without
  bf16 units the bf16 run is ~10x slower: measure this where the rollout device has them);
  then both are evaluated like the demo. Target: final accuracies within 3 points.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, rel, table, write_section  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.peak import describe_mfu  # noqa: E402
from tandem.runs import read_metrics, read_summary, remove_run  # noqa: E402
from tandem.train.checkpoint import latest_valid  # noqa: E402

BENCH = ROOT / "runs" / "bench"


def tandem(*args) -> None:
    """Run the real `tandem` command; stop the benchmark if it fails."""
    result = subprocess.run([sys.executable, "-m", "tandem.cli", *map(str, args)], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"tandem {' '.join(map(str, args))} failed with status {result.returncode}")


def ensure_sft(init: Path) -> Path:
    """The newest SFT checkpoint of the run `init` (trained first if the run does not exist). Not
    the run itself: after the demo, a run's newest checkpoint is its RL one, and RL must start
    from the weights its "SFT accuracy" was measured on."""
    if not init.exists():
        print(f"no SFT run at {init}: training the tiny preset's SFT there first", flush=True)
        tandem("sft", "--preset", "tiny", "--out", init, "--quiet")
    checkpoint = latest_valid(init / "checkpoints" / "sft")
    if checkpoint is None:
        sys.exit(f"{init} has no committed SFT checkpoint; pass --init a run trained by `tandem sft`")
    return checkpoint


def rl_run(init: Path, name: str, overrides: list[str], reuse: bool = False) -> tuple[Path, dict]:
    """A fresh GRPO run from `init` with the tiny preset plus `overrides`. With `reuse`, a finished run
    of the same config already in the folder is kept (tandem resumes it: nothing left to do; a run of
    another config is refused), which is exact because a run is a function of its config."""
    from tandem.train.grpo import run_rl_stage
    out = BENCH / name
    if not reuse:
        remove_run(out)
    cfg = load_config(preset="tiny", overrides=overrides)
    started = time.perf_counter()
    run_rl_stage(cfg, init, out, progress=False)
    wall = time.perf_counter() - started
    return out, dict(read_summary(out)["rl"], wall=wall, cfg=cfg)


def steady_rate(run_dir: Path, skip: int = 2) -> float:
    records = read_metrics(run_dir, "rl")[skip:]
    return sum(r["samples_per_s"] * r["step_seconds"] for r in records) / sum(r["step_seconds"] for r in records)


def demo_folder(seed: int, dtype: str = "") -> Path:
    """runs/bench/demo[-DTYPE][-sSEED]: seed 0 in the preset's dtypes is runs/bench/demo."""
    return BENCH / ("demo" + (f"-{dtype}" if dtype else "") + (f"-s{seed}" if seed else ""))


def demo_run(seed: int, dtype: str = "", reuse: bool = False) -> tuple[Path, float | None]:
    """`tandem pipeline --preset tiny` with run.seed = seed (and both trainers in `dtype`, if
    given) into its fresh folder; (folder, minutes). With `reuse`, a finished run is kept (None)."""
    out = demo_folder(seed, dtype)
    if reuse and out.exists() and "rl" in read_summary(out).get("evals", {}):
        return out, None
    remove_run(out)
    started = time.perf_counter()
    dtypes = ["--set", f"sft.dtype={dtype}", "--set", f"rl.dtype={dtype}"] if dtype else []
    tandem("pipeline", "--preset", "tiny", "--out", out, "--quiet", "--set", f"run.seed={seed}", *dtypes)
    return out, (time.perf_counter() - started) / 60


def part_bf16(args) -> str:
    """Per seed, the demo with both trainers in fp32 (the preset; the demo part's runs, reused if
    there) and in bf16 (autocast over fp32 master weights and AdamW state): test-split accuracy
    after SFT and after GRPO, and each trainer's throughput."""
    from tandem import accel
    rows, diffs = [], []
    for seed in [int(seed) for seed in args.seeds.split(",")]:
        runs = {dtype: read_summary(demo_run(seed, dtype, reuse=dtype == "")[0]) for dtype in ("", "bf16")}
        fp32, bf16 = runs[""], runs["bf16"]
        for task in fp32["evals"]["rl"]:
            after = {d: r["evals"]["rl"][task]["accuracy"] for d, r in (("fp32", fp32), ("bf16", bf16))}
            diffs.append((after["bf16"] - after["fp32"]) * 100)
            rows.append([seed, task, f"{fp32['evals']['sft'][task]['accuracy']:.1%}",
                         f"{bf16['evals']['sft'][task]['accuracy']:.1%}", f"{after['fp32']:.1%}",
                         f"{after['bf16']:.1%}", f"{diffs[-1]:+.1f}"])
        rows.append([seed, "SFT tokens/s, GRPO samples/s", f"{fp32['sft']['tokens_per_s']:,.0f}",
                     f"{bf16['sft']['tokens_per_s']:,.0f} ({bf16['sft']['tokens_per_s'] / fp32['sft']['tokens_per_s']:.2f}x)",
                     f"{fp32['rl']['samples_per_s']:,.0f}",
                     f"{bf16['rl']['samples_per_s']:,.0f} ({bf16['rl']['samples_per_s'] / fp32['rl']['samples_per_s']:.2f}x)", ""])
    worst = max(abs(d) for d in diffs)
    return (table(["seed", "task", "after SFT, fp32", "after SFT, bf16", "after GRPO, fp32", "after GRPO, bf16",
                   "bf16 - fp32 (points)"], rows)
            + f"\n\nTest-split greedy pass@1 of the whole demo per seed, both trainers (SFT and the GRPO policy "
              f"update) in fp32 or in bf16; the rollout worker as the preset has it either way. Largest difference "
              f"after GRPO: **{worst:.1f} points**, mean {sum(diffs) / len(diffs):+.1f} (target: within 1 point; the "
              f"binomial noise of one 1000-prompt accuracy is about +-1.5 points). bf16 units on this CPU: "
              f"{accel.fast_bf16('cpu')}. {environment(1)}.")


def part_demo(args) -> str:
    """One demo per seed in --seeds (seed 0 into runs/bench/demo, the --init of modes and parity);
    accuracies on the test split, which tuning the preset never looked at (tasks/base.py)."""
    from tandem.pipeline import run_eval_stage
    rows, gains, rl_gains, minutes = [], [], [], []
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rl_seeds = [int(seed) for seed in args.rl_seeds.split(",") if seed]
    for seed in seeds:
        out, wall = demo_run(seed)
        minutes.append(wall)
        summary = read_summary(out)
        before, after = summary["evals"]["sft"], summary["evals"]["rl"]
        hardest = min(before, key=lambda task: before[task]["accuracy"])
        rows += [[seed, f"**{task}**" if task == hardest else task, before[task]["n"], f"{before[task]['accuracy']:.1%}",
                  f"{after[task]['accuracy']:.1%}", f"{(after[task]['accuracy'] - before[task]['accuracy']) * 100:+.1f}",
                  f"{after[task]['format_rate']:.1%}"] for task in before]
        gains.append((after[hardest]["accuracy"] - before[hardest]["accuracy"]) * 100)
    first = demo_folder(seeds[0])
    sft_evals = read_summary(first)["evals"]["sft"]
    for seed in rl_seeds:      # GRPO alone, from the first demo's SFT checkpoint
        out, rl = rl_run(ensure_sft(first), f"demo-rl-s{seed}", [f"run.seed={seed}"])
        after = run_eval_stage(rl["cfg"], out, "rl", progress=False)
        rows.append([f"{seeds[0]} + RL seed {seed}", f"**{hardest}**", after[hardest]["n"],
                     f"{sft_evals[hardest]['accuracy']:.1%}", f"{after[hardest]['accuracy']:.1%}",
                     f"{(after[hardest]['accuracy'] - sft_evals[hardest]['accuracy']) * 100:+.1f}",
                     f"{after[hardest]['format_rate']:.1%}"])
        rl_gains.append((after[hardest]["accuracy"] - sft_evals[hardest]["accuracy"]) * 100)
    mean = sum(gains) / len(gains)
    spread = (f"standard deviation {statistics.stdev(gains):.1f}, range {min(gains):+.1f} to {max(gains):+.1f}"
              if len(gains) > 1 else "one seed: no spread (run with --seeds 0,1,2)")
    if rl_gains:
        every = gains[:1] + rl_gains
        spread += (f"; GRPO alone from seed {seeds[0]}'s SFT, RL seeds {seeds[0]},{args.rl_seeds}: mean "
                   f"**{sum(every) / len(every):+.1f} points**, range {min(every):+.1f} to {max(every):+.1f}")
    rl = summary["rl"]
    body = table(["seed", "task", "n", "SFT accuracy", "after GRPO", "points", "format after"], rows)
    body += (f"\n\nTest-split greedy pass@1, same eval set and decoding before and after. GRPO: {rl['steps']} steps, "
             f"{rl['mode']} mode, rollouts {rl['rollout']['dtype']} on {rl['rollout']['workers']} worker process(es). "
             f"MFU (last seed, against the matmul peaks measured in the run, tandem/peak.py): SFT "
             f"{describe_mfu(summary['sft'].get('mfu'))}, GRPO policy update {describe_mfu(rl.get('mfu'))}. "
             f"Hardest task's gain over seeds {args.seeds}: mean **{mean:+.1f} points** ({spread}). Whole demo "
             f"(tokenizer, SFT, evals, GRPO, export + gate, report): **{statistics.median(minutes):.1f} min** (median). "
             f"Targets: hardest task >= +10 points (mean over seeds); demo <= 15 min. The preset's RL settings were "
             f"picked from runs scored on a held-out split that included today's test prompts (before the "
             f"validation/test split existed); `eval.split = validation` is for tuning from now on. {environment(1)} "
             f"(SFT and eval on one thread; the RL trainer and its worker on one thread each; 2 cores).")
    return body


def measure_rl(init: str, steps: int) -> dict:
    """Steady samples/s of `run_rl_stage` (the tiny preset's RL: async, one worker) for `steps` steps
    from `init`, with the worker dtype pinned so both trees of an A/B run the same job (the A/B
    side, benchmarks/ab.py: stable APIs only)."""
    import tempfile
    from tandem.train.grpo import run_rl_stage
    cfg = load_config(preset="tiny", overrides=[f"rl.steps={steps}", "rl.checkpoint_every=1000", "rollout.dtype=bf16"])
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "rl"
        run_rl_stage(cfg, init, out, progress=False)
        return {"GRPO samples/s": steady_rate(out)}


def part_modes(args) -> str:
    init = ensure_sft(Path(args.init))
    steps = [f"rl.steps={args.steps}", "rl.checkpoint_every=1000"]
    modes = {"async": ["rl.mode=async", "rollout.workers=1", "rl.threads=1", "rollout.threads=1"],
             "colocated, 2 threads": ["rl.mode=sync", "rollout.workers=0", "rl.threads=2"],
             "colocated, 1 thread": ["rl.mode=sync", "rollout.workers=0", "rl.threads=1"]}
    configs = {"tiny preset (uniform groups filtered)": [], "tiny preset, rl.filter_groups = false": ["rl.filter_groups=false"]}
    rows = []
    for c, (config, extra) in enumerate(configs.items()):
        rates, waits, mfu = {}, {}, {}
        for m, (mode, overrides) in enumerate(modes.items()):
            out, rl = rl_run(init, f"modes-{c}{m}", steps + extra + overrides)
            rates[mode], waits[mode] = steady_rate(out), rl["wait_seconds"] / rl["seconds"]
            worker_dtype = rl["rollout"]["dtype"]
            mfu[mode] = describe_mfu(rl.get("mfu"))
        two, one = rates["colocated, 2 threads"], rates["colocated, 1 thread"]
        rows.append([config, f"{rates['async']:.0f}", f"{waits['async']:.0%}", f"{two:.0f}",
                     f"**{rates['async'] / two:.2f}x**", f"{one:.0f}", f"{rates['async'] / one:.2f}x",
                     mfu["async"], mfu["colocated, 2 threads"]])
    body = table(["RL config", "async: 2 processes x 1 thread", "trainer waiting", "colocated: 1 process x 2 threads",
                  "**async / colocated, equal hardware**", "colocated, 1 thread (one device)",
                  "async (two devices) / one device", "update MFU, async", "update MFU, colocated 2 threads"], rows)
    r = load_config(preset="tiny").rl
    return (body + f"\n\nSamples/s over steps 3..{args.steps} of {args.steps}-step runs from {rel(init)}, {r.prompts_per_step} "
            f"prompts x {r.group_size} samples per step, {worker_dtype} rollouts (the preset's rollout.dtype = auto on this CPU). Headline (bold): the same two cores either "
            f"split between a trainer and a rollout worker process that overlap (async), or given both to one "
            f"process whose roles take turns (colocated, two threads). Async's gain over taking turns is at most "
            f"(generation + update) / max(generation, update), minus what one role loses by having one thread "
            f"instead of two. The last "
            f"column is what a second device buys: colocated on one device (one thread) against async on two. It "
            f"doubles the hardware, so it is an upper bound on disaggregation's value, not a like-for-like "
            f"speed-up. With uniform groups filtered the worker is the slower role (the trainer waits), without "
            f"filtering the trainer is. {environment(2)}.")


def part_ab(args) -> str:
    """The preset's RL on this tree vs git REF (--baseline), interleaved in fresh processes (ab.py)."""
    from benchmarks.ab import compare, report
    init = ensure_sft(Path(args.init))
    result = compare("bench_grpo.py:measure_rl", {"init": str(init), "steps": args.steps}, args.baseline or "HEAD~1",
                     args.ab_rounds)
    ratio = next(iter(result.values()))["ratio"]
    return (f"The tiny preset's RL (async, one worker in bf16 on both sides, {args.steps} steps from {rel(init)}; "
            f"samples/s over the steady steps) on this tree vs `{args.baseline or 'HEAD~1'}`:\n\n"
            + report(result, args.baseline or "HEAD~1", args.ab_rounds)
            + f"\n\nTarget (issue 15): >= 1.5x the commit before the performance work "
              f"({'met' if ratio >= 1.5 else 'MISSED'}). {environment(1)} per role.")


def part_parity(args) -> str:
    from tandem.pipeline import run_eval_stage
    init = ensure_sft(Path(args.init))
    baseline = read_summary(Path(args.init)).get("evals", {}).get("sft")
    runs = {"async, bf16 worker": ["rl.mode=async", "rollout.dtype=bf16"],
            "sync, fp32 worker": ["rl.mode=sync", "rollout.dtype=fp32"]}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows, accuracy = [], {label: [] for label in runs}
    for label, overrides in runs.items():
        for seed in seeds:
            name = f"parity-{overrides[1].split('=')[1]}" + (f"-s{seed}" if seed else "")
            out, rl = rl_run(init, name, overrides + [f"run.seed={seed}"], reuse=args.reuse)
            result = run_eval_stage(rl["cfg"], out, "rl", progress=False)
            task = rl["cfg"].rl.tasks[0]
            accuracy[label].append(result[task]["accuracy"])
            last = read_metrics(out, "rl")[-10:]
            rows.append([label, seed, f"{accuracy[label][-1]:.1%}", f"{sum(r['mismatch'] for r in last) / len(last):.4f}",
                         f"{sum(r['mismatch_kl'] for r in last) / len(last):.2e}"])
    a, b = (sum(values) / len(values) for values in accuracy.values())
    base = f"SFT start: {baseline[task]['accuracy']:.1%}. " if baseline and task in baseline else ""
    noise = 1.9 / len(seeds) ** 0.5
    return (table(["run", "seed", f"held-out {task} accuracy", "mismatch |dlogp| (last 10)", "mismatch KL"], rows)
            + f"\n\n{base}Mean over seeds {args.seeds}: {a:.1%} vs {b:.1%}, difference **{abs(a - b) * 100:.1f} points** "
              f"(target <= 3). Each run scored on {result[task]['n']} held-out prompts; the binomial noise of that "
              f"difference alone is about +-{noise:.1f} points. `run.seed` sets the rollouts' sampling seeds; every run "
              f"starts from the same SFT checkpoint. {environment(1)} per role.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("demo", "bf16", "modes", "parity", "ab"))
    parser.add_argument("--init", default=str(BENCH / "demo"), help="SFT run to start RL from (modes, parity)")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per mode (modes)")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds: one demo each (demo), one run per "
                        "mode each (parity)")
    parser.add_argument("--rl-seeds", default="", help="demo: extra GRPO seeds run from the first demo's SFT checkpoint")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs of the same config instead of retraining them (parity)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    from benchmarks.ab import add_baseline_argument
    add_baseline_argument(parser)       # ab: the preset's RL on this tree vs git REF
    args = parser.parse_args()
    body = {"demo": part_demo, "bf16": part_bf16, "modes": part_modes, "parity": part_parity,
            "ab": part_ab}[args.part](args)
    print(body)
    if args.write:
        titles = {"demo": "GRPO on the tiny demo: accuracy before/after RL, wall time",
                  "bf16": "The tiny demo trained in bf16 vs fp32: accuracy and throughput",
                  "ab": "GRPO throughput against an earlier commit",
                  "modes": "GRPO: async disaggregated vs sync colocated throughput",
                  "parity": "GRPO: async bf16 rollouts vs sync fp32 rollouts, final accuracy"}
        write_section(f"bench_grpo_{args.part}", titles[args.part], body)


if __name__ == "__main__":
    main()
