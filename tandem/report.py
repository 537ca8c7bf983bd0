"""report.md and its plots, written from a run folder's metrics.jsonl and summary.json.

    python -m tandem.cli report runs/demo     (the pipeline calls write_report at its end)
"""

from __future__ import annotations

import json
from pathlib import Path

from tandem.ledger import Ledger
from tandem.peak import describe_mfu
from tandem.runs import read_metrics, read_summary


def plot_series(run_dir: Path, phase: str, key: str, filename: str, title: str) -> str | None:
    records = [r for r in read_metrics(run_dir, phase) if key in r]
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([r["step"] for r in records], [r[key] for r in records], color="#2b6cb0")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plots = Path(run_dir) / "plots"
    plots.mkdir(exist_ok=True)
    fig.savefig(plots / filename)
    plt.close(fig)
    return f"plots/{filename}"


def accuracy_table(evals: dict) -> list[str]:
    lines = ["| stage | task | n | accuracy | format rate | avg tokens |", "|---|---|---:|---:|---:|---:|"]
    for stage, by_task in evals.items():
        for task, r in by_task.items():
            lines.append(f"| {stage} | {task} | {r['n']} | {r['accuracy']:.1%} | {r['format_rate']:.1%} | "
                         f"{r.get('avg_tokens', 0):.1f} |")
    return lines


RL_PLOTS = (("reward", "rl_reward.png", "GRPO reward per step"),
            ("accuracy", "rl_accuracy.png", "GRPO rollout accuracy (sampled, per step)"),
            ("response_length", "rl_length.png", "GRPO mean response length (tokens)"),
            ("mismatch", "rl_mismatch.png", "trainer vs rollout mismatch, mean |delta logprob|"))


def _rl_summary(rl: dict) -> str:
    roll = rl.get("rollout") or {}
    where = "colocated in the trainer" if roll.get("colocated") else f"{roll.get('workers')} worker process(es)"
    faults = ", ".join(f"{k} {v}" for k, v in (rl.get("worker_faults") or {}).items() if v) or "none"
    return (f"{rl['steps']} steps in {rl['mode']} mode: trainer on `{rl['device']}` ({rl['dtype']}), rollouts on "
            f"`{roll.get('device')}` ({roll.get('dtype')}), {where}; {rl.get('samples_per_s') or 0:,.1f} samples/s. "
            f"Weight sync: {rl['push_bytes'] / 1e6:,.2f} MB per push, {rl['sync_seconds']:.1f} s on the "
            f"trainer in all. Reward errors: {rl['reward_errors']}. Worker faults: {faults}."
            f"{_mfu(rl, 'Policy update')}")


def _mfu(stage: dict, what: str) -> str:
    """' SFT MFU: 41.0% of the fp32 / 12.0% of the bf16 matmul peak measured in this run.' (empty for
    runs from before MFU was recorded)."""
    text = describe_mfu(stage.get("mfu"))
    return "" if text == "n/a" else f" {what} MFU: {text} measured in this run (tandem/peak.py)."


def plot_expert_load(run_dir: Path, phase: str) -> tuple[str, list[float]] | None:
    """A heatmap of each MoE layer's share of tokens per routed expert, summed over the phase's
    logged steps (metrics.jsonl "expert_load"), and the imbalance (max/mean) per layer of that sum;
    None for a dense model."""
    loads = [r["expert_load"] for r in read_metrics(run_dir, phase) if r.get("expert_load")]
    if not loads:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    total = [[sum(step[layer][e] for step in loads) for e in range(len(loads[0][layer]))]
             for layer in range(len(loads[0]))]
    shares = [[count / (sum(layer) or 1) for count in layer] for layer in total]
    imbalance = [max(layer) * len(layer) / sum(layer) if sum(layer) else float("nan") for layer in total]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(shares)), dpi=100)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{phase.upper()} expert load (share of routed tokens, {len(loads)} logged steps)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    plots = Path(run_dir) / "plots"
    plots.mkdir(exist_ok=True)
    fig.savefig(plots / f"{phase}_expert_load.png")
    plt.close(fig)
    return f"plots/{phase}_expert_load.png", imbalance


def expert_lines(run_dir: Path, phase: str) -> list[str]:
    """report.md lines on expert balance for one phase (none for a dense model)."""
    plotted = plot_expert_load(run_dir, phase)
    if plotted is None:
        return []
    heatmap, imbalance = plotted
    lines = [f"Expert load, max/mean over the routed experts of each MoE layer (1.00 = even), summed over the "
             f"logged steps: {', '.join(f'{value:.2f}' for value in imbalance)}.", "", f"![expert load]({heatmap})", ""]
    curve = plot_series(run_dir, phase, "expert_imbalance", f"{phase}_expert_imbalance.png",
                        "expert imbalance per logged step (max/mean, worst layer)")
    return lines + ([f"![expert imbalance]({curve})", ""] if curve else [])


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    lines = [f"# tandem run `{run_dir.name}`", ""]
    lines += [f"Preset `{config.get('preset') or 'custom'}`, {summary.get('parameters', 0):,} parameters, "
              f"tasks: {', '.join(config['data']['tasks'])}.", ""]
    if summary.get("evals"):
        lines += ["## Held-out accuracy (greedy pass@1)", ""] + accuracy_table(summary["evals"]) + [""]
    sft = summary.get("sft")
    if sft:
        lines += ["## SFT", "", f"{sft['steps']} steps on `{sft['device']}`, "
                  f"{sft['tokens_per_s'] or 0:,.0f} tokens/s, {sft['seconds']:.1f} s of compute "
                  f"({sft.get('dtype', 'fp32')}).{_mfu(sft, 'SFT')}", ""]
        plot = plot_series(run_dir, "sft", "loss", "sft_loss.png", "SFT loss (assistant tokens)")
        if plot:
            lines += [f"![SFT loss]({plot})", ""]
        lines += expert_lines(run_dir, "sft")
    rl = summary.get("rl")
    if rl:
        lines += ["## GRPO", "", _rl_summary(rl), ""]
        for key, filename, title in RL_PLOTS:
            plot = plot_series(run_dir, "rl", key, filename, title)
            if plot:
                lines += [f"![{title}]({plot})", ""]
        lines += expert_lines(run_dir, "rl")
    if summary.get("ledger"):
        lines += ["## Compute ledger", "", Ledger.from_dict(summary["ledger"]).markdown(), ""]
    samples = summary.get("samples", {})
    if samples:
        lines += ["## Sample answers", ""]
        for task, items in samples.items():
            for item in items:
                mark = "correct" if item["correct"] else f"wrong (reference {item['reference']})"
                lines += [f"**{task}** — {item['prompt']} — {mark}", "", "```", item["completion"], "```", ""]
    for extra in summary.get("report_sections", []):
        lines += [extra, ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
