"""Chaos benchmark: training on hardware that crashes, hangs and corrupts data.

    python benchmarks/bench_chaos.py --write      the full run: about 10 minutes on an idle 2-core machine
                                                  (the tiny preset's step is ~0.3 s there), more on a busy one
    python benchmarks/bench_chaos.py --quick      scaled down (a few minutes on a busy machine)

Sections, each against its target (every job is the real CLI under `--supervise`, in subprocesses,
with real signals, unless said otherwise):

1. kills: `--trials` runs of the smoke SFT preset (`--steps` steps, a checkpoint every 5), each
   with `--kills` SIGKILLs at random steps, a third of them inside a checkpoint write (files
   written, manifest not yet). Target: final weights bitwise identical to the uninterrupted run in
   every trial.
2. grpo: GRPO in sync mode from a 300-step smoke SFT, with two trainer kills (one mid-write) and
   a rollout worker kill. Target: identical to the uninterrupted GRPO run (whose weights moved).
3. silent corruption (in-process): the smoke preset, `--flips` faults at random steps among
   `--clean-steps` clean ones, each of a random silent kind (one bit, 2-8 bits, two opposite flips
   of one bit position, a swap of two elements) at a random place (a gradient after the backward
   pass, a weight or an Adam moment at rest, a gradient after the check and before
   optimizer.step), under three set-ups: 2 replicas checked every step, 2 replicas checked every
   `--check-every` steps, 1 replica checked every step (a recomputation: it cannot see state at
   rest). Reported: detected (matched causally, chaos.caused_by), NOT detected, detection latency
   in steps, false alarms, final weights against the fault-free run. Targets: with 2 replicas,
   every fault detected and 0 false alarms; and (ours) the fault-free run's weights.
4. checkpoints: `--damages` random truncations and bit flips of a real checkpoint's files (the
   manifest included). Target: every damaged checkpoint rejected.
5. hang: a smoke run that hangs, under the default 30 s heartbeat timeout (`--hang-timeout`).
   Target: killed within the timeout.
6. goodput: the tiny preset (`--tiny-steps` steps; a checkpoint every 4 steps, written async)
   under random crashes (kill, device error) at each MTBF in `--mtbfs`, next to a fault-free twin.
   Goodput = the twin's time in training steps / wall time. Target: >= 90% at an MTBF of 50
   steps. The plot (docs/chaos_goodput.png) shows the measured points and, from 20 to 500 steps,
   the model wall(M) = twin wall + (steps / M) x (measured time lost per fault).
7. async checkpoints (in-process): the tiny preset's step time, and its checkpoint saved
   synchronously and asynchronously. Target: async overhead <= 5% of step time at the default
   interval (sft.checkpoint_every of the tiny preset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, environment, fresh_scratch, median, table, write_section  # noqa: E402
from tandem.resilience.chaos import caused_by, match_detections, run_job  # noqa: E402
from tandem.resilience.faults import SILENT_KINDS, SILENT_TARGETS  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.model import weights_fingerprint  # noqa: E402
from tandem.pipeline import build_tasks, ensure_tokenizer  # noqa: E402
from tandem.runs import prepare_run  # noqa: E402
from tandem.train.checkpoint import (AsyncCheckpointer, latest_valid, load_checkpoint, save_checkpoint,  # noqa: E402
                                     to_host, verify_checkpoint)
from tandem.resilience.incidents import read_jsonl  # noqa: E402
from tandem.train.sft import train_sft  # noqa: E402

PLOT = ROOT / "docs" / "chaos_goodput.png"
QUICK = {"trials": 4, "kills": 5, "steps": 40, "flips": 20, "clean_steps": 200, "check_every": 4, "damages": 200,
         "hang_timeout": 5.0, "tiny_steps": 20, "mtbfs": "5,10", "async_steps": 3, "saves": 3}


def smoke(steps: int) -> list[str]:
    return ["run.threads=1", f"sft.steps={steps}", "sft.checkpoint_every=5", "sft.log_every=5"]


def fingerprint(run_dir: Path, phase: str = "sft") -> str:
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / phase))["model"])


def train_in_process(run_dir: Path, preset: str, overrides: list[str]) -> tuple[dict, str]:
    cfg = load_config(preset=preset, overrides=overrides)
    run_dir = prepare_run(run_dir, cfg)
    tasks = build_tasks(cfg)
    stats = train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False)
    return stats, fingerprint(run_dir)


def kill_schedule(rng: random.Random, kills: int, steps: int, every: int) -> str:
    """`kills` distinct SIGKILLs: a third inside the write of a checkpoint, the rest mid-step."""
    in_write = rng.sample(range(every, steps, every), min(kills // 3, (steps - 1) // every))
    mid_step = rng.sample(range(1, steps), kills - len(in_write))
    return ",".join([f"kill:ckpt@{s}" for s in in_write] + [f"kill@{s}" for s in mid_step])


def section_kills(args, work: Path) -> tuple[str, Path]:
    twin = run_job(["sft", "--preset", "smoke"], work / "kills-twin", smoke(args.steps), 3)
    identical, landed, in_write, restarts = 0, 0, 0, 0
    for trial in range(args.trials):
        schedule = kill_schedule(random.Random(trial), args.kills, args.steps, 5)
        run = run_job(["sft", "--preset", "smoke"], work / f"kills-{trial}",
                      smoke(args.steps) + [f"resilience.faults={json.dumps(schedule)}"], args.kills + 3)
        identical += run.returncode == 0 and run.fingerprint == twin.fingerprint
        landed += len(run.faults)
        in_write += sum(f["target"] == "ckpt" for f in run.faults)
        restarts += run.restarts
        print(f"  kills trial {trial}: {len(run.faults)} kills, {run.restarts} restarts, "
              f"identical={run.fingerprint == twin.fingerprint}", flush=True)
    body = table(["trials", "SIGKILLs", "inside a checkpoint write", "restarts", "final weights identical"],
                 [[args.trials, landed, in_write, restarts, f"**{identical}/{args.trials}**"]])
    return (f"**1. SIGKILLs, smoke SFT** ({args.steps} steps, checkpoint every 5, {args.kills} kills per trial). "
            f"Target: identical in every trial.\n\n{body}"), work / "kills-twin"


def section_grpo(args, work: Path) -> str:
    """From a 300-step smoke SFT: it writes the reasoning format often enough that group rewards
    differ, so GRPO's updates are not all zero and the comparison means something."""
    _, start = train_in_process(work / "grpo-init", "smoke", ["run.threads=1", "sft.steps=300",
                                                             "sft.checkpoint_every=300", "sft.log_every=100"])
    job = ["rl", "--init", str(work / "grpo-init"), "--preset", "smoke"]
    settings = ["run.threads=1", "rollout.threads=1", "rl.mode=sync", "rl.steps=6", "rl.checkpoint_every=1",
                "rl.prompts_per_step=2", "rl.group_size=4", "rollout.timeout=30"]
    faults = "kill@2,rollout/kill@3,kill:ckpt@5"
    twin = run_job(job, work / "grpo-twin", settings, 3)
    run = run_job(job, work / "grpo-chaos", settings + [f"resilience.faults={json.dumps(faults)}"], 5)
    detected, _ = match_detections(run.faults, run.incidents)
    ok = twin.returncode == 0 and run.returncode == 0 and twin.fingerprint == run.fingerprint
    body = table(["faults", "injected", "detected", "restarts", "weights moved", "final weights identical"],
                 [[f"`{faults}`", len(run.faults), len(detected), run.restarts,
                   "yes" if twin.fingerprint != start else "NO", f"**{'yes' if ok else 'NO'}**"]])
    return (f"**2. GRPO, sync mode** (6 steps from a 300-step smoke SFT, 1 rollout worker in bf16). Target: "
            f"identical.\n\n{body}")


def silent_schedule(rng: random.Random, faults: int, steps: int) -> str:
    """`faults` silent corruptions at distinct random steps, each of a random kind and place."""
    at = sorted(rng.sample(range(1, steps), faults))
    return ",".join(f"{rng.choice(SILENT_KINDS)}:{rng.choice(SILENT_TARGETS)}@{s}" for s in at)


def section_flips(args, work: Path) -> str:
    steps = args.clean_steps + args.flips
    faults = silent_schedule(random.Random(0), args.flips, steps)
    base = ["run.threads=1", f"sft.steps={steps}", "sft.checkpoint_every=100", "sft.log_every=100"]
    _, clean = train_in_process(work / "flips-twin", "smoke", base)
    rows = []
    for replicas, every in ((2, 1), (2, args.check_every), (1, 1)):
        folder = work / f"flips-{replicas}x{every}"
        stats, final = train_in_process(folder, "smoke", base + [
            f"resilience.replicas={replicas}", f"resilience.check_every={every}",
            f"resilience.faults={json.dumps(faults)}"])
        fired = [f for f in read_jsonl(folder / "faults.jsonl") if f.get("damaged", "") is not None]
        incidents = read_jsonl(folder / "incidents.jsonl")
        detected, missed = match_detections(fired, incidents)
        alarms = [i for i in incidents if i["kind"] == "corruption"]
        latency = [f["latency_steps"] for f in detected]
        missed_places = Counter(f["target"] for f in missed)
        rows.append([f"{replicas} replica(s), every {every}", len(fired), f"**{len(detected)}**",
                     f"**{len(missed)}**" + (f" ({', '.join(f'{t} {n}' for t, n in missed_places.items())})"
                                             if missed else ""),
                     f"{median(latency):.0f} / {max(latency)}" if latency else "-",
                     f"**{sum(not any(caused_by(f, i) for f in fired) for i in alarms)}**", "yes" if final == clean else "NO",
                     f"{stats['seconds'] / steps * 1000:.0f} ms"])
        print(f"  flips {replicas}x{every}: {len(detected)}/{len(fired)} detected", flush=True)
    kinds = Counter(f.split("@")[0] for f in faults.split(","))
    body = table(["set-up", "faults", "detected", "NOT detected (where)", "latency, steps (median / max)",
                  "false alarms", "weights = fault-free run", "step time"], rows)
    return (f"**3. Silent corruption** (smoke, {steps} steps, in-process replicas fed the same batches; "
            f"{args.flips} faults: {', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}; a fault with nothing "
            f"to corrupt, such as an Adam moment before the first update, is left out). Targets: with 2 "
            f"replicas 100% detected, 0 false alarms. A fault after a run's last check is never detected "
            f"(with sparse checks, the last steps are unchecked).\n\n{body}")


def section_checkpoints(args, twin: Path) -> str:
    folder = latest_valid(twin / "checkpoints" / "sft")
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}
    rng, rejected = random.Random(1), 0
    scratch = folder.with_name(".bench-damage")  # a copy: the twin's checkpoint stays intact
    scratch.mkdir(exist_ok=True)
    for name, data in pristine.items():
        (scratch / name).write_bytes(data)
    manifest = json.loads(pristine["manifest.json"])
    for trial in range(args.damages):
        name = rng.choice(sorted(pristine))
        data = bytearray(pristine[name])
        if trial % 2:
            del data[rng.randrange(len(data)):]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (scratch / name).write_bytes(bytes(data))
        rejected += verify_checkpoint(scratch) is not None
        (scratch / name).write_bytes(pristine[name])
    intact = verify_checkpoint(scratch) is None
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    body = table(["damaged checkpoints (truncated / bit-flipped file)", "rejected", "undamaged copy accepted"],
                 [[f"{args.damages} ({args.damages // 2} / {args.damages - args.damages // 2})",
                   f"**{rejected}/{args.damages}**", "yes" if intact else "NO"]])
    return (f"**4. Checkpoint integrity** (a smoke checkpoint, {len(manifest['files']) + 1} files). "
            f"Target: 100% rejected.\n\n{body}")


def section_hang(args, work: Path) -> str:
    settings = smoke(20) + ['resilience.faults="hang@7"', f"resilience.heartbeat_timeout={args.hang_timeout}"]
    run = run_job(["sft", "--preset", "smoke"], work / "hang", settings, 3)
    hang = run.faults[0]
    detected = [i for i in run.incidents if i["kind"] == "hang"][0]
    latency = detected["time"] - hang["time"]
    body = table(["heartbeat timeout", "hang detected after", "within the timeout", "run finished"],
                 [[f"{args.hang_timeout:.0f} s", f"{latency:.2f} s",
                   f"**{'yes' if latency <= args.hang_timeout else 'NO'}**", "yes" if run.returncode == 0 else "NO"]])
    return f"**5. Hang** (smoke, hang at step 7). Target: detected within the timeout.\n\n{body}"


def section_goodput(args, work: Path) -> str:
    """Each job's goodput is its own useful step time / its own wall time, so a machine whose load
    changes between runs does not skew the comparison; the model is in step units for the same
    reason: goodput(M) = 1 / (1 + b + l / M), b = the twin's overhead per unit of step time,
    l = steps' worth of time lost per fault, measured."""
    settings = ["sft.steps=%d" % args.tiny_steps, "sft.checkpoint_every=4", "sft.log_every=10",
                "resilience.async_checkpoint=true"]
    twin = run_job(["sft", "--preset", "tiny"], work / "goodput-twin", settings, 3)
    base = (twin.wall - twin.useful) / twin.useful
    points, lost_steps, faults = [], 0.0, 0
    for mtbf in [float(m) for m in args.mtbfs.split(",")]:
        run = run_job(["sft", "--preset", "tiny"], work / f"goodput-{mtbf:g}", settings + [
            f"resilience.mtbf={mtbf}", 'resilience.mtbf_kinds=["kill", "device_error"]', "resilience.fault_seed=1"],
            args.tiny_steps)
        step = run.useful / args.tiny_steps
        points.append((mtbf, len(run.faults), run.restarts, run.wall, run.useful / run.wall,
                       run.fingerprint == twin.fingerprint))
        lost_steps += (run.wall - run.useful * (1 + base)) / step
        faults += len(run.faults)
        print(f"  goodput mtbf {mtbf:g}: {len(run.faults)} faults, goodput {run.useful / run.wall:.1%}", flush=True)
    per_fault = lost_steps / max(1, faults)
    lowest = int(min([20.0] + [p[0] for p in points]))
    model = {m: 1 / (1 + base + per_fault / m) for m in sorted({lowest, *range(20, 501, 5)})}
    plot(model, points, 1 / (1 + base), args.tiny_steps, PLOT if args.write else work / PLOT.name)
    rows = [["none (twin)", 0, 0, f"{twin.wall:.1f} s", f"{twin.useful / twin.wall:.1%}", "-"]]
    rows += [[f"{m:g} steps", n, r, f"{w:.1f} s", f"**{g:.1%}**", "yes" if same else "NO"]
             for m, n, r, w, g, same in points]
    body = table(["MTBF", "faults", "restarts", "wall", "goodput", "weights identical"], rows)
    return (f"**6. Goodput under random crashes** (tiny preset, {args.tiny_steps} steps, checkpoint every 4 steps "
            f"written async; faults: SIGKILL and device error drawn at random). Goodput = time in the steps of "
            f"the final timeline / wall time. Target: >= 90% at an MTBF of 50 steps.\n\n{body}\n\n"
            f"Measured cost per fault: {per_fault:.1f} steps' worth of time (restart, reload, recomputed steps); "
            f"fault-free overhead {base:.1%} of step time (start-up, tokenizer, checkpoints). Model "
            f"goodput(M) = 1 / (1 + {base:.3f} + {per_fault:.1f} / M): **{model[50]:.1%} at M = 50**, "
            f"{model[20]:.1%} at 20, {model[500]:.1%} at 500.\n\n"
            f"![goodput against MTBF]({PLOT.relative_to(ROOT).as_posix()})")


def plot(model: dict, points: list, twin_goodput: float, steps: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(list(model), [100 * g for g in model.values()], label="model from the measured cost per fault")
    ax.scatter([p[0] for p in points], [100 * p[4] for p in points], color="C3", zorder=3, label="measured")
    ax.axhline(100 * twin_goodput, color="grey", linestyle=":", label="fault-free twin")
    ax.axhline(90, color="C2", linestyle="--", linewidth=0.8, label="target (90% at MTBF 50)")
    ax.set_xscale("log")
    ax.set_xlabel("mean time between faults (steps)")
    ax.set_ylabel("goodput (%)")
    ax.set_title(f"tiny preset, {steps} steps, crashes (SIGKILL, device error)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)


def section_async(args, work: Path) -> str:
    """Step time from a short tiny run; then its final checkpoint's state saved `--saves` times each
    way. Sync: the step waits for the whole write. Async: it waits for the copy to host memory; the
    write then runs beside the steps, and at most steals its own duration from them (an upper
    bound: with a spare core it steals nothing)."""
    every = load_config(preset="tiny").sft.checkpoint_every
    stats, _ = train_in_process(work / "async", "tiny", [f"sft.steps={args.async_steps}", "sft.log_every=100"])
    step = stats["seconds"] / args.async_steps
    ckpt = load_checkpoint(latest_valid(work / "async" / "checkpoints" / "sft"))
    # to_host: copies in memory, as a training run's state is (load_checkpoint's tensors are mmap'd)
    state = (to_host(ckpt["model"]), {k: v for k, v in ckpt["train_state"].items() if k != "optimizer"},
             to_host(ckpt["optimizer"]))
    sync, blocked, written = [], [], []
    saver = AsyncCheckpointer()
    for i in range(args.saves):
        t0 = time.perf_counter()
        save_checkpoint(work / "saves-sync", i + 1, *state, keep=1)
        t1 = time.perf_counter()
        saver.save(work / "saves-async", i + 1, *state, keep=1)
        t2 = time.perf_counter()
        saver.wait()
        sync.append(t1 - t0)
        blocked.append(t2 - t1)
        written.append(time.perf_counter() - t2)
    sync, blocked, written = median(sync), median(blocked), median(written)
    share = lambda seconds, interval: f"{100 * seconds / (interval * step):.2f}%"  # noqa: E731
    rows = [["sync", f"{sync * 1000:.0f} ms", "-", share(sync, 5), f"**{share(sync, every)}**"],
            ["async", f"{blocked * 1000:.0f} ms", f"{written * 1000:.0f} ms",
             f"{share(blocked, 5)} to {share(blocked + written, 5)}",
             f"**{share(blocked, every)} to {share(blocked + written, every)}**"]]
    return (f"**7. Checkpoint overhead** (tiny preset: {sum(v.numel() for v in ckpt['model'].values()):,} "
            f"parameters + AdamW moments; step {step * 1000:.0f} ms; medians of {args.saves} saves). Target: "
            f"async <= 5% of step time at the default interval ({every} steps). Async overhead is a range: "
            f"the step waits for the copy to host; the background write steals at most its own time.\n\n"
            + table(["checkpoint", "step waits", "background write", "overhead, every 5 steps",
                     f"overhead, every {every} steps"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="scaled down: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60, help="steps of each kill trial")
    parser.add_argument("--flips", type=int, default=50)
    parser.add_argument("--clean-steps", type=int, default=1000)
    parser.add_argument("--check-every", type=int, default=4, help="the sparse set-up's resilience.check_every")
    parser.add_argument("--damages", type=int, default=1000)
    parser.add_argument("--hang-timeout", type=float, default=30.0)
    parser.add_argument("--tiny-steps", type=int, default=300)
    parser.add_argument("--mtbfs", default="20,50,100,200")
    parser.add_argument("--async-steps", type=int, default=10, help="tiny steps timed for the checkpoint overhead")
    parser.add_argument("--saves", type=int, default=5, help="checkpoint saves timed each way")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: kills,grpo,flips,checkpoints,hang,goodput,async")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-chaos"), help="scratch folder (emptied if an earlier run of this benchmark made it)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and docs/chaos_goodput.png")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    skip = set(args.skip.split(","))
    work = fresh_scratch(Path(args.work))
    started = time.perf_counter()
    parts = []
    twin = None
    for name in ("kills", "grpo", "flips", "checkpoints", "hang", "goodput", "async"):
        if name in skip or (name == "checkpoints" and twin is None):
            continue
        t0 = time.perf_counter()
        print(f"[bench_chaos] {name} ...", flush=True)
        if name == "kills":
            text, twin = section_kills(args, work)
        elif name == "grpo":
            text = section_grpo(args, work)
        elif name == "flips":
            text = section_flips(args, work)
        elif name == "checkpoints":
            text = section_checkpoints(args, twin)
        elif name == "hang":
            text = section_hang(args, work)
        elif name == "goodput":
            text = section_goodput(args, work)
        else:
            text = section_async(args, work)
        print(f"{text}\n[bench_chaos] {name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
        parts.append(text)
    minutes = (time.perf_counter() - started) / 60
    body = "\n\n".join(parts) + (f"\n\n{environment(1)} (the tiny preset runs with its own run.threads); "
                                   f"{minutes:.1f} min in all.")
    if args.write:
        write_section("bench_chaos", "Training on unstable hardware (chaos)", body)


if __name__ == "__main__":
    main()
