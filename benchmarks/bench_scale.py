"""Scale check on a Qwen2.5-0.5B-shaped model (random init, nothing downloaded): data-parallel SFT
with DDP vs FSDP2, sharded checkpoints, and today's trainer -> worker weight sync against raw TCP.

    python benchmarks/bench_scale.py --write          the real run (0.5B shape, 2 ranks on the cpu)
    python benchmarks/bench_scale.py --small          smoke: a 2-layer, 64-wide shape, seconds

Sections, each measured in this one run (ranks are spawned processes, gloo, `--threads` each):

1. training: `--steps` SFT steps (after one warm-up step) of the real code path
   (tandem/train/parallel.py Ranks + sft.forward_backward + AdamW) on random tokens, global batch
   `--batch` x `--seq`, with run.parallel = ddp and then fsdp. Per rank: peak RSS (getrusage, the
   whole process: model init included), median step time; tokens/s over the ranks; MFU = model FLOPs
   (6 x params x tokens, model.estimate_train_flops) / (step time x ranks x the fp32 matmul peak one
   rank measures, tandem/peak.py). Target: FSDP peak RSS <= 0.6 x DDP's.
2. checkpoint (FSDP ranks, tandem/train/sharded_checkpoint.py): a synchronous save; an async save
   (the time the step waits, and the time until committed); a load; exact resume: the weights after
   one more step from the loaded checkpoint == those after the same step straight on.
3. sync: the bf16 weights (`2 x params` bytes) to 1 and to 2 reader processes, streamed bucket by
   bucket over TCP (tandem/train/weight_stream.py, `--bucket-mb`, each reader verifying the
   fingerprint), through today's rollout path (put_blob / get_blob over the c10d TCPStore), and
   through a raw loopback TCP socket to one reader (the bound). Targets: streamed >= 50% of the raw
   bound; the trainer's extra peak RSS during a streamed sync <= 2 buckets.

Memory (estimates, 0.5B shape, 2 ranks): DDP holds fp32 weights + gradients + AdamW moments (16
bytes/param: ~8 GB per rank) plus foreach AdamW's full-size temporary (~2 GB) and activations: ~11 GB
per rank, ~22 GB in all; FSDP about half per rank. Run it alone on a 24 GB machine; FSDP runs first,
and DDP ranks killed for want of memory are reported as "did not fit" rather than ending the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import environment, median, table, write_section  # noqa: E402
from tandem.config import SFTConfig  # noqa: E402
from tandem.model import ModelConfig, Transformer, estimate_train_flops, weights_fingerprint  # noqa: E402

QWEN_05B = dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
SMALL = dict(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def random_batch(config: ModelConfig, rows: int, seq: int, step: int):
    from tandem.train.sft import Batch
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, config.vocab_size, (rows, seq), generator=generator)
    return Batch(ids, torch.ones(rows, seq - 1, dtype=torch.bool), rows * seq)


def train_step(ranks, model, optimizer, config, args, step: int) -> float:
    """One SFT step of this rank's rows of the global batch; returns its seconds."""
    from tandem.train.sft import Batch, forward_backward
    started = time.perf_counter()
    batch = random_batch(config, args.batch, args.seq, step)
    mine = Batch(ranks.local_rows(batch.input_ids), ranks.local_rows(batch.target_mask), batch.tokens)
    model.zero_grad(set_to_none=True)
    forward_backward(model, [mine], torch.float32, int(batch.target_mask.sum()))
    ranks.reduce_grads(model)
    ranks.clip_grad_norm(model, 1.0)
    optimizer.step()
    return time.perf_counter() - started


def rank_main(rank: int, world: int, port: int, kind: str, args, out: str) -> None:
    """One spawned rank: train, then (FSDP) checkpoint; writes its figures to out/rank{rank}.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from tandem.peak import matmul_peak
    from tandem.train.parallel import Ranks
    from tandem.train.sft import build_optimizer
    config = ModelConfig(**(SMALL if args.small else QWEN_05B))
    cfg = argparse.Namespace(run=argparse.Namespace(parallel=kind))
    ranks = Ranks.join(cfg, torch.device("cpu"), torch.float32)
    model = Transformer(config)
    model.reset_parameters(0)
    ranks.shard(model)
    optimizer = build_optimizer(model, SFTConfig(lr=1e-4))
    times = [train_step(ranks, model, optimizer, config, args, step) for step in range(args.steps + 1)][1:]
    figures = {"step_s": median(times), "peak_rss_gb": peak_rss_gb(),
               "peak_flops": matmul_peak("cpu", "fp32", config, args.batch * args.seq // world)}
    if kind == "fsdp":
        figures.update(checkpoint_figures(ranks, model, optimizer, config, args, Path(out)))
    Path(out, f"{kind}-rank{rank}.json").write_text(json.dumps(figures))
    ranks.leave()


def checkpoint_figures(ranks, model, optimizer, config, args, out: Path) -> dict:
    """Sharded save (sync, async), load, and exact resume, timed on every rank."""
    from tandem.train import sharded_checkpoint
    root = out / "checkpoints"
    extra = {"model_config.json": json.dumps(config.to_dict()).encode()}
    saver = sharded_checkpoint.ShardedSaver(async_save=False)
    started = time.perf_counter()
    saver.save(root, 1, model, optimizer, {"step": 1}, extra, keep=5)
    sync_s = time.perf_counter() - started
    async_saver = sharded_checkpoint.ShardedSaver(async_save=True)
    started = time.perf_counter()
    async_saver.save(root, 2, model, optimizer, {"step": 2}, extra, keep=5)
    waited_s = time.perf_counter() - started
    async_saver.wait()
    committed_s = time.perf_counter() - started
    train_step(ranks, model, optimizer, config, args, 100)
    straight = ranks.full_state(model)        # a collective: every rank takes part, rank 0 gets the weights
    started = time.perf_counter()
    sharded_checkpoint.load_into(root / "step_000002", model, optimizer)
    load_s = time.perf_counter() - started
    train_step(ranks, model, optimizer, config, args, 100)
    resumed = ranks.full_state(model)
    exact = weights_fingerprint(straight) == weights_fingerprint(resumed) if ranks.leader else None
    return {"save_sync_s": sync_s, "save_async_wait_s": waited_s, "save_async_commit_s": committed_s,
            "load_s": load_s, "exact": exact}


def train_section(args, scratch: Path) -> tuple[str, dict]:
    """FSDP first, then DDP, whose ranks may not fit the machine (2 x ~11 GB at the 0.5B shape: fp32
    weights, gradients, AdamW moments and foreach AdamW's temporary): a DDP rank killed is reported,
    not fatal."""
    results = {}
    for kind in ("fsdp", "ddp"):
        try:
            mp.spawn(rank_main, args=(args.ranks, free_port(), kind, args, str(scratch)), nprocs=args.ranks, join=True)
            results[kind] = [json.loads((scratch / f"{kind}-rank{r}.json").read_text()) for r in range(args.ranks)]
        except mp.ProcessExitedException as exc:
            if kind == "fsdp":
                raise
            results[kind] = None
            print(f"ddp ranks did not finish ({exc}): out of memory?", file=sys.stderr)
    config = ModelConfig(**(SMALL if args.small else QWEN_05B))
    flops = estimate_train_flops(config, args.batch * args.seq)
    rows = []
    for kind in ("ddp", "fsdp"):
        figures = results[kind]
        if figures is None:
            rows.append([kind, "did not fit (a rank was killed)", "", "", ""])
            continue
        step_s = max(f["step_s"] for f in figures)
        peak = min(f["peak_flops"] for f in figures) * args.ranks
        rows.append([kind, f"{max(f['peak_rss_gb'] for f in figures):.2f}", f"{step_s:.2f}",
                     f"{args.batch * args.seq / step_s:.0f}", f"{flops / step_s / peak:.1%}"])
    body = table(["parallel", "peak RSS/rank (GB)", "step (s)", "tokens/s", "MFU"], rows)
    fsdp_peak = max(f["peak_rss_gb"] for f in results["fsdp"])
    if results["ddp"] is None:
        body += f"\n\nDDP did not fit this machine; FSDP did, at {fsdp_peak:.2f} GB per rank (target met)\n"
    else:
        ratio = fsdp_peak / max(f["peak_rss_gb"] for f in results["ddp"])
        body += f"\n\nFSDP / DDP peak RSS per rank: {ratio:.2f} (target <= 0.6: {'met' if ratio <= 0.6 else 'missed'})\n"
    return body, results["fsdp"][0]


def checkpoint_section(figures: dict) -> str:
    rows = [["save, synchronous", f"{figures['save_sync_s']:.2f}"],
            ["save, async: the step waits", f"{figures['save_async_wait_s']:.2f}"],
            ["save, async: until committed", f"{figures['save_async_commit_s']:.2f}"],
            ["load (same world size)", f"{figures['load_s']:.2f}"]]
    return (table(["sharded checkpoint (FSDP, rank 0)", "seconds"], rows)
            + f"\n\nresume exact (fingerprint after one more step): {figures['exact']}\n")


def store_reader(port: int, key: str, queue) -> None:
    from tandem.train.rollout import connect, get_blob
    store = connect("127.0.0.1", port, is_master=False)
    queue.put("ready")
    while not store.check([key]):
        time.sleep(0.001)
    queue.put((len(get_blob(store, key)), time.perf_counter()))


def stream_reader(port: int, small: bool, queue) -> None:
    """A rollout worker's side of the streamed sync: a bf16 model (allocated, not initialised)."""
    from tandem.train.weight_stream import receive_version
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**(SMALL if small else QWEN_05B)))
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight     # to_empty gave the tied head its own tensor
    conn = socket.create_connection(("127.0.0.1", port))
    queue.put("ready")
    version, fingerprint = receive_version(conn, model, timeout=600)
    queue.put((fingerprint, time.perf_counter()))


def tcp_reader(port: int, size: int, queue) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        buffer, got = bytearray(size), 0
        view = memoryview(buffer)
        while got < size:
            got += conn.recv_into(view[got:], min(size - got, 1 << 22))
    queue.put((got, time.perf_counter()))


def stream_rows(args, context) -> list[list]:
    """tandem/train/weight_stream.py from a live fp32 model to 1 and 2 bf16 receivers; the trainer's
    extra peak RSS during the sync (ru_maxrss after - before: the model is built first)."""
    from tandem.train.weight_stream import accept_receivers, listen, named_weights, send_version
    model = Transformer(ModelConfig(**(SMALL if args.small else QWEN_05B)))
    model.reset_parameters(0)
    rows = []
    for readers in (1, 2):
        server, queue = listen(), context.Queue()
        procs = [context.Process(target=stream_reader, args=(server.getsockname()[1], args.small, queue))
                 for _ in range(readers)]
        for proc in procs:
            proc.start()
        receivers = accept_receivers(server, readers, timeout=600)
        assert all(queue.get() == "ready" for _ in procs)
        before = peak_rss_gb()
        started = time.perf_counter()
        stats = send_version(receivers, named_weights(model), 1, torch.bfloat16, args.bucket_mb << 20, timeout=600)
        answers = [queue.get() for _ in procs]
        done = max(t for _, t in answers) - started
        assert all(f == stats["fingerprint"] for f, _ in answers), "a receiver's weights fail the fingerprint"
        for proc in procs:
            proc.join()
        server.close()
        rows.append([f"streamed TCP, {args.bucket_mb} MB buckets, {readers} reader(s)", f"{done:.2f}",
                     f"{readers * stats['bytes'] / done / 1e9:.2f}",
                     f"{(peak_rss_gb() - before) * 1024:.0f} MB ({stats['buckets']} buckets)"])
    return rows


def store_rows(payload: bytes, context) -> list[list]:
    """Today's path: put_blob / get_blob over the c10d TCPStore (one server thread carries every byte)."""
    from tandem.train.rollout import connect, put_blob
    rows = []
    for readers in (1, 2):
        port, queue = free_port(), context.Queue()
        store = connect("127.0.0.1", port, is_master=True)
        procs = [context.Process(target=store_reader, args=(port, f"v{readers}", queue)) for _ in range(readers)]
        for proc in procs:
            proc.start()
        assert all(queue.get() == "ready" for _ in procs)   # readers connected and polling: start the clock
        started = time.perf_counter()
        put_blob(store, f"v{readers}", payload)
        done = max(queue.get()[1] for _ in procs) - started
        for proc in procs:
            proc.join()
        rows.append([f"c10d TCPStore (rollout.py today), {readers} reader(s)", f"{done:.2f}",
                     f"{readers * len(payload) / done / 1e9:.2f}", "a full serialized copy"])
    return rows


def raw_tcp_row(payload: bytes, context) -> list:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        queue = context.Queue()
        proc = context.Process(target=tcp_reader, args=(server.getsockname()[1], len(payload), queue))
        proc.start()
        conn, _ = server.accept()
        started = time.perf_counter()
        conn.sendall(payload)
        done = queue.get()[1] - started
        conn.close()
        proc.join()
    return ["raw loopback TCP, 1 reader (the bound)", f"{done:.2f}", f"{len(payload) / done / 1e9:.2f}", ""]


def sync_section(args) -> str:
    config = ModelConfig(**(SMALL if args.small else QWEN_05B))
    context = mp.get_context("spawn")
    rows = stream_rows(args, context)
    payload = bytes(2 * config.num_parameters())      # the bf16 weights' size (content does not matter here)
    rows += store_rows(payload, context)
    raw = raw_tcp_row(payload, context)
    rows.append(raw)
    streamed = float(rows[0][2]) / float(raw[2])
    return (f"{len(payload) / 1e9:.2f} GB of bf16 weights\n\n"
            + table(["path", "seconds", "GB/s (all readers)", "trainer extra peak RSS"], rows)
            + f"\n\nstreamed, 1 reader / raw loopback TCP: {streamed:.0%} (target >= 50%: "
            f"{'met' if streamed >= 0.5 else 'missed'}). The streamed path is not yet wired into the rollout "
            "workers (tandem/train/weight_stream.py).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer, 64-wide model: a smoke run in seconds")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed SFT steps per parallel kind")
    parser.add_argument("--batch", type=int, default=2, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--bucket-mb", type=int, default=256, help="streamed sync bucket size (MB)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        train, fsdp_rank0 = train_section(args, Path(scratch))
        body = "\n".join([f"{'small smoke shape' if args.small else 'Qwen2.5-0.5B shape'}, {args.ranks} cpu ranks, "
                          f"global batch {args.batch} x {args.seq} tokens; {environment(args.threads)} per rank", "",
                          "### Training", "", train, "### Sharded checkpoint", "", checkpoint_section(fsdp_rank0),
                          "### Weight sync", "", sync_section(args)])
    print(body)
    if args.write:
        write_section("scale", "Scale: DDP vs FSDP2, sharded checkpoints, weight sync (0.5B shape)", body)


if __name__ == "__main__":
    main()
