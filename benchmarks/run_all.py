"""Every benchmark, in dependency order, each writing its section of BENCHMARKS.md (`make bench`).

    .venv/bin/python benchmarks/run_all.py                 # all of them: about two hours on an idle 2-core machine
    .venv/bin/python benchmarks/run_all.py --only serve,decode
    .venv/bin/python benchmarks/run_all.py --dry-run       # print the commands

The GRPO demo runs first: it trains runs/bench/demo (the `tiny` pipeline), the model the GRPO,
TRL, parity and serving (and serving chaos) benchmarks start from. Run it on an otherwise idle machine: the numbers are
ratios against a peer measured in the same run, but two cores shared with anything else are noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = "runs/bench/demo"

BENCHMARKS = {                      # name -> arguments of its script, in the order they run
    "grpo-demo": ["bench_grpo.py", "demo", "--rl-seeds", "1,2", "--write"],
    "grpo-modes": ["bench_grpo.py", "modes", "--write"],
    "grpo-parity": ["bench_grpo.py", "parity", "--write"],
    "trl": ["bench_trl.py", "--write"],
    "parity": ["bench_parity.py", "--model", DEMO, "--n", "64", "--write"],
    "serve": ["bench_serve.py", "--model", DEMO, "--write"],
    "serve-chaos": ["bench_serve_chaos.py", "--model", DEMO, "--write"],
    "decode": ["bench_decode.py", "--repeats", "9", "--profile", "--write"],
    "train": ["bench_train.py", "--repeats", "5", "--steps", "10", "--dtypes", "fp32,bf16", "--profile", "--write"],
    "chaos": ["bench_chaos.py", "--write"],
    "scale": ["bench_scale.py", "--write"],       # ~22 GB at its peak (2 DDP ranks): run it alone
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated names: " + ",".join(BENCHMARKS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    needs_demo = any(DEMO in BENCHMARKS[n] for n in names) and "grpo-demo" not in names
    if needs_demo and not (ROOT / DEMO).exists() and not args.dry_run:
        print(f"error: {DEMO} does not exist; run the grpo-demo benchmark first (it trains it)", file=sys.stderr)
        return 2
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    failed = []
    for name in names:
        command = [sys.executable, str(ROOT / "benchmarks" / BENCHMARKS[name][0]), *BENCHMARKS[name][1:]]
        print(f"[run_all] {name}: {' '.join(command)}", flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT, env=env)
        print(f"[run_all] {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
