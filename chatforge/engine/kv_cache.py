"""The KV cache: keys and values of the tokens seen so far, one per generation."""

from __future__ import annotations

import torch

from chatforge.model import GPT, GPTConfig


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_len` positions.

    Usage: create one per generation (`new_cache`), pass it to every `GPT.forward` call; the first call (the
    prompt) fills slots [0, T), each later call appends its tokens after those.

    Prompts of different lengths share one cache by left padding: row i's first `pad[i]` slots are
    padding, never attended to, and its positions (for the rotary encoding) count from its first real
    token, so every row computes exactly what it would alone. `keep(rows)` drops finished rows (they stop
    costing compute) or repeats rows (n samples or beams share one prefill).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype, pad: torch.Tensor | None = None):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0  # slots already filled (the same for every layer once a forward pass completes)
        self.pad = pad.to(device) if pad is not None and bool(pad.any()) else None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) the given batch rows."""
        rows = rows.to(self.keys[0].device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)

    def join(self, other: KVCache, room: int) -> KVCache:
        """A cache holding this one's rows and then `other`'s, right-aligned so that all rows end at the
        same slot (the shorter side gets more left padding), with `room` free slots after it. Leading
        slots that are padding in every row are dropped, so a cache that rows keep joining stays short.
        This is how a new sequence joins a running batch (continuous batching)."""
        length = max(self.length, other.length)
        pads = torch.cat([self._pads() + (length - self.length), other._pads() + (length - other.length)])
        drop = int(pads.min())
        length, pads = length - drop, pads - drop
        joined = object.__new__(KVCache)
        joined.max_len, joined.length = length + room, length
        joined.pad = pads if bool(pads.any()) else None
        joined.keys, joined.values = [], []
        for mine, theirs, out in ((self.keys, other.keys, joined.keys), (self.values, other.values, joined.values)):
            for a, b in zip(mine, theirs):
                t = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], joined.max_len, a.shape[3])
                for rows, source, used in ((slice(0, a.shape[0]), a, self.length), (slice(a.shape[0], None), b, other.length)):
                    shift = length - used  # where the source's slot 0 lands (negative: its first slots are dropped)
                    t[rows, :, max(0, shift):length] = source[:, :, max(0, -shift):used]
                out.append(t)
        return joined

    def _pads(self) -> torch.Tensor:
        rows = self.keys[0].shape[0]
        return self.pad if self.pad is not None else torch.zeros(rows, dtype=torch.long, device=self.keys[0].device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer` after the cached ones; return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def new_cache(model: GPT, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
    """An empty KV cache for `model` (on its device, in its dtype), `max_len` slots (default: its context);
    `pad[i]` left-padding slots for row i when prompts differ in length."""
    weight = model.embed_tokens.weight
    return KVCache(model.config, batch_size, max_len or model.config.max_seq_len, weight.device, weight.dtype, pad)
