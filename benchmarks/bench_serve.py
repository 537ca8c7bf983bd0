"""Serving load benchmark: `tandem serve` under 1, 8, 32 and 64 concurrent streaming clients.

    .venv/bin/python benchmarks/bench_serve.py --model runs/demo            # print the tables
    .venv/bin/python benchmarks/bench_serve.py --model runs/demo --write    # also update BENCHMARKS.md
    benchmarks/build_llama_server.sh                                        # first, for the llama-server rows

Starts the real server (`python -m tandem.cli serve`) in a subprocess on a free loopback port
and drives it from this process with asyncio: each level sends a fixed number of streaming chat
requests (stream_options.include_usage, `ignore_eos` so every request generates exactly
--max-tokens tokens) through that many concurrent clients, each one keep-alive connection of a
minimal HTTP/1.1 client (`Connection`: httpx made the load generator use 2-4x the CPU, which the
server on the same two cores then lacked). Per level: token throughput
(completion tokens / wall time of the level), time to first token (request sent -> first chunk
carrying text) and inter-token latency (per request: (last text chunk - first) / (tokens - 1), as
vLLM's TPOT; single chunk gaps say little once the server sends waiting tokens in one write and
the client reads several per socket read) at p50/p99 over requests, and
the lost (transport error, non-200) and malformed (bad JSON, no [DONE], wrong usage or finish
reason) responses, which must be zero.

Then the 32-client level alternately against that server and a second one started with
--max-batch 1 (one request at a time, the others queue), three rounds each: the median of the
three ratios is the continuous-batching speed-up, target >= 4x (alternating rounds keep a noisy,
shared machine from favouring either side). For reference the same ratio is measured for the
Engine alone (generate() on the same prompts, no HTTP): the ceiling the server can approach. When llama_cpp is
installed, the model is exported to GGUF and llama-cpp-python's own OpenAI-compatible server
(`python -m llama_cpp.server`, with --interrupt_requests false: by default a new request cuts the
running stream short) takes the same 1- and 32-client levels (it has no ignore_eos, so the
end-of-turn token is suppressed with logit_bias instead); otherwise that row says why it is
missing. The stronger peer is llama.cpp's own C++ `llama-server` (what a llama.cpp user would
deploy): built from the llama.cpp source vendored in the llama-cpp-python sdist by
benchmarks/build_llama_server.sh into .llama-server/ (or --llama-server PATH), started on the
same GGUF export with --parallel 32 slots and continuous batching, and driven through every level
(1, 8, 32, 64 clients; at 64, 32 are decoded and 32 queue, as tandem's --max-batch 32 does), with
ignore_eos as tandem's; without a binary that row says how to build it. --levels 1,8 limits every
level list (a smoke run). The servers get --threads threads (default 1); the load generator is
this one Python process, on the other core. Everything is bounded: about 1,100 requests, a few
minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.common import environment, table, write_section  # noqa: E402

LEVELS = {1: 8, 8: 32, 32: 96, 64: 128}         # concurrent clients -> requests sent at that level
LLAMA_SLOTS = 32                                 # llama-server --parallel: requests it decodes together
SPEEDUP_TARGET = 4.0
ROUNDS = 3                                       # alternating batched / one-at-a-time rounds for the ratio


@dataclass
class Level:
    clients: int
    requests: int = 0
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    lost: int = 0
    malformed: int = 0

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], cwd: Path | None = None) -> subprocess.Popen:
    """A server process whose output goes to an unnamed temporary file (proc.log). Not a pipe: a
    pipe nobody reads fills after 64 KB and then blocks a chatty server (llama-server logs every
    request) mid-benchmark, which the load generator would count as lost requests."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def log_tail(proc: subprocess.Popen, size: int = 500) -> str:
    proc.log.seek(0, os.SEEK_END)
    proc.log.seek(max(0, proc.log.tell() - size))
    return proc.log.read().decode(errors="replace")


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode}: {log_tail(proc)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: the server at {url} did not come up in {timeout:.0f} s")


def start_tandem(model: str, max_batch: int, threads: int, *flags: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    proc = launch([sys.executable, "-m", "tandem.cli", "serve", "--model", model, "--name", "bench",
                   "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
                   "--max-queue", "512", *flags], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/health", proc)
    return proc, url, "bench"


def export_gguf(model: str, tmp: Path) -> tuple[Path, int, int]:
    """The model as an f32 GGUF file in tmp (once); returns (file, context length, eos id)."""
    from tandem.export.gguf import write_gguf
    from tandem.loading import load_weights
    config, weights, tokenizer, _ = load_weights(model)
    gguf = tmp / "model.gguf"
    if not gguf.exists():
        write_gguf(config, weights, tokenizer, gguf, out_type="f32")
    return gguf, config.max_position_embeddings, tokenizer.eos_id


def start_llamacpp(model: str, threads: int, tmp: Path) -> tuple[subprocess.Popen, str, str, int]:
    """llama-cpp-python's server on a GGUF export of the model; also returns the eos id."""
    gguf, context, eos = export_gguf(model, tmp)
    port = free_port()
    proc = launch([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
                   "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
                   "--n_threads", str(threads), "--chat_format", "chatml",
                   "--interrupt_requests", "false"])      # queue concurrent requests, don't cut them off
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/v1/models", proc)
    return proc, url, "bench", eos


def find_llama_server(path: str | None) -> Path | None:
    """--llama-server, else the build of benchmarks/build_llama_server.sh, else llama-server on PATH."""
    if path:
        if not Path(path).is_file():
            raise SystemExit(f"error: --llama-server {path} is not a file; build it with "
                             f"benchmarks/build_llama_server.sh or leave the option out")
        return Path(path)
    built = ROOT / ".llama-server" / "bin" / "llama-server"
    on_path = shutil.which("llama-server")
    return built if built.is_file() else Path(on_path) if on_path else None


def start_llama_server(binary: Path, model: str, threads: int, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """llama.cpp's own C++ server on the GGUF export: 32 parallel slots with continuous batching,
    each slot the model's full context; requests take ignore_eos like tandem's."""
    gguf, context, _ = export_gguf(model, tmp)
    port = free_port()
    proc = launch([str(binary), "--model", str(gguf), "--alias", "bench", "--host", "127.0.0.1",
                   "--port", str(port), "--ctx-size", str(context * LLAMA_SLOTS),
                   "--parallel", str(LLAMA_SLOTS), "--cont-batching", "--threads", str(threads),
                   "--threads-batch", str(threads), "--chat-template", "chatml"])
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/health", proc)
    return proc, url, "bench"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and yields the response body as it
    arrives (chunked or not): just what the load generator needs, on asyncio streams."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, AsyncIterator[bytes]]:
        """(status, the body's pieces); read the pieces to the end before the next request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json"
                          f"\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
        status, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}
        return int(status.split()[1]), self._body(headers)

    async def _body(self, headers: dict) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                yield (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")                      # the end of the (empty) trailer
        else:
            yield await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


@dataclass
class Reply:
    """What one streamed chat request got back."""
    status: int = 0
    stamps: list[float] = field(default_factory=list)     # arrival time of each chunk carrying text
    text: list[str] = field(default_factory=list)         # that text (reasoning or content), in order
    usage: dict | None = None
    finish: str | None = None
    error: dict | None = None                             # an in-stream error event's "error"
    done: bool = False                                    # ended with data: [DONE] and nothing after


async def stream_chat(conn: Connection, body: dict) -> Reply:
    """One streamed chat request, read to its end (raises OSError, EOFError or TimeoutError when
    the connection fails, ValueError/KeyError... when the answer is not HTTP/SSE/OpenAI)."""
    reply = Reply()
    async with asyncio.timeout(120):
        reply.status, pieces = await conn.post("/v1/chat/completions", body)
        if reply.status != 200:
            conn.close()
            return reply
        buffer = b""
        async for data in pieces:                     # raw bytes, split by hand: a cheap client
            *events, buffer = (buffer + data).replace(b"\r\n", b"\n").split(b"\n\n")
            now = time.perf_counter()
            for line in (line for event in events for line in event.split(b"\n")):
                if not line or line.startswith(b":"):         # SSE comments (keep-alive pings)
                    continue
                if not line.startswith(b"data: "):
                    raise ValueError(f"not an SSE data line: {line[:80]!r}")
                if line == b"data: [DONE]":
                    reply.done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    reply.error = chunk["error"]
                    continue
                reply.usage = chunk.get("usage") or reply.usage
                for choice in chunk["choices"]:
                    delta = choice.get("delta") or {}
                    text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                    if text:
                        reply.stamps.append(now)
                        reply.text.append(text)
                    reply.finish = choice.get("finish_reason") or reply.finish
        reply.done = reply.done and not buffer.strip()
    return reply


async def one_request(conn: Connection, body: dict, level: Level, exact: bool) -> None:
    """One streamed chat request; records its timings, or counts it lost / malformed."""
    sent = time.perf_counter()
    try:
        reply = await stream_chat(conn, body)
    except (OSError, EOFError, TimeoutError):             # incl. a connection closed mid-response
        conn.close()
        level.lost += 1
        return
    except (ValueError, KeyError, IndexError, AttributeError, asyncio.LimitOverrunError):   # not HTTP/SSE/OpenAI
        conn.close()
        level.malformed += 1
        return
    if reply.status != 200:
        level.lost += 1
        return
    stamps = reply.stamps
    tokens = reply.usage["completion_tokens"] if reply.usage else len(stamps)
    want = body["max_tokens"]
    if not reply.done or reply.error or not stamps or reply.finish != "length" or (exact and tokens != want) \
            or tokens > want:
        level.malformed += 1
        return
    level.tokens += tokens
    level.ttft.append(stamps[0] - sent)
    if tokens > 1:
        level.itl.append((stamps[-1] - stamps[0]) / (tokens - 1))


def bodies(model: str, requests: int, max_tokens: int, extra: dict) -> list[dict]:
    """The load: streamed chat requests, request i seeded with i."""
    return [{"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True,
             "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": f"What is {17 + i % 80} + {i % 9}?"}], **extra}
            for i in range(requests)]


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, extra: dict,
                    exact: bool) -> Level:
    level = Level(clients, requests)
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies(model, requests, max_tokens, extra):
        queue.put_nowait(body)

    async def worker(conn: Connection):
        try:
            while not queue.empty():
                await one_request(conn, queue.get_nowait(), level, exact)
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*[worker(Connection(url)) for _ in range(clients)])
    level.wall = time.perf_counter() - started
    return level


def measure(url: str, model: str, levels: dict[int, int], max_tokens: int, extra: dict, exact: bool,
            warm: bool = True) -> list[Level]:
    if warm:
        asyncio.run(run_level(url, model, 4, 8, 8, extra, exact=False))      # warm-up, not counted
    out = []
    for clients, requests in levels.items():
        level = asyncio.run(run_level(url, model, clients, requests, max_tokens, extra, exact))
        print(f"  {clients:3d} clients: {level.throughput:8.0f} tokens/s  "
              f"TTFT p50 {pct(level.ttft, 50) * 1e3:7.1f} ms  ITL p50 {pct(level.itl, 50) * 1e3:6.2f} ms  "
              f"lost {level.lost} malformed {level.malformed}", flush=True)
        out.append(level)
    return out


def engine_ceiling(model: str, max_tokens: int, threads: int) -> tuple[float, float]:
    """tokens/s of the Engine alone (no HTTP, same prompts and sampling) serving 32 requests one
    at a time and all together, medians of 3: the ratio the server can at best reproduce."""
    import torch

    from tandem.infer.engine import Engine, SamplingParams
    from tandem.loading import load_model
    torch.set_num_threads(threads)
    loaded = load_model(model)
    prompts = [loaded.tokenizer.encode_prompt([{"role": "user", "content": f"What is {17 + i % 80} + {i % 9}?"}])
               for i in range(32)]
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=i, logprobs=False) for i in range(32)]
    out = []
    for batch in (1, 32):
        engine = Engine(loaded.model, max_batch=batch, max_len=loaded.model.config.max_position_embeddings)
        engine.generate(prompts[:batch], params[:batch])                  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            engine.generate(prompts, params)
            times.append(time.perf_counter() - started)
        out.append(32 * max_tokens / sorted(times)[1])
    return out[0], out[1]


def row(server: str, level: Level) -> list:
    ms = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
    return [server, level.clients, level.requests, f"{level.throughput:.0f}", ms(pct(level.ttft, 50)),
            ms(pct(level.ttft, 99)), f"{pct(level.itl, 50) * 1e3:.2f}", f"{pct(level.itl, 99) * 1e3:.2f}",
            level.lost, level.malformed]


def versus(ours: dict[int, Level], theirs: list[Level]) -> str:
    return "; ".join(f"at {c.clients} client(s) tandem has {ours[c.clients].throughput / c.throughput:.2f}x its "
                     f"tokens/s and {pct(c.ttft, 50) / pct(ours[c.clients].ttft, 50):.1f}x lower TTFT p50"
                     for c in theirs if c.clients in ours)


def llama_cpp_python_peer(args, model: str, tmp: Path, ours: dict[int, Level]) -> tuple[list, str]:
    """llama-cpp-python's server at 1 and 32 clients: (rows, the note under the table)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return [], ("llama-cpp-python's server: not measured, `llama_cpp` is not installed here "
                    "(pip install 'llama-cpp-python[server]' and rerun to add its rows).")
    print("llama-cpp-python server (GGUF f32):", flush=True)
    try:
        proc, url, name, eos = start_llamacpp(model, args.threads, tmp)
    except SystemExit as exc:          # e.g. the [server] extra is missing
        return [], f"llama-cpp-python's server: could not start ({exc})."
    levels = {c: (LEVELS[1] if c == 1 else 32) for c in (1, 32) if c in args.levels}
    try:
        cpp = measure(url, name, levels, args.max_tokens, {"logit_bias": {str(eos): -100.0}}, exact=False)
    finally:
        stop(proc)
    return ([row("llama-cpp-python server (GGUF f32)", level) for level in cpp],
            "Against llama-cpp-python's server on the GGUF export of the same model, same load: " + versus(ours, cpp)
            + " (its 32-client throughput is its one-client rate: that server answers one request at a time).")


def llama_server_peer(args, model: str, tmp: Path, ours: dict[int, Level]) -> tuple[list, str]:
    """llama.cpp's C++ llama-server (--parallel 32, continuous batching) at every level."""
    binary = find_llama_server(args.llama_server)
    if binary is None:
        return [], ("llama.cpp's llama-server: not measured, no binary (run benchmarks/build_llama_server.sh, "
                    "about 7 minutes on 2 cores, or pass --llama-server PATH).")
    print(f"llama.cpp llama-server (GGUF f32, --parallel {LLAMA_SLOTS}, continuous batching):", flush=True)
    proc, url, name = start_llama_server(binary, model, args.threads, tmp)
    try:
        server = measure(url, name, {c: LEVELS[c] for c in args.levels}, args.max_tokens, {"ignore_eos": True},
                         exact=True)
    finally:
        stop(proc)
    return ([row(f"llama.cpp llama-server (GGUF f32, --parallel {LLAMA_SLOTS})", level) for level in server],
            f"Against llama.cpp's own C++ llama-server (built from the source vendored in llama-cpp-python, "
            f"--parallel {LLAMA_SLOTS} slots, continuous batching, {args.threads} thread(s)) on the same GGUF "
            f"export, same load and ignore_eos: " + versus(ours, server) + ".")


def smoke_model(tmp: Path) -> str:
    out = tmp / "smoke"
    print("no --model given and runs/demo is missing: training a smoke model (~30 s)...", flush=True)
    result = subprocess.run([sys.executable, "-m", "tandem.cli", "pipeline", "--preset", "smoke", "--out", str(out),
                             "--quiet"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the smoke run failed; pass --model RUN: {result.stderr.strip()[-300:]}")
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a tandem run (default: runs/demo if it exists, else a fresh smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--levels", default="1,8,32,64",
                        help="client counts measured (default 1,8,32,64; fewer for a smoke run)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (default: the build of "
                                               "benchmarks/build_llama_server.sh, else one on PATH)")
    parser.add_argument("--write", action="store_true", help="update the bench_serve section of BENCHMARKS.md")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    if not set(args.levels) <= set(LEVELS):
        raise SystemExit(f"error: --levels takes client counts among {', '.join(map(str, LEVELS))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = args.model or (str(ROOT / "runs" / "demo") if (ROOT / "runs" / "demo").exists() else smoke_model(tmp))
    if not Path(model).exists():
        raise SystemExit(f"error: model path not found: {model}")
    ignore_eos = {"ignore_eos": True}
    rows, notes = [], []

    print(f"tandem serve --max-batch 32 ({model}) and --max-batch 1 (one request at a time):", flush=True)
    batched_proc, batched_url, name = start_tandem(model, 32, args.threads)
    serial_proc, serial_url, _ = start_tandem(model, 1, args.threads)
    try:
        print(" max-batch 32:", flush=True)
        batched = measure(batched_url, name, {c: LEVELS[c] for c in args.levels}, args.max_tokens, ignore_eos,
                          exact=True)
        print(" the 32-client level again, alternating max-batch 32 and max-batch 1 (medians of 3 rounds):")
        rounds = []
        for _ in range(ROUNDS):
            fast = measure(batched_url, name, {32: LEVELS[32]}, args.max_tokens, ignore_eos, exact=True, warm=False)
            slow = measure(serial_url, name, {32: 32}, args.max_tokens, ignore_eos, exact=True)
            rounds.append((fast[0], slow[0]))
    finally:
        stop(batched_proc)
        stop(serial_proc)
    rows += [row("tandem, continuous batching (max-batch 32)", level) for level in batched]
    ratios = sorted(fast.throughput / slow.throughput for fast, slow in rounds)
    speedup = ratios[len(ratios) // 2]
    serial = sorted((slow for _, slow in rounds), key=lambda level: level.throughput)[len(rounds) // 2]
    rows.append(row("tandem, one request at a time (max-batch 1)", serial))

    ours = {level.clients: level for level in batched}
    for peer in (llama_cpp_python_peer, llama_server_peer):
        peer_rows, note = peer(args, model, tmp, ours)
        rows += peer_rows
        notes.append(note)

    print("the Engine alone, no HTTP (32 requests one at a time, then together):", flush=True)
    alone_1, alone_32 = engine_ceiling(model, args.max_tokens, args.threads)
    measured = batched + [level for pair in rounds for level in pair]
    bad = sum(level.lost + level.malformed for level in measured)
    verdict = "met" if speedup >= SPEEDUP_TARGET else "MISSED"
    summary = (f"Continuous batching at 32 clients: **{speedup:.1f}x** the token throughput of one request at a "
               f"time (median of {ROUNDS} alternating rounds: {', '.join(f'{r:.1f}x' for r in ratios)}; "
               f"target >= {SPEEDUP_TARGET:.0f}x: {verdict}). The Engine alone, without HTTP, in the same run: "
               f"{alone_32:.0f} vs {alone_1:.0f} tokens/s = {alone_32 / alone_1:.1f}x, the ceiling for that ratio. "
               f"Lost or malformed responses: **{bad}** of {sum(level.requests for level in measured)}.")
    from tandem.loading import load_weights
    config = load_weights(model)[0]
    shape = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
             f"{config.num_parameters() / 1e6:.2f}M parameters")
    body = "\n\n".join([
        f"Model `{Path(model).name}` ({shape}), {args.max_tokens} generated tokens per request (ignore_eos), "
        f"streaming chat requests over loopback HTTP; server: {environment(args.threads)}; load generator: one "
        f"asyncio process. "
        f"TTFT = request sent to first text chunk; ITL = a request's mean time between tokens "
        f"((last text chunk - first) / (tokens - 1)); p50/p99 over requests.",
        table(["server", "clients", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
               "ITL p99 ms", "lost", "malformed"], rows),
        summary, *notes,
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on a {os.cpu_count()}-core machine."])
    print("\n" + body)
    if args.write:
        write_section("bench_serve", "Serving under load (tandem serve)", body)
        print("\nwrote the bench_serve section of BENCHMARKS.md")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
