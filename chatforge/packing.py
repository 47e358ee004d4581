"""Packing sequences that share a prefix: a prompt and its K answers, a few-shot prompt and its options.

`pack_shared_prefix` lays each group out as one row (the shared tokens once, then each sequence's own
tokens), with the rotary positions and the attention mask that make every sequence's outputs exactly what
they are when it is forwarded alone. With short answers after a long prompt, as in reward modelling
(SmolLM2's chat template alone adds 20 tokens of system prompt) and few-shot evaluation, most of the
tokens are the prompt's, so the model runs over a fraction of them. Written here because neither PyTorch nor
transformers packs a tree of sequences into one row for training (flex attention's document masks are
GPU-oriented and still need the layout built).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """How many tokens all `sequences` start with, leaving each at least one token of its own (the one its
    score is read at)."""
    length = min(len(s) for s in sequences) - 1
    first = np.asarray(sequences[0][:length])
    for s in sequences[1:]:
        differ = np.flatnonzero(np.asarray(s[:length]) != first)
        if differ.size:
            length = int(differ[0])
            first = first[:length]
    return length


@dataclass
class PackedGroups:
    """Groups of sequences packed one group per row by `pack_shared_prefix`."""

    ids: torch.Tensor  # (R, T)
    positions: torch.Tensor  # (R, T) rotary positions
    attend: torch.Tensor  # (R, 1, T, T) the keys each query sees
    last: torch.Tensor  # (N,) each sequence's last token, an index into the (R·T) flattened outputs
    sizes: list[int]  # sequences per group
    layout: list[tuple[int, int, int, int]]  # each sequence's row, tokens shared with its group, first own slot, length

    def to(self, device) -> "PackedGroups":
        return dataclasses.replace(self, ids=self.ids.to(device), positions=self.positions.to(device),
                                   attend=self.attend.to(device), last=self.last.to(device))

    def slots(self, sequence: int) -> list[int]:
        """Where each token of the `sequence`-th sequence (counted over all groups) sits in its row."""
        _, shared, start, length = self.layout[sequence]
        return list(range(shared)) + list(range(start, start + length - shared))


def pack_shared_prefix(groups: Sequence[Sequence[Sequence[int]]], pad_id: int) -> PackedGroups:
    """One row per group: the tokens its sequences share (the prompt of K ranked answers), then each
    sequence's own tokens, placed at the positions they have after the prompt and attending only to the
    prompt and to themselves. Causal attention makes every sequence's outputs what they are alone, while
    the prompt, most of the tokens when the answers are short, goes through the model once instead of K
    times. Padding after the last group attends to itself only (no empty row, no NaN)."""
    rows, segments, positions, last, layout = [], [], [], [], []
    for seqs in groups:
        shared = shared_prefix(seqs)
        row, segment, position = list(seqs[0][:shared]), [0] * shared, list(range(shared))
        for k, s in enumerate(seqs, 1):
            layout.append((len(rows), shared, len(row), len(s)))
            row += list(s[shared:])
            segment += [k] * (len(s) - shared)
            position += range(shared, len(s))
            last.append((len(rows), len(row) - 1))
        rows.append(row), segments.append(segment), positions.append(position)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row, seg, pos) in enumerate(zip(rows, segments, positions)):
        ids[r, : len(row)], segment[r, : len(row)], position[r, : len(row)] = torch.tensor(row), torch.tensor(seg), torch.tensor(pos)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    attend = causal & (((key == query) | (key == 0)) & (query >= 0) | torch.eye(width, dtype=torch.bool))
    index = torch.tensor([r * width + t for r, t in last])
    return PackedGroups(ids, position, attend[:, None], index, [len(seqs) for seqs in groups], layout)


def packed_outputs(model: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """The head's output at each packed sequence's last token: (N,) scores or (N, C) classifier logits."""
    outputs = model(packed.ids, positions=packed.positions, attend=packed.attend)
    return outputs.flatten(0, 1)[packed.last]
