"""The front doors of generation: answers to prompts, streamed or whole, sampled or by beam search."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from chatforge.engine.batch import Completion, DecodeBatch, TokenEvent
from chatforge.engine.beam import BeamSearch
from chatforge.engine.sampling import SamplingParams, cut_at_stop
from chatforge.model import GPT


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

    With `params.num_beams` > 1 the `n` answers of a prompt are its `n` best beams (n <= num_beams); they
    are known only when its search ends, and then come all at once.

    A prompt longer than the context is truncated from the left to leave room for one new token.
    """
    if params.num_beams > 1 and n > params.num_beams:
        raise ValueError(f"n is {n}, but beam search with num_beams = {params.num_beams} has only that many answers")
    was_training = model.training
    model.eval()
    try:
        if params.num_beams > 1:
            for p, prompt in enumerate(prompts):
                yield from _search_events(model, p, prompt, params, n, stop_ids, stop_strings, tokenizer, logprobs)
            return
        batch = DecodeBatch(model)
        batch.add(prompts, params, n=n, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                  logprobs=logprobs)
        while len(batch):
            for _, event in batch.step():
                yield event
    finally:
        model.train(was_training)


def _search_events(model: GPT, p: int, prompt: Sequence[int], params: SamplingParams, n: int, stop_ids: Sequence[int],
                 stop_strings: Sequence[str], tokenizer, logprobs: bool) -> Iterator[TokenEvent]:
    search = BeamSearch(model, prompt, params.num_beams, params.max_new_tokens, stop_ids=stop_ids,
                        length_penalty=params.length_penalty, stop_strings=stop_strings, tokenizer=tokenizer)
    while not search.step():
        pass
    yield from beam_events(p, search.best()[:n], logprobs)


def beam_events(prompt: int, beams: list[Completion], logprobs: bool = False) -> Iterator[TokenEvent]:
    """The tokens of a prompt's beams as the events of its samples, beam i being sample i."""
    for s, beam in enumerate(beams):
        for i, token in enumerate(beam.tokens):
            last = i == len(beam.tokens) - 1
            yield TokenEvent(prompt, s, token, beam.logprobs[i] if logprobs else None, beam.finish_reason if last else None)


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
