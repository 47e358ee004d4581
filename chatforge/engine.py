"""The generation engine that chat, serving, evaluation and PPO rollouts all use.

One batched loop over prompts of different lengths with the KV cache (`DecodeBatch`): one forward pass
over the (left-padded) prompts, then one token per step for every unfinished sequence. Sequences that
finish leave the batch, so they stop costing compute, and new ones may join between steps (continuous
batching, as the server does); `n` samples of a prompt share its prefill. Logits become tokens in one
place, `sample_next_token` (greedy, temperature, top-k, top-p), after the repetition penalty. Per-token
log-probabilities (of the model's own distribution, before any sampling transform) come back on request,
as PPO needs them. `beam_search` is the deterministic alternative.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chatforge.model import GPT, KVCache, StepWeights


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample among the smallest set of tokens whose probability reaches p"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divide the logits of tokens already present by this (1: off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for reproducible sampling"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperatures below 1e-5 are greedy (dividing by them overflows)."""
    if params.temperature < 1e-5:
        return argmax_rows(logits)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return sample_categorical(logits.softmax(dim=-1), generator)


ARGMAX_BLOCK = 128


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, (B, V) -> (B,), the first one on ties, as `argmax`. On CPU,
    `argmax` does not vectorise: at batch 8 and 8k tokens it took 70-110 us, as long as two layers' matmuls.
    The maxima of 128-wide blocks (a vectorised `amax`), then `argmax` over the few block maxima and
    within the winning block, take 30 us. One row, and vocabularies under 4 blocks or not a multiple of
    the block, use `argmax`."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or rows < 2 or vocab % ARGMAX_BLOCK or vocab < 4 * ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    blocks = logits.reshape(rows, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)
    return best * ARGMAX_BLOCK + blocks[torch.arange(rows, device=logits.device), best].argmax(dim=-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (B, V) by inverting its cumulative distribution: one uniform number per
    row. `torch.multinomial` draws an exponential number per vocabulary entry instead, which made it a
    third of a CPU decoding step at batch 16. float64, so that u·total stays below the total and a token of
    probability 0 (cut by top-k/top-p) is never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: a token already in the sequence has its logit divided by `penalty` if positive,
    multiplied if negative. `seen` (B, V) is True for the tokens present."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


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


class Group:
    """Prompts that join a `DecodeBatch` together and share their sampling settings: one `generate_stream`
    call, or one request to the server. Its live rows (n per prompt) sit next to each other in the batch."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int, stop_ids: Sequence[int],
                 stop_strings: Sequence[str], tokenizer, logprobs: bool, context: int, device):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer to decode the text")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        self.prompts = [fit_context(p, context) for p in prompts]
        self.params, self.stop_strings, self.tokenizer, self.logprobs = params, list(stop_strings), tokenizer, logprobs
        self.stop_ids = sorted(set(stop_ids))
        self.budgets = [min(params.max_new_tokens, context - len(p)) for p in self.prompts]
        self.rows = [(p, s) for p in range(len(prompts)) for s in range(n)]  # (prompt, sample) of each live row
        self.made = [0] * len(self.rows)
        self.generated: list[list[int]] = [[] for _ in self.rows]  # only kept for stop strings
        self.tail_tokens = max((len(s) for s in stop_strings), default=0) + 8  # a token holds at least one character
        self.stop = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        # seeded groups draw from their own generator, so that their answers do not depend on the batch
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None  # (rows, vocab): tokens present, for the repetition penalty

    def remaining(self) -> int:
        """The most tokens any of its live rows may still make."""
        return max((self.budgets[p] - made for (p, _), made in zip(self.rows, self.made)), default=0)

    def shares_sampling_with(self, other: "Group") -> bool:
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
            if self.stop_strings:  # only the tail can hold a stop string that the last token completed
                self.generated[r].append(token)
                tail = self.tokenizer.decode(self.generated[r][-self.tail_tokens:], skip_special=True)
                is_stop[r] = is_stop[r] or cut_at_stop(tail, self.stop_strings)[1]
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
    The model must be in eval mode.
    """

    def __init__(self, model: GPT):
        if model.training:
            raise ValueError("decode with the model in eval mode (model.eval())")
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.context = model.config.max_seq_len
        self.groups: list[Group] = []
        self.cache: KVCache | None = None
        self.weights: StepWeights | None = None  # decode_step's weights, taken when rows join an empty batch
        self.last_logits: torch.Tensor | None = None  # (rows, vocab): each live row's next-token logits

    def __len__(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, n: int = 1, stop_ids: Sequence[int] = (),
            stop_strings: Sequence[str] = (), tokenizer=None, logprobs: bool = False) -> Group:
        """Prefill `prompts` and join `n` rows for each to the batch (see `generate_stream` for the rest)."""
        group = Group(prompts, params, n, stop_ids, stop_strings, tokenizer, logprobs, self.context, self.device)
        ids, pad = _left_pad(group.prompts, pad_id=0, device=self.device)
        room = max([group.remaining()] + [g.remaining() for g in self.groups])
        cache = self.model.new_cache(len(group.prompts), ids.shape[1] + (room if self.cache is None else 0), pad=pad)
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
            self.cache, self.last_logits, self.weights = cache, logits, self.model.step_weights()
        else:
            self.cache, self.last_logits = self.cache.join(cache, room), torch.cat([self.last_logits, logits])
        self.groups.append(group)
        return group

    @torch.inference_mode()
    def step(self) -> list[tuple[Group, TokenEvent]]:
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
            self.last_logits = self.model.decode_step(torch.cat(tokens), self.cache, self.weights)
        return events

    def cancel(self, group: Group) -> None:
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
            self.cache = self.last_logits = self.weights = None
        elif len(rows) < self.last_logits.shape[0]:  # finished rows stop costing compute
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.cache.keep(index)
            self.last_logits = self.last_logits.index_select(0, index)


@torch.inference_mode()
def generate_stream(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    logprobs: bool = False,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are made, for `n` samples of each prompt, until a stop token (kept), a stop
    string in the decoded text (needs `tokenizer`; finish "stop" on the token completing it),
    `max_new_tokens` or the model's context (finish "length").

    A prompt longer than the context is truncated from the left to leave room for one new token.
    """
    was_training = model.training
    model.eval()
    try:
        batch = DecodeBatch(model)
        batch.add(prompts, params, n=n, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                  logprobs=logprobs)
        while len(batch):
            for _, event in batch.step():
                yield event
    finally:
        model.train(was_training)


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    logprobs: bool = False,
) -> list[list[Completion]]:
    """`n` completions for each prompt (see `generate_stream`); with a tokenizer, their text too."""
    out = [[Completion(logprobs=[] if logprobs else None) for _ in range(n)] for _ in prompts]
    events = generate_stream(model, prompts, params, n=n, stop_ids=stop_ids, stop_strings=stop_strings,
                             tokenizer=tokenizer, logprobs=logprobs)
    for event in events:
        completion = out[event.prompt][event.sample]
        completion.tokens.append(event.token)
        if logprobs:
            completion.logprobs.append(event.logprob)
        if event.finish_reason:
            completion.finish_reason = event.finish_reason
    if tokenizer is not None:
        for completion in (c for samples in out for c in samples):
            completion.text = cut_at_stop(tokenizer.decode(completion.tokens, skip_special=True), stop_strings)[0]
    return out


def stream(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Tokens of one completion of one prompt, as they are made."""
    for event in generate_stream(model, [prompt], params, stop_ids=stop_ids):
        yield event.token


def generate(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> list[int]:
    return list(stream(model, prompt, params, stop_ids))


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
) -> list[Completion]:
    """The `num_beams` most likely continuations, best first, ranked by sum of log-probs / length^penalty.

    All beams share the prompt's prefill and decode as one batch; a beam that emits a stop token is set
    aside as a finished hypothesis. With one beam this is greedy decoding.
    """
    if num_beams < 1 or max_new_tokens < 1 or not prompt:
        raise ValueError("beam search needs num_beams >= 1, max_new_tokens >= 1 and a non-empty prompt")
    device = model.embed_tokens.weight.device
    context = model.config.max_seq_len
    prompt = fit_context(prompt, context)
    budget = min(max_new_tokens, context - len(prompt))
    stop = set(stop_ids)
    cache = model.new_cache(1, len(prompt) + budget)
    was_training = model.training
    model.eval()
    try:
        logprobs = model(torch.tensor([prompt], device=device), cache, last_only=True)[:, -1].float().log_softmax(-1)
        weights = model.step_weights()
        beams: list[tuple[list[int], list[float]]] = [([], [])]  # tokens and their log-probs
        scores = torch.zeros(1, device=device)
        finished: list[tuple[float, Completion]] = []

        def rank(total: float, length: int) -> float:
            return total / max(1, length) ** length_penalty

        for step in range(budget):
            candidates = (scores[:, None] + logprobs).flatten()
            # enough candidates to refill every beam even if each stop token takes some
            top = candidates.topk(min((1 + len(stop)) * num_beams + num_beams, candidates.numel()))
            vocab = logprobs.shape[-1]
            keep_rows, next_beams, next_scores, next_tokens = [], [], [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                row, token = divmod(flat, vocab)
                tokens, token_logprobs = beams[row]
                tokens, token_logprobs = tokens + [token], token_logprobs + [logprobs[row, token].item()]
                if token in stop or step == budget - 1:
                    finished.append((rank(score, len(tokens)), Completion(tokens, token_logprobs,
                                                                          "stop" if token in stop else "length")))
                else:
                    keep_rows.append(row)
                    next_beams.append((tokens, token_logprobs))
                    next_scores.append(score)
                    next_tokens.append(token)
                if len(next_beams) == num_beams:
                    break
            finished.sort(key=lambda f: f[0], reverse=True)
            best_open = rank(next_scores[0], step + 1) if next_scores else float("-inf")
            if not next_beams or (len(finished) >= num_beams and finished[num_beams - 1][0] >= best_open):
                break  # Hugging Face's heuristic: no open beam now beats the finished ones
            cache.keep(torch.tensor(keep_rows, device=device))
            beams, scores = next_beams, torch.tensor(next_scores, device=device)
            logprobs = model.decode_step(torch.tensor(next_tokens, device=device), cache, weights).float().log_softmax(-1)
        finished.sort(key=lambda f: f[0], reverse=True)
        return [c for _, c in finished[:num_beams]]
    finally:
        model.train(was_training)
