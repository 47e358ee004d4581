import pytest
import torch

from chatforge.engine import SamplingParams, generate, sample_next_token
from chatforge.model import GPT, GPTConfig


def draws(logits, params, n=2000):
    g = torch.Generator().manual_seed(0)
    return torch.cat([sample_next_token(logits, params, g) for _ in range(n)])


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert set(draws(logits, SamplingParams(top_k=1), 50).tolist()) == {0}
    assert set(draws(logits, SamplingParams(top_k=3)).unique().tolist()) == {0, 1, 2}
    assert set(draws(logits, SamplingParams(top_p=0.7)).unique().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(logits, SamplingParams(top_p=0.5)).unique().tolist()) == {0}
    assert set(draws(logits, SamplingParams(top_p=0.81)).unique().tolist()) == {0, 1, 2}
    full = draws(logits, SamplingParams(), 4000).bincount(minlength=4) / 4000
    assert torch.allclose(full, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert (sample_next_token(logits, SamplingParams(temperature=0), None) == 0).all()


def test_generation_is_seeded_stops_and_respects_the_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=2, max_seq_len=16)).eval()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate(model, [1, 2, 3], params) == generate(model, [1, 2, 3], params)
    assert generate(model, [1, 2, 3], params) != generate(model, [1, 2, 3], SamplingParams(max_new_tokens=8, seed=4))
    full = generate(model, [1, 2, 3], params)
    stop = full[2]
    stopped = generate(model, [1, 2, 3], params, stop_ids=(stop,))
    assert stopped == full[: full.index(stop) + 1]  # the stop token is returned, nothing after it
    long_prompt = list(range(1, 30))  # longer than the 16-token context: keeps the last 15
    out = generate(model, long_prompt, SamplingParams(max_new_tokens=8, temperature=0))
    assert out == generate(model, long_prompt[-15:], SamplingParams(max_new_tokens=8, temperature=0))
    assert len(out) == 1  # the context is full after one token
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
