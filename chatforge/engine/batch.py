"""Continuous batching: sequences that decode together in one KV cache, one token each per step.

One forward pass over a group's (left-padded) prompts, then one token per step for every unfinished
sequence. Sequences that finish leave the batch, so they stop costing compute, and new groups may join
between steps (as the server's requests do); `n` samples of a prompt share its prefill. Per-token
log-probabilities (of the model's own distribution, before any sampling transform) come back on request,
as PPO needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chatforge.engine.decode import DecodeStep
from chatforge.engine.kv_cache import KVCache, new_cache
from chatforge.engine.sampling import SamplingParams, StopStrings, apply_repetition_penalty, sample_next_token
from chatforge.model import GPT


@dataclass
class Completion:
    """One generated answer: its tokens, why it ended ("stop" or "length"), and optionally log-probs."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = "length"
    text: str | None = None  # decoded, cut before any stop string (when a tokenizer was given)


@dataclass(frozen=True)
class TokenEvent:
    """A streamed token: of prompt `prompt`, sample `sample`; `finish_reason` is set on its last token."""

    prompt: int
    sample: int
    token: int
    logprob: float | None = None
    finish_reason: str | None = None


def fit_context(prompt: Sequence[int], context: int) -> list[int]:
    """The prompt, truncated from the left if needed to leave room for at least one new token."""
    return list(prompt)[max(0, len(prompt) - (context - 1)):]


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts])
    return ids.to(device), pad


class PromptGroup:
    """Prompts that join a `DecodeBatch` together and share their sampling settings: one `generate_stream`
    call, or one request to the server. Its live rows (n per prompt) sit next to each other in the batch."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int, stop_ids: Sequence[int],
                 stop_strings: Sequence[str], tokenizer, logprobs: bool, context: int, device):
        if params.num_beams > 1:
            raise ValueError("beam search decodes on its own, not in a batch: use engine.BeamSearch")
        self.stop_strings = StopStrings(stop_strings, tokenizer)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        self.prompts = [fit_context(p, context) for p in prompts]
        self.params, self.logprobs = params, logprobs
        self.stop_ids = sorted(set(stop_ids))
        self.budgets = [min(params.max_new_tokens, context - len(p)) for p in self.prompts]
        self.rows = [(p, s) for p in range(len(prompts)) for s in range(n)]  # (prompt, sample) of each live row
        self.made = [0] * len(self.rows)
        self.generated: list[list[int]] = [[] for _ in self.rows]  # only kept for stop strings
        self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        # seeded groups draw from their own generator, so that their answers do not depend on the batch
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None  # (rows, vocab): tokens present, for the repetition penalty

    def remaining(self) -> int:
        """The most tokens any of its live rows may still make."""
        return max((self.budgets[p] - made for (p, _), made in zip(self.rows, self.made)), default=0)

    def shares_sampling_with(self, other: "PromptGroup") -> bool:
        """Whether one `sample_next_token` call may draw for both groups' rows: no generator of their own
        (seeded groups draw from theirs, so that the answer does not depend on the batch), no penalty,
        the same settings."""
        p, q = self.params, other.params
        return (self.generator is None and other.generator is None and self.seen is None and other.seen is None
                and (p.temperature, p.top_k, p.top_p) == (q.temperature, q.top_k, q.top_p))

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each live row, from its logits."""
        penalised = logits if self.seen is None else apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        return sample_next_token(penalised, self.params, self.generator)

    def advance(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, list[TokenEvent], list[int]]:
        """Take each live row's chosen token: (tokens of the rows that go on, events, which rows go on).
        Rows that finish leave the group."""
        logprobs = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1).tolist() if self.logprobs else None
        is_stop = torch.isin(tokens, self.stop).tolist() if self.stop_ids else [False] * len(self.rows)
        events, keep = [], []
        for r, ((p, s), token) in enumerate(zip(self.rows, tokens.tolist())):
            self.made[r] += 1
            if self.stop_strings:
                self.generated[r].append(token)
                is_stop[r] = is_stop[r] or self.stop_strings.completed(self.generated[r])
            finish = "stop" if is_stop[r] else "length" if self.made[r] >= self.budgets[p] else None
            events.append(TokenEvent(p, s, token, logprobs[r] if logprobs else None, finish))
            if finish is None:
                keep.append(r)
        if len(keep) < len(self.rows):
            self.rows, self.made, self.generated = ([x[r] for r in keep] for x in (self.rows, self.made, self.generated))
            tokens = tokens[keep]
            self.seen = self.seen[keep] if self.seen is not None else None
        if self.seen is not None:
            self.seen[torch.arange(len(keep), device=tokens.device), tokens] = True
        return tokens, events, keep


class DecodeBatch:
    """Sequences that decode together, one token each per step, in one KV cache: continuous batching.

    `add` prefills a group of prompts (left-padded among themselves) and joins their rows to the running
    ones (`KVCache.join` right-aligns the two caches); `step` makes one token for every row, and rows that
    finish or are cancelled leave. Groups join and leave between any two steps, so a server's requests
    share the model instead of waiting in line; a static batch (`generate_stream`) is one group joining at
    the start. Every row computes what it would alone: padding is never attended to, rotary positions
    count from each row's first real token, and each group samples with its own settings and generator.

    The model must be in eval mode. The decoding step (`DecodeStep`, the weights laid out for it) is made
    when rows join an empty batch and dropped when the last row leaves: rows decode with the weights of
    the moment the batch started, so change the weights only while the batch is empty.
    """

    def __init__(self, model: GPT):
        if model.training:
            raise ValueError("decode with the model in eval mode (model.eval())")
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.context = model.config.max_seq_len
        self.groups: list[PromptGroup] = []
        self.cache: KVCache | None = None
        self.decode_step: DecodeStep | None = None  # made when rows join an empty batch, dropped when it empties
        self.last_logits: torch.Tensor | None = None  # (rows, vocab): each live row's next-token logits

    def __len__(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, n: int = 1, stop_ids: Sequence[int] = (),
            stop_strings: Sequence[str] = (), tokenizer=None, logprobs: bool = False) -> PromptGroup:
        """Prefill `prompts` and join `n` rows for each to the batch (see `generate_stream` for the rest)."""
        group = PromptGroup(prompts, params, n, stop_ids, stop_strings, tokenizer, logprobs, self.context, self.device)
        ids, pad = _left_pad(group.prompts, pad_id=0, device=self.device)
        room = max([group.remaining()] + [g.remaining() for g in self.groups])
        cache = new_cache(self.model, len(group.prompts), ids.shape[1] + (room if self.cache is None else 0), pad=pad)
        logits = self.model(ids, cache, last_only=True)[:, -1]
        if n > 1:  # the samples of a prompt share its prefill
            index = torch.arange(len(group.prompts), device=self.device).repeat_interleave(n)
            cache.keep(index)
            logits = logits.index_select(0, index)
        if params.repetition_penalty != 1:
            group.seen = torch.zeros(len(group.rows), logits.shape[-1], dtype=torch.bool, device=self.device)
            for r, (p, _) in enumerate(group.rows):
                group.seen[r, torch.tensor(group.prompts[p], device=self.device)] = True
        if self.cache is None:
            self.cache, self.last_logits, self.decode_step = cache, logits, DecodeStep(self.model)
        else:
            self.cache, self.last_logits = self.cache.join(cache, room), torch.cat([self.last_logits, logits])
        self.groups.append(group)
        return group

    @torch.inference_mode()
    def step(self) -> list[tuple[PromptGroup, TokenEvent]]:
        """One token for every live row: its event (with `finish_reason` on a row's last token) and group."""
        chosen, run_start, run = [], 0, []  # neighbouring groups that share sampling draw in one call
        for group in self.groups + [None]:
            if run and (group is None or not run[0].shares_sampling_with(group)):
                rows = sum(len(g.rows) for g in run)
                logits = self.last_logits[run_start:run_start + rows]
                chosen.append(run[0].choose(logits))
                run_start, run = run_start + rows, []
            if group is not None:
                run.append(group)
        chosen = torch.cat(chosen)
        events, tokens, keep, start = [], [], [], 0
        for group in self.groups:
            rows = len(group.rows)
            group_tokens, group_events, group_keep = group.advance(self.last_logits[start:start + rows], chosen[start:start + rows])
            events += [(group, e) for e in group_events]
            tokens.append(group_tokens)
            keep += [start + r for r in group_keep]
            start += rows
        self._keep(keep)
        if self.cache is not None:
            self.last_logits = self.decode_step(torch.cat(tokens), self.cache)
        return events

    def cancel(self, group: PromptGroup) -> None:
        """Drop a group's rows between steps (a client that went away frees its slots)."""
        keep, start = [], 0
        for g in self.groups:
            if g is not group:
                keep += range(start, start + len(g.rows))
            start += len(g.rows)
        group.rows = []
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        """Keep these batch rows (all of them still live in their groups); groups left empty leave."""
        self.groups = [g for g in self.groups if g.rows]
        if not self.groups:
            self.cache = self.last_logits = self.decode_step = None
        elif len(rows) < self.last_logits.shape[0]:  # finished rows stop costing compute
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.cache.keep(index)
            self.last_logits = self.last_logits.index_select(0, index)
