"""Shared fixtures: tiny models and configs built inside the tests (no downloads, CPU only).

Packages: everything `pip install 'tandem[test]'` installs is imported by the tests, never skipped
(a broken install fails). llama-cpp-python (the `llamacpp` extra, built from source) is the one
optional package: `make test` (and so CI) installs it and sets TANDEM_TEST_ALL=1, under which its
tests run and its absence is a failure; a plain `pytest` without it skips those tests, saying so.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def tiny_model_config(**overrides):
    from tandem.model import ModelConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return ModelConfig(**{**base, **overrides})


def tiny_deepseek_config(**overrides):
    """A DeepSeek-V3 shape small enough for unit tests: 3 layers (the first dense), 8 experts in 4
    groups, top-2 from the 2 best groups, one shared expert."""
    from tandem.model import ModelConfig
    base = dict(arch="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                tie_word_embeddings=False, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=4,
                topk_group=2, routed_scaling_factor=2.5)
    return ModelConfig(**{**base, **overrides})


def prefill_then_decode(model, ids, prefill: int, cache_len: int = 32):
    """Logits of `ids` [B, T] computed with a fresh KV cache: one prefill of the first `prefill`
    tokens, then one decode step per remaining token (compare with model(ids))."""
    B, T = ids.shape
    positions = torch.arange(T).expand(B, T)
    cache = model.new_cache(B, cache_len)
    with torch.no_grad():
        parts = [model(ids[:, :prefill], positions[:, :prefill], cache)] + \
                [model(ids[:, t:t + 1], positions[:, t:t + 1], cache) for t in range(prefill, T)]
    return torch.cat(parts, 1), cache


def fragile_llama(file: str) -> str:
    """Stands in for llama.cpp's run of a GGUF file in infer/gguf_probe.py's child: it reads the
    file the parent exported, then on q8_0 dereferences NULL (a real segfault, in C) and on f16
    raises; f32 is "ok"."""
    import ctypes
    from tandem.export.gguf import GGUF_TYPES, read_gguf_metadata
    gguf_type = {0: "f32", 1: "f16", 7: "q8_0"}[read_gguf_metadata(file)["general.file_type"]]
    assert gguf_type in GGUF_TYPES and gguf_type in Path(file).name
    if gguf_type == "q8_0":
        ctypes.string_at(0)
    if gguf_type == "f16":
        raise ValueError("no f16 kernels\nsecond line")
    return "ok"


def llama_cpp():
    """The llama_cpp module; without it a failure under `make test` (TANDEM_TEST_ALL=1), else a skip."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        message = "llama-cpp-python is not installed: pip install 'tandem[llamacpp]' (make test does)"
        if os.environ.get("TANDEM_TEST_ALL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    import llama_cpp as module
    return module


def run_tandem(*args, timeout=300, env=None, hide=()):
    """Run the real `tandem` CLI in a subprocess; returns CompletedProcess. `hide` names modules the
    child must not find (importing them fails, find_spec gives None), as on a machine without them."""
    start = ["-m", "tandem.cli"]
    if hide:
        start = ["-c", "import runpy, sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hide)
                 + "runpy.run_module('tandem.cli', run_name='__main__', alter_sys=True)"]
    return subprocess.run([sys.executable, *start, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def coin_flip_task(folder: Path) -> str:
    """Write a JSONL task of 60 coin flips ("Pick a or b (i)", answer a random a or b) into `folder`;
    returns the `data.tasks=[...]` override naming it. No model can know the answers, so once a short
    SFT has taught the format, about half of the answers in a group are right whatever the training
    trajectory: group rewards differ and GRPO updates are not zero on any machine (on a real task a
    smoke model's answers are all wrong, or all formatted alike, in most groups)."""
    rng = random.Random(0)
    data = folder / "coin.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Pick a or b ({i})", "answer": rng.choice("ab")}) + "\n"
                            for i in range(60)))
    return f'data.tasks=["{data}"]'


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `tandem pipeline --preset smoke` run shared by the CLI tests."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_tandem("pipeline", "--preset", "smoke", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(autouse=True)
def _deterministic_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
