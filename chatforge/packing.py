"""Packing sequences that share a prefix: a prompt and its K answers, a few-shot prompt and its options.

`pack_shared_prefix` lays each group out as one row (the shared tokens once, then each sequence's own
tokens), or several groups a row after the tokens they all share (questions after one few-shot prompt), with the rotary positions and the attention mask that make every sequence's outputs exactly what
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
    """Groups of sequences packed by `pack_shared_prefix`, one or several groups a row."""

    ids: torch.Tensor  # (R, T)
    positions: torch.Tensor  # (R, T) rotary positions
    attend: torch.Tensor  # (R, 1, T, T) the keys each query sees
    last: torch.Tensor  # (N,) each sequence's last token, an index into the (R·T) flattened outputs
    sizes: list[int]  # sequences per group
    layout: list[tuple[int, tuple[tuple[int, int], ...]]]  # each sequence's row and runs of slots (first, count)

    def to(self, device) -> "PackedGroups":
        return dataclasses.replace(self, ids=self.ids.to(device), positions=self.positions.to(device),
                                   attend=self.attend.to(device), last=self.last.to(device))

    def slots(self, sequence: int) -> list[int]:
        """Where each token of the `sequence`-th sequence (counted over all groups) sits in its row."""
        return [slot for first, count in self.layout[sequence][1] for slot in range(first, first + count)]


def pack_shared_prefix(groups: Sequence[Sequence[Sequence[int]]], pad_id: int, groups_per_row: int = 1) -> PackedGroups:
    """`groups_per_row` groups a row: the tokens all of the row's sequences share (a few-shot prompt), then
    for each group the further tokens its sequences share (a prompt of K ranked answers, a question), then
    each sequence's own tokens, each token at the position it has in its sequence and attending only to
    the tokens of its own sequence. Causal attention makes every sequence's outputs what they are alone,
    while a shared prefix, most of the tokens when the answers are short, goes through the model once
    instead of once a sequence. Padding after the last group attends to itself only (no empty row, no NaN)."""
    rows, groups_of, sequences_of, positions, last, layout = [], [], [], [], [], []
    for first in range(0, len(groups), groups_per_row):
        row_groups = groups[first : first + groups_per_row]
        common = shared_prefix([s for seqs in row_groups for s in seqs])  # seen by every token of the row
        row, group_ids, sequence_ids, position = list(row_groups[0][0][:common]), [0] * common, [0] * common, list(range(common))
        for g, seqs in enumerate(row_groups, 1):
            shared, group_start = shared_prefix(seqs), len(row)
            row += list(seqs[0][common:shared])
            group_ids += [g] * (shared - common)
            sequence_ids += [0] * (shared - common)
            position += range(common, shared)
            for k, s in enumerate(seqs, 1):
                layout.append((len(rows), ((0, common), (group_start, shared - common), (len(row), len(s) - shared))))
                row += list(s[shared:])
                group_ids += [g] * (len(s) - shared)
                sequence_ids += [k] * (len(s) - shared)
                position += range(shared, len(s))
                last.append((len(rows), len(row) - 1))
        rows.append(row), groups_of.append(group_ids), sequences_of.append(sequence_ids), positions.append(position)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)
    sequence = torch.zeros((len(rows), width), dtype=torch.long)
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row, g, k, pos) in enumerate(zip(rows, groups_of, sequences_of, positions)):
        ids[r, : len(row)], group[r, : len(row)] = torch.tensor(row), torch.tensor(g)
        sequence[r, : len(row)], position[r, : len(row)] = torch.tensor(k), torch.tensor(pos)
    query_group, key_group = group[:, :, None], group[:, None, :]
    query_sequence, key_sequence = sequence[:, :, None], sequence[:, None, :]
    same_group = (key_group == query_group) & ((key_sequence == 0) | (key_sequence == query_sequence))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    attend = causal & (((key_group == 0) | same_group) & (query_group >= 0) | torch.eye(width, dtype=torch.bool))
    index = torch.tensor([r * width + t for r, t in last])
    return PackedGroups(ids, position, attend[:, None], index, [len(seqs) for seqs in groups], layout)


def packed_outputs(model: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """The head's output at each packed sequence's last token: (N,) scores or (N, C) classifier logits."""
    outputs = model(packed.ids, positions=packed.positions, attend=packed.attend)
    return outputs.flatten(0, 1)[packed.last]
