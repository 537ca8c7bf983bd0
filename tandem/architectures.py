"""Which decoder class a `ModelConfig` builds: the dense Llama/Qwen2 `Transformer` or `DeepseekV3`.

    model = build_model(config)                                   # random init, as the class does
    model = model_from_state(config, weights, device, dtype)      # weights loaded straight there

Every place that makes a model from a config goes through here (the two classes share one
interface: forward / hidden with a KV cache, new_cache, checkpoint_state, load_checkpoint_state).
"""

from __future__ import annotations

import torch

from tandem.deepseek import DeepseekV3
from tandem.model import ModelConfig, Transformer


def model_class(config: ModelConfig) -> type[Transformer]:
    return DeepseekV3 if config.is_latent else Transformer


def build_model(config: ModelConfig) -> Transformer:
    return model_class(config)(config)


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], device=None,
                     dtype: torch.dtype | None = None) -> Transformer:
    """`Transformer.from_checkpoint_state` for the config's class."""
    return model_class(config).from_checkpoint_state(config, state, device, dtype)
