"""Does llama.cpp run each GGUF type on this CPU? One tiny probe per type, each in its own child.

    gguf_health()              # {"f32": "ok", "f16": "ok", "q8_0": "crashes (signal 11)"}
    health_text(result)        # "f32 ok, f16 ok, q8_0 crashes (signal 11)"

Some llama.cpp builds crash in the kernels of one type on some CPUs (a quantised matmul compiled
for instructions the CPU lacks), so `tandem doctor` and `tandem preflight --target llamacpp` say so
before a user meets it while serving. For each type a tiny model (random weights, built in memory)
is exported to a temp GGUF here, in the parent, and evaluated by llama.cpp in a throwaway spawned
child (tandem/isolate.py): a crash is a result, the parent lives on, and the temp folder is
removed. Nothing is cached: every call probes again, about a second per type (a child interpreter
and a model load). The callers probe only when llama-cpp-python is installed, so without it this
costs nothing. This module imports nothing heavy at its top, since each child imports it to find
`run_gguf`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

PROBE_TOKENS = 8   # tokens evaluated: every matmul of the model runs in the file's type


def run_gguf(file: str) -> str:
    """In the child: load `file` with llama.cpp and evaluate a few tokens; "ok" or what is wrong."""
    import math
    from llama_cpp import Llama
    llm = Llama(model_path=file, n_ctx=4 * PROBE_TOKENS, n_batch=4 * PROBE_TOKENS, logits_all=True,
                verbose=False, n_threads=1)
    llm.eval(list(range(PROBE_TOKENS)))
    finite = all(math.isfinite(float(x)) for x in llm.scores[PROBE_TOKENS - 1])
    return "ok" if finite else "non-finite logits"


def _tiny_model():
    """(config, weights, tokenizer) of a one-layer model whose rows are multiples of 32, so q8_0
    really quantises every matrix (q8_0 stores other rows as f16)."""
    from tandem.model import ModelConfig, Transformer
    from tandem.tokenizer import train_tokenizer
    # a corpus with repeated pairs, so the BPE has merges: llama.cpp refuses a vocabulary without any
    tokenizer = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)], 300)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4 * PROBE_TOKENS)
    model = Transformer(config)
    model.reset_parameters(0)
    return config, model.checkpoint_state(), tokenizer


def gguf_health(probe: Callable[[str], str] = run_gguf) -> dict[str, str]:
    """{GGUF type: "ok" | "crashes (signal N)" | "fails: ..."}; `probe(file)` runs in a child."""
    from tandem.export.gguf import GGUF_TYPES, write_gguf
    from tandem.isolate import ChildCrashed, run_isolated
    config, weights, tokenizer = _tiny_model()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-gguf-probe-"))
    health = {}
    try:
        for gguf_type in GGUF_TYPES:
            file = tmp / f"probe-{gguf_type}.gguf"
            write_gguf(config, weights, tokenizer, file, out_type=gguf_type)
            try:
                health[gguf_type] = run_isolated(probe, str(file), what="llama.cpp")
            except ChildCrashed as exc:
                health[gguf_type] = f"crashes (signal {exc.signum})" if exc.signum else f"crashes: {exc}"
            except Exception as exc:
                health[gguf_type] = f"fails: {(str(exc) or type(exc).__name__).splitlines()[0]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return health


def health_text(health: dict[str, str]) -> str:
    return ", ".join(f"{gguf_type} {result}" for gguf_type, result in health.items())
