"""How a trainer's batch of sequences reaches the model: right-padded rows, or packed (padding-free:
the real tokens end to end, every sequence attending only to itself).

    layout = make_layout(rows, predicts, pad_id, device, packed=True)
    hidden = target_hidden(model, layout)      # [N, dim] at every position that predicts a target
    loss = cross_entropy(model.lm_head(hidden), layout.targets)

rows[i] is sequence i's token ids; predicts[i] the positions t of sequence i whose next token
t + 1 is a training target (assistant tokens in SFT, completion tokens in GRPO), ascending. The
targets come out flat, sequence after sequence, in that order, whichever layout holds them.

Padded: one row per sequence, width = the longest; plain causal attention; every layer also
computes the pads. Packed: one row of the real tokens only, positions restarting at each sequence
(rotary as if each stood alone), so the embeddings, norms, projections and MLPs (most of the FLOPs)
skip the pads. Attention is the one place that needs sequences apart: `Varlen.attend` gathers the
packed queries, keys and values into the padded [sequences, heads, width, head_dim] form (pad slots
read a zero row), runs causal attention there, and gathers the real positions back: the unpad/pad
trick of variable-length attention, with the padded attention kernel in the middle (a varlen or
flex_attention kernel would also skip the pads' share of attention, a small part at these widths).

Results equal the padded layout's up to float summation order (other matmul shapes:
tests/test_packing.py bounds the difference); the padded layout is bitwise what the trainers
computed before packing existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.model import Transformer


class Varlen:
    """Attention for packed sequences: `index` [S * W] says which packed token fills each slot of
    the padded [S, W] grid (N, one past the last token, for a pad: a zero row); `real` [N] which
    grid slot each packed token sits in (both built on the host: no device read)."""

    def __init__(self, index: torch.Tensor, real: torch.Tensor, sequences: int, width: int):
        self.index, self.real, self.sequences, self.width = index, real, sequences, width

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, h, N, hd] packed -> [S, h, W, hd] padded (pads zero)."""
        rows = x[0].transpose(0, 1)                                        # [N, h, hd]
        rows = torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])       # row N: the pads' zeros
        grid = rows.index_select(0, self.index)                            # [S * W, h, hd]
        return grid.view(self.sequences, self.width, *rows.shape[1:]).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q, k, v: [1, heads, N, hd] -> attention output [1, heads, N, hd], each sequence causal."""
        out = F.scaled_dot_product_attention(self._pad(q), self._pad(k), self._pad(v), is_causal=self.width > 1,
                                             enable_gqa=gqa)                   # [S, H, W, hd]
        flat = out.transpose(1, 2).reshape(self.sequences * self.width, out.shape[1], out.shape[3])
        return flat.index_select(0, self.real).transpose(0, 1).unsqueeze(0)


@dataclass
class Layout:
    input_ids: torch.Tensor              # [S, W] padded, or [1, N] packed
    positions: torch.Tensor | None       # packed: [1, N] each token's position in its own sequence
    varlen: Varlen | None                # packed: the attention of its sequences
    predict: torch.Tensor                # [T] flat indices into input_ids of the target-predicting positions
    targets: torch.Tensor                # [T] the target token of each (the next token)


def padded_layout(rows: list[list[int]], predicts: list[list[int]], pad_id: int, device) -> Layout:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    predict = torch.tensor([i * width + t for i, p in enumerate(predicts) for t in p], dtype=torch.long)
    return Layout(ids.to(device), None, None, predict.to(device), ids.view(-1)[predict + 1].to(device))


def packed_layout(rows: list[list[int]], predicts: list[list[int]], device) -> Layout:
    width, tokens = max(len(r) for r in rows), sum(len(r) for r in rows)
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r))
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    positions = torch.tensor([p for r in rows for p in range(len(r))], dtype=torch.long)
    index = torch.tensor([starts[i] + p if p < len(r) else tokens for i, r in enumerate(rows) for p in range(width)],
                         dtype=torch.long)
    real = torch.tensor([i * width + p for i, r in enumerate(rows) for p in range(len(r))], dtype=torch.long)
    predict = torch.tensor([starts[i] + t for i, p in enumerate(predicts) for t in p], dtype=torch.long)
    return Layout(ids.view(1, -1).to(device), positions.view(1, -1).to(device),
                  Varlen(index.to(device), real.to(device), len(rows), width), predict.to(device),
                  ids[predict + 1].to(device))


def make_layout(rows: list[list[int]], predicts: list[list[int]], pad_id: int, device, packed: bool) -> Layout:
    return packed_layout(rows, predicts, device) if packed else padded_layout(rows, predicts, pad_id, device)


def target_hidden(model: Transformer, layout: Layout) -> torch.Tensor:
    """Final hidden states [T, dim] at the layout's target-predicting positions, in target order."""
    hidden = model.hidden(layout.input_ids, layout.positions, varlen=layout.varlen)
    return hidden.flatten(0, 1)[layout.predict]
