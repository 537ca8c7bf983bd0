"""The cross-backend parity gate: does the model answer the same on the target as on the reference?

    tandem parity --model runs/demo --ref torch:cpu:fp32 --target torch:cpu:bf16
    tandem parity --model runs/demo --ref torch:cpu:fp32 --target hf --json
    tandem parity --model runs/demo --ref torch:cpu:fp32 --target llamacpp:q8_0 --threshold kl_mean=0.02

Held-out task prompts (the run's first task unless --task) go through both backends, each with its
own tokenizer. Then:

    prompt_token_match   share of prompts both tokenizers turn into the same ids
    greedy_match         share of prompts whose greedy completions are identical token for token
    logprob_max/mean_abs |log p_ref - log p_target| of the REFERENCE's greedy tokens, the target
                         scoring the reference's sequence (teacher forcing), over all tokens
    kl_mean / kl_max     KL(ref || target) of the full next-token distributions at those positions
    top1_agreement       share of those positions where both argmaxes agree
    accuracy_drop        task accuracy (greedy) on the reference minus on the target
    routing_match        MoE models: share of those positions whose selected expert set is the
                         same on both sides in EVERY MoE layer (routing_layer_match: per layer);
                         where a side cannot show its routing (llama.cpp) it is not judged, and the
                         report says so

and the worst prompt (the diverging one with the largest KL, else the largest KL overall) is shown
with its first diverging token, both sides' log-probabilities of both candidates, and the text
before it. Scoring the reference's tokens on both sides keeps positions aligned even after greedy
paths split, which is what makes per-token comparisons meaningful (the KL is the quantity RL
importance ratios are sensitive to; greedy match and accuracy are what a user sees).

Thresholds. Each metric has a limit; defaults come from the lowest precision on either path
(PROFILES: fp32 < fp16 < bf16 < q8_0; each backend's compute dtype and the stored weights, so a
bf16 export run by transformers in fp32 still gets bf16 limits), tight for fp32 vs fp32, looser
for bf16, and may be overridden per metric. Measured on tandem's tiny models (BENCHMARKS.md), they leave about an
order of magnitude of headroom over honest rounding noise while a single perturbed weight in an
fp32 export fails (routing_match: 99.5% fp32 vs bf16 on a barely trained 4-expert smoke
model, 100% vs fp16 and HF; the limits leave room for near-ties). The command exits 0 on pass and 1 on fail; --json prints the report. When
--model is a run folder the report is also recorded in summary.json ("parity", keyed by pair) and
as a section of report.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from tandem.errors import TandemError

# metric -> "max" (value must be <= limit) or "min" (value must be >= limit)
METRICS = {
    "logprob_max_abs": "max", "logprob_mean_abs": "max", "kl_mean": "max", "kl_max": "max",
    "top1_agreement": "min", "greedy_match": "min", "prompt_token_match": "min", "accuracy_drop": "max",
    "routing_match": "min",
}
PRECISION_ORDER = ("fp32", "fp16", "bf16", "q8_0")
PROFILES = {
    # Same math in fp32 on both sides: only summation order differs (~1e-6 in logprobs).
    "fp32": {"logprob_max_abs": 1e-3, "logprob_mean_abs": 1e-4, "kl_mean": 1e-6, "kl_max": 1e-4,
             "top1_agreement": 0.999, "greedy_match": 0.95, "prompt_token_match": 1.0, "accuracy_drop": 0.02,
             "routing_match": 0.99},
    # fp16 weights/activations (e.g. an f16 GGUF): 10-bit mantissa.
    "fp16": {"logprob_max_abs": 0.25, "logprob_mean_abs": 0.01, "kl_mean": 1e-3, "kl_max": 0.05,
             "top1_agreement": 0.97, "greedy_match": 0.75, "prompt_token_match": 1.0, "accuracy_drop": 0.05,
             "routing_match": 0.95},
    # bf16 end to end: 7-bit mantissa, the usual serving dtype on accelerators.
    "bf16": {"logprob_max_abs": 1.5, "logprob_mean_abs": 0.05, "kl_mean": 0.01, "kl_max": 0.5,
             "top1_agreement": 0.93, "greedy_match": 0.5, "prompt_token_match": 1.0, "accuracy_drop": 0.1,
             "routing_match": 0.9},
    # 8-bit block quantization (GGUF q8_0), activations in f32.
    "q8_0": {"logprob_max_abs": 1.5, "logprob_mean_abs": 0.05, "kl_mean": 0.01, "kl_max": 0.5,
             "top1_agreement": 0.93, "greedy_match": 0.5, "prompt_token_match": 1.0, "accuracy_drop": 0.1,
             "routing_match": 0.9},
}


class ParityError(TandemError):
    """Bad parity arguments (unknown metric, bad threshold value, bad task...)."""


def default_thresholds(ref, target, stored: tuple = ()) -> tuple[str, dict]:
    """(profile name, thresholds) for a pair of BackendSpecs: the profile of the lowest precision
    on either path, counting the compute dtypes and `stored` weight precisions (a bf16 export run
    in fp32 still carries bf16 rounding)."""
    precisions = [ref.precision, target.precision] + [p for p in stored if p in PRECISION_ORDER]
    profile = max(precisions, key=PRECISION_ORDER.index)
    return profile, dict(PROFILES[profile])


def stored_precision(path) -> str | None:
    """Precision of the weights at `path` (run, HF folder or GGUF), None when unknown."""
    path = Path(path)
    try:
        from tandem.export.gguf import is_gguf, read_gguf_metadata
        if is_gguf(path) and not (path / "config.json").is_file():
            return {0: "fp32", 1: "fp16", 7: "q8_0"}.get(read_gguf_metadata(path).get("general.file_type"))
        from tandem.preflight import model_facts
        return model_facts(path)["stored_dtype"]
    except Exception:  # unreadable here: opening the backend reports the real problem
        return None


def parse_thresholds(items: list[str] | dict | None) -> dict:
    """['kl_mean=0.01', ...] -> {'kl_mean': 0.01}; ParityError naming the metrics otherwise."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ParityError(f"bad --threshold '{item}'; write METRIC=VALUE, e.g. kl_mean=0.01")
            pairs.append((key.strip(), value.strip()))
    out = {}
    for key, value in pairs:
        if key not in METRICS:
            raise ParityError(f"unknown parity metric '{key}'; metrics: {', '.join(METRICS)}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ParityError(f"threshold {key}={value!r} is not a number") from None
        if not math.isfinite(out[key]) or out[key] < 0:
            raise ParityError(f"threshold {key}={value!r} must be a finite number >= 0")
    return out


# -----------------------------------------------------------------------------------------------
# Which task and settings a model implies


def run_config(path: Path) -> dict | None:
    """The config of the run `path` belongs to, or the tasks (and eval length) an export remembers
    in its tandem_export.json; None for a model tandem did not train."""
    for candidate in (path, *path.parents):
        config = candidate / "config.json"
        if config.is_file() and (candidate / "checkpoints").is_dir():
            return json.loads(config.read_text())
    provenance = (path if path.is_dir() else path.parent) / "tandem_export.json"   # a folder or its .gguf
    if provenance.is_file():
        data = json.loads(provenance.read_text())
        if data.get("tasks"):
            out = {"data": {"tasks": data["tasks"], "task_params": data.get("task_params", {})}}
            if data.get("max_new_tokens"):
                out["eval"] = {"max_new_tokens": data["max_new_tokens"]}
            return out
    return None


def resolve_task(model_path, name: str | None = None):
    """The Task to test on: `name` (params from the run's config if it has them), else the run's
    first task, else addition."""
    from tandem.tasks import get_task
    config = run_config(Path(model_path)) or {}
    data = config.get("data", {})
    name = name or (data.get("tasks") or ["addition"])[0]
    return get_task(name, **data.get("task_params", {}).get(name, {}))


def default_max_new_tokens(model_path) -> int:
    config = run_config(Path(model_path)) or {}
    return int(config.get("eval", {}).get("max_new_tokens", 128))


# -----------------------------------------------------------------------------------------------
# The comparison


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(ref_backend, target_backend, examples, task, max_new_tokens: int, progress: bool = False) -> dict:
    """All metrics for `examples` (Task examples) on two open backends, plus the worst prompt."""
    from tandem.infer.backends import chat_prompt_text
    from tandem.infer.engine import SamplingParams
    from tandem.progress import log
    texts = [chat_prompt_text([{"role": "user", "content": e.prompt}]) for e in examples]
    ref_prompts = [ref_backend.encode(t) for t in texts]
    tgt_prompts = [target_backend.encode(t) for t in texts]

    def greedy(backend):
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_token_ids=(backend.eos_id,), logprobs=True)

    t0 = time.perf_counter()
    ref_out = ref_backend.generate(ref_prompts, greedy(ref_backend))
    t1 = time.perf_counter()
    tgt_out = target_backend.generate(tgt_prompts, greedy(target_backend))
    t2 = time.perf_counter()
    if progress:
        log(f"parity: generated {len(texts)} prompts on both sides ({t1 - t0:.1f}s ref, {t2 - t1:.1f}s target)")
    completions = [o.token_ids for o in ref_out]
    ref_rows = ref_backend.next_token_logprobs(ref_prompts, completions)
    tgt_rows = target_backend.next_token_logprobs(ref_prompts, completions)
    t3 = time.perf_counter()

    diffs, kls, top1 = [], [], []
    per_prompt = []
    for i, (r, t, toks) in enumerate(zip(ref_rows, tgt_rows, completions)):
        if r.shape != t.shape:
            raise ParityError(f"backends disagree on the vocabulary: {r.shape[-1]} vs {t.shape[-1]} logits")
        index = torch.tensor(toks, dtype=torch.long).view(-1, 1)
        d = (r.gather(1, index) - t.gather(1, index)).abs().view(-1)
        kl = (r.exp() * (r - t)).sum(-1).clamp_min(0.0)
        kl = torch.nan_to_num(kl, nan=float("inf"))
        agree = (r.argmax(-1) == t.argmax(-1)).float()
        diffs.append(d), kls.append(kl), top1.append(agree)
        per_prompt.append({"index": i, "kl_max": float(kl.max()) if kl.numel() else 0.0,
                           "kl_argmax": int(kl.argmax()) if kl.numel() else 0,
                           "diverge": _first_divergence(completions[i], tgt_out[i].token_ids)})
    d, kl, agree = torch.cat(diffs), torch.cat(kls), torch.cat(top1)
    ref_correct = [task.reward(o.text, e).correct for o, e in zip(ref_out, examples)]
    tgt_correct = [task.reward(o.text, e).correct for o, e in zip(tgt_out, examples)]
    n = len(examples)
    metrics = {
        "logprob_max_abs": float(d.max()), "logprob_mean_abs": float(d.mean()),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "top1_agreement": float(agree.mean()),
        "greedy_match": sum(p["diverge"] is None for p in per_prompt) / n,
        "prompt_token_match": sum(a == b for a, b in zip(ref_prompts, tgt_prompts)) / n,
        "accuracy_ref": sum(ref_correct) / n, "accuracy_target": sum(tgt_correct) / n,
    }
    metrics["accuracy_drop"] = metrics["accuracy_ref"] - metrics["accuracy_target"]
    routing = compare_routing(ref_backend, target_backend, ref_prompts, completions)
    metrics.update(routing)

    diverging = [p for p in per_prompt if p["diverge"] is not None]
    worst = max(diverging or per_prompt, key=lambda p: p["kl_max"])
    i = worst["index"]
    j = worst["diverge"] if worst["diverge"] is not None else worst["kl_argmax"]
    ref_toks, tgt_toks = completions[i], tgt_out[i].token_ids
    detail = {"index": i, "prompt": examples[i].prompt, "reference_answer": examples[i].answer,
              "ref_completion": ref_out[i].text, "target_completion": tgt_out[i].text,
              "diverges": worst["diverge"] is not None, "position": j, "kl_max": worst["kl_max"],
              "context": ref_backend.decode(ref_toks[:j])[-80:]}
    if j < len(ref_toks):
        a = ref_toks[j]
        detail["ref_token"] = {"id": a, "text": ref_backend.decode([a]),
                               "logprob_ref": float(ref_rows[i][j, a]), "logprob_target": float(tgt_rows[i][j, a])}
        if worst["diverge"] is not None and j < len(tgt_toks):
            b = tgt_toks[j]
            detail["target_token"] = {"id": b, "text": ref_backend.decode([b]),
                                      "logprob_ref": float(ref_rows[i][j, b]),
                                      "logprob_target": float(tgt_rows[i][j, b])}
    ref_tokens = sum(len(o.token_ids) for o in ref_out)
    tgt_tokens = sum(len(o.token_ids) for o in tgt_out)
    timing = {"ref_generate_s": t1 - t0, "target_generate_s": t2 - t1, "score_s": t3 - t2,
              "ref_tokens_per_s": ref_tokens / max(t1 - t0, 1e-9),
              "target_tokens_per_s": tgt_tokens / max(t2 - t1, 1e-9)}
    return {"metrics": metrics, "tokens": int(d.numel()), "worst": detail, "timing": timing}


def compare_routing(ref_backend, target_backend, prompts, completions) -> dict:
    """{routing_match, routing_layer_match} over the scored positions (module doc); {} for a dense
    model; {routing_note} when only one side can show its routing."""
    ref = ref_backend.routing(prompts, completions)
    if ref is None:
        return {}
    target = target_backend.routing(prompts, completions)
    if target is None:
        return {"routing_note": f"{target_backend.describe()} does not expose its expert choice: routing not judged"}
    same = [(a == b).all(-1) for a, b in zip(ref, target) if len(a)]     # [tokens, MoE layers] per sequence
    if any(a.shape != b.shape for a, b in zip(ref, target)):
        raise ParityError("the two sides have different MoE shapes (layers or experts per token): not the same model")
    same = torch.cat(same).float() if same else torch.ones(0, ref[0].shape[1])
    return {"routing_match": float(same.min(-1).values.mean()) if len(same) else 1.0,
            "routing_layer_match": [float(x) for x in same.mean(0)] if len(same) else []}


def evaluate(metrics: dict, thresholds: dict) -> list[str]:
    """The failed checks, as 'metric value > limit' strings (empty = pass). A metric the pair cannot
    have (routing on a dense model, or on a backend that hides it) is not judged."""
    failures = []
    for name, limit in thresholds.items():
        if name not in metrics:
            continue
        value = metrics[name]
        if METRICS[name] == "max" and not value <= limit:
            failures.append(f"{name} {value:.3g} > {limit:.3g}")
        elif METRICS[name] == "min" and not value >= limit:
            failures.append(f"{name} {value:.3g} < {limit:.3g}")
    return failures


def run_parity(model, ref, target, target_model=None, task: str | None = None, n: int = 32,
               max_new_tokens: int | None = None, thresholds=None, progress: bool = True,
               record: bool = False, seed: int = 0) -> dict:
    """Open both backends on the model (the target on `target_model` if given), compare, judge.

    Returns the JSON-able report: ref, target, task, n, tokens, metrics, thresholds, profile,
    failures, passed, worst, timing.
    """
    from tandem.infer.backends import open_backend, parse_backend
    from tandem.progress import log
    if not isinstance(n, int) or n < 1:
        raise ParityError(f"--n must be an integer >= 1, got {n!r}")
    ref_spec, target_spec = parse_backend(ref), parse_backend(target)
    stored = (stored_precision(model), stored_precision(target_model or model))
    profile, limits = default_thresholds(ref_spec, target_spec, stored)
    limits.update(parse_thresholds(thresholds))
    task_obj = resolve_task(model, task)
    examples = task_obj.test_set(n)
    max_new_tokens = max_new_tokens or default_max_new_tokens(model)
    started = time.perf_counter()
    if progress:
        log(f"parity: {ref_spec} vs {target_spec} on {len(examples)} held-out {task_obj.name} prompts")
    with open_backend(ref_spec, model, seed=seed) as ref_backend, \
            open_backend(target_spec, target_model or model, seed=seed) as target_backend:
        result = compare(ref_backend, target_backend, examples, task_obj, max_new_tokens, progress)
    failures = evaluate(result["metrics"], limits)
    report = {"ref": str(ref_spec), "target": str(target_spec), "model": str(model),
              "target_model": str(target_model or model), "task": task_obj.name, "n": len(examples),
              "max_new_tokens": max_new_tokens, "profile": profile, "thresholds": limits,
              "failures": failures, "passed": not failures, "seconds": time.perf_counter() - started, **result}
    if record:
        from tandem.loading import run_folder
        run_dir = run_folder(Path(model))
        if run_dir is not None:
            record_parity(run_dir, report)
    return report


# -----------------------------------------------------------------------------------------------
# Output: terminal text, markdown, run summary


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


_LABELS = {"logprob_max_abs": "logprob abs diff, max", "logprob_mean_abs": "logprob abs diff, mean",
           "kl_mean": "KL(ref, target), mean", "kl_max": "KL(ref, target), max",
           "top1_agreement": "top-1 agreement", "greedy_match": "greedy sequence match",
           "prompt_token_match": "prompt token match", "accuracy_drop": "accuracy drop (ref - target)",
           "routing_match": "same experts, every MoE layer"}


def _routing_line(metrics: dict) -> str | None:
    if "routing_layer_match" in metrics:
        return ("same expert set per MoE layer: "
                + ", ".join(f"{share:.1%}" for share in metrics["routing_layer_match"]))
    return metrics.get("routing_note")


def _worst_line(report: dict) -> str:
    w = report["worst"]
    head = f"worst prompt #{w['index']} {w['prompt']!r}"
    if not w["diverges"]:
        return f"{head}: greedy outputs identical (largest KL {_fmt(w['kl_max'])} at token {w['position']})"
    line = f"{head}: first divergence at completion token {w['position']}"
    if "ref_token" in w and "target_token" in w:
        a, b = w["ref_token"], w["target_token"]
        line += (f": reference {a['text']!r} (log p {a['logprob_ref']:.3f} ref / {a['logprob_target']:.3f} target) "
                 f"vs target {b['text']!r} (log p {b['logprob_ref']:.3f} ref / {b['logprob_target']:.3f} target)")
    elif "ref_token" in w:
        line += f": the target stopped where the reference continued with {w['ref_token']['text']!r}"
    else:
        line += ": the reference stopped where the target continued"
    return line + f", after {w['context']!r}"


def format_text(report: dict) -> str:
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [f"parity {report['ref']} vs {report['target']}: task {report['task']}, {report['n']} prompts, "
             f"{report['tokens']} scored tokens: {verdict} ({report['profile']} thresholds)"]
    m, limits = report["metrics"], report["thresholds"]
    for name in METRICS:
        if name in limits and name in m:
            op = "<=" if METRICS[name] == "max" else ">="
            ok = "ok" if not any(f.startswith(name + " ") for f in report["failures"]) else "FAIL"
            lines.append(f"  {_LABELS[name]:30s} {_fmt(m[name]):>10s}  {op} {_fmt(limits[name]):<8s} {ok}")
    lines.append(f"  {'task accuracy':30s} ref {m['accuracy_ref']:.1%}, target {m['accuracy_target']:.1%}")
    if _routing_line(m):
        lines.append("  " + _routing_line(m))
    lines.append("  " + _worst_line(report))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    verdict = "**PASS**" if report["passed"] else "**FAIL**"
    m, limits = report["metrics"], report["thresholds"]
    lines = [f"## Parity: `{report['ref']}` vs `{report['target']}`", "",
             f"{verdict} on {report['n']} held-out `{report['task']}` prompts ({report['tokens']} scored tokens, "
             f"`{report['profile']}` thresholds). Task accuracy: reference {m['accuracy_ref']:.1%}, "
             f"target {m['accuracy_target']:.1%}.", "",
             "| metric | value | threshold | |", "|---|---:|---:|---|"]
    for name in METRICS:
        if name in limits and name in m:
            op = "≤" if METRICS[name] == "max" else "≥"
            ok = "fail" if any(f.startswith(name + " ") for f in report["failures"]) else "ok"
            lines.append(f"| {_LABELS[name]} | {_fmt(m[name])} | {op} {_fmt(limits[name])} | {ok} |")
    lines += [""] + ([_routing_line(m) + ".", ""] if _routing_line(m) else []) + [_worst_line(report) + "."]
    return "\n".join(lines)


def record_parity(run_dir: str | Path, report: dict) -> None:
    """summary.json["parity"][REF vs TARGET] = report, a report.md section, report re-rendered."""
    from tandem.runs import read_summary, update_summary
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    key = f"{report['ref']} vs {report['target']}"
    parity = dict(summary.get("parity", {}), **{key: report})
    heading = f"## Parity: `{report['ref']}` vs `{report['target']}`"
    sections = [s for s in summary.get("report_sections", []) if not s.startswith(heading)]
    sections.append(markdown(report))
    update_summary(run_dir, parity=parity, report_sections=sections)
    if (run_dir / "config.json").is_file():
        from tandem.report import write_report
        write_report(run_dir)
