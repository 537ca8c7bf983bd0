"""Aux-loss-free expert balancing (DeepSeek-V3, section 2.1.2): the trainers' step hook.

    load = balance_experts(model, updated=True)   # after each optimizer step (SFT and GRPO)
    load_metrics(load)                            # -> {"expert_load", "expert_imbalance"} for metrics.jsonl

Each router of a `DeepseekV3` counted, during the step's forwards with gradients, the tokens it sent
to each expert (`Router.load`). After an applied optimizer step every router's
`e_score_correction_bias` moves by `bias_update_speed` (gamma) toward balance: down for experts
above the mean load, up for those below (a sign step, so recomputed forwards, which scale every
count alike, change nothing). The counts are then zeroed, also after a skipped step, so every
checkpoint (taken between steps) holds the whole router state in the bias, and resume is exact.
With data-parallel trainers the counts are summed over the group first, so every rank moves its
bias alike. A dense model has no routers: nothing happens. The step's counts are returned first,
for metrics.jsonl and report.md's expert-load plots (only logged steps are kept: a sample, not a
running total).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.deepseek import DeepseekV3


def balance_experts(model: torch.nn.Module, updated: bool, group=None) -> list[list[float]] | None:
    """Move the router biases toward balance (if `updated`) and zero the load counts. Returns the
    step's counts (tokens per routed expert, one list per MoE layer), None for a dense model."""
    if not isinstance(model, DeepseekV3):
        return None
    routers = model.routers()
    loads = torch.stack([router.load for router in routers])        # [MoE layers, experts]
    if group is not None:
        dist.all_reduce(loads, group=group)
    gamma = model.config.bias_update_speed
    with torch.no_grad():
        for router, load in zip(routers, loads):
            if updated and gamma > 0 and bool(load.sum() > 0):
                router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
            router.load.zero_()
    return loads.tolist()


def load_metrics(loads: list[list[float]] | None) -> dict:
    """metrics.jsonl fields for one step's expert counts: none for a dense model; else the counts and
    the imbalance, the largest max/mean load over the MoE layers (1.0 = perfectly even)."""
    if not loads:
        return {}
    ratios = [max(layer) * len(layer) / sum(layer) for layer in loads if sum(layer) > 0]
    return {"expert_load": loads, **({"expert_imbalance": max(ratios)} if ratios else {})}
