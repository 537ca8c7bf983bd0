"""The engine's decode step replayed from a captured device graph (CUDA graphs, through accel).

At batch 1 a decode step of a small model is ~100 tiny kernels whose launch cost, not their math,
sets the speed. Recorded once as a graph, a step is one replay. The engine's static decode step
(`Engine._decode(n, static=True)`) reads only device tensors that live as long as the engine (the
pending tokens, their positions, the KV cache, the fused weights) and attends over the whole cache
under a mask built on the device, so its shapes depend on the batch size alone.

    graphs = DecodeGraphs(engine)       # Engine(..., capture_decode=True) builds one
    logits = graphs.decode(n)           # [n, vocab]; captured on first use of n's bucket
    graphs.clear()                      # the weights' tensors were rebuilt: capture again

Batch sizes are rounded up to a power of two (capped at max_batch): a few graphs serve every n.
The extra rows of a bucket compute a step for free slots: they write keys/values only into free
slots at positions a later prefill or decode overwrites before anything reads them, and their
logits are dropped. Replaying a graph is idempotent for the same inputs (the same keys/values land
in the same cache rows), which the capture's warm-up runs rely on. Simplification: attention runs
over max_len positions each step, which costs more than the eager step's used prefix on a long
cache; the graphs pay off where launches dominate (small batches, small models).
"""

from __future__ import annotations

import torch

from tandem import accel


class DecodeGraphs:
    """capture(device, step) -> (graph, output): accel.capture_graph; tests on a machine without
    CUDA pass a stand-in with the same replay semantics (output overwritten in place)."""

    def __init__(self, engine, capture=accel.capture_graph):
        self.engine, self.capture = engine, capture
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}

    def bucket(self, n: int) -> int:
        return min(self.engine.max_batch, 1 << (n - 1).bit_length())

    def decode(self, n: int) -> torch.Tensor:
        size = self.bucket(n)
        if size not in self.graphs:
            self.graphs[size] = self.capture(self.engine.device, lambda: self.engine._decode(size, static=True))
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    def clear(self) -> None:
        self.graphs.clear()
