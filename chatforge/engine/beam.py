"""Beam search: the deterministic alternative to sampling, for one prompt at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatforge.engine.batch import Completion, fit_context
from chatforge.engine.decode import DecodeStep
from chatforge.engine.kv_cache import new_cache
from chatforge.engine.sampling import StopStrings
from chatforge.model import GPT


class BeamSearch:
    """The `num_beams` most likely continuations of one prompt, ranked by sum of log-probs / length^penalty,
    found one token per `step()`, so that a server can interleave a search with its other work.

    All beams share the prompt's prefill and decode as one batch; a beam that emits a stop token or
    completes a stop string (which needs `tokenizer`) is set aside as a finished hypothesis. With one beam
    this is greedy decoding. The model must be in eval mode.
    """

    @torch.inference_mode()
    def __init__(self, model: GPT, prompt: Sequence[int], num_beams: int, max_new_tokens: int, *,
                 stop_ids: Sequence[int] = (), length_penalty: float = 1.0, stop_strings: Sequence[str] = (),
                 tokenizer=None):
        if num_beams < 1 or max_new_tokens < 1 or not prompt:
            raise ValueError("beam search needs num_beams >= 1, max_new_tokens >= 1 and a non-empty prompt")
        self.decode_step = DecodeStep(model)
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.stop, self.stop_strings = set(stop_ids), StopStrings(stop_strings, tokenizer)
        self.device = model.embed_tokens.weight.device
        prompt = fit_context(prompt, model.config.max_seq_len)
        self.budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
        self.cache = new_cache(model, 1, len(prompt) + self.budget)
        prompt_ids = torch.tensor([prompt], device=self.device)
        self.logprobs = model(prompt_ids, self.cache, last_only=True)[:, -1].float().log_softmax(-1)
        self.beams: list[tuple[list[int], list[float]]] = [([], [])]  # open beams: tokens and their log-probs
        self.scores = torch.zeros(1, device=self.device)
        self.finished: list[tuple[float, Completion]] = []  # (rank, hypothesis), best first
        self.steps, self.done = 0, False

    def rank(self, total: float, length: int) -> float:
        return total / max(1, length) ** self.length_penalty

    @torch.inference_mode()
    def step(self) -> bool:
        """Extend the open beams by one token; True once the search is over."""
        if self.done:
            return True
        last_step = self.steps == self.budget - 1
        self.steps += 1
        candidates = (self.scores[:, None] + self.logprobs).flatten()
        # enough candidates to refill every beam even if each stop token takes some
        top = candidates.topk(min((2 + len(self.stop)) * self.num_beams, candidates.numel()))
        vocab = self.logprobs.shape[-1]
        keep_rows, next_beams, next_scores, next_tokens = [], [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            row, token = divmod(flat, vocab)
            tokens, token_logprobs = self.beams[row]
            tokens, token_logprobs = tokens + [token], token_logprobs + [self.logprobs[row, token].item()]
            stopped = token in self.stop or bool(self.stop_strings) and self.stop_strings.completed(tokens)
            if stopped or last_step:
                self.finished.append((self.rank(score, len(tokens)),
                                      Completion(tokens, token_logprobs, "stop" if stopped else "length")))
            else:
                keep_rows.append(row)
                next_beams.append((tokens, token_logprobs))
                next_scores.append(score)
                next_tokens.append(token)
            if len(next_beams) == self.num_beams:
                break
        self.finished.sort(key=lambda f: f[0], reverse=True)
        best_open = self.rank(next_scores[0], self.steps) if next_scores else float("-inf")
        if not next_beams or (len(self.finished) >= self.num_beams and self.finished[self.num_beams - 1][0] >= best_open):
            self.done = True  # Hugging Face's heuristic: no open beam now beats the finished ones
            self.cache = self.logprobs = self.decode_step = None  # its memory and weights go as soon as it ends
            return True
        self.cache.keep(torch.tensor(keep_rows, device=self.device))
        self.beams, self.scores = next_beams, torch.tensor(next_scores, device=self.device)
        self.logprobs = self.decode_step(torch.tensor(next_tokens, device=self.device), self.cache).float().log_softmax(-1)
        return False

    def best(self) -> list[Completion]:
        """The finished hypotheses, best first: `num_beams` of them once the search is over."""
        return [c for _, c in self.finished[:self.num_beams]]


def beam_search(
    model: GPT,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
) -> list[Completion]:
    """The `num_beams` most likely continuations of `prompt`, best first (see `BeamSearch`)."""
    was_training = model.training
    model.eval()
    try:
        search = BeamSearch(model, prompt, num_beams, max_new_tokens, stop_ids=stop_ids, length_penalty=length_penalty,
                            stop_strings=stop_strings, tokenizer=tokenizer)
        while not search.step():
            pass
        return search.best()
    finally:
        model.train(was_training)
