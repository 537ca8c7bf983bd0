"""The model subcommands of `tandem` (parsers in tandem/cli/__init__.py): eval, generate, inspect, doctor.

    tandem eval     --model runs/demo [--task addition] [--split test|validation|all] [--json]
    tandem generate --model runs/demo --prompt "What is 12 + 7?"
    tandem inspect  runs/demo [--json]                step, config, parameters, weight fingerprint
    tandem doctor                                     devices, dtypes, backends, versions
"""

from __future__ import annotations

import json
import sys

from tandem.cli import chat
from tandem.cli.portability import open_for_command
from tandem.errors import TandemError


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
    max_new = chat.fit_new_tokens(args.max_new_tokens, len(prompt), engine.max_len)
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
