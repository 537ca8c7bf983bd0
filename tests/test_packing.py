"""Padding-free batches (tandem/train/packing.py): packed sequences give the padded path's loss and
gradients (fp32, within a stated tolerance: only float summation order differs), and the padded
layout is bitwise the computation the trainers did before packing existed."""

import random

import pytest
import torch
import torch.nn.functional as F

from tandem.model import ModelConfig, Transformer
from tandem.train.grpo_loss import build_batch, token_logprobs
from tandem.train.packing import make_layout, target_hidden

# fp32: the two layouts differ in matmul shapes only (summation order), ~1e-7 relative here
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _model(arch: str) -> Transformer:
    model = Transformer(ModelConfig(arch=arch, vocab_size=97, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64))
    model.reset_parameters(seed=3)
    if arch == "qwen2":      # non-zero q/k/v biases, so a wrong position or mask would show
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    return model


def _sequences(n: int, seed: int):
    rng = random.Random(seed)
    rows = [[rng.randrange(1, 97) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    predicts = [sorted(rng.sample(range(len(r) - 1), rng.randrange(1, len(r)))) for r in rows]
    return rows, predicts


def _loss_and_grads(model, layout):
    model.zero_grad(set_to_none=True)
    logits = model.lm_head(target_hidden(model, layout))
    loss = F.cross_entropy(logits, layout.targets, reduction="sum")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradients_equal_the_padded_path(arch):
    model = _model(arch)
    rows, predicts = _sequences(9, seed=1)
    padded = make_layout(rows, predicts, pad_id=0, device="cpu", packed=False)
    packed = make_layout(rows, predicts, pad_id=0, device="cpu", packed=True)
    assert packed.input_ids.numel() == sum(map(len, rows)) < padded.input_ids.numel()   # no pads
    assert torch.equal(packed.targets, padded.targets)
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=LOSS_RTOL)
    for a, b in zip(grads_a, grads_b):
        assert (a - b).abs().max() <= GRAD_RTOL * a.abs().max()


def test_the_padded_layout_is_bitwise_the_plain_forward():
    model = _model("llama")
    rows, predicts = _sequences(5, seed=2)
    layout = make_layout(rows, predicts, pad_id=0, device="cpu", packed=False)
    mask = torch.zeros(layout.input_ids.shape[0], layout.input_ids.shape[1] - 1, dtype=torch.bool)
    for i, p in enumerate(predicts):
        mask[i, p] = True
    with torch.no_grad():
        expected = model.hidden(layout.input_ids)[:, :-1][mask]
        assert torch.equal(target_hidden(model, layout), expected)
    assert torch.equal(layout.targets, layout.input_ids[:, 1:][mask])


def test_grpo_logprobs_packed_equal_padded():
    """The GRPO update's per-token logprobs (flat, sequence after sequence) in both layouts, on a
    micro-batch slice of a batch of prompts + completions."""
    model = _model("qwen2")
    rows, _ = _sequences(6, seed=4)
    prompts = [r[:2] for r in rows]
    completions = [r[2:] for r in rows]
    batch = build_batch(prompts, completions, [[0.0] * len(c) for c in completions], torch.zeros(6), "dapo",
                        64, 0, "cpu").select([1, 2, 3, 4])
    with torch.no_grad():
        padded, packed = token_logprobs(model, batch.layout(False)), token_logprobs(model, batch.layout(True))
    assert padded.shape == (sum(len(c) for c in completions[1:5]),)
    torch.testing.assert_close(packed, padded, rtol=LOSS_RTOL, atol=1e-5)
