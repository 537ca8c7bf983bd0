"""Helpers shared by the benchmarks: medians, markdown tables, writing a section of BENCHMARKS.md,
scratch folders that only a benchmark's own earlier scratch folder may be emptied as, and a
profile of where a piece of work's time goes (op_profile).

Each benchmark owns one section between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers and
rewrites only that section, with the command that produced it, the date, versions and threads.
"""

from __future__ import annotations

import datetime
import platform
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = ("# tandem benchmarks\n\nEvery table below is written by a script in `benchmarks/`; the command that "
          "made it is under its heading. Peers are measured side by side in the same run; figures are "
          "medians over repeats, and ratios are what we claim (absolute times on this shared 2-core "
          "machine are noisy).\n")


SCRATCH_MARK = ".tandem-bench-scratch"


def fresh_scratch(path: Path) -> Path:
    """An empty folder at `path`, marked as a benchmark's scratch. An existing folder is emptied
    only if it carries that mark; any other is refused (the benchmark stops), never deleted."""
    path = Path(path)
    if path.exists():
        if not (path / SCRATCH_MARK).is_file():
            sys.exit(f"{path} exists and is not a benchmark's scratch folder (no {SCRATCH_MARK}); "
                     "choose another folder or remove it yourself")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / SCRATCH_MARK).write_text("a tandem benchmark's scratch folder: emptied by the next run\n")
    return path


def median(values) -> float:
    return statistics.median(values)


def environment(threads: int) -> str:
    import torch
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"{threads} thread(s)",
             platform.machine()]
    try:
        import transformers
        parts.insert(2, f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rel(path) -> str:
    """A path as the tables print it: relative to the repository when inside it (no machine's paths)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def write_section(name: str, title: str, body: str, command: str | None = None) -> None:
    command = command or "python " + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix()
                                               if Path(sys.argv[0]).is_absolute() else sys.argv[0]] + sys.argv[1:])
    stamp = datetime.date.today().isoformat()
    section = (f"<!-- {name}:start -->\n## {title}\n\n`{command}` ({stamp})\n\n{body.strip()}\n"
               f"<!-- {name}:end -->")
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)


def op_profile(run, units: int) -> dict:
    """Where the time of `run()` goes, per unit of work (`units` per call: tokens decoded, steps),
    from torch.profiler's CPU ops: {"ops": aten ops, "op_us": their summed self time (kernels plus
    torch's dispatch; the profiler adds ~1 us per op), "wall_us": the profiled wall, "python_us":
    the rest (the Python around the ops), "top": [(op, calls, self us)] for the 6 costliest ops}."""
    import time
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = (time.perf_counter() - start) * 1e6 / units
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    op_us = sum(e.self_cpu_time_total for e in events) / units
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {"ops": sum(e.count for e in events) / units, "op_us": op_us, "wall_us": wall,
            "python_us": max(0.0, wall - op_us),
            "top": [(e.key, e.count / units, e.self_cpu_time_total / units) for e in top]}


def profile_table(profiles: dict[str, dict], unit: str) -> str:
    """A markdown table of op_profile results side by side, then each one's costliest ops."""
    rows = [[name, f"{p['wall_us']:,.0f}", f"{p['ops']:,.0f}", f"{p['op_us']:,.0f}", f"{p['python_us']:,.0f}",
             ", ".join(f"`{op.removeprefix('aten::')}` {us:,.0f}" for op, _, us in p["top"][:4])]
            for name, p in profiles.items()]
    return table([f"per {unit}, under the profiler", "wall us", "aten ops", "op self time us",
                  "Python (the rest) us", "costliest ops (self us)"], rows)
