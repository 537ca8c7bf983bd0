"""The Python steps of benchmarks/device_check.sh: first contact with an accelerator.

    python benchmarks/device_check.py STEP --device cuda --out runs/device_check [--tiny]

STEP is one of:
  sft     SFT in bf16 on the device: a straight run vs a run stopped and resumed (weights must be
          bitwise equal), then the same with resilience.check_every=1 and replicas=2 (false
          corruption alarms counted from incidents.jsonl: on correct deterministic hardware, 0)
  grpo    the smoke GRPO for a few steps in sync and async mode, trainer on the device in bf16,
          one rollout worker process on the cpu in bf16
  engine  KV-cache equivalence (cached greedy == full recompute) and seeded sampling independent
          of batch composition, on the device
  memory  device memory after building an Engine with defaults for a Qwen2.5-0.5B-shaped model
          (random init) in bf16: what max_len the engine chose and what it allocated
Each step writes OUT/STEP.json and prints one summary line; it exits 1 when a check fails.
--tiny shrinks every size (the cpu dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tandem import accel  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.model import weights_fingerprint  # noqa: E402
from tandem.runs import prepare_run  # noqa: E402
from tandem.train.checkpoint import latest_valid, load_checkpoint  # noqa: E402


def _fingerprint(run_dir: Path, stage: str) -> str:
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / stage))["model"])


def _sft(run_dir: Path, overrides: list[str], stop_after: int | None = None) -> dict:
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.train.sft import train_sft
    cfg = load_config(preset="smoke", overrides=overrides)
    run_dir = prepare_run(run_dir, cfg)
    tasks = build_tasks(cfg)
    return train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False,
                     stop_after=stop_after)


def _alarms(run_dir: Path) -> int:
    path = run_dir / "incidents.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(json.loads(line)["kind"] == "corruption" for line in lines)


def check_sft(device: str, out: Path, tiny: bool) -> dict:
    steps = 8 if tiny else 60
    base = [f"run.device={device}", "sft.dtype=bf16", f"sft.steps={steps}", f"sft.checkpoint_every={steps // 4}",
            "sft.log_every=1"]
    result = {}
    for name, extra in (("plain", []), ("votes", ["resilience.check_every=1", "resilience.replicas=2"])):
        started = time.perf_counter()
        _sft(out / f"sft-{name}-straight", base + extra)
        straight_s = time.perf_counter() - started
        _sft(out / f"sft-{name}-resumed", base + extra, stop_after=steps // 2 - 1)
        stats = _sft(out / f"sft-{name}-resumed", base + extra)
        same = _fingerprint(out / f"sft-{name}-straight", "sft") == _fingerprint(out / f"sft-{name}-resumed", "sft")
        result[name] = {"steps": steps, "resumed_from": stats.get("resumed_from"), "bitwise_equal": same,
                        "straight_seconds": round(straight_s, 2),
                        "false_alarms": _alarms(out / f"sft-{name}-straight") + _alarms(out / f"sft-{name}-resumed")}
    result["ok"] = all(r["bitwise_equal"] and r["false_alarms"] == 0 for r in result.values())
    return result


def check_grpo(device: str, out: Path, tiny: bool) -> dict:
    from tandem.train.grpo import train_grpo
    init = out / "grpo-init"
    if latest_valid(init / "checkpoints" / "sft") is None:
        _sft(init, [f"run.device={device}", "sft.dtype=bf16", "sft.steps=10"])
    steps = 2 if tiny else 4
    result = {}
    for mode in ("sync", "async"):
        cfg = load_config(preset="smoke", overrides=[
            f"run.device={device}", f"rl.device={device}", "rl.dtype=bf16", f"rl.mode={mode}", f"rl.steps={steps}",
            "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=12", "rl.max_prompt_len=32",
            "rl.checkpoint_every=1", "rollout.workers=1", "rollout.device=cpu", "rollout.dtype=bf16",
            "rollout.threads=1"])
        started = time.perf_counter()
        stats = train_grpo(cfg, prepare_run(out / f"grpo-{mode}", cfg), init, progress=False)
        result[mode] = {"steps": steps, "seconds": round(time.perf_counter() - started, 2),
                        "mode": stats["mode"], "device": stats["device"]}
    result["ok"] = True  # reaching here without an exception is the check
    return result


def check_engine(device: str, out: Path, tiny: bool) -> dict:
    from tandem.infer.engine import Engine, SamplingParams, check_kv_cache_equivalence
    from tandem.model import ModelConfig, Transformer
    dev = accel.resolve_device(device)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Transformer(config)
    model.reset_parameters(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # large weights: greedy outputs that are not constant
    model.to(dev).eval()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 17, 30]]
    equivalent = True
    try:
        check_kv_cache_equivalence(model, prompts, max_new_tokens=16)
    except Exception as exc:  # the check raises on a mismatch, naming it
        equivalent = False
        print(f"engine: KV cache mismatch: {exc}")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = Engine(model, max_batch=1, max_len=64).generate([prompts[3]], params)[0].token_ids
    mixed = Engine(model, max_batch=4, max_len=64).generate(prompts, [SamplingParams(max_new_tokens=16, temperature=1.0,
                                                                                     seed=i) for i in range(3)]
                                                             + [params])
    batch_independent = alone == mixed[3].token_ids
    return {"kv_cache_equivalent": equivalent, "seeded_batch_independent": batch_independent,
            "ok": equivalent and batch_independent}


def check_memory(device: str, out: Path, tiny: bool) -> dict:
    from tandem.infer.engine import Engine
    from tandem.model import ModelConfig, Transformer
    dev = accel.resolve_device(device)
    shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 tie_word_embeddings=True, arch="qwen2")
    if tiny:  # the same code path on a model the cpu builds in a second
        shape.update(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    dtype = torch.bfloat16 if "bf16" in accel.supported_dtypes(dev) else torch.float32
    with torch.device(dev):
        model = Transformer(ModelConfig(**shape)).to(dtype).eval()
    before = accel.memory_stats(dev)
    engine = Engine(model, max_batch=64)
    accel.synchronize(dev)
    after = accel.memory_stats(dev)
    return {"model": "Qwen2.5-0.5B shape" if not tiny else "tiny stand-in", "dtype": accel.dtype_name(dtype),
            "max_batch": 64, "max_len": engine.max_len, "max_len_source": engine.max_len_source,
            "kv_cache_gib": round(engine.cache_bytes / 2**30, 3), "memory_before": before, "memory_after": after,
            "ok": engine.max_len >= 2}


STEPS = {"sft": check_sft, "grpo": check_grpo, "engine": check_engine, "memory": check_memory}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/device_check")
    parser.add_argument("--tiny", action="store_true", help="every size small (the cpu dry run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = STEPS[args.step](args.device, out, args.tiny)
    result.update(device=args.device, device_name=accel.device_name(accel.resolve_device(args.device)),
                  seconds=round(time.perf_counter() - started, 2), versions=accel.versions())
    (out / f"{args.step}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.step}: {'ok' if result['ok'] else 'FAILED'} "
          f"{json.dumps({k: v for k, v in result.items() if k not in ('versions', 'memory_before', 'memory_after')})}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
