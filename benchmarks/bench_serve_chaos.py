"""Serving chaos benchmark: `tandem serve` with random engine faults under 32 streaming clients.

    .venv/bin/python benchmarks/bench_serve_chaos.py --model runs/demo            # print the table
    .venv/bin/python benchmarks/bench_serve_chaos.py --model runs/demo --write    # also update BENCHMARKS.md
    .venv/bin/python benchmarks/bench_serve_chaos.py --requests 8 --clients 4 --max-tokens 8 --mtbf 4   # smoke

Starts two real servers on free loopback ports: a fault-free one, and one with `--fault-mtbf`
(device errors, hangs and NaN logits drawn at random, seeded, one every --mtbf engine steps on
average; a hang is detected after --step-timeout seconds). The same fixed set of streaming chat
requests (request i seeded with i, ignore_eos, --max-tokens tokens each) goes to each through
--clients concurrent keep-alive connections (bench_serve.py's load generator), fault-free first.

Reported for the faulty run: requests completed (finish_reason length, every token, [DONE]),
sequences restarted after a fault (the server's counter), requests failed with an explicit error
(an OpenAI error event in the stream, or an HTTP error status), LOST (no answer and no error: a
broken connection, a stream cut short or without [DONE], a time-out; target 0), and completed
answers whose text differs from the fault-free run's for the same seed (target 0); request latency
(sent -> its stream's end) p50/p99 against the fault-free run's, measured in the same invocation, and the
faults injected by kind. Exits 1 if anything was lost or differs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.bench_serve import Connection, bodies, pct, smoke_model, start_tandem, stop, stream_chat  # noqa: E402
from benchmarks.common import environment, table, write_section  # noqa: E402


@dataclass
class Outcome:
    kind: str                 # completed | failed | lost
    text: str = ""
    latency: float = 0.0


async def one(conn: Connection, body: dict) -> Outcome:
    sent = time.perf_counter()
    try:
        reply = await stream_chat(conn, body)
    except Exception:                        # a broken connection, a time-out, an answer that is not SSE
        conn.close()
        return Outcome("lost")
    if reply.status != 200 or (reply.error and reply.done):
        return Outcome("failed")
    tokens = reply.usage["completion_tokens"] if reply.usage else -1
    if reply.done and reply.finish == "length" and tokens == body["max_tokens"]:
        return Outcome("completed", "".join(reply.text), time.perf_counter() - sent)
    return Outcome("lost")


async def run(url: str, load: list[dict], clients: int) -> list[Outcome]:
    """Every request of `load` through `clients` connections; outcomes in request order."""
    outcomes: list[Outcome | None] = [None] * len(load)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(load)):
        queue.put_nowait(i)

    async def worker(conn: Connection):
        try:
            while not queue.empty():
                i = queue.get_nowait()
                outcomes[i] = await one(conn, load[i])
        finally:
            conn.close()
    await asyncio.gather(*[worker(Connection(url)) for _ in range(clients)])
    return outcomes


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a tandem run (default: runs/demo if it exists, else a fresh smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    parser.add_argument("--requests", type=int, default=256, help="requests per run (default 256)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--mtbf", type=float, default=100, help="mean engine steps between faults (default 100)")
    parser.add_argument("--fault-seed", type=int, default=0, help="seeds the fault draws (default 0)")
    parser.add_argument("--step-timeout", type=float, default=1.0, help="the hang watchdog, seconds (default 1)")
    parser.add_argument("--write", action="store_true", help="update the bench_serve_chaos section of BENCHMARKS.md")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-chaos-"))
    model = args.model or (str(ROOT / "runs" / "demo") if (ROOT / "runs" / "demo").exists() else smoke_model(tmp))
    if not Path(model).exists():
        raise SystemExit(f"error: model path not found: {model}")
    load = bodies("bench", args.requests, args.max_tokens, {"ignore_eos": True})
    warm = bodies("bench", 4, 4, {"ignore_eos": True})

    print(f"fault-free server, then one with --fault-mtbf {args.mtbf:g} ({args.requests} requests, "
          f"{args.clients} clients):", flush=True)
    results, metrics = {}, {}
    faults = ["--fault-mtbf", str(args.mtbf), "--fault-seed", str(args.fault_seed), "--step-timeout",
              str(args.step_timeout)]
    for name, flags in (("fault-free", []), ("faults", faults)):
        proc, url, _ = start_tandem(model, 32, args.threads, *flags)
        try:
            asyncio.run(run(url, warm, 4))                      # warm-up, not counted (faults may strike it)
            started = time.perf_counter()
            results[name] = asyncio.run(run(url, load, args.clients))
            print(f" {name}: {time.perf_counter() - started:.1f} s", flush=True)
            metrics[name] = scrape(url)
        finally:
            stop(proc)

    clean, faulty = results["fault-free"], results["faults"]
    rows, verdicts = [], []
    for name, outcomes in results.items():
        kinds = [o.kind for o in outcomes]
        latencies = [o.latency for o in outcomes if o.kind == "completed"]
        differ = sum(o.kind == "completed" and c.kind == "completed" and o.text != c.text
                     for o, c in zip(outcomes, clean))
        m = metrics[name]
        rows.append([name, len(outcomes), kinds.count("completed"), int(m["tandem_requests_restarted_total"]),
                     kinds.count("failed"), kinds.count("lost"), differ if name == "faults" else "-",
                     f"{pct(latencies, 50) * 1e3:.0f}", f"{pct(latencies, 99) * 1e3:.0f}"])
        verdicts.append(kinds.count("lost") + (differ if name == "faults" else 0))
    m = metrics["faults"]
    injected = {k: int(m[f'tandem_engine_faults_by_kind_total{{kind="{k}"}}']) for k in ("device_error", "hang",
                                                                                       "nonfinite")}
    lat = lambda outcomes, q: pct([o.latency for o in outcomes if o.kind == "completed"], q)  # noqa: E731
    lost, differ = sum(r[5] for r in rows), rows[1][6]
    summary = (f"Faults detected: {sum(injected.values())} ({', '.join(f'{v} {k}' for k, v in injected.items())}), "
               f"{int(m['tandem_engine_recoveries_total'])} engine rebuilds taking "
               f"{m['tandem_engine_recovery_seconds_sum']:.2f} s in all. LOST: **{lost}** (target 0); answers "
               f"differing from the fault-free run: **{differ}** (target 0). Latency with faults: p50 "
               f"{lat(faulty, 50) / lat(clean, 50):.2f}x, p99 {lat(faulty, 99) / lat(clean, 99):.2f}x the fault-free "
               f"run's.")
    body = "\n\n".join([
        f"Model `{Path(model).name}`, {args.requests} streaming chat requests ({args.max_tokens} tokens each, "
        f"ignore_eos, request i seeded with i) through {args.clients} concurrent clients, against a fault-free "
        f"`tandem serve` and one with `--fault-mtbf {args.mtbf:g} --fault-seed {args.fault_seed} --step-timeout "
        f"{args.step_timeout:g}`; server: {environment(args.threads)}. Latency = request sent to the end of its "
        f"stream, over completed requests.",
        table(["run", "requests", "completed", "restarted", "failed (explicit error)", "LOST", "differ",
               "latency p50 ms", "latency p99 ms"], rows),
        summary,
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on a {os.cpu_count()}-core machine."])
    print("\n" + body)
    if args.write:
        write_section("bench_serve_chaos", "Serving through engine faults (tandem serve --fault-mtbf)", body)
        print("\nwrote the bench_serve_chaos section of BENCHMARKS.md")
    return 0 if sum(verdicts) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
