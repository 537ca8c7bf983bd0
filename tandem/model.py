"""A Llama / Qwen2-compatible decoder-only transformer (DeepSeek-V3 builds on it: tandem/deepseek.py).

Parameter names and config fields map one-to-one onto Hugging Face `LlamaForCausalLM` and
`Qwen2ForCausalLM` (Qwen2 = Llama + q/k/v biases), so an export loads unchanged in transformers,
vLLM, vLLM-Ascend and MindIE, and an HF checkpoint loads here:

    model.embed_tokens.weight                       [vocab, dim]
    model.layers.{i}.input_layernorm.weight         [dim]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ q/k/v .bias for qwen2)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                  (absent from files when tied)

Building blocks: RMSNorm, rotary embeddings (theta configurable, HF's rotate-half layout), grouped
query attention through `F.scaled_dot_product_attention`, SwiGLU MLP. Runs in fp32 or bf16; like
HF, norms and rotary tables are computed in fp32.

Inference keeps keys/values in a `KVCache` of fixed slots. The caller says where each new token
sits (`positions`, one row per slot), which is what lets the engine batch sequences of different
lengths and let sequences join and leave between decode steps (continuous batching).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

DENSE_ARCHS = ("llama", "qwen2")
ARCHITECTURES = DENSE_ARCHS + ("deepseek_v3",)
# The DeepSeek-V3 fields (MLA + DeepSeekMoE): 0 on a dense arch, > 0 (or as validated) on deepseek_v3.
LATENT_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "first_k_dense_replace", "n_group", "topk_group")


@dataclass
class ModelConfig:
    """Decoder shape. Field names follow HF `LlamaConfig` / `Qwen2Config` / `DeepseekV3Config`."""
    arch: str = "llama"                  # "llama", "qwen2" (adds q/k/v biases) or "deepseek_v3" (MLA + MoE)
    vocab_size: int = 512                # set from the tokenizer when training from scratch
    hidden_size: int = 128               # model width
    intermediate_size: int = 384         # SwiGLU inner width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2         # < num_attention_heads means grouped-query attention
    head_dim: int = 0                    # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 512   # longest sequence (prompt + completion)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True     # lm_head shares the embedding matrix
    initializer_range: float = 0.02      # std of the normal init
    # deepseek_v3 only (HF DeepseekV3Config names; see tandem/deepseek.py). head_dim is then
    # qk_rope_head_dim (as in HF), num_key_value_heads = num_attention_heads, and intermediate_size
    # the width of the first_k_dense_replace dense layers' MLP.
    q_lora_rank: int = 0                 # query down-projection rank (q_a_proj), > 0
    kv_lora_rank: int = 0                # the cached latent's width (kv_a_proj_with_mqa), > 0
    qk_nope_head_dim: int = 0            # per-head query/key width without rotary
    qk_rope_head_dim: int = 0            # per-head query width with rotary; the one shared rotary key's width
    v_head_dim: int = 0                  # per-head value width
    n_routed_experts: int = 0            # routed experts per MoE layer
    n_shared_experts: int = 0            # always-on experts (one MLP of n_shared x moe_intermediate_size)
    num_experts_per_tok: int = 0         # top-k routed experts per token
    moe_intermediate_size: int = 0       # each expert's SwiGLU width
    first_k_dense_replace: int = 0       # the first k layers have a dense MLP instead of MoE
    n_group: int = 0                     # expert groups; routing keeps the topk_group best groups
    topk_group: int = 0
    routed_scaling_factor: float = 1.0   # routed-expert weights are multiplied by this
    norm_topk_prob: bool = True          # normalise the top-k weights to sum 1 (before the scaling)
    rope_interleave: bool = True         # rotary on adjacent pairs (DeepSeek, llama.cpp); false: rotate-half
    # Load balancing while training (DeepSeek-V3 paper, section 2.1.2); not part of HF's config.
    bias_update_speed: float = 0.001     # gamma: after each optimizer step every router bias moves by gamma,
                                         # down for experts above the mean load, up below it (0 = off)
    aux_loss_alpha: float = 0.0          # alpha of the sequence-wise balance loss (0 = off; DeepSeek 1e-4)

    def __post_init__(self):
        if self.arch == "deepseek_v3":
            self.head_dim = self.qk_rope_head_dim
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def attention_bias(self) -> bool:
        return self.arch == "qwen2"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def is_latent(self) -> bool:
        """MLA attention + DeepSeekMoE (deepseek_v3)."""
        return self.arch == "deepseek_v3"

    def _attention_parameters(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if not self.is_latent:
            return d * hd * (h + 2 * kv) + h * hd * d + (hd * (h + 2 * kv) if self.attention_bias else 0)
        q, r, rope = self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim
        qk = self.qk_nope_head_dim + rope
        return (d * q + q + q * h * qk + d * (r + rope) + r + r * h * (self.qk_nope_head_dim + self.v_head_dim)
                + h * self.v_head_dim * d)

    def num_parameters(self, active: bool = False) -> int:
        """Weights (router biases included); active: those one token uses (its top-k experts only)."""
        d = self.hidden_size
        dense_layers = self.first_k_dense_replace if self.is_latent else self.num_hidden_layers
        moe_layers = self.num_hidden_layers - dense_layers
        experts = self.num_experts_per_tok if active else self.n_routed_experts
        moe = 3 * d * self.moe_intermediate_size * (experts + self.n_shared_experts) + \
            self.n_routed_experts * (d + 1)
        layers = self.num_hidden_layers * (self._attention_parameters() + 2 * d) + \
            dense_layers * 3 * d * self.intermediate_size + moe_layers * moe
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + layers + d + head

    def kv_cache_values_per_token(self) -> int:
        """Values the KV cache holds per token over all layers: keys + values per kv head, or for MLA
        the latent + the rotary key."""
        if self.is_latent:
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (2 x weights touched: active experts only), attention
        scores excluded."""
        embed = self.vocab_size * self.hidden_size
        return 2 * (self.num_parameters(active=True) - embed * (1 if self.tie_word_embeddings else 2) + embed)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF does), scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotary_tables(config: ModelConfig, device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [length, head_dim] in fp32 (HF's layout: frequencies repeated twice)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, hd]; cos/sin: [B, 1, T, hd] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values for `batch` slots of up to `max_len` tokens each.

    k[layer], v[layer]: [batch, kv_heads, max_len, head_dim]. The cache does not track lengths:
    the caller passes each new token's position, the token is written there, and a query sees
    only keys at positions <= its own. A slot can be reused by writing from position 0 again.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch, self.max_len = batch, max_len


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.heads, self.kv_heads, self.head_dim = h, kv, hd

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, slots, positions, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.heads != self.kv_heads
        if cache is None and mask is not None:  # unpadded tokens (tandem/train/packing.py's Varlen)
            out = mask.attend(q, k, v, gqa)
        elif cache is None:  # training / full recompute: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            # Write the new keys/values at their positions, then attend over the slots (masked).
            kc, vc = cache.k[layer], cache.v[layer]
            kc[slots[:, None], :, positions] = k.transpose(1, 2)
            vc[slots[:, None], :, positions] = v.transpose(1, 2)
            kc, vc = kc[slots], vc[slots]
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int = 0):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention or Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp or MLP(config)

    def forward(self, x, cos, sin, cache, layer, slots, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, slots, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, make_layer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    keep_fp32: tuple[str, ...] = ()   # names (suffixes) of tensors kept fp32 whatever the model's dtype

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, self.make_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_cache: tuple | None = None
        self.reset_parameters()

    def make_layer(self, index: int) -> nn.Module:
        return DecoderLayer(self.config)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms (HF's init)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * self.config.initializer_range)

    def _rotary(self, positions: torch.Tensor, dtype, need: int):
        """cos, sin at `positions` ([B, 1, T, hd] in `dtype`); `need` bounds the positions from
        above, known on the host (reading positions.max() would wait for the device)."""
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < need or cached[0].device != positions.device:
            length = max(need, self.config.max_position_embeddings)
            self._rope_cache = cached = rotary_tables(self.config, positions.device, length)
        cos, sin = cached
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, slots: torch.Tensor | None = None, varlen=None) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim].

        input_ids: [B, T]. Without a cache: a causal forward over positions 0..T-1 (training;
        right padding is harmless because real tokens never attend forward to pads).
        With a cache: positions [B, T] say where each token goes in slot `slots[b]` (default:
        slot b); each query attends to its own slot's keys at positions <= its own, over the whole
        slot (later positions masked: the used length would need a device->host read; the engine,
        which tracks lengths on the host, reads only the used prefix). Positions must be below
        max(max_position_embeddings, T, the cache's max_len).
        varlen (without a cache): input_ids is [1, N], the tokens of several sequences end to end
        with `positions` restarting at each; varlen.attend(q, k, v, gqa) does their attention, each
        sequence causal over itself only (tandem/train/packing.py).
        """
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        mask = varlen
        need = max(T, cache.max_len if cache is not None else 0)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is not None:
            if slots is None:
                slots = torch.arange(B, device=input_ids.device)
            key_pos = torch.arange(cache.max_len, device=input_ids.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B,1,T,max_len]
        # The tables in the dtype q/k are computed in: autocast's (else q, k would reach attention
        # in fp32 next to a bf16 v), or the weights'.
        kind = x.device.type
        compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        cos, sin = self._rotary(positions, compute, need)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, slots, positions, mask)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, cache=None, slots=None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden(input_ids, positions, cache, slots))

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len or self.config.max_position_embeddings, p.device, p.dtype)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """State dict as it goes to disk: HF names, lm_head dropped when tied, contiguous."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], strict: bool = True,
                              assign: bool = False) -> None:
        """Copy `state` (checkpoint_state's form) into the parameters; assign: take its tensors AS
        the parameters instead (their device and dtype; how a model built on `meta` gets weights)."""
        state = dict(state)
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(state, strict=False, assign=assign)
        if self.config.tie_word_embeddings:   # assign wraps the shared tensor in two Parameters
            self.lm_head.weight = self.model.embed_tokens.weight
        if strict and (missing or unexpected):
            raise KeyError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")

    @classmethod
    def from_checkpoint_state(cls, config: ModelConfig, state: dict[str, torch.Tensor], device=None,
                              dtype: torch.dtype | None = None) -> "Transformer":
        """A model holding `state`, each tensor moved straight to `device` / `dtype` (None: as
        stored). Built on the meta device: no random init, and no full fp32 copy on the way to a
        bf16 model on an accelerator. Tensors already there are used as they are, not copied."""
        with torch.device("meta"):
            model = cls(config)
        model.load_checkpoint_state({k: v.to(device=device, dtype=torch.float32 if k.endswith(cls.keep_fp32) and dtype
                                             else dtype) for k, v in state.items()}, assign=True)
        return model


def weights_fingerprint(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """SHA-256 over the weights in a canonical order (name, dtype, shape, raw bytes); `dtype`:
    of the weights converted to it (one tensor at a time).

    Identical for a run's checkpoint, its HF export and a re-import, whatever the file layout.
    """
    import hashlib
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        fingerprint_update(digest, name, tensor if dtype is None else tensor.to(dtype))
    return digest.hexdigest()


def fingerprint_update(digest, name: str, tensor: torch.Tensor) -> None:
    """Add one named tensor (on the cpu) to a weights_fingerprint digest: tensors added in sorted
    name order give weights_fingerprint's value, one tensor at a time (a streamed sync hashes as
    the buckets go by)."""
    tensor = tensor.contiguous()
    digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}\n".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def model_fingerprint(model: Transformer) -> str:
    return weights_fingerprint(model.checkpoint_state())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def estimate_train_flops(config: ModelConfig, tokens: int) -> float:
    """6 x params x tokens (forward + backward), the usual estimate (Kaplan et al. 2020)."""
    return 3.0 * config.flops_per_token() * tokens


