"""The inference engine: KV-cached, continuously batched generation for a tandem `Transformer`.

One engine owns one model and one KV cache of `max_batch` slots. Everything (offline batch
generation for RL and evals, the HTTP server's streaming loop) goes through the same core:

    engine = Engine(model, max_batch=32, max_len=1024, seed=0)

    # offline: a list of prompts in, a list of Generation out (input order)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=128, temperature=0.8, top_p=0.95))
    gens[0].token_ids, gens[0].logprobs, gens[0].finish_reason      # "stop" | "length"

    # online (the server): requests join and leave between decode steps
    rid = engine.add(prompt_ids, SamplingParams(stop_token_ids=(eos,)))
    while engine.has_work():
        for out in engine.step():        # one new token for every active request
            ...out.request_id, out.token_id, out.finished, out.generation (when finished)
    engine.cancel(rid)                   # frees the slot at once

    # teacher-forced log-probabilities of completions (RL ratios, the parity gate)
    lps = engine.score(sequences, prompt_lens)    # list of float32 tensors on the cpu

How a step works. Requests beyond `max_batch` wait in a FIFO queue. At each `step()`, waiting
requests take free slots and are prefilled together (right-padded, one causal forward, keys and
values written into their slots); the already-running requests advance one token in a single
batched decode forward; one vectorised sampling pass then picks a token for every row, what the
step reads back (tokens, logprobs, top logprobs) reaches the host in one copy, and the engine
checks stop tokens / lengths in Python. Finished (or cancelled) requests leave at once and
the last running slot moves into the hole, so the running requests always occupy slots 0..n-1
and attention reads plain views of the cache, never gathered copies.

Speed. Small models are dominated by per-op Python/dispatcher overhead, so the forward passes are
written here, lean, rather than going through `Transformer.hidden`: q/k/v and gate/up are fused into
single matmuls; rotary tables are precomputed once and applied to q, k and v in one expression
(v with cos 1, sin 0) so that the new keys/values reach the cache in one `index_copy_`; the
attention mask is built once per step and skipped when every row sits at the same position;
grouped-query attention folds a group's query heads into the query-length dimension (no key/value
repetition); residual adds ride in `addmm`; the lm_head runs only on each prompt's last position at
prefill; in fp32 on the cpu the RMSNorm scales are folded into the fused weights (see below).

MLA (deepseek_v3, tandem/deepseek.py). The cache holds per token and layer only the latent and
the rotary key (kv_lora_rank + qk_rope_head_dim values, `ModelConfig.kv_cache_values_per_token`);
prefill and decode run the model's own layers with that cache (its up-projections absorbed into the
query and output, as DeepSeek's inference code does), over the used prefix of the running slots.
Slots, queueing, sampling and scoring are the same as for the dense models; the fused fast path
below is the dense models' only.

Device graphs (`capture_decode=True`, where accel.graph_capture_reason allows: CUDA): the decode
step is recorded once per batch-size bucket and replayed, one launch instead of ~100
(tandem/infer/decode_graph.py). Off by default; on the cpu there is nothing to capture.

Weights. The engine reads the model's own tensors except the fused q/k/v and gate/up matrices,
which are copies built at construction (memory: about the model's attention + MLP weights once
more). `refresh_weights()` rebuilds them. The engine also notices weight changes by itself
(parameter identity and version counters, bumped by optimizer steps and `load_state_dict`)
whenever it admits requests, so RL loops that update the model between generate() calls need no
extra call; call refresh_weights() yourself only to change weights under running requests.

Numerics. Same math as `Transformer.forward`, fp32 norms and rotary tables as in HF. In fp32 on
the cpu the norm is computed as x / sqrt(|x|^2 + dim*eps) with weight * sqrt(dim) folded into the next
matmul: not bitwise equal to the model (differences ~1e-7 relative), and cached greedy decoding
matches a naive full recompute token for token (`check_kv_cache_equivalence`). Elsewhere the
engine keeps the model's exact norm formula; in bf16 the cached path still rounds differently from the
uncached forward (other matmul shapes, fusions), which can flip an argmax between near-tied logits.

Sampling. temperature == 0 is greedy (argmax). Otherwise logits / temperature, then top-k, then
top-p (nucleus), then one draw by inverse CDF from a per-request host `torch.Generator` seeded with
`params.seed` (or, when None, a seed derived from the engine's seed and a request counter). Each
request consumes one uniform per token and its CDF runs in vocabulary order, so a seeded request
yields the same tokens whatever else shares the batch (barring last-bit logit differences from
batch-size-dependent matmul kernels landing exactly on a CDF boundary). `Generation.logprobs` are
always log-softmax of the RAW logits (temperature 1, no top-k/top-p) at the chosen tokens: the
quantity RL importance ratios and parity checks need, and what `score()` returns.

Memory: the cache holds 2 x layers x max_batch x kv_heads x max_len x head_dim values of the
model's dtype; pass a `max_len` that fits your prompts + completions. Without one the engine takes
`max_position_embeddings` capped by a memory budget: `cache_memory_fraction` (default 0.5) of what
the device can still allocate after the weights (accel.free_memory; available RAM on the cpu), as
vLLM's gpu_memory_utilization does, and logs its choice (`engine.max_len`, `engine.cache_bytes`,
`engine.max_len_source`). A Qwen2.5-0.5B (32k context) at max_batch 64 would otherwise need 24 GiB.
The engine is not thread-safe: drive add/step/cancel from one thread. `logits_hook`, when set,
sees every step's logits [rows, V] before sampling and returns them (or raises, which requeues
what the step admitted): the server injects engine faults and checks for non-finite logits there.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem import accel
from tandem.errors import TandemError
from tandem.deepseek import LatentCache
from tandem.progress import keep_alive
from tandem.model import KVCache, Transformer, rotary_tables


class RequestError(TandemError):
    """A generation request, its sampling parameters or an engine call is invalid."""


# -----------------------------------------------------------------------------------------------
# Public data types


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. Validated on construction (RequestError, one line)."""
    max_new_tokens: int = 256              # generated tokens at most (the stop token included)
    temperature: float = 0.0               # 0 = greedy
    top_k: int = 0                         # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                     # nucleus: smallest set with mass >= top_p; 1 = off
    stop_token_ids: tuple[int, ...] = ()   # any of these ends the request (finish_reason "stop")
    seed: int | None = None                # None: derived from the engine seed + a counter
    logprobs: bool = True                  # return the raw-logit logprob of each token
    top_logprobs: int = 0                  # also return the n most likely (token, logprob) pairs

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise RequestError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        if not all(_is_int(t) and t >= 0 for t in stops):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise RequestError(f"logprobs must be true or false, got {self.logprobs!r}")
        if not _is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise RequestError(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")


@dataclass
class Generation:
    """One finished request.

    token_ids are the generated tokens, INCLUDING the stop token when finish_reason is "stop"
    (so training can learn to stop). logprobs[i] is log-softmax of the raw logits (temperature 1,
    no top-k/top-p) at token_ids[i]; empty when params.logprobs is False. top_logprobs[i] lists
    the params.top_logprobs most likely (token_id, logprob) pairs at step i, best first (empty
    when not requested). finish_reason: "stop" | "length" | "cancelled" (cancel()).
    """
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    request_id: int = -1


@dataclass(slots=True)
class StepOutput:
    """One request's new token from one `step()`; `generation` is set when it finished."""
    request_id: int
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finished: bool
    finish_reason: str | None
    generation: Generation | None


class _Request:
    __slots__ = ("id", "prompt", "params", "stops", "max_new", "want_lp", "top_n", "generator",
                 "tokens", "logprobs", "tops", "slot")

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, generator):
        self.id, self.prompt, self.params = rid, prompt, params
        self.stops = frozenset(params.stop_token_ids)
        self.max_new = params.max_new_tokens
        self.want_lp, self.top_n = params.logprobs, params.top_logprobs
        self.generator = generator
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.slot = -1

    def result(self, reason: str) -> Generation:
        return Generation(list(self.prompt), self.tokens, self.logprobs, self.tops, reason, self.id)


def _mix_seed(seed: int, counter: int) -> int:
    """splitmix64 of (seed, counter): a well-spread 63-bit seed for request `counter`."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def _to_host(tokens: torch.Tensor, lps: torch.Tensor | None, tops) -> tuple:
    """(tokens, logprobs, top values, top ids) of a step as Python lists (None where absent), in
    ONE device->host copy: the float32 columns travel bit-cast to int32 next to the ids (exact)."""
    cols = [tokens.view(-1, 1).int()]
    if lps is not None:
        cols.append(lps.view(-1, 1).view(torch.int32))
    if tops is not None:
        cols += [tops[0].view(torch.int32), tops[1].int()]
    host = (torch.cat(cols, 1) if len(cols) > 1 else cols[0]).cpu()
    lp_list = top_vals = top_ids = None
    col = 1
    if lps is not None:
        lp_list, col = host[:, 1].view(torch.float32).tolist(), 2
    if tops is not None:
        n = tops[0].shape[1]
        top_vals, top_ids = host[:, col:col + n].view(torch.float32).tolist(), host[:, col + n:].tolist()
    return host[:, 0].tolist(), lp_list, top_vals, top_ids


class _Plan:
    """Sampling work for the current set of running requests (rebuilt when it changes)."""
    __slots__ = ("all_greedy", "rows", "gens", "temps", "filter", "k0", "ks", "ps", "any_topk", "any_topp",
                 "has_topk", "topp_only", "any_topp_only", "filtered", "want_lp", "top_n")


# -----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Continuous-batching generation over a fixed pool of KV-cache slots. See the module doc."""

    def __init__(self, model: Transformer, max_batch: int = 32, max_len: int | None = None,
                 seed: int = 0, max_prefill_tokens: int = 16384, cache_memory_fraction: float = 0.5,
                 capture_decode: bool = False):
        if not _is_int(max_batch) or max_batch < 1:
            raise RequestError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        config = model.config
        self.model, self.config = model, config
        param = model.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_len_source = "given"
        max_len = max_len or self._budget_len(max_batch, cache_memory_fraction)
        if not _is_int(max_len) or max_len < 2:
            raise RequestError(f"max_len must be an integer >= 2, got {max_len!r}")
        self.max_batch, self.max_len, self.seed = max_batch, max_len, int(seed)
        self.cache_bytes = self._position_bytes(max_batch) * max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab_size = config.vocab_size
        H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self._H, self._KV, self._G, self._hd, self._half = H, KV, H // KV, hd, hd // 2
        self._I = config.intermediate_size
        dev, D = self.device, config.hidden_size
        # fp32 on the cpu: RMSNorm's weight (and sqrt(dim)) is folded into the next matmul's fused
        # weights, leaving x / sqrt(|x|^2 + dim * eps) (3 ops instead of a ~10-op composite).
        # Otherwise the model's exact formula (normalise in fp32, scale in the model dtype, as HF).
        self._fold = self.dtype == torch.float32 and self.device.type == "cpu"
        self._eps_dim = torch.tensor(math.sqrt(D * config.rms_norm_eps), device=dev)
        self._latent = config.is_latent
        with torch.inference_mode():
            L = config.num_hidden_layers
            if self._latent:   # MLA: [layer, slot, position, latent + rotary key] (tandem/deepseek.py)
                self._buf = torch.zeros((L, max_batch, max_len, config.kv_lora_rank + config.qk_rope_head_dim),
                                        device=dev, dtype=self.dtype)
                self.cache = LatentCache(config, max_batch, max_len, dev, self.dtype, kv=list(self._buf.unbind(0)))
            else:
                # One buffer for the whole cache: [layer, k|v, slot, kv_head, position, head_dim].
                self._buf = torch.zeros((L, 2, max_batch, KV, max_len, hd), device=dev, dtype=self.dtype)
                self.cache = object.__new__(KVCache)          # a KVCache whose k/v are views of _buf
                self.cache.k = [self._buf[i, 0] for i in range(L)]
                self.cache.v = [self._buf[i, 1] for i in range(L)]
                self.cache.batch, self.cache.max_len = max_batch, max_len
                self._flat = [self._buf[i].view(-1, hd) for i in range(L)]
                # Row of _flat for (slot b, k|v t, kv head j) at position 0; add the position.
                b, t, j = torch.meshgrid(torch.arange(max_batch), torch.arange(2), torch.arange(KV), indexing="ij")
                self._base = (((t * max_batch + b) * KV + j) * max_len).to(dev)          # [B, 2, KV]
                # Rotary tables as (cos, sign-folded sin) so that rotate(x) = x cos + flip_halves(x) sin.
                # They are applied to q, k AND v at once; v's heads get cos = 1, sin = 0.
                cos, sin = rotary_tables(config, dev, max_len)
                sin = torch.cat([-sin[:, :hd // 2], sin[:, hd // 2:]], dim=-1)
                self._cs = torch.stack([cos, sin], 1).unsqueeze(2).to(self.dtype)       # [L, 2, 1, hd]
                self._vpad = torch.stack([torch.ones(max_batch, KV, hd), torch.zeros(max_batch, KV, hd)], 1
                                         ).to(device=dev, dtype=self.dtype)             # [B, 2, KV, hd]
            self._arange = torch.arange(max_len, device=dev)
            self._rank = torch.arange(config.vocab_size, device=dev)
            self._last = torch.zeros(max_batch, dtype=torch.long, device=dev)    # pending token
            self._pos = torch.zeros(max_batch, dtype=torch.long, device=dev)     # its position
        self._pos_py = [0] * max_batch
        self._slots: list[_Request | None] = [None] * max_batch
        self._n = 0                                    # running requests hold slots 0.._n-1
        self._waiting: deque[_Request] = deque()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._plan: _Plan | None = None
        self._weights_key = None
        self._graphs = None
        if capture_decode:      # replay the decode step from device graphs (accel says where it can)
            reason = accel.graph_capture_reason(self.device)
            if reason is None and self._latent:
                reason = "the MLA (deepseek_v3) decode step reads host positions, so it cannot be captured"
            if reason is not None:
                raise RequestError(f"capture_decode: {reason}; build the Engine with capture_decode=False")
            from tandem.infer.decode_graph import DecodeGraphs
            self._graphs = DecodeGraphs(self)
        self.logits_hook = None    # called with each step's logits before sampling; may raise (server/recovery.py)
        self.refresh_weights()

    def _position_bytes(self, max_batch: int) -> int:
        """KV-cache bytes per position over all slots and layers."""
        return self.config.kv_cache_values_per_token() * max_batch * self.dtype.itemsize

    def _budget_len(self, max_batch: int, fraction: float) -> int:
        """max_position_embeddings, or fewer positions where `fraction` of the free memory is less
        (sets max_len_source and logs the choice); RequestError when not even 2 positions fit."""
        if not 0 < fraction <= 1:
            raise RequestError(f"cache_memory_fraction must be in (0, 1], got {fraction!r}")
        limit, free = self.config.max_position_embeddings, accel.free_memory(self.device)
        fits = limit if free is None else int(free * fraction) // self._position_bytes(max_batch)
        self.max_len_source = "max_position_embeddings" if fits >= limit else f"{fraction:g} of free memory"
        chosen = min(limit, fits)
        if chosen < 2:
            raise RequestError(f"the KV cache for max_batch {max_batch} does not fit in {fraction:g} of the "
                               f"{free} free bytes on {self.device}; lower max_batch or pass max_len")
        logging.getLogger("tandem.engine").info(
            "KV cache: max_len %d (%s) x max_batch %d = %.2f GiB on %s", chosen, self.max_len_source,
            max_batch, chosen * self._position_bytes(max_batch) / 2**30, self.device)
        return chosen

    # --- weights ----------------------------------------------------------------------------

    def _current_weights_key(self):
        return tuple((id(p), p._version) for p in self.model.parameters())

    def refresh_weights(self) -> None:
        """Rebuild the fused q/k/v and gate/up copies from the model's current weights.

        Call after changing the model's weights while requests are running; otherwise the engine
        notices changes itself whenever it admits requests.
        """
        m, D = self.model, self.config.hidden_size
        if self._latent:   # MLA runs the model's own layers: nothing to fuse
            self._weights_key = self._current_weights_key()
            return
        with torch.inference_mode():
            def fold(weight, norm):    # [out, D] -> [D, out] with the norm's scale folded in
                return (weight * (norm * math.sqrt(D))).t() if self._fold else weight.t()

            layers = []
            for layer in m.model.layers:
                a, mlp = layer.self_attn, layer.mlp
                ln1, ln2 = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
                wqkv = fold(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), ln1)
                bqkv = None
                if a.q_proj.bias is not None:
                    bqkv = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
                wgu = fold(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), ln2)
                layers.append((ln1, wqkv, bqkv, a.o_proj.weight.detach().t(), ln2, wgu,
                               mlp.down_proj.weight.detach().t()))
            self._layers = layers
            self._embed = m.model.embed_tokens.weight.detach()
            final = m.model.norm.weight.detach()
            self._final_norm = final * math.sqrt(D) if self._fold else final
            self._lm_head_t = m.lm_head.weight.detach().t()
        self._weights_key = self._current_weights_key()
        if self._graphs is not None:    # the graphs read the old tensors
            self._graphs.clear()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm; in fp32 mode without the scale (folded into the next weights, see __init__)."""
        if self._fold:
            return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self._eps_dim)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps).to(x.dtype)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm (its scale is not folded: the lm_head is usually tied to the embeddings)."""
        if self._fold:
            return self._norm(x, self._final_norm) * self._final_norm
        return self._norm(x, self._final_norm)

    # --- requests ---------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        """Requests holding a cache slot."""
        return self._n

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free slot."""
        return len(self._waiting)

    def has_work(self) -> bool:
        """True while any request is running or waiting."""
        return self._n > 0 or bool(self._waiting)

    def _check_request(self, prompt_ids, params) -> list[int]:
        """The prompt as a list of ints, or RequestError saying what is wrong with the request."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise RequestError("prompt_ids must be a list of integer token ids") from None
        if not prompt:
            raise RequestError("prompt_ids is empty; a prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                               f"{total} exceeds the engine's max_len {self.max_len}; shorten the prompt, "
                               f"lower max_new_tokens or build the Engine with a larger max_len")
        if params.top_logprobs > self.vocab_size:
            raise RequestError(f"top_logprobs {params.top_logprobs} exceeds the vocabulary size {self.vocab_size}")
        return prompt

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; it joins the running batch at the next step() with a free slot."""
        params = SamplingParams() if params is None else params
        prompt = self._check_request(prompt_ids, params)
        rid = self._next_id
        self._next_id += 1
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else _mix_seed(self.seed, rid)
            generator = torch.Generator().manual_seed(seed)   # on the host: every device has one
        req = _Request(rid, prompt, params, generator)
        self._requests[rid] = req
        self._waiting.append(req)
        return rid

    def cancel(self, request_id: int) -> Generation | None:
        """Drop a request (running or waiting) and free its slot now. Returns what it generated
        so far (finish_reason "cancelled"), or None for an unknown or finished request."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if req.slot < 0:
            self._waiting.remove(req)
            del self._requests[request_id]
        else:
            with torch.inference_mode():
                self._release([req.slot])
        return req.result("cancelled")

    def _release(self, finished: list[int]) -> None:
        """Free the given slots and move the last running slots into the holes."""
        n = self._n
        keep = n - len(finished)
        gone = set(finished)
        for s in finished:
            req = self._slots[s]
            req.slot = -1
            self._slots[s] = None
            del self._requests[req.id]
        holes = sorted(s for s in finished if s < keep)
        movers = [s for s in range(keep, n) if s not in gone]
        if holes:
            length = max(self._pos_py[s] for s in movers)   # cached positions are < pos
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            if self._latent:
                self._buf[:, dst, :length] = self._buf[:, src, :length]
            else:
                self._buf[:, :, dst, :, :length] = self._buf[:, :, src, :, :length]
            self._last[dst] = self._last[src]
            self._pos[dst] = self._pos[src]
            for h, s in zip(holes, movers):
                req = self._slots[s]
                self._slots[h], self._slots[s], req.slot = req, None, h
                self._pos_py[h] = self._pos_py[s]
        self._n = keep
        self._plan = None

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Admit waiting requests (prefill), advance running ones by one token, sample, and
        report one StepOutput per request that got a token. Finished requests leave at once."""
        with torch.inference_mode():
            n = self._n
            self._admit()
            total = self._n
            if not total:
                return []
            try:
                parts = [self._graphs.decode(n) if self._graphs is not None else self._decode(n)] if n else []
                start = n
                while start < total:          # prefill in chunks of at most max_prefill_tokens
                    stop, longest = start + 1, len(self._slots[start].prompt)
                    while stop < total:
                        longest_next = max(longest, len(self._slots[stop].prompt))
                        if longest_next * (stop + 1 - start) > self.max_prefill_tokens:
                            break
                        longest, stop = longest_next, stop + 1
                    parts.append(self._prefill(self._slots[start:stop], start))
                    start = stop
                logits = parts[0] if len(parts) == 1 else torch.cat(parts)
                if self.logits_hook is not None:
                    logits = self.logits_hook(logits)
                tokens, lps, tops = self._sample(logits, total)
            except BaseException:             # e.g. out of memory: requeue what was just admitted
                for s in range(total - 1, n - 1, -1):
                    req, self._slots[s] = self._slots[s], None
                    req.slot = -1
                    self._waiting.appendleft(req)
                self._n, self._plan = n, None
                raise
            self._last[:total] = tokens
            if n:
                self._pos[:n] += 1
            tok_list, lp_list, top_vals, top_ids = _to_host(tokens, lps, tops)
            pos_py, slots = self._pos_py, self._slots
            outputs, finished = [], []
            for i in range(total):
                req, tok = slots[i], tok_list[i]
                if i < n:
                    pos_py[i] += 1
                req.tokens.append(tok)
                lp = top = None
                if req.want_lp:
                    lp = lp_list[i]
                    req.logprobs.append(lp)
                if req.top_n:
                    top = list(zip(top_ids[i][:req.top_n], top_vals[i][:req.top_n]))
                    req.tops.append(top)
                reason = "stop" if tok in req.stops else "length" if len(req.tokens) >= req.max_new else None
                if reason is None:
                    outputs.append(StepOutput(req.id, tok, lp, top, False, None, None))
                else:
                    finished.append(i)
                    outputs.append(StepOutput(req.id, tok, lp, top, True, reason, req.result(reason)))
            if finished:
                self._release(finished)
            return outputs

    def _admit(self) -> None:
        """Move waiting requests (FIFO) into the free slots after the running ones."""
        free = self.max_batch - self._n
        if not self._waiting or not free:
            return
        param = self.model.lm_head.weight
        if param.device != self.device or param.dtype != self.dtype:
            raise RequestError(f"the model moved to {param.device}/{param.dtype} after this Engine was built "
                               f"for {self.device}/{self.dtype}; build a new Engine")
        if self._current_weights_key() != self._weights_key:
            self.refresh_weights()
        lens = []
        while self._waiting and len(lens) < free:
            req = self._waiting.popleft()
            req.slot = self._n + len(lens)
            self._slots[req.slot] = req
            self._pos_py[req.slot] = len(req.prompt)
            lens.append(len(req.prompt))
        self._pos[self._n:self._n + len(lens)] = torch.tensor(lens, device=self.device)
        self._n += len(lens)
        self._plan = None

    # --- forward passes ---------------------------------------------------------------------

    def _decode(self, n: int, static: bool = False) -> torch.Tensor:
        """One token for each of slots 0..n-1 (their pending token at their position): logits [n, V].

        static: read no host value (positions stay on the device): attend over the whole cache
        under a mask built on the device, so every tensor's shape depends on n alone and the step
        can be replayed from a captured device graph (tandem/infer/decode_graph.py). Otherwise
        attention reads only the used prefix, and no mask when every row sits at one position."""
        if self._latent:
            used = max(self._pos_py[:n]) + 1
            hidden = self._latent_forward(self._last[:n].view(n, 1), self._pos[:n].view(n, 1), 0, used)
            return self.model.lm_head(hidden[:, 0])
        H, KV, G, hd, half, I = self._H, self._KV, self._G, self._hd, self._half, self._I
        W = H + 2 * KV
        pos = self._pos[:n]
        x = F.embedding(self._last[:n], self._embed)                            # [n, D]
        cos, sin = torch.cat((self._cs[pos].expand(n, 2, H + KV, hd), self._vpad[:n]), 2).unbind(1)
        rows = (self._base[:n] + pos.view(n, 1, 1)).view(-1)                    # cache rows to write
        if static:
            used = self.max_len
            mask = (self._arange <= pos.view(n, 1)).view(n, 1, 1, used)
        else:
            positions = self._pos_py[:n]
            hi = max(positions)
            used = hi + 1
            mask = None
            if n > 1 and min(positions) != hi:    # rows at different positions: hide their futures
                mask = (self._arange[:used] <= pos.view(n, 1)).view(n, 1, 1, used)
        norm = self._norm
        kv = iter(self._buf[:, :, :n, :, :used].flatten(0, 1).unbind(0))    # k0, v0, k1, v1, ...
        for (ln1, wqkv, bqkv, wo_t, ln2, wgu, wd_t), flat, k, v in zip(self._layers, self._flat, kv, kv):
            h = norm(x, ln1)
            qkv = (torch.mm(h, wqkv) if bqkv is None else torch.addmm(bqkv, h, wqkv)).view(n, W, hd)
            qkv = torch.addcmul(qkv * cos, qkv.view(n, W, 2, half).flip(2).view(n, W, hd), sin)
            flat.index_copy_(0, rows, qkv[:, H:].reshape(-1, hd))               # new k, v -> cache
            q = qkv[:, :H].view(n, KV, G, hd)      # a group's query heads act as G query rows
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = torch.addmm(x, att.reshape(n, H * hd), wo_t)
            gu = torch.mm(norm(x, ln2), wgu)
            x = torch.addmm(x, F.silu(gu[:, :I]).mul_(gu[:, I:]), wd_t)
        return torch.mm(self._final(x), self._lm_head_t)

    def _prefill(self, reqs: list[_Request], slot0: int) -> torch.Tensor:
        """Causal forward over right-padded prompts, writing their keys/values into slots
        slot0.. (positions 0..len-1); logits [m, V] at each prompt's last token."""
        H, KV, hd, half, I = self._H, self._KV, self._hd, self._half, self._I
        W = H + 2 * KV
        m = len(reqs)
        lens = [len(r.prompt) for r in reqs]
        T = max(lens)
        ids = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in reqs], device=self.device)
        if self._latent:
            hidden = self._latent_forward(ids, self._arange[:T].expand(m, T), slot0, T)
            last = torch.tensor(lens, device=self.device) - 1
            return self.model.lm_head(hidden[torch.arange(m, device=self.device), last])
        x = F.embedding(ids.view(-1), self._embed)                              # [m T, D]
        cos, sin = torch.cat((self._cs[:T].expand(T, 2, H + KV, hd),
                              self._vpad[:1].expand(T, 2, KV, hd)), 2).unbind(1)  # [T, W, hd]
        norm = self._norm
        for (ln1, wqkv, bqkv, wo_t, ln2, wgu, wd_t), kc, vc in zip(self._layers, self.cache.k, self.cache.v):
            h = norm(x, ln1)
            qkv = (torch.mm(h, wqkv) if bqkv is None else torch.addmm(bqkv, h, wqkv)).view(m, T, W, hd)
            qkv = torch.addcmul(qkv * cos, qkv.view(m, T, W, 2, half).flip(3).view(m, T, W, hd), sin)
            q, k, v = qkv.transpose(1, 2).split((H, KV, KV), 1)                  # [m, heads, T, hd]
            kc[slot0:slot0 + m, :, :T] = k
            vc[slot0:slot0 + m, :, :T] = v
            att = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != KV)
            x = torch.addmm(x, att.transpose(1, 2).reshape(m * T, H * hd), wo_t)
            gu = torch.mm(norm(x, ln2), wgu)
            x = torch.addmm(x, F.silu(gu[:, :I]).mul_(gu[:, I:]), wd_t)
        last = torch.tensor([b * T + n - 1 for b, n in enumerate(lens)], device=self.device)
        return torch.mm(self._final(x[last]), self._lm_head_t)

    def _latent_forward(self, ids: torch.Tensor, positions: torch.Tensor, slot0: int, used: int) -> torch.Tensor:
        """MLA: the model's own cached forward (absorbed attention over the latent cache) for slots
        slot0..slot0+len(ids), reading and writing positions < `used` only; final hidden [m, T, D]."""
        m = ids.shape[0]
        cache = LatentCache(self.config, m, used, None, None, kv=[layer[slot0:slot0 + m, :used] for layer in self._buf])
        return self.model.hidden(ids, positions, cache, torch.arange(m, device=self.device))

    # --- sampling ---------------------------------------------------------------------------

    def _make_plan(self, total: int) -> _Plan:
        """Which rows sample and with what; per-row parameters as [rows, 1] device tensors."""
        reqs = self._slots[:total]
        plan = _Plan()
        plan.want_lp = any(r.want_lp for r in reqs)
        plan.top_n = max(r.top_n for r in reqs)
        sampled = [i for i, r in enumerate(reqs) if r.generator is not None]
        plan.all_greedy = not sampled
        if sampled:
            dev, V = self.device, self.vocab_size
            params = [reqs[i].params for i in sampled]
            plan.rows = None if len(sampled) == total else torch.tensor(sampled, device=dev)
            plan.gens = [reqs[i].generator for i in sampled]
            plan.temps = torch.tensor([p.temperature for p in params], device=dev).view(-1, 1)
            ks = [p.top_k if p.top_k < V else 0 for p in params]
            topp = [p.top_p < 1 for p in params]
            rows_filtered = [bool(k) or tp for k, tp in zip(ks, topp)]
            plan.filter = any(rows_filtered)
            if plan.filter:
                def column(values):
                    return torch.tensor(values, device=dev).view(-1, 1)
                plan.any_topk, plan.any_topp = any(ks), any(topp)
                plan.ks = column([k or V for k in ks])
                plan.ps = column([p.top_p if p.top_p < 1 else 2.0 for p in params])
                plan.has_topk = column([bool(k) for k in ks])
                plan.topp_only = column([tp and not k for k, tp in zip(ks, topp)])
                plan.any_topp_only = any(tp and not k for k, tp in zip(ks, topp))
                plan.filtered = None if all(rows_filtered) else column(rows_filtered)
                plan.k0 = min(V, max([64] + ks))     # candidates: enough for every row's top-k
                if plan.any_topp_only and self.device.type != "cpu":
                    plan.k0 = V     # one sort: growing the candidates waits for the device each round
        return plan

    def _sample(self, logits: torch.Tensor, total: int):
        """tokens [total], raw-logit logprobs [total] or None, (top values, top ids) or None."""
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan(total)
        if plan.all_greedy:
            tokens = logits.argmax(-1)
        elif plan.rows is None:
            tokens = self._draw(logits, plan)
        else:
            tokens = logits.argmax(-1)
            tokens.index_copy_(0, plan.rows, self._draw(logits.index_select(0, plan.rows), plan))
        lps = tops = None
        if plan.want_lp or plan.top_n:
            logp = logits.float().log_softmax(-1)
            if plan.want_lp:
                lps = logp.gather(1, tokens.view(-1, 1)).view(-1)
            if plan.top_n:
                tops = logp.topk(plan.top_n, -1)
        return tokens, lps, tops

    def _draw(self, logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Temperature, top-k, top-p, then one inverse-CDF draw per row from its own generator.

        top-k/top-p work on the few best candidates (`topk`, not a full-vocabulary sort, which
        is slow on the cpu), grown until they hold every top-p row's nucleus; the check reads the
        device, so on an accelerator top-p rows sort the whole vocabulary at once instead (k0 = V,
        no host sync). They only mask tokens out: the CDF always runs in vocabulary order, so a
        row's draw does not depend on which other rows share the batch."""
        x = logits.float() / plan.temps
        # One host draw per row (no kernel launch each), one copy to the device for the batch.
        u = torch.cat([torch.rand(1, generator=g) for g in plan.gens]).to(self.device, non_blocking=True)
        if plan.filter:
            V, inf = x.shape[1], float("-inf")
            logz = x.logsumexp(-1, keepdim=True)
            k = plan.k0
            while True:
                vals, order = x.topk(k, dim=-1)                         # sorted, best first
                if k == V or not plan.any_topp_only:
                    break
                mass = (vals - logz).exp().sum(-1, keepdim=True)        # of the candidates
                if bool(((mass >= plan.ps) | ~plan.topp_only).all()):
                    break
                k = 4 * k if 16 * k <= V else V      # near the whole vocabulary: just sort it
            if plan.any_topk:
                vals = vals.masked_fill(self._rank[:k] >= plan.ks, inf)
            if plan.any_topp:   # drop a token when the mass before it already reaches top_p
                norm = torch.where(plan.has_topk, vals.logsumexp(-1, keepdim=True), logz) if plan.any_topk else logz
                probs = (vals - norm).exp()
                vals = vals.masked_fill(probs.cumsum(-1) - probs >= plan.ps, inf)
            kept = torch.full_like(x, inf).scatter_(1, order, vals)
            x = kept if plan.filtered is None else torch.where(plan.filtered, kept, x)
        cdf = x.softmax(-1).cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).view(-1, 1), right=True)
        return pick.clamp_(max=cdf.shape[1] - 1).view(-1)

    # --- offline APIs -----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Generation]:
        """Generate for every prompt (through add/step, the server's path); results in input order.

        The engine must be idle (no requests from a server loop in flight).
        """
        params = SamplingParams() if params is None else params
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams; pass one "
                               f"SamplingParams or one per prompt")
        if self.has_work():
            raise RequestError(f"generate() needs an idle engine, but {self.num_active} requests are running "
                               f"and {self.num_waiting} waiting; drain them with step() or cancel() first")
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            try:
                self._check_request(prompt, p)
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        ids = [self.add(prompt, p) for prompt, p in zip(prompts, plist)]
        done: dict[int, Generation] = {}
        try:
            while len(done) < len(ids):
                keep_alive()  # a long batch proves it is alive at each decode step (the pipeline's eval)
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out.generation
        except BaseException:
            for rid in ids:
                self.cancel(rid)
            raise
        return [done[rid] for rid in ids]

    def score(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
        """Teacher-forced log-probabilities of each sequence's completion tokens.

        sequences[i] = prompt + completion; returns, per sequence, a float32 cpu tensor of
        length len(sequences[i]) - prompt_lens[i] holding log p(token_t | tokens_<t) from the raw
        logits (what Generation.logprobs holds). One batched forward of the model itself (no cache,
        right padding); the lm_head runs only at the positions that predict completion tokens.
        """
        if len(sequences) != len(prompt_lens):
            raise RequestError(f"got {len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
        if not sequences:
            return []
        try:
            seqs = [[operator.index(t) for t in s] for s in sequences]
        except TypeError:
            raise RequestError("sequences must be lists of integer token ids") from None
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            if not _is_int(p) or not 1 <= p <= len(s):
                raise RequestError(f"sequence {i}: prompt_len must be in [1, {len(s)}], got {p!r}")
            if s and (min(s) < 0 or max(s) >= self.vocab_size):
                raise RequestError(f"sequence {i}: a token id is outside the vocabulary [0, {self.vocab_size})")
        T = max(len(s) for s in seqs)
        with torch.no_grad():
            ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=self.device)
            hidden = self.model.hidden(ids).reshape(len(seqs) * T, -1)
            where = [b * T + t for b, (s, p) in enumerate(zip(seqs, prompt_lens)) for t in range(p - 1, len(s) - 1)]
            where = torch.tensor(where, dtype=torch.long, device=self.device)
            targets = ids.view(-1)[where + 1]
            out = []
            chunk = max(1, (1 << 24) // self.vocab_size)     # bound the [rows, vocab] temporaries
            for i in range(0, where.numel(), chunk):
                logits = self.model.lm_head(hidden[where[i:i + chunk]]).float()
                out.append(logits.log_softmax(-1).gather(1, targets[i:i + chunk].view(-1, 1)).view(-1))
            flat = torch.cat(out).cpu() if out else torch.zeros(0)
        return list(flat.split([len(s) - p for s, p in zip(seqs, prompt_lens)]))


# -----------------------------------------------------------------------------------------------
# Self-check


def naive_greedy(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding by re-running the whole sequence every step (no cache): the reference."""
    device = model.lm_head.weight.device
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids], device=device))[0, -1]
                ids.append(int(logits.argmax()))
            outs.append(ids[len(prompt):])
    return outs


def check_kv_cache_equivalence(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 16) -> list[list[int]]:
    """Assert that the engine's cached greedy decoding (all prompts batched together) equals
    naive full-recompute greedy decoding token for token; returns the generated tokens.

    Raises AssertionError naming the first prompt and step where they diverge. Meant for fp32
    (in bf16 the two paths round differently and may legitimately flip near-tied argmaxes).
    """
    longest = max(len(p) for p in prompts)
    engine = Engine(model, max_batch=len(prompts), max_len=longest + max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, logprobs=False)
    cached = [g.token_ids for g in engine.generate(prompts, params)]
    naive = naive_greedy(model, prompts, max_new_tokens)
    for i, (a, b) in enumerate(zip(cached, naive)):
        if a != b:
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise AssertionError(f"prompt {i}: cached greedy decoding diverges from full recompute at "
                                 f"token {j}: cached {a[j:j + 5]} vs naive {b[j:j + 5]}")
    return cached
