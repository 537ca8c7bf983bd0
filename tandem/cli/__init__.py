"""The `tandem` command.

    tandem pipeline --preset tiny --out runs/demo     SFT -> eval -> GRPO -> eval -> export + gate -> report
    tandem sft      --preset smoke --out runs/s       SFT only (resumes in the same folder)
    tandem sft      --preset smoke --init runs/s --out runs/s2 --set sft.steps=400   train runs/s longer
    tandem rl       --init runs/s --out runs/r        GRPO with rollout workers (tandem/cli/train.py)
    tandem eval     --model runs/demo [--task addition] [--split test|validation|all] [--json]
    tandem generate --model runs/demo --prompt "What is 12 + 7?"
    tandem chat     --model runs/demo [--multi-turn]  terminal chat, thinking shown dimmed (tandem/cli/chat.py)
    tandem serve    --model runs/demo                 OpenAI-compatible server + web chat on :8000
    tandem inspect  runs/demo [--json]                step, config, parameters, weight fingerprint
    tandem doctor                                     devices, dtypes, backends, versions
    tandem chaos    --preset smoke --out runs/c --faults kill@7,hang@12   faults vs a fault-free twin

sft, rl and pipeline take --supervise [--max-restarts N]: the job runs as a child process that is
restarted (and resumes) after a crash or a hang (tandem/resilience/supervisor.py).

Any config field can be overridden with --set section.key=value (repeatable). A user mistake
prints one line starting with "error:" and exits with status 2; a training run that cannot make
progress (resilience.max_rollbacks) prints one such line and exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tandem.cli import chat, models, resilience, serve, train  # noqa: E402
from tandem.cli.args import add_config_args, add_model_args, add_sampling_args  # noqa: E402
from tandem.cli.portability import COMMANDS as PORTABILITY_COMMANDS  # noqa: E402
from tandem.cli.portability import add_backend_arg  # noqa: E402
from tandem.cli.portability import add_subcommands as add_portability_subcommands  # noqa: E402
from tandem.errors import TandemError, TrainingFailed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pipeline", help="SFT -> eval -> GRPO -> eval -> export + parity gate -> report, on one preset")
    add_config_args(p)
    p = sub.add_parser("sft", help="supervised fine-tuning (resumes in the same --out)")
    add_config_args(p)
    p.add_argument("--init", help="start from the newest committed checkpoint of a tandem run (or a checkpoint "
                   "folder) instead of random weights, e.g. to train a finished run longer: its weights and "
                   "tokenizer are taken, the optimizer starts fresh (AdamW moments are not carried over) and "
                   "the schedule (warmup + cosine) spans this run's sft.steps; the model config must match it")
    train.add_parser(sub)

    p = sub.add_parser("eval", help="accuracy on a task's held-out split")
    add_model_args(p)
    p.add_argument("--task", action="append", help="task name or .jsonl (default: the run's tasks)")
    p.add_argument("--n", type=int, default=200,
                   help="examples per task, from its held-out split (a .jsonl file holds out its last ~10%% "
                        "of rows; fewer than asked prints a note)")
    p.add_argument("--split", choices=("test", "validation", "all"), default="test",
                   help="test: the held-out split for claims (default); validation: the held-out split for "
                        "tuning; all: every row of a .jsonl task, training rows too")
    p.add_argument("--pass-k", type=int, default=0, help="also report sampled pass@k")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for pass@k")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for several tasks)")
    add_backend_arg(p)

    p = sub.add_parser("generate", help="answer one prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true")
    add_backend_arg(p)

    p = sub.add_parser("chat", help="chat in the terminal (thinking shown dimmed)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--multi-turn", action="store_true",
                   help="send the whole conversation (default: each message on its own, as tandem's "
                        "single-turn tasks train the model)")

    serve.add_parser(sub)

    p = sub.add_parser("inspect", help="step, config, parameters and weight fingerprint of a model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("doctor", help="devices, dtypes, distributed backends and versions here")
    p.add_argument("--json", action="store_true")
    add_portability_subcommands(sub)  # export, parity, preflight
    resilience.add_chaos_parser(sub)
    return parser


COMMANDS = {"pipeline": train.cmd_pipeline, "sft": train.cmd_sft, "eval": models.cmd_eval,
            "generate": models.cmd_generate, "chat": chat.cmd_chat, "inspect": models.cmd_inspect,
            "doctor": models.cmd_doctor, **PORTABILITY_COMMANDS}
COMMANDS["serve"] = serve.cmd_serve
COMMANDS["rl"] = train.cmd_rl
COMMANDS["chaos"] = resilience.cmd_chaos


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if resilience.wants_supervisor(args):
            return resilience.run_supervised(args, sys.argv[1:] if argv is None else list(argv), main)
        return COMMANDS[args.command](args)
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TrainingFailed.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

