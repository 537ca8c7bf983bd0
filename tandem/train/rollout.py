"""The rollout role: worker processes that generate GRPO samples on their own device and dtype,
fed with weights by the trainer, and the trainer's side of that traffic.

    tandem rl --init runs/demo --out runs/rl                        one machine: tandem spawns the workers
    python -m tandem.train.rollout --master HOST:PORT --rank R      (re)start one worker by hand

Roles. A GRPO job is one torch.distributed job: ranks 0 .. rl.trainers-1 are trainers (rank 0 leads:
it samples prompts, scores rewards, publishes weights and checkpoints), the next rollout.workers
ranks are rollout workers. Each role has its own device and dtype (`rl.device`/`rl.dtype`,
`rollout.device`/`rollout.dtype`), e.g. trainer on cuda in fp32, workers on npu in bf16. The
trainer checks that the rollout device and dtype exist before it starts any worker; a worker on
another machine that lacks them reports the one-line error back and the job stops with it.

Launching.
* One machine (default): `tandem rl` hosts the job's store on 127.0.0.1 (`rollout.port`, 0 = any
  free port) and starts rollout.workers subprocesses of `python -m tandem.train.rollout`, each
  with `rollout.threads` torch threads and its log in runs/NAME/logs/rollout-R.log. A worker that
  dies or hangs is killed and respawned (up to rollout.max_restarts times).
* Across machines: the same entry point under torchrun, one torchrun per machine, e.g. a trainer
  node and a rollout node:

      torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
          -m tandem.cli rl --init runs/demo --out runs/rl --preset tiny --set rollout.workers=2
      torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr HOST --master-port 29500 \\
          -m tandem.cli rl --init runs/demo --out runs/rl --preset tiny --set rollout.workers=2

  RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from torchrun; WORLD_SIZE must equal
  rl.trainers + rollout.workers. Rank 0 needs --init and --out; worker ranks ignore them and get
  everything (model config, sampling settings, weights) from the trainer. The store is torchrun's
  own (the c10d store its agent hosts on MASTER_ADDR:MASTER_PORT). torchrun owns the processes
  here, so tandem does not respawn workers: it reassigns a dead worker's prompts and re-admits a
  worker that comes back, restarted by torchrun or by hand with `--master HOST:PORT --rank R`.

Data-parallel trainers (`rl.trainers > 1`, torchrun only: one process per rank). The trainer ranks
form their own process group over the trainer device's backend (accel.dist_backend: nccl, hccl,
gloo on the cpu). Rank 0 alone talks to the workers; it broadcasts each step's batch to the other
trainers, every trainer computes the loss of its contiguous slice of the sequences, and the
gradients are summed with all_reduce before the (identical) optimizer step. Every trainer rank
reads --init and resumes from the run's checkpoints itself, so trainer ranks on several machines
need the same paths (a shared filesystem); only rank 0 writes. A trainer that dies ends the job
(restart it; it resumes): trainers are the stable hardware in this design, workers are not.

Transport. Everything between the roles goes through host memory over the job's c10d key/value
store (torch.distributed.TCPStore), never through a collective: NCCL (trainer) and HCCL (workers)
cannot talk to each other, and a collective with a dead or hung peer blocks every rank in it,
where a key/value exchange lets the trainer poll with its own deadlines. The trainer never blocks
on a worker: it only ever `check`s whether a key exists and reads keys that do, so a dead or hung
worker can cost it `rollout.timeout` seconds, never the job. A worker re-admits itself by
announcing a new incarnation (an atomic counter per rank); work is keyed by rank and incarnation,
so a late answer from a killed incarnation is never mistaken for a new one. Values above the
store's 8 MiB message limit are split into chunks, with the chunk count written last. Rollouts
travel as JSON and weights as safetensors (neither can carry executable code, unlike pickle).

Keys (all small JSON unless said otherwise):
    spec                       what a worker needs: model config, device, dtype, sampling settings
    hello/R                    counter: incarnation number of worker R (it adds 1 when ready)
    fatal/R                    a worker's one-line startup error (device or dtype missing)
    weights/V                  safetensors bytes of weights version V, in the rollout dtype (chunked)
    refused/V                  counter: workers that got bytes failing V's SHA-256 (trainer resends)
    job/R/I/K                  the K-th job of incarnation I of worker R: version, fingerprint, requests
    result/R/I/K               its answer: tokens, raw-logit logprobs, finish reasons, timings

Weight sync. After each policy update the trainer publishes version V = step with its SHA-256
fingerprint (tandem.model.weights_fingerprint over the tensors as sent); each job names the version
and fingerprint it must be generated with. A worker switches weights only when a job asks for a
new version (or, after a trainer rollback republished it, new weights under a version number it
has seen), and verifies the fingerprint first: bytes that do not match are refused (logged, the
refusal counted, the trainer resends, the worker retries). The trainer keeps the last two versions
(async mode generates with the previous one). Sync time and bytes are measured on both sides.

Faults. A worker that exits (local: its process is gone), stops answering (no result within
rollout.timeout seconds of having work; a starting worker gets START_TIMEOUT = 120 s to import
torch and build its model) or returns malformed rollouts (wrong count, token ids
outside the vocabulary, logprobs that are not finite log-probabilities, a different weights
version) is declared failed: its process is killed, every job it held goes to another worker (or
back to its respawned self), and its late answers are ignored. A step is complete only when every
one of its prompts has an accepted answer, so no step is lost or doubled. With no worker left and
none coming back, the trainer generates the remaining prompts itself on the rollout device.
Sampling seeds belong to requests, not workers, so a reassigned prompt yields the same tokens
(barring last-bit differences of batch-size-dependent kernels).

Colocated mode (`rollout.workers = 0`): no worker processes; the trainer keeps a second copy of the
model on the rollout device and dtype and generates itself, taking turns with training. Weights
still go through the same publish/verify path, so sync bytes and the mismatch are comparable.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tandem import accel
from tandem.errors import TandemError
from tandem.architectures import build_model
from tandem.model import ModelConfig, weights_fingerprint
from tandem.progress import log

CHUNK = 4 << 20          # bytes per store value (the libuv TCPStore refuses messages over 8 MiB)
POLL = 0.004             # seconds between polls of the store for an answer or a job
SLOW_POLL = 0.25         # seconds between checks for (re)started workers and refused weights
KEEP_VERSIONS = 2        # weight versions kept published: async jobs use the previous one
START_TIMEOUT = 120.0    # seconds a worker may take to start (python + torch imports, model build)


class RolloutError(TandemError):
    """A rollout worker cannot run (device or dtype missing on its machine), or the job's launch
    does not add up (torchrun world size vs the config)."""


class WeightsMismatch(Exception):
    """Received weights fail their SHA-256 fingerprint (a worker refuses them and asks again)."""


# -----------------------------------------------------------------------------------------------
# The store: connection and chunked values


def connect(host: str, port: int, is_master: bool, timeout: float = 60.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=is_master, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)


def put_blob(store, key: str, data: bytes) -> None:
    """Write `data` under key as chunks key/0.., then key = chunk count (the commit, written last)."""
    chunks = max(1, math.ceil(len(data) / CHUNK))
    for i in range(chunks):
        store.set(f"{key}/{i}", data[i * CHUNK:(i + 1) * CHUNK])
    store.set(key, str(chunks))


def get_blob(store, key: str) -> bytes:
    chunks = int(store.get(key))
    return b"".join(store.get(f"{key}/{i}") for i in range(chunks))


def delete_blob(store, key: str) -> None:
    if store.check([key]):
        chunks = int(store.get(key))
        store.delete_key(key)
        for i in range(chunks):
            store.delete_key(f"{key}/{i}")


# -----------------------------------------------------------------------------------------------
# Weights: encode with a fingerprint, decode and verify


def encode_weights(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[str, bytes]:
    """(SHA-256 fingerprint, safetensors bytes) of `state` cast to the rollout dtype on the cpu."""
    wire = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    return weights_fingerprint(wire), st_save(wire)


def decode_weights(blob: bytes, fingerprint: str) -> dict[str, torch.Tensor]:
    """The tensors in `blob`, or WeightsMismatch if they do not hash to `fingerprint`."""
    try:
        state = st_load(blob)
    except Exception as exc:  # truncated or garbled bytes: same outcome as a wrong hash
        raise WeightsMismatch(f"unreadable weights ({exc})") from None
    got = weights_fingerprint(state)
    if got != fingerprint:
        raise WeightsMismatch(f"sha256 {got[:12]} != expected {fingerprint[:12]}")
    return state


def receive_weights(store, version: int, fingerprint: str, who: str, retries: int = 50,
                    backoff: float = 0.1) -> dict[str, torch.Tensor]:
    """Fetch weights `version` from the store and verify them; on a mismatch refuse them (logged,
    counted under refused/V so the trainer resends) and try again."""
    for attempt in range(retries):
        try:
            return decode_weights(get_blob(store, f"weights/{version}"), fingerprint)
        except WeightsMismatch as exc:
            log(f"{who}: weights v{version} fail verification ({exc}); refusing them, retrying "
                f"({attempt + 1}/{retries})")
            store.add(f"refused/{version}", 1)
            time.sleep(backoff)
    raise WeightsMismatch(f"weights v{version} failed verification {retries} times")


# -----------------------------------------------------------------------------------------------
# Generation on the rollout device (used by worker processes, colocated mode and the fallback)


def make_spec(cfg, model_config: ModelConfig, tokenizer) -> dict:
    """Everything a worker needs to build its engine and sample, as JSON."""
    r, w = cfg.rl, cfg.rollout
    dtype = w.dtype
    if dtype == "auto":     # resolved here, once, so the trainer encodes weights in the workers' dtype
        try:
            dtype = accel.choose_dtype(dtype, accel.resolve_device(cfg.device_for("rollout")))
        except TandemError as exc:
            raise RolloutError(f"rollout.dtype = 'auto' is decided on the trainer's machine, where the rollout "
                               f"device is not usable ({exc}); set rollout.dtype to the workers' dtype") from None
    return {"model": model_config.to_dict(), "device": cfg.device_for("rollout"), "dtype": dtype,
            "deterministic": cfg.run.deterministic, "threads": w.threads, "max_batch": w.max_batch,
            "max_len": r.max_prompt_len + r.max_new_tokens,
            "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "eos_id": tokenizer.eos_id, "vocab_size": model_config.vocab_size}


class Generator:
    """A model and an Engine on the rollout device/dtype that answers jobs at a weights version."""

    def __init__(self, spec: dict):
        from tandem.infer.engine import Engine
        self.spec = spec
        self.device = accel.resolve_device(spec["device"])
        accel.set_deterministic(self.device, spec["deterministic"])   # run.deterministic, as the trainers
        self.dtype = accel.resolve_dtype(spec["dtype"], self.device)
        self.kind = accel.device_kind(self.device)
        self.model = build_model(ModelConfig.from_dict(spec["model"])).to(self.device, self.dtype).eval()
        self.engine = Engine(self.model, max_batch=spec["max_batch"], max_len=spec["max_len"])
        self.version: int | None = None
        self.fingerprint: str | None = None

    def holds(self, version: int, fingerprint: str) -> bool:
        """Whether these weights are loaded. A version number alone is not enough: after the trainer
        rolls back, the versions after the checkpoint's are published again with other weights."""
        return (self.version, self.fingerprint) == (version, fingerprint)

    def load(self, version: int, state: dict[str, torch.Tensor], fingerprint: str | None = None) -> None:
        """Load weights `version` (`fingerprint`: their SHA-256 as published; None when unknown)."""
        self.model.load_checkpoint_state({k: v.to(self.device) for k, v in state.items()})
        self.version, self.fingerprint = version, fingerprint

    def run(self, job: dict) -> dict:
        """Generate every request of `job` (weights must be at job["version"]); the answer payload."""
        from tandem.infer.engine import SamplingParams
        s = self.spec
        started = accel.timer(self.device)
        prompts = [p for p, _ in job["requests"]]
        params = [SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                 stop_token_ids=(s["eos_id"],), seed=seed) for _, seed in job["requests"]]
        generations = self.engine.generate(prompts, params)
        seconds = accel.timer(self.device) - started
        tokens = sum(len(p) + len(g.token_ids) for p, g in zip(prompts, generations))
        return {"version": self.version, "device_kind": self.kind, "seconds": seconds, "tokens": tokens,
                "samples": [{"tokens": g.token_ids, "logprobs": g.logprobs, "finish": g.finish_reason}
                            for g in generations]}


def check_payload(payload, job: dict, vocab_size: int, max_new_tokens: int) -> str | None:
    """None if a worker's answer to `job` is well formed, else what is wrong with it."""
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        return "not a rollout answer (no samples list)"
    if payload.get("version") != job["version"]:
        return f"generated with weights v{payload.get('version')}, the job asked for v{job['version']}"
    samples = payload["samples"]
    if len(samples) != len(job["requests"]):
        return f"{len(samples)} samples for {len(job['requests'])} requests"
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            return f"sample {i}: not an object"
        tokens, logprobs = sample.get("tokens"), sample.get("logprobs")
        if not isinstance(tokens, list) or not isinstance(logprobs, list) or not tokens:
            return f"sample {i}: tokens/logprobs missing or empty"
        if len(tokens) > max_new_tokens or len(logprobs) != len(tokens):
            return f"sample {i}: {len(tokens)} tokens with {len(logprobs)} logprobs (at most {max_new_tokens})"
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            return f"sample {i}: a token id outside the vocabulary [0, {vocab_size})"
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-3 for x in logprobs):
            return f"sample {i}: a logprob that is not a finite log-probability (<= 0)"
        if sample.get("finish") not in ("stop", "length"):
            return f"sample {i}: finish reason {sample.get('finish')!r}"
    return None


# -----------------------------------------------------------------------------------------------
# The worker process


def serve(host: str, port: int, rank: int) -> int:
    """Run rollout worker `rank` against the job's store until the trainer says stop or goes away."""
    who = f"rollout worker {rank} (pid {os.getpid()})"
    store = connect(host, port, is_master=False)
    while not store.check(["spec"]):
        time.sleep(0.05)
    spec = json.loads(store.get("spec"))
    accel.set_threads(spec["threads"])
    try:
        generator = Generator(spec)
    except TandemError as exc:
        store.set(f"fatal/{rank}", f"rollout worker {rank}: {exc}")
        return 2
    incarnation = store.add(f"hello/{rank}", 1)
    log(f"{who}: ready on {generator.device} in {spec['dtype']}, incarnation {incarnation}")
    k = 0
    while True:
        key = f"job/{rank}/{incarnation}/{k}"
        while not store.check([key]):
            time.sleep(POLL)
        job = json.loads(get_blob(store, key))
        if job.get("stop"):
            return 0
        sync_seconds = 0.0
        if not generator.holds(job["version"], job["fingerprint"]):
            started = time.perf_counter()
            state = receive_weights(store, job["version"], job["fingerprint"], who)
            generator.load(job["version"], state, job["fingerprint"])
            sync_seconds = time.perf_counter() - started
        payload = generator.run(job)
        payload["sync_seconds"] = sync_seconds
        put_blob(store, f"result/{rank}/{incarnation}/{k}", json.dumps(payload).encode())
        k += 1


# -----------------------------------------------------------------------------------------------
# The trainer's side


@dataclass
class RolloutResult:
    """The answers to one submitted step, in request order."""
    samples: list[dict]
    version: int
    generate: dict = field(default_factory=dict)       # device kind -> [seconds, tokens]
    sync_seconds: dict = field(default_factory=dict)   # device kind -> seconds receiving weights
    faults: int = 0                                    # worker faults handled while collecting it


def _merge(result: RolloutResult, payload: dict) -> None:
    gen = result.generate.setdefault(payload["device_kind"], [0.0, 0])
    gen[0] += payload["seconds"]
    gen[1] += payload["tokens"]
    if payload.get("sync_seconds"):
        kind = payload["device_kind"]
        result.sync_seconds[kind] = result.sync_seconds.get(kind, 0.0) + payload["sync_seconds"]


class Publisher:
    """The trainer's published weight versions (kept in memory for resends and local generation)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.versions: dict[int, tuple[str, bytes]] = {}   # version -> (fingerprint, blob)

    def encode(self, version: int, state: dict[str, torch.Tensor]) -> tuple[str, bytes]:
        """Keep `version` and the one before it; publishing an older version than the newest (after
        the trainer rolled back to a checkpoint) drops the newer ones, of an abandoned timeline."""
        self.versions = {v: kept for v, kept in self.versions.items() if v < version}
        self.versions[version] = encode_weights(state, self.dtype)
        for old in sorted(self.versions)[:-KEEP_VERSIONS]:
            del self.versions[old]
        return self.versions[version]

    def fingerprint(self, version: int) -> str:
        return self.versions[version][0]

    def load_into(self, generator: Generator, version: int) -> float:
        """Bring a local generator to `version` (verified like a worker does); seconds spent."""
        fingerprint, blob = self.versions[version]
        if generator.holds(version, fingerprint):
            return 0.0
        started = time.perf_counter()
        generator.load(version, decode_weights(blob, fingerprint), fingerprint)
        return time.perf_counter() - started


class Colocated:
    """rollout.workers = 0: the trainer generates itself on the rollout device, taking turns."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.generator = Generator(spec)
        self.publisher = Publisher(self.generator.dtype)
        self.results: dict[int, RolloutResult] = {}
        self.next_ticket = 0

    def describe(self) -> dict:
        return {"workers": 0, "device": str(self.generator.device), "dtype": self.spec["dtype"], "colocated": True}

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict:
        started = time.perf_counter()
        fingerprint, blob = self.publisher.encode(version, state)
        self.publisher.load_into(self.generator, version)
        return {"seconds": time.perf_counter() - started, "bytes": len(blob), "fingerprint": fingerprint}

    def submit(self, step: int, version: int, requests: list) -> int:
        sync = self.publisher.load_into(self.generator, version)
        payload = self.generator.run({"version": version, "requests": requests})
        result = RolloutResult(payload["samples"], version)
        _merge(result, dict(payload, sync_seconds=sync))
        self.next_ticket += 1
        self.results[self.next_ticket] = result
        return self.next_ticket

    def collect(self, ticket: int) -> RolloutResult:
        return self.results.pop(ticket)

    def fault_counts(self) -> dict:
        return {}

    def pids(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class _Shard:
    ticket: int
    index: int                   # shard number within its step (its preferred worker)
    job: dict                    # version, fingerprint, requests
    payload: dict | None = None  # the accepted answer


@dataclass
class _Worker:
    rank: int
    incarnation: int = 0                 # 0: has never said hello
    state: str = "starting"              # starting | live | failed (respawn pending or gone)
    proc: subprocess.Popen | None = None
    outstanding: deque = field(default_factory=deque)   # shards posted to it, in order
    next_job: int = 0
    since: float = field(default_factory=time.monotonic)  # start of the current wait for an answer
    restarts: int = 0


class WorkerPool:
    """The trainer's view of the rollout workers: publish weights, submit steps, collect answers,
    and handle dead, hung and faulty workers (see the module docstring)."""

    def __init__(self, cfg, spec: dict, store, ranks: list[int], spawn: tuple[str, int] | None, run_dir: Path):
        self.spec, self.store, self.run_dir = spec, store, Path(run_dir)
        self.timeout, self.max_restarts = cfg.rollout.timeout, cfg.rollout.max_restarts
        self.spawn_at = spawn                        # (host, port) when tandem owns the processes
        self.publisher = Publisher(accel.DTYPES[spec["dtype"]])
        self.refused_seen: dict[int, int] = {}
        self.workers = {rank: _Worker(rank) for rank in ranks}
        self.queue: deque[_Shard] = deque()
        self.tickets: dict[int, list[_Shard]] = {}
        self.next_ticket = 0
        self.faults = {"died": 0, "hung": 0, "malformed": 0, "respawned": 0, "refused_weights": 0, "local_fallback": 0}
        self.events = 0                              # fault events since the last collect
        self.last_slow_poll = 0.0
        self.fallback: Generator | None = None
        for rank in ranks:
            store.delete_key(f"fatal/{rank}")
        store.set("spec", json.dumps(spec))
        if spawn:
            for worker in self.workers.values():
                self._spawn(worker)

    def describe(self) -> dict:
        return {"workers": len(self.workers), "device": self.spec["device"], "dtype": self.spec["dtype"],
                "colocated": False, "spawned": self.spawn_at is not None}

    # --- processes ---

    def _spawn(self, worker: _Worker) -> None:
        host, port = self.spawn_at
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   TOKENIZERS_PARALLELISM="false")
        with open(logs / f"rollout-{worker.rank}.log", "a") as handle:
            worker.proc = subprocess.Popen([sys.executable, "-m", "tandem.train.rollout", "--master",
                                            f"{host}:{port}", "--rank", str(worker.rank)],
                                           stdout=handle, stderr=subprocess.STDOUT, env=env)
        worker.state, worker.since = "starting", time.monotonic()

    def _fail(self, worker: _Worker, kind: str, reason: str) -> None:
        """Declare a worker failed: kill it, requeue its jobs (in order, ahead of new ones), respawn."""
        self.faults[kind] += 1
        self.events += 1
        requeued = len(worker.outstanding)
        log(f"warning: rollout worker {worker.rank} {reason}; {requeued} job(s) reassigned")
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait()
        self.queue.extendleft(reversed(worker.outstanding))
        worker.outstanding.clear()
        worker.state = "failed"
        if self.spawn_at and worker.restarts < self.max_restarts:
            worker.restarts += 1
            self.faults["respawned"] += 1
            self._spawn(worker)

    # --- the poll loop ---

    def _poll(self) -> None:
        """One round: new incarnations, dead or hung workers, answers, resends, dispatch. The store
        is asked for an answer every call, about new incarnations and refusals every SLOW_POLL
        seconds (or every call while a worker is starting): the store lives in this process and
        polling it costs the trainer CPU."""
        now = time.monotonic()
        slow = now - self.last_slow_poll > SLOW_POLL or any(w.state != "live" for w in self.workers.values())
        for worker in self.workers.values():
            if slow:
                incarnation = self.store.add(f"hello/{worker.rank}", 0)
                if incarnation > worker.incarnation:          # a (re)started worker is ready
                    if worker.outstanding:                     # its old incarnation's jobs are orphans
                        self.queue.extendleft(reversed(worker.outstanding))
                        worker.outstanding.clear()
                    worker.incarnation, worker.next_job, worker.state = incarnation, 0, "live"
                    worker.since = now
                if worker.state == "starting" and self.store.check([f"fatal/{worker.rank}"]):
                    raise RolloutError(self.store.get(f"fatal/{worker.rank}").decode())
            if worker.state == "failed":
                continue
            if worker.proc is not None and worker.proc.poll() is not None:
                self._fail(worker, "died", f"exited with status {worker.proc.returncode}")
            elif worker.state == "starting" and now - worker.since > START_TIMEOUT:
                self._fail(worker, "hung", f"did not start within {START_TIMEOUT:g}s")
            elif worker.outstanding and now - worker.since > self.timeout:
                self._fail(worker, "hung", f"did not answer within rollout.timeout = {self.timeout:g}s")
            elif worker.outstanding:
                self._take_answer(worker, now)
        if slow:
            self._resend_refused()
            self.last_slow_poll = now
        self._dispatch()

    def _take_answer(self, worker: _Worker, now: float) -> None:
        shard = worker.outstanding[0]
        key = f"result/{worker.rank}/{worker.incarnation}/{worker.next_job - len(worker.outstanding)}"
        if not self.store.check([key]):
            return
        raw = get_blob(self.store, key)
        delete_blob(self.store, key)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        problem = check_payload(payload, shard.job, self.spec["vocab_size"], self.spec["max_new_tokens"])
        if problem:
            self._fail(worker, "malformed", f"returned malformed rollouts ({problem}); rejected")
            return
        worker.outstanding.popleft()
        worker.since = now
        shard.payload = payload

    def _resend_refused(self) -> None:
        for version in list(self.publisher.versions):
            refused = self.store.add(f"refused/{version}", 0)
            if refused > self.refused_seen.get(version, 0):
                self.faults["refused_weights"] += refused - self.refused_seen.get(version, 0)
                self.refused_seen[version] = refused
                log(f"warning: a rollout worker refused weights v{version} (fingerprint mismatch); resending")
                put_blob(self.store, f"weights/{version}", self.publisher.versions[version][1])

    def _dispatch(self) -> None:
        while self.queue:
            shard = self.queue[0]
            ranks = sorted(self.workers)
            preferred = self.workers[ranks[shard.index % len(ranks)]]
            live = [w for w in self.workers.values() if w.state == "live"]
            if preferred.state == "live" or (preferred.state == "starting" and preferred.restarts == 0):
                target = preferred
            elif live:
                target = min(live, key=lambda w: (len(w.outstanding), w.rank))
            else:
                target = None
            if target is None and any(w.state == "starting" for w in self.workers.values()):
                return                                     # wait for a (re)starting worker
            if target is not None and target.state == "starting":
                return                                     # first start: keep the planned split
            self.queue.popleft()
            if target is None:
                self._generate_locally(shard)
                continue
            if not target.outstanding:
                target.since = time.monotonic()
            key = f"job/{target.rank}/{target.incarnation}/{target.next_job}"
            put_blob(self.store, key, json.dumps(shard.job).encode())
            target.next_job += 1
            target.outstanding.append(shard)

    def _generate_locally(self, shard: _Shard) -> None:
        if self.fallback is None:
            log("warning: no rollout worker is left; the trainer generates the remaining rollouts itself")
            self.fallback = Generator(self.spec)
        self.faults["local_fallback"] += 1
        sync = self.publisher.load_into(self.fallback, shard.job["version"])
        shard.payload = dict(self.fallback.run(shard.job), sync_seconds=sync)

    # --- the API the trainer uses ---

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict:
        started = time.perf_counter()
        fingerprint, blob = self.publisher.encode(version, state)
        put_blob(self.store, f"weights/{version}", blob)
        for old in [v for v in self.refused_seen if v not in self.publisher.versions]:
            del self.refused_seen[old]
        stale = version - KEEP_VERSIONS
        if stale >= 0:
            delete_blob(self.store, f"weights/{stale}")
        return {"seconds": time.perf_counter() - started, "bytes": len(blob), "fingerprint": fingerprint}

    def submit(self, step: int, version: int, requests: list) -> int:
        """Queue the requests of one step, split into one shard per worker, at weights `version`."""
        self.next_ticket += 1
        per = math.ceil(len(requests) / len(self.workers))
        fingerprint = self.publisher.fingerprint(version)
        shards = [_Shard(self.next_ticket, i, {"step": step, "version": version, "fingerprint": fingerprint,
                                                "requests": requests[i * per:(i + 1) * per]})
                  for i in range(math.ceil(len(requests) / per))]
        self.tickets[self.next_ticket] = shards
        self.queue.extend(shards)
        self._dispatch()
        return self.next_ticket

    def collect(self, ticket: int) -> RolloutResult:
        """Wait until every shard of `ticket` has an accepted answer; handle faults meanwhile."""
        shards = self.tickets[ticket]
        while any(s.payload is None for s in shards):
            self._poll()
            time.sleep(POLL)
        del self.tickets[ticket]
        result = RolloutResult([s for shard in shards for s in shard.payload["samples"]], shards[0].job["version"])
        for shard in shards:
            _merge(result, shard.payload)
        result.faults, self.events = self.events, 0
        return result

    def fault_counts(self) -> dict:
        return dict(self.faults)

    def pids(self) -> dict[str, int]:
        """Live worker processes this pool started, {"rolloutR": pid} (fault injection targets them)."""
        return {f"rollout{w.rank}": w.proc.pid for w in self.workers.values()
                if w.proc is not None and w.proc.poll() is None}

    def close(self) -> None:
        """Tell live workers to stop, then make sure every process we started is gone."""
        for worker in self.workers.values():
            if worker.state == "live":
                try:
                    put_blob(self.store, f"job/{worker.rank}/{worker.incarnation}/{worker.next_job}",
                             json.dumps({"stop": True}).encode())
                except Exception:  # the store may already be unusable; the kill below still runs
                    pass
        deadline = time.monotonic() + 5
        for worker in self.workers.values():
            if worker.proc is not None:
                try:
                    worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
                    worker.proc.wait()


# -----------------------------------------------------------------------------------------------
# Wiring: which rank am I, where is the store, and the trainer's entry point


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (or any env:// launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


@functools.cache
def env_store(rank: int):
    """The job's store under torchrun: its agent's (as init_process_group uses), else rank 0 hosts it.
    One connection per process (cached): the trainer group and the worker pool share it."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    hosted = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    return connect(host, port, is_master=hosted)


def join_trainers(cfg) -> tuple[object | None, torch.device]:
    """(the trainers' process group or None, this trainer's device).

    With rl.trainers > 1 (torchrun only: one process per rank) ranks 0 .. rl.trainers-1 form a
    process group over the trainer device's own backend (accel.dist_backend: nccl, hccl, gloo on the
    cpu) for data parallelism. Each rank's device is accel.local_device's: an accelerator named
    without an index gets LOCAL_RANK's, one with an index i is the first trainer's (cuda:0 -> ranks
    on cuda:0, cuda:1, ...); it becomes the process's current device (accel.set_device) before the
    group forms, so NCCL/HCCL never put two ranks on one device.
    """
    device = accel.resolve_device(cfg.device_for("rl"))
    if cfg.rl.trainers == 1:
        accel.set_device(device)
        return None, device
    launched = torchrun_env()
    if launched is None:
        world = cfg.rl.trainers + cfg.rollout.workers
        raise RolloutError(f"rl.trainers = {cfg.rl.trainers} needs one process per trainer: launch with "
                           f"torchrun --nproc-per-node {world} -m tandem.cli rl ... (or set rl.trainers = 1)")
    rank = launched[0]
    device = accel.local_device(device, int(os.environ.get("LOCAL_RANK", "0")), cfg.rl.trainers)
    accel.set_device(device)
    # Rank 0 joins only after preparing the run folder, so the others find it when this returns.
    store = dist.PrefixStore("trainers", env_store(rank))
    dist.init_process_group(accel.dist_backend(device), store=store, rank=rank, world_size=cfg.rl.trainers)
    return dist.group.WORLD, device


def leave_trainers(group) -> None:
    """Wait until every trainer is done, then tear the group and the store connection down here and
    now rather than in the interpreter's exit (where their threads may outlive the objects)."""
    dist.barrier(group)
    dist.destroy_process_group(group)
    env_store.cache_clear()


def check_devices(cfg) -> None:
    """Fail fast, before anything runs: each role's device must exist here and do its dtype; GRPO's
    trainer ranks are data parallel with whole models (run.parallel = "fsdp" is for SFT ranks)."""
    if cfg.run.parallel != "ddp" and cfg.rl.trainers > 1:
        raise RolloutError(f"run.parallel = {cfg.run.parallel!r} is not built for GRPO trainer ranks (they keep whole "
                           "models, summing gradients); set run.parallel=ddp")
    for section in ("rl", "rollout"):
        if section == "rollout" and cfg.rollout.workers and torchrun_env():
            continue  # workers may live on other machines; each checks its own device
        spec = cfg.device_for(section)
        try:
            device, dtype = accel.resolve_device(spec), getattr(cfg, section).dtype
            accel.choose_dtype(dtype, device)
        except TandemError as exc:
            raise type(exc)(f"{section}.device = {spec!r} ({section} role): {exc}") from None


def start_rollouts(cfg, model_config: ModelConfig, tokenizer, run_dir: Path, trainer_device):
    """The trainer's rollout role: Colocated (rollout.workers = 0) or a WorkerPool of processes
    it spawns itself (one machine) or that torchrun started (across machines)."""
    spec = make_spec(cfg, model_config, tokenizer)
    w = cfg.rollout
    if w.workers == 0:
        return Colocated(spec)
    launched = torchrun_env()
    first = cfg.rl.trainers
    if launched:
        rank, world = launched
        if world != cfg.rl.trainers + w.workers:
            raise RolloutError(f"torchrun started {world} ranks but rl.trainers + rollout.workers = "
                               f"{cfg.rl.trainers + w.workers}; set --set rollout.workers={world - cfg.rl.trainers}")
        return WorkerPool(cfg, spec, env_store(rank), list(range(first, world)), None, run_dir)
    store = connect("127.0.0.1", w.port, is_master=True)
    return WorkerPool(cfg, spec, store, list(range(first, first + w.workers)), ("127.0.0.1", store.port), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.train.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--master", help="HOST:PORT of the job's store (default: MASTER_ADDR:MASTER_PORT)")
    parser.add_argument("--rank", type=int, help="this worker's rank (default: RANK)")
    args = parser.parse_args(argv)
    if args.master:
        host, _, port = args.master.rpartition(":")
    else:
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "-1"))
    if rank < 1 or not port.isdigit():
        print("error: give --master HOST:PORT and --rank R (R >= 1), or run under torchrun", file=sys.stderr)
        return 2
    try:
        return serve(host, int(port), rank)
    except dist.DistError:
        return 0  # the trainer (and its store) went away: nothing left to do


if __name__ == "__main__":
    sys.exit(main())
