"""Preflight: will this model run on that target, and if not, why not?

    tandem preflight --model runs/demo --target vllm-ascend
    tandem preflight --model exports/demo-hf --target mindie --dtype fp16 --json
    tandem preflight --model runs/demo --target vllm --tp 4

Targets: tandem's own engine on each kind of device accel.py knows, llamacpp, vllm, vllm-ascend and
mindie (the table's section names; `--target nope` lists them). Each one's documented support
(architectures, dtypes, head sizes, alignment rules), with the source of every entry, lives in
tandem/preflight_targets.toml: data, not code, so a stale constraint is a one-line fix next to its
citation. The checks run on the model's config alone (no weights are
loaded), then, where the target's hardware is present on this machine, the dtype is probed on the
device (accel.py) and the installed software versions are read; where it is absent those checks
say "skip" rather than guess. For llamacpp, where llama-cpp-python is installed (this machine would
serve), each GGUF type is run once on a tiny model in a child process (infer/gguf_probe.py): a type
whose kernels crash on this CPU fails the check instead of crashing the server later.

Each check has a status: ok, warn (works with a caveat or a flag), fail (will not work as is), skip
(not checkable here). Exit status 0 when nothing fails, 1 otherwise.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from tandem.errors import ModelError, TandemError
from tandem.tomlcompat import tomllib

TARGETS_FILE = Path(__file__).with_name("preflight_targets.toml")


class PreflightError(TandemError):
    """Unknown target, bad --dtype for the target, or an unreadable support table."""


def load_targets(path: Path = TARGETS_FILE) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PreflightError(f"cannot read the support tables {path}: {exc}") from None


def model_facts(path: str | Path) -> dict:
    """{"config": ModelConfig, "arch": HF class, "stored_dtype", "kind", "path"} without loading weights."""
    from tandem.export.hf import ARCH_CLASSES, hf_model_config
    from tandem.loading import find_checkpoint, is_hf_folder
    from tandem.model import ModelConfig
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path not found: {path}")
    checkpoint = find_checkpoint(path)
    if checkpoint is not None:
        config = ModelConfig.from_dict(json.loads((checkpoint / "model_config.json").read_text()))
        from safetensors import safe_open
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
            first = next(iter(handle.keys()))
            stored = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(handle.get_slice(first).get_dtype(), "?")
        kind = "tandem"
    elif is_hf_folder(path):
        data = json.loads((path / "config.json").read_text())
        config = hf_model_config(data, path)
        name = data.get("torch_dtype") or data.get("dtype") or "float32"
        stored = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
        kind = "hf"
    elif (path / "checkpoints").is_dir():
        raise ModelError(f"run {path} has no committed checkpoint yet; train it first")
    else:
        raise ModelError(f"{path} is not a tandem run, checkpoint or HF model folder; preflight reads the "
                         "model a GGUF was exported from, not the GGUF")
    return {"config": config, "arch": ARCH_CLASSES[config.arch], "stored_dtype": stored, "kind": kind,
            "path": str(path)}


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.replace("+", ".").replace("-", ".").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _rule(rule: dict, facts: dict, dtype: str, tp: int) -> tuple[str, str] | None:
    """(status, message) for one table rule, or None when it does not apply."""
    c = facts["config"]
    when = rule.get("when_dtype")
    if when and dtype not in when:
        return None
    check, value, values = rule["check"], rule.get("value"), rule.get("values")
    bad, actual = False, None
    if c.is_latent and check.startswith("head_dim") or not c.is_latent and check.startswith(("mla_", "moe_")):
        return None     # MLA runs its own attention kernels: per-head rules do not apply, and vice versa
    if check == "mla_cache_width_in":
        bad, actual = c.kv_lora_rank + c.qk_rope_head_dim not in values, c.kv_lora_rank + c.qk_rope_head_dim
    elif check == "moe_tp_divisible":
        if tp <= 1:
            return None
        value, bad, actual = tp, c.moe_intermediate_size % tp != 0, c.moe_intermediate_size
    elif check == "dtype_in":
        bad, actual = dtype not in values, dtype
    elif check == "head_dim_in":
        bad, actual = c.head_dim not in values, c.head_dim
    elif check == "head_dim_multiple_of":
        bad, actual = c.head_dim % value != 0, c.head_dim
    elif check == "head_dim_at_most":
        bad, actual = c.head_dim > value, c.head_dim
    elif check == "hidden_multiple_of":
        bad, actual = c.hidden_size % value != 0, c.hidden_size
    elif check == "row_multiple_of":
        rows = sorted({c.hidden_size, c.intermediate_size})
        off = [r for r in rows if r % value]
        bad, actual = bool(off), ", ".join(map(str, off or rows))
    elif check == "fp16_range":
        bad, actual = dtype == "fp16" and facts["stored_dtype"] != "fp16", dtype
    elif check == "tp_divisible":
        value = tp
        bad = tp > 1 and (c.num_attention_heads % tp or c.num_key_value_heads % tp)
        actual = f"{c.num_attention_heads} query / {c.num_key_value_heads} kv"
        if tp <= 1:
            return None
    else:
        raise PreflightError(f"unknown check '{check}' in {TARGETS_FILE.name}")
    if not bad:
        return "ok", f"{check.replace('_', ' ')}: {actual} is fine"
    status = "fail" if rule.get("severity", "error") == "error" else "warn"
    return status, rule["message"].format(value=value, values=values, actual=actual)


def _gguf_cpu_check(dtype: str, gguf_probe) -> tuple[str, str] | None:
    """(status, message): does llama.cpp run `dtype` on this CPU? None where it is not installed."""
    from tandem.infer.gguf_probe import gguf_health, health_text, run_gguf
    if gguf_probe is None:
        try:
            metadata.version("llama_cpp_python")
        except metadata.PackageNotFoundError:
            return None
    health = gguf_health(gguf_probe or run_gguf)
    found = f"llama.cpp on this CPU: {health_text(health)}"
    if dtype not in health:
        return "skip", found
    if health[dtype] == "ok":
        return "ok", found
    working = [t for t, result in health.items() if result == "ok"]
    fix = (f"; serve {' or '.join(working)} instead (--dtype, and export with it)" if working else
           "; no GGUF type runs here: reinstall llama-cpp-python built for this CPU")
    return "fail", found + fix


def _shape_checks(c, add) -> None:
    """The model's shape (and its MLA/MoE shape) as info lines; a head_dim convention warning."""
    add("shape", "ok", f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, head_dim {c.head_dim}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv (GQA ratio "
        f"{c.num_attention_heads // c.num_key_value_heads}), vocab {c.vocab_size}, "
        f"context {c.max_position_embeddings}", "model config")
    if c.is_latent:
        add("moe_mla_shape", "ok", f"MLA: kv_lora_rank {c.kv_lora_rank} + rope {c.qk_rope_head_dim} cached per token "
            f"(q_lora_rank {c.q_lora_rank}, nope {c.qk_nope_head_dim}, v {c.v_head_dim}); MoE: {c.n_routed_experts} "
            f"experts in {c.n_group} groups (keep {c.topk_group}), top-{c.num_experts_per_tok}, {c.n_shared_experts} "
            f"shared, first {c.first_k_dense_replace} layer(s) dense", "model config")
    derived = c.hidden_size // c.num_attention_heads
    if c.head_dim != derived and not c.is_latent:
        add("head_dim_convention", "warn",
            f"head_dim {c.head_dim} differs from hidden_size / num_attention_heads ({derived}); config.json says so "
            "and transformers, vLLM and llama.cpp read it, but loaders that derive it build wrong shapes",
            "NVIDIA/TensorRT-LLM#5913 (Qwen config derived head_dim, broke Qwen3-32B); vllm-project/speculators#134")


def preflight(model: str | Path, target: str, dtype: str | None = None, tp: int = 1, gguf_probe=None) -> dict:
    """Run every check of `target` on `model`; returns the JSON-able report. `gguf_probe` replaces
    the llama.cpp run of infer/gguf_probe.py (tests)."""
    from tandem import accel
    targets = load_targets()
    if target not in targets:
        raise PreflightError(f"unknown preflight target '{target}'; targets: {', '.join(targets)}")
    t = targets[target]
    dtype = dtype or t["default_dtype"]
    if dtype not in t["dtypes"] and dtype not in ("fp32", "bf16", "fp16"):
        raise PreflightError(f"unknown --dtype '{dtype}' for {target}; it serves in {', '.join(t['dtypes'])}")
    if not isinstance(tp, int) or tp < 1:
        raise PreflightError(f"--tp must be an integer >= 1, got {tp!r}")
    facts = model_facts(model)
    c = facts["config"]
    checks = []

    def add(name, status, message, source=""):
        checks.append({"check": name, "status": status, "message": message, "source": source})

    ok_arch = facts["arch"] in t["architectures"]
    add("architecture", "ok" if ok_arch else "fail",
        f"{facts['arch']} is supported" if ok_arch else
        f"{target} does not serve {facts['arch']} (it serves {', '.join(t['architectures'])})",
        t.get("architectures_source", ""))
    ok_dtype = dtype in t["dtypes"]
    add("dtype", "ok" if ok_dtype else "fail",
        f"serving in {dtype}" if ok_dtype else
        f"{target} does not serve in {dtype}; use one of {', '.join(t['dtypes'])} (--dtype, and export with it)",
        t.get("dtypes_source", ""))
    _shape_checks(c, add)
    for rule in t.get("rules", []):
        result = _rule(rule, facts, dtype, tp)
        if result is not None:
            add(rule["check"], result[0], result[1], rule.get("source", ""))

    kind = t.get("device_kind")
    present = kind is None or accel.kind_available(kind)
    if kind is None:
        pass
    elif not present:
        add("hardware", "skip", f"no {kind} device on this machine: hardware and local dtype not checked",
            "tandem.accel")
    elif dtype in accel.DTYPES:
        supported = accel.supported_dtypes(kind)
        add("hardware", "ok" if dtype in supported else "fail",
            f"{accel.device_name(kind)} computes in {', '.join(supported)}" if dtype in supported else
            f"this machine's {kind} device cannot compute in {dtype} (it supports {', '.join(supported)})",
            "probed by tandem.accel.supported_dtypes")
    for name, minimum in t.get("packages", []):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        if version is None:
            add("software", "skip" if not present or kind is None else "warn",
                f"{name} is not installed here (needed where the model is served)", t.get("packages_source", ""))
        elif minimum and _version_tuple(version) < _version_tuple(minimum):
            add("software", "fail" if present else "warn", f"{name} {version} is older than the required {minimum}",
                t.get("packages_source", ""))
        else:
            add("software", "ok", f"{name} {version} installed", t.get("packages_source", ""))
    cpu = _gguf_cpu_check(dtype, gguf_probe) if t["loads"] == "gguf" else None
    if cpu is not None:
        add("cpu_kernels", *cpu, "probed by tandem.infer.gguf_probe (a tiny model of each GGUF type, in a child)")
    failed = [x for x in checks if x["status"] == "fail"]
    warned = [x for x in checks if x["status"] == "warn"]
    return {"target": target, "title": t["title"], "loads": t["loads"], "model": facts["path"],
            "arch": facts["arch"], "dtype": dtype, "stored_dtype": facts["stored_dtype"], "tp": tp,
            "checks": checks, "ok": not failed, "failures": len(failed), "warnings": len(warned)}


def format_text(report: dict) -> str:
    head = "OK" if report["ok"] else f"{report['failures']} problem(s)"
    lines = [f"preflight {report['model']} -> {report['target']} ({report['title']}), {report['arch']} "
             f"in {report['dtype']}: {head}, {report['warnings']} warning(s)"]
    for check in report["checks"]:
        lines.append(f"  {check['status']:4s}  {check['check']:20s} {check['message']}")
        if check["status"] in ("fail", "warn") and check["source"]:
            lines.append(f"        {'':20s} source: {check['source']}")
    return "\n".join(lines)
