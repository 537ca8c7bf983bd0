#!/usr/bin/env bash
# First contact with an accelerator: does tandem run, resume bitwise and stay within memory there?
#
#   benchmarks/device_check.sh [--device cuda[:i]|npu[:i]|cpu] [--out runs/device_check]
#
# (a) SFT in bf16 on the device: straight vs stopped+resumed (bitwise), also with
#     resilience.check_every=1 and replicas=2 (false corruption alarms counted)
# (b) the smoke GRPO, sync and async, trainer on the device, one rollout worker on the cpu (bf16)
# (c) engine: KV-cache equivalence and seeded sampling independent of the batch, on the device
# (d) benchmarks/bench_train.py and bench_decode.py on the device
# (e) memory after building an Engine with defaults for a Qwen2.5-0.5B-shaped model
# (f) the decode step replayed from CUDA graphs == eager greedy (tests/test_engine.py; skipped off CUDA)
# Results: OUT/*.json, OUT/*.log and OUT/BENCHMARKS-snippet.md. Under 8 minutes on one GPU;
# `--device cpu` is the dry run (same steps, tiny sizes, a few minutes). Exits 1 if a check failed.
# Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=runs/device_check
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--device DEVICE] [--out FOLDER]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
rm -rf "$OUT" && mkdir -p "$OUT"
TINY=""; BENCH_TRAIN="--repeats 3 --steps 20 --dtypes fp32,bf16"; BENCH_DECODE="--repeats 3 --new-tokens 128"
if [ "$DEVICE" = cpu ]; then
  TINY="--tiny"; BENCH_TRAIN="--repeats 1 --steps 2 --threads 1"; BENCH_DECODE="--repeats 1 --new-tokens 8 --batches 1,4"
fi
failed=()
step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, remember a failure
  local name="$1"; shift
  local started=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then status=ok; else status=FAILED; failed+=("$name"); fi
  echo "$name: $status ($((SECONDS - started)) s) -- $(tail -n 1 "$OUT/$name.log")"
}
step sft "$PY" benchmarks/device_check.py sft --device "$DEVICE" --out "$OUT" $TINY
step grpo "$PY" benchmarks/device_check.py grpo --device "$DEVICE" --out "$OUT" $TINY
step engine "$PY" benchmarks/device_check.py engine --device "$DEVICE" --out "$OUT" $TINY
step bench_train "$PY" benchmarks/bench_train.py --device "$DEVICE" $BENCH_TRAIN
step bench_decode "$PY" benchmarks/bench_decode.py --device "$DEVICE" $BENCH_DECODE
step memory "$PY" benchmarks/device_check.py memory --device "$DEVICE" --out "$OUT" $TINY
step decode_graphs "$PY" -m pytest -q -rs tests/test_engine.py -k "cuda_graph or static_decode"
"$PY" - "$OUT" "${failed[@]+"${failed[@]}"}" <<'PY'
import json, sys
from pathlib import Path
out, failed = Path(sys.argv[1]), sys.argv[2:]
results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
results["failed"] = failed
(out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
first = next(iter(r for r in results.values() if isinstance(r, dict)), {})
lines = [f"### Device check: {first.get('device_name', '?')} ({first.get('device', '?')})", ""]
if "sft" in results:
    for name, r in results["sft"].items():
        if isinstance(r, dict) and "bitwise_equal" in r:
            lines.append(f"- SFT bf16 {name}: resume bitwise equal: {r['bitwise_equal']}, false corruption alarms: "
                         f"{r['false_alarms']}, {r['steps']} steps straight in {r['straight_seconds']} s")
if "grpo" in results:
    lines.append("- GRPO (trainer on the device, rollout worker on the cpu, bf16): " + ", ".join(
        f"{m} {results['grpo'][m]['steps']} steps in {results['grpo'][m]['seconds']} s" for m in ("sync", "async")))
if "engine" in results:
    e = results["engine"]
    lines.append(f"- Engine: KV cache == full recompute: {e['kv_cache_equivalent']}; seeded sampling independent "
                 f"of the batch: {e['seeded_batch_independent']}")
if "memory" in results:
    m = results["memory"]
    lines.append(f"- Engine defaults for a {m['model']} ({m['dtype']}, max_batch {m['max_batch']}): max_len "
                 f"{m['max_len']} ({m['max_len_source']}), KV cache {m['kv_cache_gib']} GiB; allocated after: "
                 f"{m['memory_after'].get('allocated_bytes', 'n/a')} bytes")
for name in ("bench_train", "bench_decode"):
    log = out / f"{name}.log"
    if log.exists():
        lines += ["", f"{name}:", "", *[l for l in log.read_text().splitlines() if l.startswith("|")]]
lines += ["", f"Failed steps: {', '.join(failed) or 'none'}"]
(out / "BENCHMARKS-snippet.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
[ ${#failed[@]} -eq 0 ]
