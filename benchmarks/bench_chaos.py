"""Chaos benchmark: training on hardware that crashes, hangs and corrupts data.

    python benchmarks/bench_chaos.py --write      the full run: about 40 minutes on an idle 2-core machine
                                                  (the tiny preset's step is ~0.3 s there; section 5's hangs
                                                  wait out the 30 s timeout 20 times), more on a busy one
    python benchmarks/bench_chaos.py --quick      scaled down (a few minutes on a busy machine)

Sections, each against its target (every job is the real CLI under `--supervise`, in subprocesses,
with real signals, unless said otherwise):

1. kills at fixed points: `--trials` runs of the smoke SFT preset (`--steps` steps, a checkpoint
   every 5), each with `--kills` SIGKILLs the trainer sends itself at random steps, at one of two
   fixed points: after the backward pass, or (a third of them) inside a checkpoint write (files
   written, manifest not yet). Target: final weights bitwise identical to the uninterrupted run in
   every trial. Section 5 sends kills from outside instead, at moments the trainer does not choose.
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
5. outside: kills and hangs sent by this process at random moments (tandem/resilience/outside.py):
   `--trials` smoke SFT runs with `--kills` SIGKILLs each, and `--hangs` runs each of a SIGSTOP
   (a frozen process: a hang wherever it lands, mid-backward included) during training, during
   the pipeline's eval and during its export, under a `--hang-timeout` heartbeat timeout.
   Targets: every hang detected (reported: seconds from the signal to the verdict), final
   weights (and export) identical to a fault-free run in every trial.
6. goodput: the tiny preset (`--tiny-steps` steps) under random faults (kill, device error and
   hang, the hang costing `--goodput-hang-timeout`, default 30 s as the config's) at each MTBF
   in `--mtbfs`, checkpointing (async) at the Young/Daly interval sqrt(2 x checkpoint cost x
   MTBF) for that MTBF (`--goodput-interval preset`: the preset's 200), next to a fault-free twin
   at the preset's interval. Goodput = the job's time in training steps / its wall time from the
   command's launch to its exit. Target: >= 90% at an MTBF of 50 steps. The plot
   (docs/chaos_goodput.png) shows the measured points and, from 20 to 500 steps, the model
   wall(M) = twin wall + (steps / M) x (measured time lost per fault).
7. async checkpoints (in-process): the tiny preset's step time, and its checkpoint saved
   synchronously and asynchronously. Target: async overhead <= 5% of step time at the default
   interval (sft.checkpoint_every of the tiny preset).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, environment, fresh_scratch, median, table, write_section  # noqa: E402
from tandem.export.hf import PROVENANCE  # noqa: E402
from tandem.resilience.chaos import JobResult, caused_by, match_detections, run_job  # noqa: E402
from tandem.resilience.faults import SILENT_KINDS, SILENT_TARGETS  # noqa: E402
from tandem.resilience.outside import Strike, strike_at_random  # noqa: E402
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
         "hangs": 2, "hang_timeout": 10.0, "tiny_steps": 20, "mtbfs": "5,10", "goodput_hang_timeout": 10.0,
         "async_steps": 3, "saves": 3}


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


def _detections(run: JobResult, strikes: list[Strike]) -> list[float]:
    """Seconds from each SIGSTOP to the supervisor's hang verdict on it (the first one after it)."""
    hangs = sorted(i["time"] for i in run.incidents if i["kind"] == "hang")
    return [next((t - s.time for t in hangs if t > s.time), float("inf")) for s in strikes if s.signal == "SIGSTOP"]


def _exported(run_dir: Path) -> str | None:
    provenance = run_dir / "export" / "hf" / PROVENANCE
    return json.loads(provenance.read_text())["fingerprint"] if provenance.is_file() else None


def section_outside(args, work: Path) -> str:
    """Kills and hangs sent from another process at random moments (tandem/resilience/outside.py):
    SIGKILL (as `kill -9`) and SIGSTOP (a frozen process: a hang that lands wherever the process
    is, mid-backward included, not right after a heartbeat) during training; SIGSTOP during the
    pipeline's eval and export stages. Each job is compared with its own fault-free twin."""
    train = smoke(args.steps) + [f"resilience.heartbeat_timeout={args.hang_timeout}"]
    job = ["sft", "--preset", "smoke"]
    twin = run_job(job, work / "outside-twin", train, 3)
    rows = []
    cases = [("SIGKILL, training", [signal.SIGKILL] * args.kills, ("trainer",), args.trials),
             ("SIGSTOP (hang), training", [signal.SIGSTOP], ("trainer",), args.hangs)]
    for label, signals, roles, trials in cases:
        identical, sent, detections = 0, [], []
        for trial in range(trials):
            rng, strikes, folder = random.Random(f"{label}/{trial}"), [], work / f"outside-{len(rows)}-{trial}"
            run = run_job(job, folder, train, len(signals) + 3,
                          during=lambda p: strikes.extend(strike_at_random(p, folder, rng, signals, roles,
                                                                            args.steps - 1)))
            identical += run.returncode == 0 and run.fingerprint == twin.fingerprint
            sent += strikes
            detections += _detections(run, strikes)
        rows.append(_outside_row(label, trials, sent, detections, identical))
    pipeline = ["pipeline", "--preset", "smoke"]
    stages = smoke(args.steps) + ["rl.steps=0", 'export.formats=["hf"]', "eval.n=200",
                                  f"resilience.heartbeat_timeout={args.hang_timeout}"]
    pipeline_twin = run_job(pipeline, work / "outside-pipeline-twin", stages, 3)
    for stage in ("eval", "export"):
        identical, sent, detections = 0, [], []
        for trial in range(args.hangs):
            rng, strikes, folder = random.Random(f"{stage}/{trial}"), [], work / f"outside-{stage}-{trial}"
            run = run_job(pipeline, folder, stages, 3,
                          during=lambda p: strikes.extend(strike_at_random(p, folder, rng, [signal.SIGSTOP], (stage,))))
            identical += run.returncode == 0 and _exported(folder) == _exported(work / "outside-pipeline-twin") \
                and run.fingerprint == pipeline_twin.fingerprint
            sent += strikes
            detections += _detections(run, strikes)
        rows.append(_outside_row(f"SIGSTOP (hang), {stage}", args.hangs, sent, detections, identical))
    body = table(["sent from outside", "trials", "signals landed", "hangs detected", "detection after the signal "
                  "(median / max)", "final weights identical"], rows)
    return (f"**5. Kills and hangs sent from outside at random moments** (smoke, {args.steps} steps, checkpoint "
            f"every 5; heartbeat timeout {args.hang_timeout:g} s). Another process waits for a random step, then a "
            f"random fraction of a step, and sends the signal to the training child (as `kill -9` would, or a "
            f"hung device that freezes it: SIGSTOP); eval and export: a random 0-1 s into the pipeline's stage. "
            f"A hang is detected when the heartbeat is {args.hang_timeout:g} s old, so detection after the signal "
            f"is the timeout minus the time since the last beat (eval and export beat at every decode step, prompt "
            f"and phase; their longest silent phase, importing transformers and loading the export for its "
            f"parity gate, must stay under the timeout). Pipeline rows compare the SFT weights and the "
            f"exported model with a fault-free pipeline. Targets: every hang detected, identical in every "
            f"trial.\n\n{body}")


def _outside_row(label: str, trials: int, sent: list[Strike], detections: list[float], identical: int) -> list:
    stops = [d for d in detections if d != float("inf")]
    timing = f"{median(stops):.2f} s / {max(stops):.2f} s" if stops else "-"
    hangs = f"{len(stops)}/{len(detections)}" if detections else "-"
    return [label, trials, len(sent), hangs, timing, f"**{identical}/{trials}**"]


def young_daly(cost_steps: float, mtbf_steps: float) -> int:
    """The checkpoint interval that minimises expected lost time, Young's first-order rule
    sqrt(2 x checkpoint cost x MTBF) (Young 1974; Daly 2006), in steps, at least 1."""
    return max(1, round(math.sqrt(2 * cost_steps * mtbf_steps)))


def section_goodput(args, work: Path) -> str:
    """Each job's goodput is its own useful step time / its own wall time (launch to exit), so a
    machine whose load changes between runs does not skew the comparison; the model is in step
    units for the same reason: goodput(M) = 1 / (1 + b + l / M), b = the twin's overhead per unit
    of step time, l = steps' worth of time lost per fault, measured."""
    costs = checkpoint_costs(args, work)
    cost_steps = (costs["blocked"] + costs["written"]) / costs["step"]  # an async save, upper bound
    preset_every = load_config(preset="tiny").sft.checkpoint_every
    kinds = ["kill", "device_error", "hang"]
    settings = ["sft.steps=%d" % args.tiny_steps, "sft.log_every=10", "resilience.async_checkpoint=true",
                f"resilience.heartbeat_timeout={args.goodput_hang_timeout}"]
    twin = run_job(["sft", "--preset", "tiny"], work / "goodput-twin", settings, 3)
    base = (twin.wall - twin.useful) / twin.useful
    points, lost_steps, faults = [], 0.0, 0
    for mtbf in [float(m) for m in args.mtbfs.split(",")]:
        every = young_daly(cost_steps, mtbf) if args.goodput_interval == "young-daly" else preset_every
        run = run_job(["sft", "--preset", "tiny"], work / f"goodput-{mtbf:g}", settings + [
            f"sft.checkpoint_every={every}", f"resilience.mtbf={mtbf}", f"resilience.mtbf_kinds={json.dumps(kinds)}",
            "resilience.fault_seed=1"], args.tiny_steps)
        step = run.useful / args.tiny_steps
        points.append((mtbf, every, len(run.faults), sum(f["kind"] == "hang" for f in run.faults), run.restarts,
                       run.wall, run.useful / run.wall, run.fingerprint == twin.fingerprint))
        lost_steps += (run.wall - run.useful * (1 + base)) / step
        faults += len(run.faults)
        print(f"  goodput mtbf {mtbf:g}: {len(run.faults)} faults, goodput {run.useful / run.wall:.1%}", flush=True)
    per_fault = lost_steps / max(1, faults)
    lowest = int(min([20.0] + [p[0] for p in points]))
    model = {m: 1 / (1 + base + per_fault / m) for m in sorted({lowest, *range(20, 501, 5)})}
    plot(model, points, 1 / (1 + base), args.tiny_steps, PLOT if args.write else work / PLOT.name)
    rows = [["none (twin)", preset_every, 0, 0, f"{twin.wall:.1f} s", f"{twin.useful / twin.wall:.1%}", "-"]]
    rows += [[f"{m:g} steps", e, f"{n} ({h} hangs)", r, f"{w:.1f} s", f"**{g:.1%}**", "yes" if same else "NO"]
             for m, e, n, h, r, w, g, same in points]
    body = table(["MTBF", "checkpoint every", "faults", "restarts", "wall", "goodput", "weights identical"], rows)
    rule = f"the preset's interval ({preset_every} steps)"
    if args.goodput_interval == "young-daly":
        rule = (f"the Young/Daly interval sqrt(2 x checkpoint cost x MTBF), checkpoint cost {cost_steps:.2f} steps "
                f"(an async save: the step's wait plus the background write, measured)")
    return (f"**6. Goodput under random faults** (tiny preset, {args.tiny_steps} steps; faults drawn at random "
            f"among SIGKILL, device error and hang; a hang costs the heartbeat timeout, "
            f"{args.goodput_hang_timeout:g} s (the config's default: 30 s); checkpoints written async every N "
            f"steps, N = {rule}; "
            f"the twin checkpoints at the preset's interval). Goodput = time in the steps of the final timeline / "
            f"wall time from the command's launch to its exit (start-up included). Target: >= 90% at an MTBF of "
            f"50 steps.\n\n{body}\n\n"
            f"Measured cost per fault: {per_fault:.1f} steps' worth of time (restart, reload, recomputed steps, "
            f"hang timeouts); fault-free overhead {base:.1%} of step time (start-up, tokenizer, checkpoints). Model "
            f"goodput(M) = 1 / (1 + {base:.3f} + {per_fault:.1f} / M): **{model[50]:.1%} at M = 50**, "
            f"{model[20]:.1%} at 20, {model[500]:.1%} at 500.\n\n"
            f"![goodput against MTBF]({PLOT.relative_to(ROOT).as_posix()})")


def plot(model: dict, points: list, twin_goodput: float, steps: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(list(model), [100 * g for g in model.values()], label="model from the measured cost per fault")
    ax.scatter([p[0] for p in points], [100 * p[6] for p in points], color="C3", zorder=3, label="measured")
    ax.axhline(100 * twin_goodput, color="grey", linestyle=":", label="fault-free twin")
    ax.axhline(90, color="C2", linestyle="--", linewidth=0.8, label="target (90% at MTBF 50)")
    ax.set_xscale("log")
    ax.set_xlabel("mean time between faults (steps)")
    ax.set_ylabel("goodput (%)")
    ax.set_title(f"tiny preset, {steps} steps, SIGKILL, device error, hang")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)


def checkpoint_costs(args, work: Path) -> dict:
    """Step time from a short tiny run; then its final checkpoint's state saved `--saves` times each
    way (medians, seconds). Sync: the step waits for the whole write. Async: it waits for the copy
    to host memory ("blocked"); the write ("written") then runs beside the steps, and at most
    steals its own duration from them (an upper bound: with a spare core it steals nothing).
    Measured once per benchmark run (the goodput section's Young/Daly interval uses it too)."""
    if getattr(args, "costs", None):
        return args.costs
    stats, _ = train_in_process(work / "async", "tiny", [f"sft.steps={args.async_steps}", "sft.log_every=100"])
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
    args.costs = {"step": stats["seconds"] / args.async_steps, "sync": median(sync), "blocked": median(blocked),
                  "written": median(written), "parameters": sum(v.numel() for v in ckpt["model"].values())}
    return args.costs


def section_async(args, work: Path) -> str:
    every = load_config(preset="tiny").sft.checkpoint_every
    c = checkpoint_costs(args, work)
    step, sync, blocked, written = c["step"], c["sync"], c["blocked"], c["written"]
    share = lambda seconds, interval: f"{100 * seconds / (interval * step):.2f}%"  # noqa: E731
    rows = [["sync", f"{sync * 1000:.0f} ms", "-", share(sync, 5), f"**{share(sync, every)}**"],
            ["async", f"{blocked * 1000:.0f} ms", f"{written * 1000:.0f} ms",
             f"{share(blocked, 5)} to {share(blocked + written, 5)}",
             f"**{share(blocked, every)} to {share(blocked + written, every)}**"]]
    return (f"**7. Checkpoint overhead** (tiny preset: {c['parameters']:,} "
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
    parser.add_argument("--hangs", type=int, default=5, help="trials of each hang sent from outside (section 5)")
    parser.add_argument("--hang-timeout", type=float, default=30.0, help="heartbeat timeout of section 5")
    parser.add_argument("--tiny-steps", type=int, default=300)
    parser.add_argument("--mtbfs", default="20,50,100,200")
    parser.add_argument("--goodput-interval", choices=("young-daly", "preset"), default="young-daly",
                        help="checkpoint interval of the goodput runs: Young/Daly for each MTBF, or the preset's")
    parser.add_argument("--goodput-hang-timeout", type=float, default=30.0,
                        help="heartbeat timeout of the goodput runs (a drawn hang costs this much)")
    parser.add_argument("--async-steps", type=int, default=10, help="tiny steps timed for the checkpoint overhead")
    parser.add_argument("--saves", type=int, default=5, help="checkpoint saves timed each way")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: kills,grpo,flips,checkpoints,outside,goodput,async")
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
    for name in ("kills", "grpo", "flips", "checkpoints", "outside", "goodput", "async"):
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
        elif name == "outside":
            text = section_outside(args, work)
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
