"""Parity across backends: how differently does the same trained model answer on each runtime?

The reference is the model on tandem's engine in fp32 on CPU (`torch:cpu:fp32`). Each target runs
the same held-out task prompts through `tandem.parity.run_parity` (its own tokenizer, greedy
decoding), then scores the reference's greedy tokens; the table reports the metrics the gate
checks (see tandem/parity.py), task accuracy on both sides, and the gate's verdict under the
default thresholds of the pair. Targets:

    torch:cpu:bf16   the same engine in bf16 (what an accelerator serves in)
    torch:cpu:fp16   the same engine in fp16
    hf:cpu:fp32      transformers on the HF export (the export gate)
    llamacpp:f16 / llamacpp:q8_0   llama.cpp on the GGUF export, when llama-cpp-python is installed

    .venv/bin/python benchmarks/bench_parity.py --model runs/demo --write   # a `--preset tiny` run
    .venv/bin/python benchmarks/bench_parity.py                             # trains a smoke run first (~20 s)
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, table, write_section  # noqa: E402

TARGETS = ["torch:cpu:bf16", "torch:cpu:fp16", "hf:cpu:fp32"]
GGUF_TARGETS = ["llamacpp:f16", "llamacpp:q8_0"]


def smoke_run(folder: Path) -> Path:
    out = folder / "smoke"
    subprocess.run([sys.executable, "-m", "tandem.cli", "pipeline", "--preset", "smoke", "--out", str(out),
                    "--quiet", "--set", "sft.steps=150", "--set", "export.formats=[]"], check=True, cwd=ROOT)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a trained run (default: train a smoke run in a temp folder)")
    parser.add_argument("--n", type=int, default=64, help="held-out prompts per target")
    parser.add_argument("--task", action="append", help="task(s) to test (default: every task of the run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update the bench_parity section of BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch
    from tandem.parity import _run_config, run_parity
    torch.set_num_threads(args.threads)
    tmp = None
    model = Path(args.model) if args.model else None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-parity-")
        model = smoke_run(Path(tmp.name))
    targets = list(TARGETS)
    if importlib.util.find_spec("llama_cpp") is not None:
        targets += GGUF_TARGETS
    skipped = [] if len(targets) > len(TARGETS) else GGUF_TARGETS

    tasks = args.task or (_run_config(model) or {}).get("data", {}).get("tasks") or ["addition"]
    rows, reports = [], []
    for task in tasks:
        for target in targets:
            report = run_parity(model, "torch:cpu:fp32", target, task=task, n=args.n, progress=True)
            reports.append(report)
            rows.append(_row(report))
            print(f"{task} {target}: {'pass' if report['passed'] else 'FAIL ' + '; '.join(report['failures'])}",
                  flush=True)
    headers = ["task", "target (ref `torch:cpu:fp32`)", "thresholds", "scored tokens", "logprob diff max",
               "logprob diff mean", "KL mean", "KL max", "top-1 agree", "greedy match", "acc ref", "acc target",
               "gate", "target tok/s"]
    first = reports[0]
    from tandem.loading import load_weights
    config, _, _, info = load_weights(model)
    preset = (_run_config(model) or {}).get("preset")
    what = f"preset {preset}, " if preset else ""
    if info.get("step") is not None:
        what += f"{info['kind']} {info.get('phase') or ''} checkpoint step {info['step']}, "
    body = table(headers, rows)
    body += (f"\n\nModel `{model.name}` ({what}{config.num_parameters():,} parameters), {first['n']} held-out "
             f"prompts per task, greedy, up to {first['max_new_tokens']} new tokens; {environment(args.threads)}. "
             "The logprob/KL columns compare the reference's greedy tokens scored by both sides (teacher "
             "forcing); greedy match is whole sequences. Gate thresholds are the defaults of "
             "`tandem/parity.py` for the pair's lowest precision; "
             "tokens/s are for the parity run (one prompt at a time for hf), not a throughput benchmark.")
    if skipped:
        body += f" Not measured here: {', '.join(skipped)} (llama-cpp-python is not installed)."
    diverged = [r for r in reports if r["worst"].get("diverges") and "target_token" in r["worst"]]
    if diverged:
        r = max(diverged, key=lambda r: r["metrics"]["kl_max"])
        w = r["worst"]
        body += (f"\n\nLargest divergence ({r['task']}, {r['target']}): prompt {w['prompt']!r}, completion "
                 f"token {w['position']}: reference {w['ref_token']['text']!r} "
                 f"(log p {w['ref_token']['logprob_ref']:.3f}) vs target {w['target_token']['text']!r} "
                 f"(log p {w['target_token']['logprob_ref']:.3f} under the reference), after {w['context'][-40:]!r}.")
    else:
        body += "\n\nNo greedy sequence diverged on any target."
    print(body)
    if args.write:
        write_section("bench_parity", "Parity across backends (`bench_parity.py`)", body)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _row(report: dict) -> list:
    m, t = report["metrics"], report["timing"]
    return [report["task"], f"`{report['target']}`", report["profile"], report["tokens"],
            f"{m['logprob_max_abs']:.2g}", f"{m['logprob_mean_abs']:.2g}", f"{m['kl_mean']:.2g}",
            f"{m['kl_max']:.2g}", f"{m['top1_agreement']:.1%}", f"{m['greedy_match']:.1%}",
            f"{m['accuracy_ref']:.1%}", f"{m['accuracy_target']:.1%}",
            "pass" if report["passed"] else "**FAIL**", f"{t['target_tokens_per_s']:.0f}"]


if __name__ == "__main__":
    sys.exit(main())
