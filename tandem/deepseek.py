"""DeepSeek-V3: Multi-head Latent Attention (MLA) + DeepSeekMoE, as HF `DeepseekV3ForCausalLM`.

`model.arch = "deepseek_v3"` builds a `DeepseekV3` (through `tandem.architectures.build_model`); it
is a `tandem.model.Transformer` (same forward, KV-cache and checkpoint interface) whose layers
differ. Tensor names are HF's, one tensor per expert as DeepSeek's own checkpoints store them:

    model.layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj          query: down, norm, up
    model.layers.{i}.self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj
    model.layers.{i}.self_attn.o_proj
    model.layers.{i}.mlp.{gate,up,down}_proj                    layers < first_k_dense_replace
    model.layers.{i}.mlp.gate.weight, mlp.gate.e_score_correction_bias      the router (fp32)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj

MLA. Keys and values come from one latent per token: c = norm(x W_a)[:kv_lora_rank] plus a single
rotary key k_rope shared by all heads; per head k_nope, v = c W_b. Training and uncached forwards
expand the latent (HF's math). With a cache only (c, k_rope) is stored per token and layer, and the
up-projection is absorbed (DeepSeek's inference code): scores = (q_nope W_uk) . c + q_rope . k_rope,
output = (softmax . c) W_uv, so keys and values are never materialised. `rope_interleave` rotates
adjacent pairs and lays the result out as HF does (rotated evens, then odds).

The router (V3): fp32 logits, sigmoid scores, `e_score_correction_bias` added for the *choice*
only; group score = sum of each group's two best biased scores; the `topk_group` best groups are
kept; top-k experts among them; weights = their unbiased scores, normalised when norm_topk_prob,
times routed_scaling_factor. Output = routed experts (weighted) + shared experts. Tokens are sorted
by expert and each expert runs once on its rows (no scatter-add: deterministic on every device).

Balancing (DeepSeek-V3, aux-loss-free): while training with gradients, each router counts the tokens
it sends to each expert (`load`, not saved: the trainer's step hook, tandem/train/balance.py, moves
the bias by bias_update_speed and zeroes the counts after every optimizer step, so a checkpoint, taken
between steps, holds none). With aux_loss_alpha > 0 the sequence-wise balance loss is added to the
gradient through the router's scores (Megatron's "aux loss auto-scaler" trick: no trainer change);
simplification: padded positions count as tokens of their sequence, and each forward's aux loss is
added once (with gradient accumulation, once per micro-batch).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.model import MLP, DecoderLayer, ModelConfig, RMSNorm, Transformer, apply_rotary


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotary on x [..., T, rope] (cos/sin in HF's doubled layout [..., T, rope])."""
    if not interleave:
        return apply_rotary(x, cos, sin)
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


class LatentCache:
    """The MLA cache: kv[layer] is [batch, max_len, kv_lora_rank + qk_rope_head_dim] (latent, rotary key)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype, kv=None):
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = kv if kv is not None else [torch.zeros((batch, max_len, width), device=device, dtype=dtype)
                                             for _ in range(config.num_hidden_layers)]
        self.batch, self.max_len = batch, max_len


class LatentAttention(nn.Module):
    """Multi-head Latent Attention (q LoRA, one compressed latent + one rotary key per token)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.heads, self.rank, self.nope = h, config.kv_lora_rank, config.qk_nope_head_dim
        self.rope, self.v_dim, self.interleave = config.qk_rope_head_dim, config.v_head_dim, config.rope_interleave
        self.scale = (self.nope + self.rope) ** -0.5
        self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)   # HF's default eps for the latent norms
        self.q_b_proj = nn.Linear(config.q_lora_rank, h * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)

    def forward(self, x, cos, sin, cache: LatentCache | None, layer: int, slots, positions, mask):
        B, T, _ = x.shape
        H, r, nope, rope = self.heads, self.rank, self.nope, self.rope
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, H, nope + rope).transpose(1, 2)
        q_nope, q_rot = q.split([nope, rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)                                  # [B, T, r]
        q_rot = rotate(q_rot, cos, sin, self.interleave)
        k_rot = rotate(k_rot.unsqueeze(1), cos, sin, self.interleave)         # [B, 1, T, rope]
        if cache is None:
            out = self._expanded(q_nope, q_rot, latent, k_rot)
        else:
            entry = cache.kv[layer]
            entry[slots[:, None], positions] = torch.cat([latent, k_rot.squeeze(1)], dim=-1).to(entry.dtype)
            out = self._absorbed(q_nope, q_rot, entry[slots], mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _expanded(self, q_nope, q_rot, latent, k_rot):
        """Causal attention with per-head keys/values built from the latent (training, HF's math)."""
        B, H, T, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, T, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)

    def _absorbed(self, q_nope, q_rot, keys, mask):
        """Attention over cached (latent, rotary key) rows [B, S, r + rope], W_uk absorbed into the
        query and W_uv applied after: one shared "head" of keys for all query heads."""
        B, H, T, _ = q_nope.shape
        w_uk, w_uv = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.rank).split([self.nope, self.v_dim], 1)
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk.to(q_nope.dtype)), q_rot], dim=-1)
        keys = keys.to(q.dtype).unsqueeze(1)
        S = keys.shape[2]
        out = F.scaled_dot_product_attention(q, keys.expand(B, H, S, keys.shape[-1]),
                                             keys[..., :self.rank].expand(B, H, S, self.rank),
                                             attn_mask=mask, scale=self.scale)
        return torch.einsum("bhtr,hvr->bhtv", out, w_uv.to(out.dtype))


def select_experts(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Top-k expert ids [N, k] from sigmoid scores [N, E]: biased scores, group-limited (V3's noaux_tc)."""
    N, E = scores.shape
    biased = scores + bias
    group_scores = biased.view(N, n_group, E // n_group).topk(min(2, E // n_group), dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1.0)
    allowed = keep.bool().unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, E)
    return biased.masked_fill(~allowed, float("-inf")).topk(k, dim=-1)[1]


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `output`; backward also sends gradient 1 into `aux` (the loss rides along)."""

    @staticmethod
    def forward(ctx, output, aux):
        return output

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), device=grad.device, dtype=torch.float32)


class Router(nn.Module):
    """DeepSeek-V3's router (`mlp.gate`). Kept in fp32 whatever the model's dtype, as HF does."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        self.register_buffer("load", torch.zeros(c.n_routed_experts), persistent=False)
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm, self.scaling = c.norm_topk_prob, c.routed_scaling_factor

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the router but keep it fp32 (a bf16 bias would round away gamma steps).
        # (A meta tensor, which has no data to keep, takes fn as is: to_empty and friends still work.)
        return super()._apply(lambda t: t.to(fn(t).device) if t.is_floating_point() and not t.is_meta else fn(t),
                              recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (sigmoid scores [N, E] fp32, expert ids [N, k], weights [N, k] fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            ids = select_experts(scores, self.e_score_correction_bias, self.n_group, self.topk_group, self.top_k)
        weights = scores.gather(1, ids)
        if self.norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, ids, weights * self.scaling


class MoE(nn.Module):
    """Routed experts (top-k of n_routed_experts) + shared experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts))
        self.shared_experts = MLP(config, config.moe_intermediate_size * config.n_shared_experts)
        self.aux_alpha = config.aux_loss_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        scores, ids, weights = self.gate(flat)
        N, k = ids.shape
        expert_of = ids.reshape(-1)
        order = expert_of.argsort(stable=True)                  # (token, k) pairs grouped by expert
        counts = torch.bincount(expert_of, minlength=len(self.experts))
        rows = flat[order // k].split(counts.tolist())
        out = torch.cat([expert(part) for expert, part in zip(self.experts, rows)])
        out = torch.zeros_like(out).index_copy(0, order, out).view(N, k, D)
        routed = (out * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        if self.training and torch.is_grad_enabled():
            self.gate.load += counts.to(self.gate.load.dtype)
            if self.aux_alpha > 0:
                routed = _AttachAuxLoss.apply(routed, self._aux_loss(scores.view(B, T, -1), ids.view(B, T, k)))
        return (routed + self.shared_experts(flat)).view(B, T, D)

    def _aux_loss(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """alpha * sum_e f_e P_e averaged over sequences (DeepSeek-V3 eq. 17-20): f_e = E/(k T) x the
        sequence's tokens sent to e, P_e = mean over its tokens of the normalised scores."""
        B, T, k = ids.shape
        E = scores.shape[-1]
        chosen = torch.zeros_like(scores).scatter_(2, ids, 1.0).sum(1)          # [B, E]
        f = chosen * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.aux_alpha * (f * p).sum(-1).mean()


class DeepseekV3(Transformer):
    """The DeepSeek-V3 decoder (see the module doc): Transformer's interface, MLA + MoE layers."""

    keep_fp32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    def make_layer(self, index: int) -> nn.Module:
        c = self.config
        return DecoderLayer(c, LatentAttention(c), MLP(c) if index < c.first_k_dense_replace else MoE(c))

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def reset_parameters(self, seed: int | None = None) -> None:
        super().reset_parameters(seed)
        for router in self.routers():
            router.e_score_correction_bias.zero_()
            router.load.zero_()

    def load_checkpoint_state(self, state, strict: bool = True, assign: bool = False) -> None:
        super().load_checkpoint_state(state, strict, assign)
        for router in self.routers():   # fresh counts, on the weights' device (a meta-built model has none)
            router.load = torch.zeros_like(router.e_score_correction_bias)

    def new_cache(self, batch: int, max_len: int | None = None) -> LatentCache:
        p = self.lm_head.weight
        return LatentCache(self.config, batch, max_len or self.config.max_position_embeddings, p.device, p.dtype)
