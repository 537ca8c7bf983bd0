"""A/B against another commit: the same measurement on this tree and on a `git worktree` of REF, in
the same run, interleaved, so a claimed speed-up is a ratio measured together rather than two noisy
absolute figures taken on different days.

    python benchmarks/bench_train.py --baseline            # this tree vs HEAD~1
    python benchmarks/bench_decode.py --baseline v0.3      # this tree vs the tag v0.3

How: REF is checked out (detached) into a temporary git worktree, removed at the end. Each round
runs the benchmark's measure function in two fresh processes, one per side, alternating which goes
first; the side's process imports `tandem` from its own tree before anything else (so the
benchmark's code, from this tree, drives the other tree's package), and prints one JSON object of
figures. A measure function must use only tandem APIs that both commits have: the high-level
entry points (train_sft, Engine.generate), not internals that a change may rename. Reported: the
median of each figure per side and the ratio this tree / baseline.

    python benchmarks/ab.py --worker TREE MODULE:FUNCTION JSON_ARGS     (what each side runs)
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_baseline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", nargs="?", const="HEAD~1", default=None, metavar="REF",
                        help="also measure git REF (default HEAD~1) in a worktree, in the same run, and print "
                             "the ratio this tree / REF")
    parser.add_argument("--ab-rounds", type=int, default=3, help="A/B rounds (each: one process per side)")


def baseline_tree(ref: str) -> Path:
    """A detached worktree of `ref` in a temporary folder, removed when this process exits."""
    folder = Path(tempfile.mkdtemp(prefix="tandem-ab-")) / "tree"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"--baseline {ref}: git worktree failed: {exc.stderr.strip()}")

    def remove() -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True)
        shutil.rmtree(folder.parent, ignore_errors=True)
    atexit.register(remove)
    return folder


def measure_in(tree: Path, target: str, kwargs: dict) -> dict:
    """Run `target` ("module_file.py:function", a benchmark in this tree) against `tree`'s tandem
    in a fresh process; its figures."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), target,
                          json.dumps(kwargs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(target: str, kwargs: dict, ref: str, rounds: int) -> dict[str, dict]:
    """{figure: {"this": median, "baseline": median, "ratio": this / baseline}} over `rounds`
    interleaved rounds of both sides (which side goes first alternates)."""
    trees = {"this": ROOT, "baseline": baseline_tree(ref)}
    seen: dict[str, dict[str, list[float]]] = {"this": {}, "baseline": {}}
    for round_ in range(rounds):
        for side in (("this", "baseline") if round_ % 2 == 0 else ("baseline", "this")):
            for key, value in measure_in(trees[side], target, kwargs).items():
                seen[side].setdefault(key, []).append(value)
    result = {}
    for key in seen["this"]:
        this, base = statistics.median(seen["this"][key]), statistics.median(seen["baseline"].get(key, [float("nan")]))
        result[key] = {"this": this, "baseline": base, "ratio": this / base if base else float("nan")}
    return result


def report(result: dict[str, dict], ref: str, rounds: int) -> str:
    """The comparison as a markdown table."""
    lines = [f"| figure | this tree | {ref} | this / {ref} |", "|---|---:|---:|---:|"]
    lines += [f"| {key} | {r['this']:,.4g} | {r['baseline']:,.4g} | **{r['ratio']:.2f}x** |" for key, r in result.items()]
    return "\n".join(lines) + f"\n\nMedians of {rounds} interleaved rounds, one fresh process per side and round."


def source_tree() -> dict:
    """A measure function that measures nothing: which tree the side's `tandem` came from (tests)."""
    import tandem
    return {"tree": str(Path(tandem.__file__).resolve().parent.parent)}


def _worker(tree: str, target: str, kwargs: str) -> None:
    sys.path.insert(0, tree)
    import tandem  # noqa: F401  (first: the side's own package, whatever paths the benchmark adds later)
    if not Path(tandem.__file__).resolve().is_relative_to(Path(tree).resolve()):
        sys.exit(f"tandem came from {tandem.__file__}, not from {tree}")
    sys.path.insert(1, str(ROOT))
    filename, function = target.split(":")
    spec = importlib.util.spec_from_file_location("ab_target", ROOT / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, function)(**json.loads(kwargs))))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:])
    else:
        sys.exit(__doc__)
