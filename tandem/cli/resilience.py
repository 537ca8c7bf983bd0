"""The CLI side of resilience: `tandem chaos`, and --supervise / --max-restarts on sft, rl, pipeline.

    tandem sft --preset tiny --out runs/x --supervise --max-restarts 5
    tandem chaos --preset smoke --out runs/chaos --faults kill@7,hang@12,nan@15 \\
        --set resilience.heartbeat_timeout=3 [--json] [--init RUN: GRPO instead of SFT]

tandem/cli/args.py adds the supervision flags to every command that takes a config (sft, rl, pipeline);
when --supervise is given, main() (tandem/cli/__init__.py) hands the command to run_supervised instead
of running it. The supervisor forks children that run the same command line; the attempt number it
puts in their environment is what stops a child from supervising itself again.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

from tandem.errors import TandemError


def add_supervise_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--supervise", action="store_true",
                        help="run the job as a child process; restart it (resuming) after a crash or a hang")
    parser.add_argument("--max-restarts", type=int, default=None, metavar="N",
                        help="with --supervise: give up after N restarts (default 3)")


def wants_supervisor(args) -> bool:
    """True when this process should supervise the command rather than run it."""
    from tandem.resilience.incidents import ATTEMPT_ENV
    if getattr(args, "max_restarts", None) is not None and not args.supervise:
        raise TandemError("--max-restarts only applies with --supervise; add --supervise")
    return getattr(args, "supervise", False) and ATTEMPT_ENV not in os.environ


def run_supervised(args, argv: list[str], main: Callable[[list[str]], int]) -> int:
    """Supervise `main(argv)` (the CLI's own entry point, run in forked children)."""
    from pathlib import Path

    import tandem.pipeline  # noqa: F401  (imported once here, so every forked child starts warm)
    from tandem.config import load_config
    from tandem.resilience.supervisor import Policy, supervise
    from tandem.progress import log
    if args.max_restarts is not None and args.max_restarts < 0:
        raise TandemError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)  # a bad config fails here, once
    policy = Policy.from_config(cfg.resilience, 3 if args.max_restarts is None else args.max_restarts)
    supervision = supervise(lambda: main(argv), Path(args.out), policy)
    if supervision.restarts or supervision.gave_up:
        log(supervision.report())
    return supervision.exit_code


def add_chaos_parser(sub) -> None:
    p = sub.add_parser("chaos", help="a training job under injected faults next to a fault-free twin")
    p.add_argument("--preset", help="a preset from configs/ (smoke, tiny, ...)")
    p.add_argument("--config", help="a TOML config file instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field for both jobs (repeatable)")
    p.add_argument("--out", required=True, help="a new folder; the jobs go to OUT/twin and OUT/chaos")
    p.add_argument("--init", help="run GRPO (tandem rl) from this run or checkpoint instead of SFT")
    p.add_argument("--faults", default="", help="a fault schedule, e.g. kill@7,hang@12,nan@15,bitflip:grad@18")
    p.add_argument("--mtbf", type=float, default=0.0, help="also random faults, one per MTBF steps on average")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the random faults and bit positions")
    p.add_argument("--kinds", default="", help="comma-separated kinds of random faults (default: kill,device_error)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="supervisor restarts allowed (default: the scheduled crashes and hangs + 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_chaos(args) -> int:
    from tandem.resilience.chaos import run_chaos
    if not args.faults and args.mtbf <= 0:
        raise TandemError("give --faults SCHEDULE or --mtbf STEPS (or both); e.g. --faults kill@7,hang@12")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] or None
    report = run_chaos(args.preset, args.config, args.overrides, args.out, args.faults, args.mtbf,
                       args.fault_seed, kinds, args.max_restarts, args.init)
    print(json.dumps(report.to_dict()) if args.json else report.text())
    return 0 if report.chaos.returncode == 0 else 1
