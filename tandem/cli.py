"""The `tandem` command.

    tandem pipeline --preset tiny --out runs/demo     SFT -> eval -> GRPO -> eval -> export + gate -> report
    tandem sft      --preset smoke --out runs/s       SFT only (resumes in the same folder)
    tandem sft      --preset smoke --init runs/s --out runs/s2 --set sft.steps=400   train runs/s longer
    tandem rl       --init runs/s --out runs/r        GRPO with rollout workers (tandem/cli_rl.py)
    tandem eval     --model runs/demo [--task addition] [--split test|all] [--json]
    tandem generate --model runs/demo --prompt "What is 12 + 7?"
    tandem chat     --model runs/demo [--multi-turn]  terminal chat, thinking shown dimmed (tandem/cli_chat.py)
    tandem serve    --model runs/demo                 OpenAI-compatible server + web chat on :8000
    tandem inspect  runs/demo [--json]                step, config, parameters, weight fingerprint
    tandem doctor                                     devices, dtypes, backends, versions
    tandem chaos    --preset smoke --out runs/c --faults kill@7,hang@12   faults vs a fault-free twin

sft, rl and pipeline take --supervise [--max-restarts N]: the job runs as a child process that is
restarted (and resumes) after a crash or a hang (tandem/supervisor.py).

Any config field can be overridden with --set section.key=value (repeatable). A user mistake
prints one line starting with "error:" and exits with status 2; a training run that cannot make
progress (resilience.max_rollbacks) prints one such line and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tandem import cli_chat, cli_resilience, cli_rl, cli_serve  # noqa: E402
from tandem.cli_portability import COMMANDS as PORTABILITY_COMMANDS  # noqa: E402
from tandem.cli_portability import add_backend_arg, open_for_command  # noqa: E402
from tandem.cli_portability import add_subcommands as add_portability_subcommands  # noqa: E402
from tandem.errors import TandemError, TrainingFailed  # noqa: E402


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a preset from configs/ (smoke, tiny, ...)")
    parser.add_argument("--config", help="a TOML config file instead of a preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (repeatable), e.g. --set sft.steps=200")
    parser.add_argument("--out", required=True, help="the run folder (rerun into it to resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    cli_resilience.add_supervise_args(parser)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a tandem run folder, checkpoint folder or HF model folder")
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|xpu|mps (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16 (default fp32)")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"reply length limit (default {cli_chat.DEFAULT_NEW_TOKENS}, cut to the room "
                             f"the prompt leaves in the model's context)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pipeline", help="SFT -> eval -> GRPO -> eval -> export + parity gate -> report, on one preset")
    _add_config_args(p)
    p = sub.add_parser("sft", help="supervised fine-tuning (resumes in the same --out)")
    _add_config_args(p)
    p.add_argument("--init", help="start from the newest committed checkpoint of a tandem run (or a checkpoint "
                   "folder) instead of random weights, e.g. to train a finished run longer: its weights and "
                   "tokenizer are taken, the optimizer starts fresh (AdamW moments are not carried over) and "
                   "the schedule (warmup + cosine) spans this run's sft.steps; the model config must match it")
    cli_rl.add_parser(sub)

    p = sub.add_parser("eval", help="accuracy on a task's held-out split")
    _add_model_args(p)
    p.add_argument("--task", action="append", help="task name or .jsonl (default: the run's tasks)")
    p.add_argument("--n", type=int, default=200,
                   help="examples per task, from its held-out split (a .jsonl file holds out its last ~10%% "
                        "of rows; fewer than asked prints a note)")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="test: the held-out split (default); all: every row of a .jsonl task, training rows too")
    p.add_argument("--pass-k", type=int, default=0, help="also report sampled pass@k")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for pass@k")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for several tasks)")
    add_backend_arg(p)

    p = sub.add_parser("generate", help="answer one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    _add_sampling_args(p)
    p.add_argument("--json", action="store_true")
    add_backend_arg(p)

    p = sub.add_parser("chat", help="chat in the terminal (thinking shown dimmed)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--multi-turn", action="store_true",
                   help="send the whole conversation (default: each message on its own, as tandem's "
                        "single-turn tasks train the model)")

    cli_serve.add_parser(sub)

    p = sub.add_parser("inspect", help="step, config, parameters and weight fingerprint of a model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("doctor", help="devices, dtypes, distributed backends and versions here")
    p.add_argument("--json", action="store_true")
    add_portability_subcommands(sub)  # export, parity, preflight
    cli_resilience.add_chaos_parser(sub)
    return parser


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
    return 0


def _eval_tasks(model_path: str, names: list[str] | None):
    """Tasks to evaluate, with the parameters the model was trained with (its run's config.json, or
    an export's tandem_export.json), so `tandem eval` scores the same held-out split as the
    pipeline. Default: the model's tasks (addition for a model tandem did not train)."""
    from pathlib import Path
    from tandem.parity import run_config
    from tandem.tasks import get_task
    data = (run_config(Path(model_path)) or {}).get("data", {})
    params = data.get("task_params", {})
    return [get_task(name, **params.get(name, {})) for name in (names or data.get("tasks") or ["addition"])]


def cmd_eval(args) -> int:
    from tandem.evaluate import evaluate_task
    from tandem.infer.engine import Engine
    from tandem.loading import load_model
    if args.n < 1:
        raise TandemError(f"--n must be >= 1, got {args.n}")
    tasks = _eval_tasks(args.model, args.task)
    if args.backend:
        engine, tokenizer, info = open_for_command(args, args.batch_size)
    else:
        loaded = load_model(args.model, args.device, args.dtype)
        engine, tokenizer, info = Engine(loaded.model, max_batch=args.batch_size), loaded.tokenizer, loaded.info
    results = []
    for task in tasks:
        result = evaluate_task(engine, tokenizer, task, n=args.n, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, pass_k=args.pass_k,
                               temperature=args.temperature, progress=not args.json, split=args.split)
        if result["n"] < args.n:
            print(f"note: {_shortfall(task, args.split, args.n)}", file=sys.stderr)
        result.pop("samples")
        result["model"] = info["path"]
        results.append(result)
        if not args.json:
            extra = f", pass@{args.pass_k} {result[f'pass@{args.pass_k}']:.1%}" if args.pass_k else ""
            print(f"{task.name}: accuracy {result['accuracy']:.1%} format {result['format_rate']:.1%} "
                  f"avg tokens {result['avg_tokens']:.1f}{extra} (n={result['n']})")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    return 0


def _shortfall(task, split: str, asked: int) -> str:
    """Why eval scores fewer examples than --n asked for."""
    from tandem.tasks import JsonlTask
    if split == "all":
        return f"{task.name} has {len(task.rows)} rows, so n={len(task.rows)}, not {asked}"
    have = task.held_out_size()
    if isinstance(task, JsonlTask):
        return (f"{task.name}: scored its held-out split, the last {have} of {len(task.rows)} rows "
                f"(test_fraction {task.params['test_fraction']}), so n={have}, not {asked}; "
                f"--split all scores every row")
    return f"{task.name} with {task.params} holds out only {have} problems, so n={have}, not {asked}"


def _sampling(args, eos_id: int, max_new_tokens: int):
    from tandem.infer.engine import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_token_ids=(eos_id,))


def cmd_generate(args) -> int:
    from tandem.infer.engine import Engine
    from tandem.loading import load_model
    from tandem.reasoning import parse_reasoning
    if args.backend:
        engine, tok, _ = open_for_command(args, 1)
    else:
        loaded = load_model(args.model, args.device, args.dtype)
        engine, tok = Engine(loaded.model, max_batch=1), loaded.tokenizer
    prompt = tok.encode_prompt([{"role": "user", "content": args.prompt}])
    max_new = cli_chat.fit_new_tokens(args.max_new_tokens, len(prompt), engine.max_len)
    generation = engine.generate([prompt], _sampling(args, tok.eos_id, max_new))[0]
    text = tok.decode([t for t in generation.token_ids if t != tok.eos_id])
    parsed = parse_reasoning(text)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "thinking": parsed.thinking,
                          "answer": parsed.answer, "format_ok": parsed.format_ok,
                          "finish_reason": generation.finish_reason, "tokens": len(generation.token_ids)}))
    else:
        print(text)
    return 0


def cmd_inspect(args) -> int:
    from tandem.loading import load_model
    loaded = load_model(args.path)
    info = dict(loaded.info, config=loaded.model.config.to_dict(), vocab_size=loaded.tokenizer.vocab_size)
    info.setdefault("step", None)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"path:        {info['path']}")
        print(f"kind:        {info['kind']} ({info.get('phase', '-')}, step {info['step']})")
        print(f"parameters:  {info['parameters']:,}")
        print(f"fingerprint: {info['fingerprint']}")
        c = info["config"]
        print(f"model:       {c['arch']} {c['num_hidden_layers']}L d{c['hidden_size']} "
              f"h{c['num_attention_heads']}/kv{c['num_key_value_heads']} vocab {c['vocab_size']}")
    return 0


def cmd_doctor(args) -> int:
    import platform
    from importlib import metadata
    from tandem import accel
    report = {"python": platform.python_version(), "threads": accel.set_threads(None), "devices": {}}
    for name in accel.available_devices():
        report["devices"][name] = {"name": accel.device_name(name), "dtypes": accel.supported_dtypes(name),
                                   "dist_backend": accel.dist_backend(name), "memory": accel.memory_stats(name)}
    packages = {}
    for package in ("torch", "transformers", "tokenizers", "safetensors", "fastapi", "gguf", "llama_cpp_python"):
        try:
            packages[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            packages[package] = None
    report["packages"] = dict(packages, **accel.versions())
    report["default_device"] = str(accel.resolve_device("auto"))
    from tandem.infer.backends import available_backends
    report["backends"] = available_backends()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"python {report['python']}, torch threads {report['threads']}, default device {report['default_device']}")
    for name, dev in report["devices"].items():
        print(f"  {name:8s} {dev['name']:24s} dtypes {','.join(dev['dtypes']):14s} backend {dev['dist_backend']}")
    for package, version in report["packages"].items():
        print(f"  {package:18s} {version or 'not installed'}")
    print("inference backends (--backend):")
    for b in report["backends"]:
        runs = ", ".join(b["runs"]) if b["installed"] else f"not installed: {b['install']}"
        print(f"  {b['backend']:9s} {b['version'] or '-':10s} {runs}")
        if "on_this_cpu" in b:
            from tandem.infer.gguf_probe import health_text
            print(f"  {'':20s} on this CPU: {health_text(b['on_this_cpu'])}")
    return 0


COMMANDS = {"pipeline": cmd_pipeline, "sft": cmd_sft, "eval": cmd_eval, "generate": cmd_generate,
            "chat": cli_chat.cmd_chat, "inspect": cmd_inspect, "doctor": cmd_doctor, **PORTABILITY_COMMANDS}
COMMANDS["serve"] = cli_serve.cmd_serve
COMMANDS["rl"] = cli_rl.cmd_rl
COMMANDS["chaos"] = cli_resilience.cmd_chaos


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if cli_resilience.wants_supervisor(args):
            return cli_resilience.run_supervised(args, sys.argv[1:] if argv is None else list(argv))
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


if __name__ == "__main__":
    sys.exit(main())
