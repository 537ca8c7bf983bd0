"""DeepSeek-V3 (tandem/deepseek.py) against HF's own DeepseekV3: router choice and weights, the MoE
block and whole-model logits with copied weights; the MLA latent cache against full recompute."""

import pytest
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from conftest import prefill_then_decode, tiny_deepseek_config
from tandem.architectures import build_model, model_from_state
from tandem.deepseek import DeepseekV3, LatentCache, Router


def hf_config(config):
    return transformers.DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        n_shared_experts=config.n_shared_experts, n_routed_experts=config.n_routed_experts,
        routed_scaling_factor=config.routed_scaling_factor, kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim, n_group=config.n_group, topk_group=config.topk_group,
        num_experts_per_tok=config.num_experts_per_tok, first_k_dense_replace=config.first_k_dense_replace,
        norm_topk_prob=config.norm_topk_prob, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rope_interleave=config.rope_interleave, num_nextn_predict_layers=0)


def fused_experts(state: dict) -> dict:
    """Per-expert tensors -> HF 5.x's in-memory layout (gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    out, groups = {}, {}
    for name, tensor in state.items():
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            index, proj = rest.split(".")[:2]
            groups.setdefault(prefix, {}).setdefault(proj, {})[int(index)] = tensor
        else:
            out[name] = tensor
    for prefix, projs in groups.items():
        stack = {proj: torch.stack([v[i] for i in sorted(v)]) for proj, v in projs.items()}
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], 1)
        out[f"{prefix}.mlp.experts.down_proj"] = stack["down_proj"]
    return out


def randomised(config, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" not in name else 1.0)
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.1)
    return model


def test_router_matches_hf_choice_and_weights():
    for norm in (True, False):
        config = tiny_deepseek_config(norm_topk_prob=norm)
        ours, theirs = Router(config), hf_ds.DeepseekV3TopkRouter(hf_config(config))
        with torch.no_grad():
            ours.weight.normal_()
            ours.e_score_correction_bias.normal_(0, 0.5)
            theirs.weight.copy_(ours.weight)
            theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias)
        x = torch.randn(200, config.hidden_size)
        _, ids, weights = ours(x)
        _, hf_weights, hf_ids = theirs(x)
        ours_sorted, order = ids.sort(-1)
        hf_sorted, hf_order = hf_ids.sort(-1)
        assert torch.equal(ours_sorted, hf_sorted)
        assert torch.allclose(weights.gather(1, order), hf_weights.gather(1, hf_order), atol=1e-6)


def test_moe_block_matches_hf():
    config = tiny_deepseek_config()
    model = randomised(config)
    moe = model.model.layers[1].mlp
    theirs = hf_ds.DeepseekV3MoE(hf_config(config))
    prefix = "model.layers.1.mlp."
    state = {k[len(prefix):]: v for k, v in fused_experts(model.state_dict()).items() if k.startswith(prefix)}
    theirs.load_state_dict(state)
    x = torch.randn(3, 11, config.hidden_size)
    with torch.no_grad():
        assert (moe(x) - theirs(x)).abs().max() < 1e-5


@pytest.mark.parametrize("interleave", [True, False])
def test_logits_match_hf_deepseek_v3(interleave):
    config = tiny_deepseek_config(rope_interleave=interleave)
    model = randomised(config).eval()
    hf = transformers.DeepseekV3ForCausalLM(hf_config(config)).eval()
    missing, unexpected = hf.load_state_dict(fused_experts(model.state_dict()), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, config.vocab_size, (3, 17))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4


def test_latent_cache_prefill_then_decode_equals_full_forward():
    config = tiny_deepseek_config()
    model = randomised(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
    cached, cache = prefill_then_decode(model, ids, 7)
    assert isinstance(cache, LatentCache)
    assert cache.kv[0].shape == (2, 32, config.kv_lora_rank + config.qk_rope_head_dim)
    assert (cached - full).abs().max() < 1e-4


def test_parameter_counts_and_fp32_router():
    config = tiny_deepseek_config()
    model = randomised(config)
    state = model.checkpoint_state()
    assert isinstance(model, DeepseekV3)
    assert config.num_parameters() == sum(t.numel() for t in state.values())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in state and "model.layers.0.mlp.gate_proj.weight" in state
    assert config.num_parameters(active=True) < config.num_parameters()
    low = model_from_state(config, state, dtype=torch.bfloat16)
    router = low.model.layers[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert low.lm_head.weight.dtype == torch.bfloat16
    assert low.to(torch.float16).model.layers[1].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (low(ids).float() - model(ids)).abs().max() < 0.5


# --- the engine on the MLA latent cache ----------------------------------------------------------

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [4], [9, 9, 9, 9, 9, 17, 30]]


@pytest.mark.parametrize("interleave", [True, False])
def test_engine_latent_cache_greedy_equals_full_recompute(interleave):
    from tandem.infer.engine import Engine, check_kv_cache_equivalence
    model = randomised(tiny_deepseek_config(rope_interleave=interleave), seed=3).eval()
    out = check_kv_cache_equivalence(model, PROMPTS, max_new_tokens=24)   # raises on mismatch
    assert len({t for o in out for t in o}) > 5
    engine = Engine(model, max_batch=4, max_len=64)
    config = model.config
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert engine.cache_bytes == per_token * 4 * 64


def test_engine_latent_requests_join_mid_stream_and_logprobs_equal_score():
    from tandem.infer.engine import Engine, SamplingParams
    model = randomised(tiny_deepseek_config(), seed=4).eval()
    engine = Engine(model, max_batch=2, max_len=64)     # 2 slots: the third request waits, then moves in
    ids = [engine.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, (20, 6, 12, 9))]
    done = {}
    while engine.has_work():
        done.update({o.request_id: o.generation for o in engine.step() if o.finished})
    for rid, prompt in zip(ids, PROMPTS):
        gen = done[rid]
        alone = Engine(model, max_batch=1, max_len=64).generate([prompt], SamplingParams(max_new_tokens=len(gen.token_ids)))
        assert gen.token_ids == alone[0].token_ids
        scored = engine.score([prompt + gen.token_ids], [len(prompt)])[0]
        assert torch.allclose(scored, torch.tensor(gen.logprobs), atol=1e-4)


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("model.num_experts_per_tok=9", "'model.num_experts_per_tok' = 9 is out of range; allowed: <= model.n_routed_experts"),
    ("model.n_group=3", "'model.n_routed_experts' = 8 is out of range; allowed: a multiple of model.n_group (3)"),
    ("model.topk_group=5", "'model.topk_group' = 5 is out of range; allowed: <= model.n_group (4)"),
    ("model.kv_lora_rank=0", "'model.kv_lora_rank' = 0 is out of range; allowed: > 0 for deepseek_v3"),
    ("model.num_experts_per_tok=5", "the experts in the kept groups"),
    ("model.num_key_value_heads=2", "MLA has no grouped-query heads"),
    ("model.first_k_dense_replace=5", "model.first_k_dense_replace"),
])
def test_moe_shapes_that_cannot_work_are_refused(override, needle):
    from tandem.config import load_config
    from tandem.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        load_config(preset="moe", overrides=[override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_mla_fields_on_a_dense_arch_are_refused_by_the_cli_before_any_folder(tmp_path):
    from conftest import run_tandem
    result = run_tandem("sft", "--preset", "smoke", "--set", "model.kv_lora_rank=16", "--out", tmp_path / "a")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'model.kv_lora_rank' = 16" in lines[0] and 'model.arch = "deepseek_v3"' in lines[0]
    assert not (tmp_path / "a").exists()


def test_moe_preset_is_deepseek_shaped_with_tiny_active_parameters():
    from tandem.config import load_config
    moe, tiny = load_config(preset="moe").model, load_config(preset="tiny").model
    assert moe.is_latent and moe.head_dim == moe.qk_rope_head_dim and moe.n_group > 1
    assert (moe.n_routed_experts, moe.num_experts_per_tok, moe.n_shared_experts, moe.first_k_dense_replace) == (8, 2, 1, 1)
    moe.vocab_size = tiny.vocab_size = 512
    assert abs(moe.num_parameters(active=True) / tiny.num_parameters() - 1) < 0.05
    assert moe.kv_cache_values_per_token() < tiny.kv_cache_values_per_token() / 2


def test_gguf_export_of_deepseek_is_refused_in_one_line():
    from tandem.config import load_config
    from tandem.errors import ConfigError, TandemError
    from tandem.export.gguf import write_gguf
    with pytest.raises(ConfigError, match="export.formats.*deepseek2"):
        load_config(preset="moe", overrides=['export.formats=["hf", "gguf"]'])
    with pytest.raises(TandemError, match="not implemented yet; export it with --format hf"):
        write_gguf(tiny_deepseek_config(), {}, None, "unused.gguf")
