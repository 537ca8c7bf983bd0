"""Publishing an export: a tandem model as an HF folder or a GGUF file, optionally gated by parity.

    tandem export --model runs/demo --format hf   --out exports/demo-hf
    tandem export --model runs/demo --format gguf --out exports/demo-gguf --gguf-type q8_0
    tandem export --model runs/demo --format hf   --out exports/demo-hf --gate torch:cpu:fp32

The export is staged and published atomically (tandem/export/__init__.py: staging, --force). A run
with no committed checkpoint is refused (loading.py).

With a gate (`--gate REF`), the staged export is run through `tandem parity` against the source
model on REF before it is published; if it fails its thresholds the staged folder is deleted and
GateFailure is raised (the CLI exits 1). An HF export carries a model card (README.md,
export/card.py) with the run's training figures, ledger, accuracies and this gate's result.
`run_export_stage` is the pipeline's last stage: it
exports the formats listed in the run config's [export] section to runs/NAME/export/FORMAT.

This module sits above both export/ and parity.py (it gates the one with the other), so neither of
those imports the other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tandem.errors import ModelError, TandemError, writing
from tandem.export import check_out, clean_stale_staging, remove_export, staging
from tandem.parity import markdown as parity_markdown
from tandem.parity import record_parity, run_parity

FORMATS = ("hf", "gguf")


class GateFailure(Exception):
    """An export failed its parity gate (not a user mistake: the CLI exits 1, not 2)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def export_model(model: str | Path, out: str | Path, fmt: str = "hf", force: bool = False,
                 dtype: str = "auto", max_shard_size: str | int | None = None, gguf_type: str = "f16",
                 gate: str | None = None, gate_target: str | None = None, gate_task: str | None = None,
                 gate_n: int = 32, max_new_tokens: int | None = None, thresholds: dict | None = None,
                 record: bool = True, progress: bool = True) -> dict:
    """Export `model` (run, checkpoint or HF folder) to `out`; returns a summary dict.

    gate: a reference backend spec (e.g. "torch:cpu:fp32"); the export must pass `tandem parity`
    against it (target: gate_target, default "hf" for HF exports and "llamacpp" for GGUF).
    """
    from tandem.export.hf import DEFAULT_MAX_SHARD, PROVENANCE, write_hf
    from tandem.loading import load_weights, run_folder
    from tandem.model import weights_fingerprint
    from tandem.progress import keep_alive, log

    if fmt not in FORMATS:
        raise ModelError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    out = Path(out)
    source, target_dir = Path(model).resolve(), out.resolve()
    if target_dir == source or target_dir in source.parents:
        raise ModelError(f"--out {out} is the model folder or contains it; export somewhere else")
    if out.parent.is_dir():  # before the checks: a crash mid-swap may have left the previous export aside
        with writing(out):
            clean_stale_staging(out)
    out = check_out(out, force)
    if gate:  # fail on a bad spec or a missing backend before any work is done
        from tandem.infer.backends import check_installed, parse_backend
        check_installed(parse_backend(gate))
        check_installed(parse_backend(gate_target or ("hf" if fmt == "hf" else "llamacpp")))
    started = time.perf_counter()
    config, weights, tokenizer, info = load_weights(model)
    keep_alive()  # the pipeline's export watchdog (progress.py); the write is one phase, the gate beats per prompt
    source_fp = weights_fingerprint({k: v for k, v in weights.items()
                                     if not (config.tie_word_embeddings and k == "lm_head.weight")})
    provenance = {"format": fmt, "source": info.get("path"), "source_kind": info.get("kind"),
                  "step": info.get("step"), "phase": info.get("phase"), "source_fingerprint": source_fp}
    run_dir = run_folder(Path(model))
    if run_dir is not None:
        run_config = json.loads((run_dir / "config.json").read_text())
        provenance["tasks"] = run_config["data"]["tasks"]
        provenance["task_params"] = run_config["data"].get("task_params", {})
        provenance["max_new_tokens"] = run_config.get("eval", {}).get("max_new_tokens")
    gate_report = None
    with staging(out, force) as tmp:
        if fmt == "hf":
            written = write_hf(config, weights, tokenizer, tmp, dtype=dtype,
                               max_shard_size=max_shard_size or DEFAULT_MAX_SHARD)
            from tandem.export.hf import import_hf
            _, exported, _, _ = import_hf(tmp)        # read back: what a loader will see
            provenance["fingerprint"] = weights_fingerprint(exported)
            provenance["dtype"] = written["dtype"]
        else:
            from tandem.export.gguf import GGUF_FILE, write_gguf
            name = (run_dir.name if run_dir else Path(model).name) or "tandem"
            written = write_gguf(config, weights, tokenizer, tmp / GGUF_FILE, out_type=gguf_type, name=name)
            provenance["gguf_type"] = gguf_type
        provenance["files"] = written["files"]
        if gate:
            target = gate_target or ("hf" if fmt == "hf" else f"llamacpp:{gguf_type}")
            log(f"export: gating the staged {fmt} export against {gate} (target {target})")
            gate_report = run_parity(model, gate, target, target_model=tmp, task=gate_task, n=gate_n,
                                     max_new_tokens=max_new_tokens, thresholds=thresholds, progress=progress)
            provenance["gate"] = {k: gate_report[k] for k in ("ref", "target", "passed", "metrics",
                                                              "thresholds", "failures", "task", "n")}
            if not gate_report["passed"]:
                raise GateFailure(f"export failed its parity gate against {gate}: "
                                  f"{'; '.join(gate_report['failures'])}; nothing was published", gate_report)
        if fmt == "hf":  # the model card: training figures, ledger, accuracies, this gate (export/card.py)
            from tandem.export.card import CARD, model_card
            from tandem.runs import read_summary
            summary = read_summary(run_dir) if run_dir is not None else {}
            gate_text = None if gate_report is None else parity_markdown(gate_report)
            (tmp / CARD).write_text(model_card(provenance, config.arch, config.num_parameters(), summary, gate_text))
            provenance["files"].append(CARD)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    if gate_report is not None and record and run_dir is not None:
        record_parity(run_dir, gate_report)
    result = dict(provenance, out=str(out), seconds=time.perf_counter() - started)
    log(f"export: {fmt} -> {out} ({', '.join(provenance['files'])})")
    return result


def run_export_stage(cfg, run_dir: str | Path, progress: bool = True) -> dict:
    """The pipeline's export (+ gate) stage: cfg.export.formats -> runs/NAME/export/FORMAT.

    A gate failure does not raise: the export is not published (any older one is removed, it no
    longer matches the run), the failure is recorded in summary.json["export"] and the report,
    and the caller decides the exit code. A gate whose backend is not installed is skipped with
    the reason recorded (the export is published ungated) rather than failing a finished run.
    """
    from tandem.resilience.incidents import Heartbeat
    from tandem.runs import read_summary, update_summary
    run_dir = Path(run_dir)
    with Heartbeat(run_dir, role="export").working():  # --supervise: a hang in export is a hang too
        results = {fmt: _export_format(cfg, run_dir, fmt, progress) for fmt in cfg.export.formats}
    summary = read_summary(run_dir)
    update_summary(run_dir, export=dict(summary.get("export", {}), **results))
    return results


def _export_format(cfg, run_dir: Path, fmt: str, progress: bool) -> dict:
    """One format of run_export_stage: its result record (published, gated, passed or the reason)."""
    from tandem.infer.backends import BackendMissing
    from tandem.progress import log
    e = cfg.export
    out = run_dir / "export" / fmt
    kwargs = dict(fmt=fmt, force=True, dtype=e.hf_dtype, gguf_type=e.gguf_type, gate_n=e.gate_n,
                  max_new_tokens=cfg.eval.max_new_tokens, progress=progress)
    gate = e.gate_ref if e.gate else None
    target = (e.gate_target or None) if fmt == "hf" else None
    try:
        result = export_model(run_dir, out, gate=gate, gate_target=target, **kwargs)
        return {"published": True, "path": str(out), "gated": bool(gate),
                "passed": result.get("gate", {}).get("passed") if gate else None}
    except BackendMissing as exc:
        log(f"warning: export {fmt}: gate skipped, {exc}")
        export_model(run_dir, out, **kwargs)
        return {"published": True, "path": str(out), "gated": False, "gate_skipped": str(exc)}
    except GateFailure as exc:
        remove_export(out)
        log(f"error: export {fmt}: {exc}")
        record_parity(run_dir, exc.report)
        return {"published": False, "gated": True, "passed": False, "reason": str(exc)}
    except TandemError as exc:
        log(f"error: export {fmt}: {exc}")
        return {"published": False, "reason": str(exc)}
