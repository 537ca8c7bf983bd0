"""The model card (README.md) of an HF export: the evidence travels with the weights.

The Hugging Face Hub renders README.md with its YAML front matter (library_name, pipeline_tag,
tags). The body says where the weights come from (run, step, fingerprint), how they were trained
(steps, tokens, timings: summary.json's sft / rl), the compute ledger, the held-out accuracies and
the parity gate this very export passed against the trained model (when it was gated): why this
model can be trusted on the backend it was checked on. Figures are copied from the run's
summary.json at export time; a model that is not a tandem run (an HF folder, a bare checkpoint)
gets the provenance and gate parts only.
"""

from __future__ import annotations

import json

from tandem.ledger import Ledger
from tandem.report import accuracy_table

CARD = "README.md"


def _front_matter(provenance: dict, arch: str) -> list[str]:
    tags = ["tandem", arch, "reasoning", "chatml", *provenance.get("tasks", [])]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(str(tag))}" for tag in dict.fromkeys(tags)]   # JSON strings are YAML strings
    return lines + ["---", ""]


def _training(summary: dict) -> list[str]:
    lines = ["| phase | steps | device | compute seconds | tokens | throughput |", "|---|---:|---|---:|---:|---:|"]
    sft, rl = summary.get("sft"), summary.get("rl")
    if sft:
        start = f", from `{sft['init']['path']}`" if sft.get("init") else ""
        lines.append(f"| SFT{start} | {sft['steps']} | `{sft['device']}` | {sft['seconds']:.1f} | {sft['tokens']:,} | "
                     f"{sft.get('tokens_per_s') or 0:,.0f} tokens/s |")
    if rl:
        lines.append(f"| GRPO ({rl['mode']}, {rl['dtype']}) | {rl['steps']} | `{rl['device']}` | {rl['seconds']:.1f} | "
                     f"{rl['samples']:,} samples | {rl.get('samples_per_s') or 0:,.1f} samples/s |")
    return lines if sft or rl else []


def model_card(provenance: dict, arch: str, parameters: int, summary: dict, gate_text: str | None) -> str:
    """README.md for an HF export. provenance: tandem_export.json's content; summary: the source
    run's summary.json ({} when the source is not a run); gate_text: tandem parity's report of the gate
    as markdown (parity.markdown), None when the export was not gated."""
    lines = _front_matter(provenance, arch)
    lines += ["# tandem model", "",
              f"A {parameters:,}-parameter `{arch}` decoder trained with tandem (SFT, then GRPO where listed), "
              f"exported from `{provenance.get('source')}` ({provenance.get('phase') or provenance.get('source_kind')}, "
              f"step {provenance.get('step')}) in {provenance.get('dtype')}. Weight fingerprint "
              f"`{provenance.get('fingerprint')}`; provenance in `tandem_export.json`.", ""]
    if provenance.get("tasks"):
        lines += [f"Tasks: {', '.join(provenance['tasks'])}; parameters "
                  f"`{json.dumps(provenance.get('task_params', {}))}`.", ""]
    training = _training(summary)
    if training:
        lines += ["## Training", ""] + training + [""]
    if summary.get("ledger"):
        lines += ["## Compute ledger", "", Ledger.from_dict(summary["ledger"]).markdown(), ""]
    if summary.get("evals"):
        lines += ["## Held-out accuracy (greedy pass@1)", ""] + accuracy_table(summary["evals"]) + [""]
    if gate_text is not None:
        lines += ["## Parity gate of this export", "",
                  "Before publishing, this folder was run on the target backend against the trained model "
                  "on the reference and had to meet every threshold below.", "",
                  gate_text.replace("## Parity:", "### Parity:", 1), ""]
    else:
        lines += ["## Parity gate", "", "This export was not gated (run `tandem parity` against its source to check it).", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
              "tokenizer = AutoTokenizer.from_pretrained(FOLDER)   # ChatML; apply_chat_template == tandem's prompts",
              "```", ""]
    return "\n".join(lines)
