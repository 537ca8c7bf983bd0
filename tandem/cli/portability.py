"""The portability subcommands of `tandem`: export, parity, preflight (registered by tandem/cli/__init__.py).

    tandem export    --model runs/demo --format hf|gguf --out DIR [--force] [--gate torch:cpu:fp32]
    tandem parity    --model runs/demo --ref torch:cpu:fp32 --target hf [--task T] [--n N] [--json]
    tandem preflight --model runs/demo --target vllm-ascend [--dtype bf16] [--tp 2] [--json]

Exit status: 0 success / pass, 1 a parity or preflight failure (or an export refused by its gate),
2 a user mistake (one line starting with "error:").
"""

from __future__ import annotations

import argparse
import json
import sys


def add_subcommands(sub) -> None:
    p = sub.add_parser("export", help="write the model as an HF folder or a GGUF file (atomic, optionally gated)")
    p.add_argument("--model", required=True, help="a tandem run, checkpoint or HF model folder")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf")
    p.add_argument("--out", required=True, help="the export folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (after the new export is complete)")
    p.add_argument("--dtype", default="auto", help="HF weights dtype: auto (as trained) | fp32 | bf16 | fp16")
    p.add_argument("--max-shard-size", default="5GB", help="HF: split weights into shards above this size (e.g. 500MB)")
    p.add_argument("--gguf-type", default="f16", choices=("f32", "f16", "q8_0"), help="GGUF: tensor type")
    p.add_argument("--gate", metavar="REF", help="refuse to publish unless the export passes `tandem parity` "
                                                 "against the model on REF (e.g. torch:cpu:fp32)")
    p.add_argument("--gate-target", metavar="BACKEND", help="backend that runs the export in the gate "
                                                            "(default hf for HF, llamacpp for GGUF)")
    p.add_argument("--task", help="gate task (default: the run's first task)")
    p.add_argument("--n", type=int, default=32, help="gate prompts")
    p.add_argument("--threshold", action="append", default=[], metavar="METRIC=VALUE", help="override a gate threshold")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("parity", help="compare a model on two backends; exit 1 if it fails the thresholds")
    p.add_argument("--model", required=True, help="a tandem run, checkpoint, HF folder (or .gguf for llamacpp)")
    p.add_argument("--ref", default="torch:cpu:fp32", help="reference backend (default torch:cpu:fp32)")
    p.add_argument("--target", required=True, help="target backend, e.g. torch:cpu:bf16, hf, llamacpp:q8_0")
    p.add_argument("--target-model", help="run the target on this path instead (e.g. an export of --model)")
    p.add_argument("--task", help="task name or .jsonl (default: the run's first task)")
    p.add_argument("--n", type=int, default=32, help="held-out prompts (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    p.add_argument("--threshold", action="append", default=[], metavar="METRIC=VALUE",
                   help="override a threshold, e.g. kl_mean=0.02 (repeatable)")
    p.add_argument("--no-record", action="store_true", help="do not write the result into the run's summary/report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("preflight", help="check a model against a serving target's documented support")
    p.add_argument("--model", required=True, help="a tandem run, checkpoint or HF model folder")
    p.add_argument("--target", required=True, help="a target from tandem/preflight_targets.toml, e.g. vllm, "
                                                    "vllm-ascend, mindie, llamacpp, cpu")
    p.add_argument("--dtype", help="dtype to serve in (default: the target's usual one)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check divisibility for")
    p.add_argument("--json", action="store_true")


def cmd_export(args) -> int:
    from tandem.publish import GateFailure, export_model
    from tandem.parity import format_text, parse_thresholds
    thresholds = parse_thresholds(args.threshold)
    if args.threshold and not args.gate:
        from tandem.errors import TandemError
        raise TandemError("--threshold applies to the gate; add --gate REF (e.g. --gate torch:cpu:fp32)")
    try:
        result = export_model(args.model, args.out, fmt=args.format, force=args.force, dtype=args.dtype,
                              max_shard_size=args.max_shard_size, gguf_type=args.gguf_type, gate=args.gate,
                              gate_target=args.gate_target, gate_task=args.task, gate_n=args.n,
                              thresholds=thresholds, progress=not args.json)
    except GateFailure as exc:
        if args.json:
            print(json.dumps({"published": False, "error": str(exc), "gate": exc.report}))
        else:
            print(format_text(exc.report))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(result, published=True)))
    else:
        gate = result.get("gate")
        extra = f", gate {gate['ref']} vs {gate['target']}: PASS" if gate else ""
        print(f"exported {result['format']} -> {result['out']}{extra}")
    return 0


def cmd_parity(args) -> int:
    from tandem.parity import format_text, run_parity
    report = run_parity(args.model, args.ref, args.target, target_model=args.target_model, task=args.task,
                        n=args.n, max_new_tokens=args.max_new_tokens, thresholds=args.threshold,
                        progress=not args.json, record=not args.no_record)
    print(json.dumps(report) if args.json else format_text(report))
    return 0 if report["passed"] else 1


def cmd_preflight(args) -> int:
    from tandem.preflight import format_text, preflight
    report = preflight(args.model, args.target, dtype=args.dtype, tp=args.tp)
    print(json.dumps(report) if args.json else format_text(report))
    return 0 if report["ok"] else 1


COMMANDS = {"export": cmd_export, "parity": cmd_parity, "preflight": cmd_preflight}


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", help="run on this backend instead of --device/--dtype: "
                                          "torch:DEVICE[:DTYPE], hf[:DEVICE[:DTYPE]] or llamacpp[:f32|f16|q8_0]")


def open_for_command(args, max_batch: int):
    """(engine-like backend, tokenizer-like, info) for eval/generate/chat given --backend.

    The backend's generate() takes token-id prompts and returns objects with .token_ids and
    .finish_reason, like Engine.generate; the returned tokenizer encodes prompts and decodes
    completions with the backend's own tokenizer.
    """
    from tandem.infer.backends import open_backend
    backend = open_backend(args.backend, args.model, max_batch=max_batch)
    return backend, _BackendTokenizer(backend), {"path": str(args.model), "backend": str(backend.spec)}


class _BackendTokenizer:
    """The slice of ChatTokenizer that eval/generate use, served by a backend's own tokenizer."""

    def __init__(self, backend):
        self.backend = backend
        self.eos_id = backend.eos_id

    def encode_prompt(self, messages):
        return self.backend.encode_prompt(messages)

    def decode(self, ids, skip_special: bool = True):
        return self.backend.decode(ids)
