"""The compute ledger: device-seconds, tokens and FLOPs per phase and per device kind.

    ledger = Ledger.from_dict(summary.get("ledger"))
    ledger.add("sft", "cpu", seconds=12.5, tokens=400_000, flops=3.1e12)
    summary["ledger"] = ledger.to_dict()

Utilisation is achieved FLOP/s over the device's matmul peak, measured at the model's shapes in
the phase's dtype (tandem/peak.py), on every device, CPU included. A row whose FLOPs are not
counted (eval, weight sync) has no utilisation ("n/a").
"""

from __future__ import annotations


class Ledger:
    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}

    def add(self, phase: str, device_kind: str, seconds: float, tokens: int = 0, flops: float = 0.0,
            peak_flops: float | None = None) -> None:
        row = self.rows.setdefault((phase, device_kind), {"seconds": 0.0, "tokens": 0, "flops": 0.0,
                                                          "peak_flops": peak_flops})
        row["seconds"] += seconds
        row["tokens"] += tokens
        row["flops"] += flops
        if peak_flops:
            row["peak_flops"] = peak_flops

    def to_dict(self) -> list[dict]:
        out = []
        for (phase, kind), row in self.rows.items():
            seconds = round(row["seconds"], 3)  # rates from the stored value, so a reloaded ledger agrees
            achieved = row["flops"] / seconds if seconds else 0.0
            out.append({"phase": phase, "device_kind": kind, "device_seconds": seconds,
                        "tokens": row["tokens"], "flops": row["flops"], "achieved_flops_per_s": achieved,
                        "peak_flops": row["peak_flops"],
                        "utilisation": achieved / row["peak_flops"] if row["peak_flops"] and achieved else None})
        return out

    @classmethod
    def from_dict(cls, rows: list[dict] | None) -> "Ledger":
        ledger = cls()
        for row in rows or []:
            ledger.rows[(row["phase"], row["device_kind"])] = {
                "seconds": row["device_seconds"], "tokens": row["tokens"], "flops": row["flops"],
                "peak_flops": row.get("peak_flops")}
        return ledger

    def markdown(self) -> str:
        lines = ["| phase | device | device-seconds | tokens | FLOPs | achieved FLOP/s | measured peak FLOP/s "
                 "| utilisation |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in self.to_dict():
            util = f"{row['utilisation']:.1%}" if row["utilisation"] is not None else "n/a"
            peak = f"{row['peak_flops']:.3g}" if row["peak_flops"] else "n/a"
            lines.append(f"| {row['phase']} | {row['device_kind']} | {row['device_seconds']:.1f} | "
                         f"{row['tokens']:,} | {row['flops']:.3g} | {row['achieved_flops_per_s']:.3g} | {peak} | {util} |")
        return "\n".join(lines)
