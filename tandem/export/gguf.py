"""GGUF export for llama.cpp (and everything built on it: llama-cpp-python, Ollama, LM Studio).

    tandem export --model runs/demo --format gguf --gguf-type f16 --out exports/demo-gguf
    llama-server -m exports/demo-gguf/model.gguf --jinja        # chat template is embedded

Written with the `gguf` package (pip install 'tandem[gguf]'), following what llama.cpp's own
convert_hf_to_gguf.py does for LlamaForCausalLM / Qwen2ForCausalLM:

* Architecture "llama" or "qwen2"; hyper-parameters under `{arch}.*` (context_length,
  embedding_length, block_count, feed_forward_length, attention.head_count[_kv],
  attention.key_length/value_length, attention.layer_norm_rms_epsilon, rope.freq_base,
  rope.dimension_count, vocab_size).
* Tensor names from gguf's own HF->GGUF map (token_embd, blk.N.attn_q, ..., output_norm, output);
  a tied lm_head is not written (llama.cpp then reuses token_embd, as for Qwen2.5-0.5B).
* Q/K permutation, "llama" only. HF rotates pairs (i, i + head_dim/2) ("rotate half", NeoX
  style); llama.cpp's llama graph rotates adjacent pairs (2i, 2i+1). convert_hf_to_gguf.py
  therefore reorders the rows of q_proj/k_proj within each head so that adjacent rows are HF's
  pairs: rows reshaped [heads, 2, head_dim/2] -> swap the last two axes -> [heads, head_dim/2, 2].
  "qwen2" uses NeoX rope in llama.cpp, so its weights go in unpermuted. `unpermute_qk` inverts it
  (used by `read_gguf` and the tests to prove the file holds exactly our weights).
* Norms and biases are always F32 (llama.cpp expects 1-D tensors in F32); matrices are F32, F16
  or Q8_0 (blocks of 32 along a row; a matrix whose rows are not a multiple of 32 falls back to F16,
  as convert_hf_to_gguf.py does).
* Tokenizer: tokenizer.ggml.model = "gpt2" (byte-level BPE) with tokens, merges and token types;
  the turn markers <|im_start|>/<|im_end|>/<|endoftext|> are CONTROL (never printed, parsed only as
  special), the reasoning tags USER_DEFINED (always matched, always printed, like our tokenizer);
  eos = eot = <|im_end|>, pad = bos = <|endoftext|>, no BOS added; the ChatML template is embedded.

Pre-tokenizer. llama.cpp re-implements each known pre-tokenizer by name and refuses (older
versions) or falls back on (newer) an unknown name, so ours must be declared as one it knows:
tokenizer.ggml.pre = "gpt-2", GPT-2's regex. Ours is `Digits(individual_digits=True)` then that
same regex. The BPE was trained after the digit split, so no merge contains a digit next to
anything, and BPE over GPT-2's coarser pieces (" 123") yields the same tokens (" ", "1", "2",
"3"). One known exception: a run of two or more whitespace characters right before a digit
("a  1", "\\n\\n1"): GPT-2's regex leaves one whitespace with the digit and so splits the run,
ours keeps the run whole, so the tokens differ when the vocab has a merge for that run.
tests/test_gguf.py checks equality on the task corpus and chat prompts and pins the exception;
`tandem parity` reports the prompt-token match rate (threshold 1.0) so an affected dataset fails
loudly instead of quietly.

Verification without llama.cpp: tests/test_gguf.py recomputes the logits from the GGUF file alone
(metadata for the shapes and constants, tensors by GGUF name, llama.cpp's rope mode per
architecture, token_embd standing in for a missing output) and matches our model to 1e-4 in f32;
with llama-cpp-python installed, `tandem parity --target llamacpp:f32` compares the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tandem.errors import TandemError
from tandem.model import ModelConfig
from tandem.tokenizer import CHAT_TEMPLATE, ChatTokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"
Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TandemError("GGUF export needs the gguf package: pip install 'tandem[gguf]'") from None
    return gguf


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp adjacent-pair row order, per head (rows = heads * hd)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of permute_qk."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _token_table(tokenizer: ChatTokenizer, vocab_size: int, gguf) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") from tokenizer.json."""
    data = json.loads(tokenizer.tokenizer.to_str())
    by_id: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise TandemError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    toktypes = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, toktypes, merges


def write_gguf(config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: ChatTokenizer,
               path: str | Path, out_type: str = "f16", name: str = "tandem") -> dict:
    """Write one .gguf file at `path` (the caller publishes it atomically). Returns a summary."""
    gguf = _gguf()
    if out_type not in GGUF_TYPES:
        raise TandemError(f"unknown GGUF type '{out_type}'; use one of {', '.join(GGUF_TYPES)}")
    if config.is_latent:
        raise TandemError(f"GGUF export of {config.arch} (llama.cpp's deepseek2) is not implemented yet; "
                          "export it with --format hf")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[config.arch]
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[out_type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    tokens, toktypes, merges = _token_table(tokenizer, config.vocab_size, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.pad_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = dict(weights)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    types_used: dict[str, int] = {}
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TandemError(f"no GGUF name for weight {hf_name}")
        data = tensor.detach().cpu().float()
        if config.arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, config.num_attention_heads)
        elif config.arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, config.num_key_value_heads)
        array = data.numpy()
        qtype = Q.F32 if array.ndim <= 1 or gguf_name.endswith("_norm.weight") else matrix_type
        if qtype == Q.Q8_0 and array.shape[-1] % Q8_BLOCK:
            qtype = Q.F16
        if qtype == Q.F16:
            array = array.astype(np.float16)
        elif qtype == Q.Q8_0:
            array = gguf.quants.quantize(array, Q.Q8_0)
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        types_used[qtype.name] = types_used.get(qtype.name, 0) + 1

    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"files": [Path(path).name], "gguf_type": out_type, "tensor_types": types_used,
            "architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": len(state)}


def _field_value(field):
    """A scalar/string/array value of a GGUFReader field, as Python data."""
    import gguf
    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def find_gguf(path: str | Path) -> Path:
    """The .gguf file a path means: itself, or the single .gguf inside a folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TandemError(f"{path} holds {len(found)} .gguf files; point at one of them")
    raise TandemError(f"no .gguf file at {path}; export one with tandem export --format gguf")


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and any(path.glob("*.gguf")))


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (no tensors read)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(find_gguf(path)))
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, weights under HF names, un-permuted, dequantized to fp32) of a tandem GGUF.

    The inverse of write_gguf, for checks: the GGUF must hold exactly the run's weights (bitwise
    for f32, to f16/q8_0 rounding otherwise).
    """
    gguf = _gguf()
    reader = gguf.GGUFReader(str(find_gguf(path)))
    meta = {name: _field_value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
    arch_name = meta["general.architecture"]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    blocks = meta[f"{arch_name}.block_count"]
    heads, kv_heads = meta[f"{arch_name}.attention.head_count"], meta[f"{arch_name}.attention.head_count_kv"]
    to_hf = {}
    mapping = gguf.get_tensor_name_map(arch, blocks)
    for hf_name in _hf_names(blocks, arch_name):
        gguf_name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name:
            to_hf[gguf_name] = hf_name
    weights = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))   # ggml order is reversed
        data = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).reshape(shape)
        hf_name = to_hf[tensor.name]
        if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = unpermute_qk(data, heads)
        elif arch_name == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = unpermute_qk(data, kv_heads)
        weights[hf_name] = data
    return meta, weights


def _hf_names(blocks: int, arch: str) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(blocks):
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
        if arch == "qwen2":
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    return names
