"""The device's matmul peak, measured: what the compute ledger's utilisation divides by.

Datasheet peaks are not known for every chip (and do not exist for a CPU), so tandem measures one:
the best FLOP/s of the dense matmuls of the model's own layers ([tokens, in] x [in, out] for the
attention, MLP and head projections), in a given dtype, on the run's device, at the current torch
thread count. Utilisation = achieved FLOP/s / this peak: the share of what the device does at these
shapes that the training loop got. It is an attainable peak at small shapes, not a datasheet one,
so it reads higher than an MFU against a vendor's number would.

    peak = matmul_peak(device, "bf16", model_config, tokens=2048)    # FLOP/s, ~0.1 s of measuring
    peaks = run_peaks(run_dir, device, ["fp32", "bf16"], model_config, tokens)   # once per run
    utilisation(flops, seconds, peaks)   -> {"fp32": 0.41, "bf16": 0.12}: MFU against each peak
    describe_mfu({"fp32": 0.41})         -> "41.0% of the fp32 matmul peak"

Every device question (which device, which dtype, waiting for queued work) goes through accel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tandem import accel
from tandem.model import ModelConfig
from tandem.runs import read_summary, update_summary

MAX_TOKENS = 4096  # rows of the measured matmuls: at most this many (bounds time and memory)


def layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every distinct weight matrix of the model: q, kv, o, gate/up, down, lm_head."""
    h, heads = config.hidden_size, config.num_attention_heads * config.head_dim
    shapes = {(h, heads), (h, config.num_key_value_heads * config.head_dim), (heads, h),
              (h, config.intermediate_size), (config.intermediate_size, h), (h, config.vocab_size)}
    return sorted(shapes)


def matmul_peak(device, dtype: str, config: ModelConfig, tokens: int, budget_s: float = 0.1) -> float:
    """The best FLOP/s of one [tokens, in] x [in, out] call over the model's layer shapes, measured for
    about budget_s seconds in all (each shape: one warm-up call, then repeats until its share is
    spent). The fastest call counts, so a busy machine lowers the peak less than an average would."""
    device = accel.resolve_device(device)
    torch_dtype = accel.resolve_dtype(dtype, device)
    rows = max(1, min(int(tokens), MAX_TOKENS))
    shapes = layer_shapes(config)
    best = 0.0
    generator = torch.Generator().manual_seed(0)  # keeps the run's RNG streams untouched
    for k, n in shapes:
        a = torch.randn(rows, k, generator=generator).to(device, torch_dtype)
        b = torch.randn(k, n, generator=generator).to(device, torch_dtype)
        a @ b  # warm-up: kernel selection, caches
        now = accel.timer(device)
        deadline, fastest = now + budget_s / len(shapes), float("inf")
        while now < deadline or fastest == float("inf"):
            started = now
            a @ b
            now = accel.timer(device)
            fastest = min(fastest, now - started)
        best = max(best, 2.0 * rows * k * n / max(fastest, 1e-9))
    return best


def run_peaks(run_dir: Path, device, dtypes: list[str], config: ModelConfig, tokens: int) -> dict[str, float]:
    """{dtype: FLOP/s} for this device and thread count, measured once per run folder: kept in
    summary.json["device_peaks"] and reused by later stages and resumes."""
    device = accel.resolve_device(device)
    key = f"{device}|{accel.device_name(device)}|threads={accel.set_threads(None)}|tokens={min(tokens, MAX_TOKENS)}"
    known = dict(read_summary(run_dir).get("device_peaks", {}))
    peaks = dict(known.get(key, {}))
    for dtype in dict.fromkeys(dtypes):
        if dtype not in peaks:
            peaks[dtype] = matmul_peak(device, dtype, config, tokens)
    if peaks != known.get(key):
        update_summary(run_dir, device_peaks=dict(known, **{key: peaks}))
    return peaks


def utilisation(flops: float, seconds: float, peaks: dict[str, float]) -> dict[str, float | None]:
    """Model FLOPs utilisation: achieved FLOP/s over each measured peak ({dtype: share}); None where
    nothing was timed. Against the fp32 peak it can exceed 1 in bf16 (bf16 units outrun fp32 ones)."""
    achieved = flops / seconds if seconds else 0.0
    return {dtype: (achieved / peak if achieved and peak else None) for dtype, peak in peaks.items()}


def describe_mfu(mfu: dict | None) -> str:
    """"41.0% of the fp32 / 12.0% of the bf16 matmul peak" ("n/a" without figures: runs from before
    MFU was recorded, or nothing timed)."""
    shares = [f"{share:.1%} of the {dtype}" for dtype, share in (mfu or {}).items() if share]
    return f"{' / '.join(shares)} matmul peak" if shares else "n/a"
