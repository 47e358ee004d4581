"""The generation engine that chat, serving, evaluation and PPO rollouts all use.

- `sampling`: `SamplingParams`, and how logits become tokens (`sample_next_token`: greedy, temperature,
  top-k, top-p, after the repetition penalty) and when text stops;
- `kv_cache`: `KVCache`, keys and values of the tokens seen so far, left-padded rows included;
- `decode`: `DecodeStep`, one token per row, with the weights laid out for it at the start of each
  generation;
- `batch`: `DecodeBatch`, continuous batching (groups of prompts join and leave between steps, `n`
  samples share a prefill, log-probs on request);
- `beam`: `BeamSearch`, the deterministic alternative;
- `generate`: `generate_stream` / `generate_batch` / `stream` / `generate`, which pick the one or the other.
"""

from chatforge.engine.batch import Completion, DecodeBatch, PromptGroup, TokenEvent, fit_context
from chatforge.engine.beam import BeamSearch, beam_search
from chatforge.engine.decode import DecodeStep, DecodeWeights, decode_step, reads_as_stock
from chatforge.engine.generate import beam_events, generate, generate_batch, generate_stream, stream
from chatforge.engine.kv_cache import KVCache, new_cache
from chatforge.engine.sampling import (
    ARGMAX_BLOCK, SamplingParams, StopStrings, apply_repetition_penalty, argmax_rows, cut_at_stop,
    sample_categorical, sample_next_token,
)

__all__ = [
    "ARGMAX_BLOCK", "BeamSearch", "Completion", "DecodeBatch", "DecodeStep", "DecodeWeights", "KVCache",
    "PromptGroup", "SamplingParams", "StopStrings", "TokenEvent", "apply_repetition_penalty", "argmax_rows",
    "beam_events", "beam_search", "cut_at_stop", "decode_step", "fit_context", "generate", "generate_batch",
    "generate_stream", "new_cache", "reads_as_stock", "sample_categorical", "sample_next_token", "stream",
]
