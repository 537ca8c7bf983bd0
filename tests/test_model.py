"""The decoder matches HF Llama/Qwen2 bitwise, and its KV cache matches full recompute."""

import pytest
import torch

from conftest import prefill_then_decode, tiny_model_config
from tandem.model import ModelConfig, Transformer, model_fingerprint, weights_fingerprint


def _hf_twin(config):
    import transformers
    kw = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
              num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
              max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
              rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings)
    if config.arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))


@pytest.mark.parametrize("arch,tied,theta", [("llama", True, 10000.0), ("llama", False, 500000.0),
                                             ("qwen2", False, 1000000.0)])
def test_logits_match_transformers(arch, tied, theta):
    config = tiny_model_config(arch=arch, tie_word_embeddings=tied, rope_theta=theta)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    hf = _hf_twin(config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, config.vocab_size, (3, 17))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))


def test_qwen2_has_biases_and_llama_not():
    assert "model.layers.0.self_attn.q_proj.bias" in Transformer(tiny_model_config(arch="qwen2")).state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" not in Transformer(tiny_model_config()).state_dict()


def test_cache_prefill_then_decode_equals_full_forward():
    config = tiny_model_config()
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
    assert torch.allclose(prefill_then_decode(model, ids, 7)[0], full, atol=1e-5)


def test_bf16_forward_runs_and_is_close():
    config = tiny_model_config()
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1


def test_init_is_seeded_and_fingerprint_is_stable():
    config = tiny_model_config()
    a, b = Transformer(config), Transformer(config)
    a.reset_parameters(7)
    b.reset_parameters(7)
    assert model_fingerprint(a) == model_fingerprint(b)
    b.reset_parameters(8)
    assert model_fingerprint(a) != model_fingerprint(b)
    state = a.checkpoint_state()
    assert "lm_head.weight" not in state  # tied: stored once, like HF
    flipped = dict(state)
    flipped["model.norm.weight"] = state["model.norm.weight"].clone()
    flipped["model.norm.weight"][0] += 1e-7
    assert weights_fingerprint(flipped) != weights_fingerprint(state)
    assert config.num_parameters() == sum(t.numel() for t in state.values())


def test_autocast_attention_gets_one_dtype(monkeypatch):
    """Under bf16 autocast q, k (rotary tables) and v all reach attention in bf16, not q/k in fp32."""
    import torch.nn.functional as F
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    seen, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [(torch.bfloat16,) * 3]


def test_weights_load_straight_into_the_target_dtype(monkeypatch):
    """from_checkpoint_state initialises on the meta device only, then takes the weights in the
    target dtype: bf16 parameters, the head still tied, the same numbers as a cast fp32 model."""
    config = tiny_model_config()
    source = Transformer(config)
    source.reset_parameters(3)
    state = source.checkpoint_state()
    initialised_on = []
    reset = Transformer.reset_parameters

    def spy(self, seed=None):
        initialised_on.append(self.lm_head.weight.device.type)
        reset(self, seed)
    monkeypatch.setattr(Transformer, "reset_parameters", spy)
    model = Transformer.from_checkpoint_state(config, state, "cpu", torch.bfloat16)
    assert initialised_on == ["meta"]
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cast = source.to(torch.bfloat16)
    assert weights_fingerprint(model.checkpoint_state()) == weights_fingerprint(cast.checkpoint_state())
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), cast(ids))
    with pytest.raises(KeyError, match="missing"):
        Transformer.from_checkpoint_state(config, {k: v for k, v in state.items() if "norm" not in k})
