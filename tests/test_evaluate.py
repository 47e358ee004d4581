"""Evaluation helpers against computations done the slow way."""

import math

import pytest
import torch

from chatforge.data import TokenWindows
from chatforge.evaluate import bits_per_byte, choice_logprobs, continuation_logprobs, token_bytes
from chatforge.model import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer


@torch.no_grad()
def test_continuation_logprobs_equal_each_sequence_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=60, n_layer=2, d_model=32, n_head=4, max_seq_len=32)).eval()
    # packed in one row after the prefix; two continuations share their first token too
    prefix, continuations = [1, 5, 9, 13], [[20, 21, 22], [30], [40, 41], [20, 25]]
    got = continuation_logprobs(model, prefix, continuations)
    for score, continuation in zip(got, continuations):
        ids = torch.tensor([prefix + continuation])
        logprobs = model(ids).log_softmax(-1)[0, len(prefix) - 1 : -1].gather(1, torch.tensor(continuation)[:, None])
        assert math.isclose(score, float(logprobs.mean()), rel_tol=0, abs_tol=1e-5)
    # several questions in one batch, each with its own prefix, as each alone
    questions = [(prefix, continuations), ([2, 3], [[7], [8, 9]]), ([1, 5, 9, 13, 17, 19], [[20, 21], [30]])]
    shots = [1, 5, 9, 13, 17, 19]  # questions after one few-shot prompt, which a row holds once
    questions += [(shots + [23], [[20, 21], [30]]), (shots + [23, 24], [[40], [41, 42]]), (shots, [[50], [51]])]
    for per_row in (1, 2, 4, None):
        for batched, (p, c) in zip(choice_logprobs(model, questions, batch_size=5, per_row=per_row), questions):
            assert batched == pytest.approx(continuation_logprobs(model, p, c), abs=1e-5)


@torch.no_grad()
def test_bits_per_byte_counts_the_text_predicted(data_dir):
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=4, max_seq_len=16)).eval()
    sizes = token_bytes(tokenizer)
    assert sizes[tokenizer.bos_id] == 0 and sizes[tokenizer.encode("hello")].sum() == 5
    inputs, targets = TokenWindows(data_dir, "val", 16, mode="sequential").batch(0, 4)
    nats = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="none")
    text = sizes[targets.flatten()] > 0
    expected = float(nats[text].sum()) / math.log(2) / int(sizes[targets].sum())
    assert math.isclose(bits_per_byte(model, tokenizer, str(data_dir), batches=1, batch_size=4, seq_len=16), expected,
                        rel_tol=1e-5)
