"""The training subcommands of `tandem`: pipeline, sft (their parsers are in tandem/cli/__init__.py) and
rl: GRPO from a tandem run or an HF checkpoint, with rollout workers.

    tandem pipeline --preset tiny --out runs/demo
    tandem sft --preset smoke --out runs/s
    tandem rl --init runs/demo --out runs/demo-rl --preset tiny
    tandem rl --init models/Qwen2.5-0.5B-Instruct --out runs/qwen-rl --preset hf-grpo \\
        --set 'data.tasks=["data/mine.jsonl"]'
    torchrun ... -m tandem.cli rl --init ... --out ...      across machines (tandem/train/rollout.py)

--init is a run folder (its newest checkpoint: RL's if any, else SFT's), a checkpoint folder, or an
HF Llama/Qwen2 folder. The model's shape comes from --init; the config's [model] section is not
used. From a tandem run, data.tasks and data.task_params are the run's own (its config.json), each
unless --set names it. Rerunning the same command into the same --out resumes from the newest RL
checkpoint.
Under torchrun, ranks >= rl.trainers become rollout workers and ignore --init/--out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tandem.cli.args import add_config_args


def _config(args):
    from tandem.config import load_config
    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def cmd_pipeline(args) -> int:
    from tandem.pipeline import run_pipeline
    run_dir = run_pipeline(_config(args), args.out, progress=not args.quiet)
    print(f"done: {run_dir} (report: {run_dir / 'report.md'})")
    print(f"try it: tandem chat --model {run_dir}")
    print(f"serve it: tandem serve --model {run_dir}   (OpenAI API + web chat on http://127.0.0.1:8000/)")
    from tandem.runs import read_summary
    refused = [f for f, r in read_summary(run_dir).get("export", {}).items() if not r.get("published", True)]
    return 1 if refused else 0  # an export refused by its parity gate fails the pipeline


def cmd_sft(args) -> int:
    from tandem.pipeline import run_sft_stage
    cfg = _config(args)
    if args.init:
        cfg.sft.init = args.init  # recorded in config.json: a rerun with another --init is refused
    run_dir = run_sft_stage(cfg, args.out, progress=not args.quiet)
    print(f"done: {run_dir}")
    from tandem.train.parallel import launched_world
    return exit_now(0) if launched_world() else 0


def add_parser(sub) -> None:
    p = sub.add_parser("rl", help="GRPO with trainer and rollout roles (resumes in the same --out)")
    p.add_argument("--init", required=True, help="the model RL starts from: a run, a checkpoint or an HF folder; "
                   "from a tandem run, data.tasks and data.task_params are inherited from its config.json "
                   "unless given with --set")
    add_config_args(p)


def inherit_tasks(cfg, init: str, overrides: list[str]) -> None:
    """data.tasks / data.task_params from the init run's config.json (a tandem run or one of its
    checkpoints), each unless --set names it, so RL trains on the tasks the model was SFT'd on."""
    from tandem.config import parse_override, validate
    from tandem.loading import run_folder
    run = run_folder(Path(init))
    if run is None:  # an HF folder: the config's tasks
        return
    given = {parse_override(text)[:2] for text in overrides}
    data = json.loads((run / "config.json").read_text()).get("data", {})
    for key in ("tasks", "task_params"):
        if ("data", key) not in given and key in data:
            setattr(cfg.data, key, data[key])
    validate(cfg)


def cmd_rl(args) -> int:
    from tandem.config import load_config
    from tandem.train import rollout
    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    launched = rollout.torchrun_env()
    if launched and launched[0] >= cfg.rl.trainers:   # this torchrun rank is a rollout worker
        return exit_now(rollout.main([]))
    inherit_tasks(cfg, args.init, args.overrides)
    from tandem.train.grpo import run_rl_stage
    run_dir = run_rl_stage(cfg, args.init, args.out, progress=not args.quiet)
    print(f"done: {run_dir}")
    print(f"evaluate it: tandem eval --model {run_dir}")
    return exit_now(0) if launched else 0


def exit_now(code: int) -> int:
    """End a torchrun rank that has finished its work without the interpreter's teardown: there, a
    gloo worker thread can still free a tensor while Python finalizes and abort the process
    ("terminate called without an active exception", about 1 launch in 20 here) after the run
    is complete and committed, which torchrun would report as a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
