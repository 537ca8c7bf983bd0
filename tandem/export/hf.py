"""Hugging Face format: export a tandem model as an HF Llama/Qwen2/DeepseekV3 folder, and import one back.

    tandem export --model runs/demo --format hf --out exports/demo-hf
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('exports/demo-hf')"

An export folder holds exactly what `transformers.AutoModelForCausalLM` / `AutoTokenizer` (and so
vLLM, vLLM-Ascend and MindIE, which read the same files) expect:

    config.json                    LlamaForCausalLM, Qwen2ForCausalLM or DeepseekV3ForCausalLM, dtype,
                                   special token ids
    model.safetensors              weights under HF names (lm_head dropped when tied, as HF does);
      or model-0000i-of-0000n.safetensors + model.safetensors.index.json above --max-shard-size
    generation_config.json         eos = <|im_end|>, pad = <|endoftext|>, greedy by default
    tokenizer.json                 our byte-level BPE, unchanged
    tokenizer_config.json          ChatML chat template: apply_chat_template == our prompt format
    tandem_export.json             provenance: source run, step, weight fingerprint, gate result
    README.md                      model card: training figures, ledger, accuracies, gate (export/card.py)

Tensor names are already HF's (tandem/model.py), so exporting is a dtype cast at most and the weight
fingerprint of an fp32 export equals the run's. config.json carries both the transformers 4.x keys
(`rope_theta`, `torch_dtype`) and the 5.x ones (`rope_parameters`, `dtype`), so either generation
of loaders reads it.

DeepseekV3ForCausalLM (tandem/deepseek.py): one tensor per expert (`mlp.experts.{i}.*`, as DeepSeek's
checkpoints and transformers' save_pretrained store them; transformers 5 fuses them on load), the
router (`mlp.gate.weight`, `e_score_correction_bias`) kept fp32 whatever the export dtype (as
DeepSeek's checkpoints), and config.json with `scoring_func: "sigmoid"`, `topk_method: "noaux_tc"`
and `num_nextn_predict_layers: 0` written explicitly: transformers' config class leaves the first two
out, but vLLM and llama.cpp's converter read them (a missing scoring_func means softmax there).

`import_hf(folder)` goes the other way for an HF Llama/Qwen2 folder (safetensors weights plus a
fast tokenizer with the ChatML markers <|im_start|>/<|im_end|>/<|endoftext|>, e.g. the Qwen2 family):
it returns the tensors exactly as stored, so HF -> tandem -> HF is bitwise identical. What tandem's
decoder does not implement (rope scaling, sliding windows, Llama attention/MLP biases, activations
other than SiLU) is refused with a ModelError naming the key, never silently approximated.
No ChatML fallback: a tokenizer without the markers (Llama 3's <|eot_id|> family, say) is refused,
because adding the markers would mean untrained embedding rows; fine-tune such a model on a ChatML
template first (e.g. TRL's `setup_chat_format`) and import the result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tandem.errors import ModelError
from tandem.architectures import build_model, model_class
from tandem.model import ModelConfig
from tandem.train.checkpoint import save_safetensors
from tandem.tokenizer import IM_END, IM_START, PAD, ChatTokenizer, hf_tokenizer_config

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
CLASS_ARCHS = {v: k for k, v in ARCH_CLASSES.items()}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD = "5GB"  # transformers' own default for save_pretrained
PROVENANCE = "tandem_export.json"
_IGNORED_WEIGHTS = re.compile(r"\.rotary_emb\.inv_freq$")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / '1024' -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match:
        raise ModelError(f"bad size '{text}'; write e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size < 1:
        raise ModelError(f"--max-shard-size must be positive, got '{text}'")
    return size


# -----------------------------------------------------------------------------------------------
# Export


def hf_config(config: ModelConfig, tokenizer: ChatTokenizer, dtype: torch.dtype) -> dict:
    """config.json for transformers (4.x and 5.x keys), vLLM, vLLM-Ascend and MindIE."""
    dtype_name = HF_DTYPE_NAMES[dtype]
    out = {
        "architectures": [ARCH_CLASSES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # No BOS is ever prepended (add_bos_token false); <|endoftext|> stands in, as in Qwen2.
        "bos_token_id": tokenizer.pad_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    if config.arch == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif config.is_latent:
        out.update(_deepseek_fields(config))
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=config.num_hidden_layers)
    return out


def _deepseek_fields(config: ModelConfig) -> dict:
    """config.json keys of DeepseekV3ForCausalLM beyond the Llama ones (see the module doc)."""
    out = {key: getattr(config, key) for key in (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "n_group",
        "topk_group", "routed_scaling_factor", "norm_topk_prob", "rope_interleave")}
    out.update(scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0, attention_bias=False,
               pretraining_tp=1)
    return out


def generation_config(tokenizer: ChatTokenizer) -> dict:
    return {"bos_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id, "do_sample": False}


def _ordered(config: ModelConfig, weights: dict[str, torch.Tensor]) -> list[str]:
    """Weight names in model order (embeddings, layer 0..n, norm, head): shards read naturally."""
    with torch.device("meta"):
        order = list(build_model(config).state_dict())
    known = [n for n in order if n in weights]
    return known + sorted(set(weights) - set(known))


def write_hf(config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: ChatTokenizer,
             folder: str | Path, dtype: str = "auto", max_shard_size: str | int = DEFAULT_MAX_SHARD) -> dict:
    """Write an HF folder into `folder` (which must exist and be empty; see export/__init__.py for
    the atomic publish). dtype "auto" keeps the weights' own dtype. Returns {"files", "dtype"}."""
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in weights.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    fp32_names = model_class(config).keep_fp32
    if dtype == "auto":
        dtypes = {v.dtype for k, v in state.items() if not k.endswith(fp32_names)}
        target = dtypes.pop() if len(dtypes) == 1 else torch.float32
    elif dtype in TORCH_DTYPES:
        target = TORCH_DTYPES[dtype]
    else:
        raise ModelError(f"unknown export dtype '{dtype}'; use auto, fp32, bf16 or fp16")
    if target not in HF_DTYPE_NAMES:
        raise ModelError(f"weights are {target}; export with --dtype fp32, bf16 or fp16")
    state = {k: v.to(torch.float32 if k.endswith(fp32_names) else target).contiguous() for k, v in state.items()}

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name in _ordered(config, state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = []
    if len(shards) == 1:
        save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
        files.append("model.safetensors")
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors({n: state[n] for n in names}, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
            files.append(fname)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append("model.safetensors.index.json")

    (folder / "config.json").write_text(json.dumps(hf_config(config, tokenizer, target), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2))
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(), indent=2))
    files += ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    return {"files": files, "dtype": HF_DTYPE_NAMES[target], "shards": len(shards)}


# -----------------------------------------------------------------------------------------------
# Import


def _rope_theta(data: dict, path: Path) -> float:
    """rope_theta from a 4.x (top-level) or 5.x (rope_parameters) config; scaling is refused."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise ModelError(f"{path}/config.json uses rope scaling '{kind}', which tandem's decoder does not "
                         "implement; use a model without rope_scaling")
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    return float(theta)


def hf_model_config(data: dict, path: Path) -> ModelConfig:
    """A ModelConfig from an HF config.json, or a ModelError naming what is unsupported."""
    classes = data.get("architectures") or []
    arch = CLASS_ARCHS.get(classes[0]) if classes else data.get("model_type")
    if arch not in ARCH_CLASSES:
        found = classes[0] if classes else data.get("model_type", "nothing")
        raise ModelError(f"{path}/config.json declares architecture {found!r}; tandem imports "
                         f"{', '.join(ARCH_CLASSES.values())} only")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(data.get(key), int):
            raise ModelError(f"{path}/config.json lacks '{key}' (an integer); the folder is incomplete")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{path}/config.json: hidden_act {data['hidden_act']!r} is not supported (silu only)")
    if arch == "llama" and (data.get("attention_bias") or data.get("mlp_bias")):
        raise ModelError(f"{path}/config.json: Llama with attention_bias/mlp_bias is not supported")
    if arch == "qwen2" and data.get("use_sliding_window"):
        raise ModelError(f"{path}/config.json: use_sliding_window=true is not supported; "
                         "set it to false if the model was trained without it")
    heads = data["num_attention_heads"]
    if arch == "deepseek_v3":
        return _deepseek_config(data, path)
    return ModelConfig(
        arch=arch, vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(data, path), rms_norm_eps=data.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        initializer_range=data.get("initializer_range", 0.02))


def _deepseek_config(data: dict, path: Path) -> ModelConfig:
    """A deepseek_v3 ModelConfig from a DeepseekV3 config.json; what tandem's decoder does not
    implement (no q LoRA, softmax scoring, other top-k methods, biases) is refused."""
    checks = [("q_lora_rank", bool(data.get("q_lora_rank")), "a positive q_lora_rank (no-q-LoRA 'lite' models "
               "are not supported)"),
              ("scoring_func", data.get("scoring_func", "sigmoid") == "sigmoid", "sigmoid"),
              ("topk_method", data.get("topk_method", "noaux_tc") == "noaux_tc", "noaux_tc"),
              ("attention_bias", not data.get("attention_bias"), "false"),
              ("num_key_value_heads", data.get("num_key_value_heads") in (None, data["num_attention_heads"]),
               "num_attention_heads")]
    for key, ok, allowed in checks:
        if not ok:
            raise ModelError(f"{path}/config.json: {key} {data.get(key)!r} is not supported by tandem's "
                             f"deepseek_v3 decoder (it needs {allowed})")
    fields = {key: data[key] for key in (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "n_group",
        "topk_group", "routed_scaling_factor", "norm_topk_prob", "rope_interleave") if data.get(key) is not None}
    return ModelConfig(
        arch="deepseek_v3", vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
        num_attention_heads=data["num_attention_heads"], num_key_value_heads=data["num_attention_heads"],
        max_position_embeddings=data.get("max_position_embeddings", 2048), rope_theta=_rope_theta(data, path),
        rms_norm_eps=data.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        initializer_range=data.get("initializer_range", 0.02), **fields)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise ModelError(f"{index} is unreadable (no weight_map); re-export the model") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelError(f"{path} is incomplete: weight shard(s) {', '.join(missing[:3])} listed in "
                             f"model.safetensors.index.json are missing")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"{path} holds pytorch_model.bin weights; tandem reads safetensors only: convert with "
                         "AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, safe_serialization=True)")
    raise ModelError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")


def import_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], ChatTokenizer, dict]:
    """(ModelConfig, weights as stored, ChatTokenizer, info) for an HF Llama/Qwen2 folder."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path} has no config.json; it is not an HF model folder")
    try:
        data = json.loads(config_path.read_text())
    except ValueError:
        raise ModelError(f"{config_path} is not valid JSON") from None
    config = hf_model_config(data, path)

    # Tokenizer first: cheap, and the most common reason an HF model cannot be a tandem model.
    if not (path / "tokenizer.json").is_file():
        hint = " (only a slow sentencepiece tokenizer.model: save it with a fast tokenizer first)" \
            if (path / "tokenizer.model").is_file() else ""
        raise ModelError(f"{path} has no tokenizer.json{hint}")
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    missing = [t for t in (IM_START, IM_END, PAD) if raw.token_to_id(t) is None]
    if missing:
        raise ModelError(f"the tokenizer in {path} lacks the ChatML markers {', '.join(missing)} that tandem's "
                         "chat format needs; use a ChatML model (e.g. the Qwen2 family) or fine-tune with a "
                         "ChatML template first")
    tokenizer = ChatTokenizer(raw)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size "
                         f"is {config.vocab_size}")

    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if not _IGNORED_WEIGHTS.search(name):
                        weights[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file} is unreadable ({str(exc).splitlines()[0]}): truncated or corrupt; "
                             "export or download the model again") from None
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)   # HF ignores a stored head when tied; so do we
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).checkpoint_state().items()}
    absent = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    if absent:
        raise ModelError(f"{path} is missing {len(absent)} weight(s) for a {ARCH_CLASSES[config.arch]} of this "
                         f"config, e.g. {', '.join(absent[:3])}")
    if extra:
        raise ModelError(f"{path} has weight(s) tandem's {config.arch} decoder does not use, e.g. "
                         f"{', '.join(extra[:3])}; the architecture is not plain {ARCH_CLASSES[config.arch]}")
    wrong = [n for n, shape in expected.items() if tuple(weights[n].shape) != shape]
    if wrong:
        n = wrong[0]
        raise ModelError(f"{path}: weight {n} has shape {tuple(weights[n].shape)}, config.json implies {expected[n]}")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in weights.values()})
    info = {"kind": "hf", "path": str(path), "step": None, "arch": ARCH_CLASSES[config.arch],
            "dtype": ",".join(dtypes)}
    provenance = path / PROVENANCE
    if provenance.is_file():
        try:
            info["exported_from"] = json.loads(provenance.read_text()).get("source")
        except ValueError:
            pass
    return config, weights, tokenizer, info
