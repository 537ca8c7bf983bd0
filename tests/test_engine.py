"""The inference engine: cached decoding == full recompute, stops, logprobs == score(),
continuous batching (join mid-stream, cancel, queueing), seeded sampling, parameter errors."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.infer.engine import (Engine, Generation, SamplingParams, check_kv_cache_equivalence,
                                 naive_greedy)
from tandem.model import ModelConfig, Transformer

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [4], [9, 9, 9, 9, 9, 17, 30]]


def make_model(seed: int = 0, dtype=torch.float32, **overrides) -> Transformer:
    """A tiny model with large random weights, so that greedy outputs are not constant."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.5 * noise)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is much faster (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_model()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


# --- cached decoding vs full recompute -------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},                                                     # grouped-query attention (4 q, 2 kv)
    {"num_key_value_heads": 4},                             # plain multi-head
    {"num_key_value_heads": 1, "tie_word_embeddings": False},
    {"arch": "qwen2"},                                      # q/k/v biases
], ids=["gqa", "mha", "mqa-untied", "qwen2"])
def test_kv_cache_matches_full_recompute_fp32(overrides):
    model = make_model(seed=1, **overrides)               # (qwen2 biases get random values too)
    out = check_kv_cache_equivalence(model, PROMPTS, max_new_tokens=24)   # raises on mismatch
    assert [len(o) for o in out] == [24] * len(PROMPTS)
    assert len({t for o in out for t in o}) > 5            # the test is not trivially constant


def test_kv_cache_equal_length_prompts(model):
    # all rows at the same position: the decode step runs without a mask
    check_kv_cache_equivalence(model, [[1, 2, 3, 4], [9, 8, 7, 6], [5, 5, 5, 5]], max_new_tokens=16)
    check_kv_cache_equivalence(model, [[42]], max_new_tokens=20)


def test_exact_norm_path_matches_full_recompute(model):
    # off the cpu (or in bf16) the engine keeps the model's exact RMSNorm instead of folding it
    engine = Engine(model, max_batch=4, max_len=64)
    engine._fold = False
    engine.refresh_weights()
    got = [g.token_ids for g in engine.generate(PROMPTS, greedy(20))]
    assert got == naive_greedy(model, PROMPTS, 20)


def test_kv_check_detects_a_broken_cache(model, monkeypatch):
    def broken(self, n):  # forget the cache: attend to position 0 only
        self._pos_py[:n] = [0] * n
        return original(self, n)
    original = Engine._decode
    monkeypatch.setattr(Engine, "_decode", broken)
    with pytest.raises(AssertionError, match="diverges"):
        check_kv_cache_equivalence(model, PROMPTS, max_new_tokens=12)


def test_kv_cache_bf16_differs_only_at_near_ties():
    """bf16 cannot be compared strictly: the cached path (fused matmuls, other shapes) rounds
    differently from the full forward, and bf16 logits carry ~3 significant digits, so near-tied
    argmaxes legitimately flip. Check that every divergence happens at a near tie."""
    model = make_model(seed=2, dtype=torch.bfloat16)
    engine = Engine(model, max_batch=4, max_len=64)
    cached = [g.token_ids for g in engine.generate(PROMPTS, greedy(20))]
    naive = naive_greedy(model, PROMPTS, 20)
    for prompt, a, b in zip(PROMPTS, cached, naive):
        if a == b:
            continue
        j = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + b[:j]]))[0, -1].float()
        assert logits[b[j]] - logits[a[j]] <= 0.04 * logits.abs().max(), (prompt, j)


# --- stops, lengths, logprobs ----------------------------------------------------------------

def test_per_sequence_stop_and_length(model):
    engine = Engine(model, max_batch=4, max_len=64)
    free = engine.generate(PROMPTS[:2], greedy(16))
    a, b = free[0].token_ids, free[1].token_ids
    stop = next(t for t in a[2:] if t not in b)             # ends sequence 0, never sequence 1
    cut = a.index(stop)
    gens = engine.generate(PROMPTS[:2], greedy(16, stop_token_ids=(stop,)))
    assert gens[0].finish_reason == "stop" and gens[0].token_ids == a[:cut + 1]   # stop token kept
    assert gens[1].finish_reason == "length" and gens[1].token_ids == b
    assert len(gens[0].logprobs) == cut + 1
    # per-request params: only the first request stops on it
    mixed = engine.generate(PROMPTS[:2], [greedy(16, stop_token_ids=(stop,)), greedy(16)])
    assert mixed[0].token_ids == a[:cut + 1] and mixed[1].token_ids == b
    one = engine.generate([PROMPTS[0]], greedy(1))[0]
    assert one.finish_reason == "length" and len(one.token_ids) == 1


def test_logprobs_equal_score(model):
    engine = Engine(model, max_batch=4, max_len=64)
    for params in (greedy(12), SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=5)):
        gens = engine.generate(PROMPTS, params)
        scores = engine.score([g.prompt_ids + g.token_ids for g in gens], [len(p) for p in PROMPTS])
        for g, s in zip(gens, scores):
            assert s.dtype == torch.float32 and s.shape == (12,)
            assert torch.allclose(torch.tensor(g.logprobs), s, atol=1e-5, rtol=1e-5), (g.logprobs, s)
    assert engine.score([[1, 2, 3]], [3])[0].numel() == 0   # nothing to score


def test_top_logprobs(model):
    engine = Engine(model, max_batch=4, max_len=64)
    g = engine.generate([PROMPTS[1]], greedy(6, top_logprobs=3))[0]
    assert len(g.top_logprobs) == 6
    for tok, lp, top in zip(g.token_ids, g.logprobs, g.top_logprobs):
        assert len(top) == 3 and top[0][0] == tok and top[0][1] == pytest.approx(lp)
        assert top[0][1] >= top[1][1] >= top[2][1]
    # sampled tokens with top_k=3 always come from the 3 most likely raw tokens
    s = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20, temperature=2.0, top_k=3,
                                                     top_logprobs=3, seed=1))[0]
    assert all(tok in {t for t, _ in top} for tok, top in zip(s.token_ids, s.top_logprobs))
    off = engine.generate([PROMPTS[1]], greedy(4, logprobs=False))[0]
    assert off.logprobs == [] and off.top_logprobs == []


# --- continuous batching ---------------------------------------------------------------------

def alone(model, prompt, params):
    return Engine(model, max_batch=1, max_len=64).generate([prompt], params)[0].token_ids


def drain(engine):
    done = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.generation
    return done


def test_requests_joining_mid_stream_match_running_alone(model):
    engine = Engine(model, max_batch=4, max_len=64)
    first = engine.add(PROMPTS[1], greedy(20))
    outputs = engine.step()
    assert [o.request_id for o in outputs] == [first] and not outputs[0].finished
    for _ in range(4):
        engine.step()
    late = [engine.add(PROMPTS[0], greedy(10)), engine.add(PROMPTS[2], greedy(15))]
    engine.step()
    assert engine.num_active == 3 and engine.num_waiting == 0
    for _ in range(3):
        engine.step()
    later = engine.add(PROMPTS[3], greedy(8))
    done = drain(engine)
    assert done[first].token_ids[5:] and not engine.has_work()
    # streamed tokens of the first request are in its Generation too
    assert done[first].token_ids == alone(model, PROMPTS[1], greedy(20))
    assert done[late[0]].token_ids == alone(model, PROMPTS[0], greedy(10))
    assert done[late[1]].token_ids == alone(model, PROMPTS[2], greedy(15))
    assert done[later].token_ids == alone(model, PROMPTS[3], greedy(8))


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=2, max_len=64)
    a = engine.add(PROMPTS[0], greedy(30))
    b = engine.add(PROMPTS[1], greedy(12))
    c = engine.add(PROMPTS[3], greedy(9))
    d = engine.add(PROMPTS[2], greedy(9))
    engine.step()
    engine.step()
    assert engine.num_active == 2 and engine.num_waiting == 2
    cancelled = engine.cancel(a)                # running request: its slot frees at once
    assert isinstance(cancelled, Generation) and cancelled.finish_reason == "cancelled"
    assert len(cancelled.token_ids) == 2 and engine.num_active == 1
    assert engine.cancel(d).finish_reason == "cancelled" and engine.num_waiting == 1   # waiting
    assert engine.cancel(a) is None and engine.cancel(12345) is None
    outputs = engine.step()                     # c takes the freed slot and gets its first token
    assert {o.request_id for o in outputs} == {b, c} and engine.num_active == 2
    done = drain(engine)
    assert set(done) == {b, c}
    assert done[b].token_ids == alone(model, PROMPTS[1], greedy(12))
    assert done[c].token_ids == alone(model, PROMPTS[3], greedy(9))


def test_a_failed_step_requeues_the_admitted_requests(model, monkeypatch):
    engine = Engine(model, max_batch=4, max_len=64)
    a = engine.add(PROMPTS[0], greedy(8))
    engine.step()
    b = engine.add(PROMPTS[1], greedy(6))
    real = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, reqs, slot0: (_ for _ in ()).throw(MemoryError("boom")))
    with pytest.raises(MemoryError):
        engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 1
    monkeypatch.setattr(Engine, "_prefill", real)
    done = drain(engine)
    assert done[b].token_ids == alone(model, PROMPTS[1], greedy(6))
    assert done[a].token_ids == alone(model, PROMPTS[0], greedy(8))


def test_more_requests_than_slots_queue_and_complete(model):
    prompts = PROMPTS + [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8], [6] * 9]
    lengths = [5, 17, 9, 1, 11, 6, 14]
    params = [greedy(n) for n in lengths]
    engine = Engine(model, max_batch=3, max_len=64, max_prefill_tokens=12)   # prefill in chunks too
    gens = engine.generate(prompts, params)
    assert [len(g.token_ids) for g in gens] == lengths and not engine.has_work()
    assert [g.prompt_ids for g in gens] == prompts                          # input order
    for prompt, n, g in zip(prompts, lengths, gens):
        assert g.token_ids == naive_greedy(model, [prompt], n)[0]


# --- sampling --------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, seed=42)
    solo = alone(model, PROMPTS[1], hot)
    assert solo == alone(model, PROMPTS[1], hot)
    engine = Engine(model, max_batch=4, max_len=64)
    crowd = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                            [greedy(5), hot, SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.8),
                             SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4, seed=1)])
    assert crowd[1].token_ids == solo
    other = alone(model, PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=1.5, seed=43))
    assert other != solo
    # seed=None: derived from the engine's seed and a request counter
    unseeded = SamplingParams(max_new_tokens=16, temperature=1.5)
    runs = [Engine(model, max_batch=4, max_len=64, seed=s).generate(PROMPTS, unseeded) for s in (0, 0, 1)]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    assert [g.token_ids for g in runs[0]] != [g.token_ids for g in runs[2]]
    assert len({tuple(g.token_ids) for g in runs[0]} | {tuple(solo)}) > 1


def test_degenerate_sampling_equals_greedy(model):
    engine = Engine(model, max_batch=4, max_len=64)
    want = [g.token_ids for g in engine.generate(PROMPTS, greedy(16))]
    for params in (SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3),
                   SamplingParams(max_new_tokens=16, temperature=5.0, top_p=1e-6, seed=3)):
        assert [g.token_ids for g in engine.generate(PROMPTS, params)] == want


def test_top_p_candidates_grow_until_they_hold_the_nucleus():
    """top-k/top-p work on topk() candidates (64 first), grown as needed: the same draws as with
    a full sort, every draw inside the exact nucleus (1024-token vocabulary, flat and peaked rows)."""
    model = make_model(vocab_size=1024)
    engine = Engine(model, max_batch=4, max_len=16)
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, top_p=0.9),
              SamplingParams(max_new_tokens=2, temperature=1.0, top_p=0.5, top_k=50),
              SamplingParams(max_new_tokens=2, temperature=2.0),
              SamplingParams(max_new_tokens=2, temperature=1.0, top_p=0.97)]
    for p in params:
        engine.add([1, 2], p)
    engine.step()
    plan = engine._plan
    assert plan.k0 == 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1024, generator=g) * torch.tensor([[2.0], [1.0], [1.0], [6.0]])

    def nucleus(row, top_p):
        p, order = logits[row].softmax(-1).sort(descending=True)
        return set(order[:int(((p.cumsum(0) - p) < top_p).sum())].tolist())
    nuclei = {0: nucleus(0, 0.9), 3: nucleus(3, 0.97)}
    assert 64 < len(nuclei[0]) <= 256                       # row 0 needs one round of growth
    top50 = set(logits[1].topk(50).indices.tolist())
    for seed in range(40):
        draws = []
        for k0 in (64, 1024):                               # 1024: a full sort
            plan.k0 = k0
            plan.gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(4)]
            with torch.inference_mode():
                draws.append(engine._draw(logits, plan).tolist())
        assert draws[0] == draws[1]
        assert draws[0][0] in nuclei[0] and draws[0][3] in nuclei[3] and draws[0][1] in top50


# --- errors, weights -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
    ({"top_logprobs": -1}, "top_logprobs"),
])
def test_bad_sampling_params(kwargs, words):
    with pytest.raises(TandemError, match=words) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_requests(model):
    engine = Engine(model, max_batch=2, max_len=32)
    with pytest.raises(TandemError, match="max_len 32"):
        engine.add(list(range(1, 21)), greedy(13))
    engine.add(list(range(1, 21)), greedy(12))              # exactly fits
    with pytest.raises(TandemError, match="empty"):
        engine.add([], greedy(4))
    with pytest.raises(TandemError, match="outside the vocabulary"):
        engine.add([1, 64], greedy(4))
    with pytest.raises(TandemError, match="idle engine"):
        engine.generate([[1]], greedy(2))
    drain(engine)
    with pytest.raises(TandemError, match="2 prompts but 1 SamplingParams"):
        engine.generate([[1], [2]], [greedy(2)])
    with pytest.raises(TandemError, match="prompt 1: .*max_len"):
        engine.generate([[1], list(range(40))], greedy(2))
    assert not engine.has_work()                               # nothing half-queued
    with pytest.raises(TandemError, match="prompt_len"):
        engine.score([[1, 2]], [0])


def test_weight_changes_are_picked_up(model):
    model = make_model(seed=3)
    engine = Engine(model, max_batch=4, max_len=64)
    before = [g.token_ids for g in engine.generate(PROMPTS, greedy(10))]
    with torch.no_grad():
        model.load_checkpoint_state(make_model(seed=4).checkpoint_state())   # in-place copy
    after = [g.token_ids for g in engine.generate(PROMPTS, greedy(10))]
    assert after != before and after == naive_greedy(model, PROMPTS, 10)


def test_kv_cache_without_max_len_fits_a_memory_budget(model):
    from tandem import accel
    assert Engine(model, max_batch=4).max_len == 128                 # small model: its whole context
    assert Engine(model, max_batch=4).max_len_source == "max_position_embeddings"
    per_position = 2 * 2 * 4 * 2 * 8 * 4                             # k|v x layers x slots x kv heads x hd x fp32
    fraction = 40 * per_position / accel.free_memory("cpu")          # room for ~40 of the 128 positions
    engine = Engine(model, max_batch=4, cache_memory_fraction=fraction)
    assert 2 <= engine.max_len < 128 and "free memory" in engine.max_len_source
    assert engine.cache_bytes == engine.max_len * per_position == engine._buf.numel() * 4
    assert [engine.generate([[1, 2, 3]], greedy(8))[0].token_ids] == naive_greedy(model, [[1, 2, 3]], 8)
    with pytest.raises(TandemError, match="does not fit .* lower max_batch or pass max_len") as info:
        Engine(model, max_batch=4, cache_memory_fraction=fraction / 1000)
    assert "\n" not in str(info.value)


# --- the decode step replayed from a device graph ---------------------------------------------

class EagerReplay:
    """Stands in for accel.capture_graph where CUDA is absent, with a graph's semantics: the step
    runs once at capture (plus once as warm-up), and each replay overwrites the SAME output tensor."""

    def __init__(self, step):
        self.step = step
        step()                                           # the warm-up run the real capture does
        self.output = step()

    def replay(self):
        self.output.copy_(self.step())


def _graph_engine(model, max_batch, capture):
    from tandem.infer.decode_graph import DecodeGraphs
    engine = Engine(model, max_batch=max_batch, max_len=64)
    engine._graphs = DecodeGraphs(engine, capture)
    return engine


def test_the_static_decode_step_in_graph_buckets_decodes_like_the_eager_one():
    """The step a graph captures (no host reads: the whole cache under a device-built mask), in
    power-of-two batch buckets with requests leaving and joining: greedy tokens identical to the
    eager engine; new weights loaded in place are picked up (the graphs are captured again)."""
    def capture(device, step):
        replay = EagerReplay(step)
        return replay, replay.output

    model, other = make_model(seed=3), make_model(seed=7)
    params = [greedy(n, logprobs=True) for n in (5, 17, 9, 12)]       # lengths differ: buckets 4 -> 2 -> 1
    eager = Engine(model, max_batch=4, max_len=64).generate(PROMPTS, params)
    graphed = _graph_engine(model, 4, capture)
    replayed = graphed.generate(PROMPTS, params)
    assert [g.token_ids for g in replayed] == [g.token_ids for g in eager]
    assert sorted(graphed._graphs.graphs) == [1, 2, 4]
    for a, b in zip(replayed, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    model.load_state_dict(other.state_dict())          # in place: the engine's fused copies go stale
    expected = Engine(other, max_batch=4, max_len=64).generate(PROMPTS, params)
    assert [g.token_ids for g in expected] != [g.token_ids for g in eager]
    assert [g.token_ids for g in graphed.generate(PROMPTS, params)] == [g.token_ids for g in expected]


def test_capture_decode_needs_a_device_that_can_capture(model):
    from tandem import accel
    reason = accel.graph_capture_reason("cpu")
    assert reason and "CUDA" in reason
    with pytest.raises(TandemError, match="capture_decode: .*capture_decode=False"):
        Engine(model, max_batch=2, max_len=32, capture_decode=True)


@pytest.mark.skipif(__import__("tandem.accel", fromlist=["x"]).graph_capture_reason("cuda") is not None,
                    reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_decode_equals_eager_greedy():
    """Real CUDA graphs: greedy tokens identical to the eager engine, before and after new weights
    are loaded in place (the captured graphs read the old fused copies unless captured again)."""
    cuda_model, other = make_model(seed=2).cuda(), make_model(seed=7).cuda()
    params = [greedy(n) for n in (6, 20, 11, 14)]
    graphed = Engine(cuda_model, max_batch=4, max_len=64, capture_decode=True)
    for weights in (cuda_model, other):
        cuda_model.load_state_dict(weights.state_dict())
        eager = Engine(cuda_model, max_batch=4, max_len=64).generate(PROMPTS, params)
        assert [g.token_ids for g in graphed.generate(PROMPTS, params)] == [g.token_ids for g in eager]
