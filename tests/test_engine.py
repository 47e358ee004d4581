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
    for bad in (dict(temperature=float("nan")), dict(repetition_penalty=float("nan")), dict(top_p=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- the batched engine ------------------------------------------------------------------------------

from chatforge.engine import apply_repetition_penalty, beam_search, generate_batch, generate_stream  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with torch.no_grad():
        m = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=48, n_head=4, n_kv_head=2, max_seq_len=40)).eval()
        for p in m.parameters():  # a peaked, far-from-uniform model, so that greedy paths are well separated
            p.mul_(3.0)
    return m


PROMPTS = [[5, 6, 7], list(range(10, 19)), [42], list(range(20, 34))]


def forward_calls(model, monkeypatch):
    """The (rows, new tokens) of every pass the model makes: prefills (`forward`) and decoding steps."""
    calls = []
    forward, decode_step = GPT.forward, GPT.decode_step

    def spy_forward(self, idx, cache=None, **kwargs):
        calls.append(tuple(idx.shape))
        return forward(self, idx, cache, **kwargs)

    def spy_decode_step(self, tokens, cache, weights=None):
        calls.append((tokens.shape[0], 1))
        return decode_step(self, tokens, cache, weights)

    monkeypatch.setattr(GPT, "forward", spy_forward)
    monkeypatch.setattr(GPT, "decode_step", spy_decode_step)
    return calls


def test_ragged_batch_gives_each_prompt_what_it_gets_alone(model, monkeypatch):
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    alone = [generate(model, p, greedy) for p in PROMPTS]
    calls = forward_calls(model, monkeypatch)
    batched = generate_batch(model, PROMPTS, greedy)
    assert [c[0].tokens for c in batched] == alone
    assert calls[0] == (4, 14)  # one prefill for all prompts, left-padded to the longest
    assert all(shape[1] == 1 for shape in calls[1:])  # then one token per step


def test_finished_sequences_leave_the_batch(model, monkeypatch):
    # budgets differ near the 40-token context: 31 new tokens fit after a 9-token prompt, 26 after 14
    prompts = [list(range(10, 19)), list(range(20, 34))]
    greedy = SamplingParams(max_new_tokens=50, temperature=0)
    alone = [generate(model, p, greedy) for p in prompts]
    calls = forward_calls(model, monkeypatch)
    out = generate_batch(model, prompts, greedy)
    assert [len(c[0].tokens) for c in out] == [31, 26] and [c[0].finish_reason for c in out] == ["length"] * 2
    assert [shape[0] for shape in calls[1:]] == [2] * 25 + [1] * 5
    assert [c[0].tokens for c in out] == alone  # the rows that stay keep their own cache and positions


def test_rows_leaving_at_different_steps_keep_their_answers(model):
    """Stop tokens end rows at different steps (so the batch is re-indexed several times), padded rows too."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    alone = [generate(model, p, greedy) for p in PROMPTS]
    stops = [alone[0][2], alone[2][6]]
    expected = []
    for answer in alone:
        cut = min([answer.index(s) for s in stops if s in answer], default=len(answer) - 1)
        expected.append(answer[: cut + 1])
    assert len({len(e) for e in expected}) > 1
    assert [c[0].tokens for c in generate_batch(model, PROMPTS, greedy, stop_ids=stops)] == expected


def test_n_samples_share_one_prefill_and_differ(model, monkeypatch):
    calls = forward_calls(model, monkeypatch)
    out = generate_batch(model, PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=1.5, seed=1), n=3)
    assert calls[0] == (2, 9) and calls[1] == (6, 1)  # prefill per prompt, decoding per sample
    assert [len(samples) for samples in out] == [3, 3]
    assert len({tuple(c.tokens) for c in out[1]}) > 1


def test_log_probs_equal_a_full_forward_pass(model):
    out = generate_batch(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=0), logprobs=True)
    for prompt, (completion,) in zip(PROMPTS, out):
        seq = torch.tensor([prompt + completion.tokens])
        with torch.no_grad():
            full = model(seq)[0].log_softmax(-1)
        expected = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion.tokens)]
        assert completion.logprobs == pytest.approx(expected, abs=1e-4)


def test_stop_tokens_end_a_sequence_and_streaming_marks_the_end(model):
    full = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=0))
    events = list(generate_stream(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0), stop_ids=[full[3]]))
    first = [e for e in events if e.prompt == 0]
    assert [e.token for e in first] == full[: full.index(full[3]) + 1]
    assert first[-1].finish_reason == "stop" and all(e.finish_reason is None for e in first[:-1])


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]


def test_beam_search(model):
    greedy = generate(model, PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0))
    (one,) = beam_search(model, PROMPTS[1], num_beams=1, max_new_tokens=8)
    assert one.tokens == greedy
    beams = beam_search(model, PROMPTS[1], num_beams=4, max_new_tokens=8, length_penalty=0)
    assert len(beams) == 4 and len({tuple(b.tokens) for b in beams}) == 4
    totals = [sum(b.logprobs) for b in beams]
    assert totals == sorted(totals, reverse=True)
    assert totals[0] >= sum(one.logprobs) - 1e-6  # a wider search never finds a less likely answer
    # stop tokens end hypotheses early; with a length penalty they are ranked by mean log-prob
    stop = greedy[3]
    (stopped,) = beam_search(model, PROMPTS[1], num_beams=1, max_new_tokens=8, stop_ids=[stop])
    assert stopped.tokens == greedy[: greedy.index(stop) + 1] and stopped.finish_reason == "stop"
    ranked = beam_search(model, PROMPTS[1], num_beams=3, max_new_tokens=8, stop_ids=[stop], length_penalty=1.0)
    means = [sum(b.logprobs) / len(b.tokens) for b in ranked]
    assert means == sorted(means, reverse=True)
    with pytest.raises(ValueError):
        beam_search(model, PROMPTS[1], num_beams=0, max_new_tokens=8)


def test_stop_strings_end_the_text(tokenizer_dir):
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=64)).eval()
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompt = tokenizer.encode("The list")
    (free,) = generate_batch(m, [prompt], params, tokenizer=tokenizer)[0]
    stop = free.text[5:8]  # a piece of text the model is going to write
    (stopped,) = generate_batch(m, [prompt], params, stop_strings=[stop], tokenizer=tokenizer)[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(stop)]
    assert stop in tokenizer.decode(stopped.tokens) and stop not in tokenizer.decode(stopped.tokens[:-1])
    with pytest.raises(ValueError, match="need the tokenizer"):
        list(generate_stream(m, [prompt], params, stop_strings=["x"]))


# --- continuous batching ------------------------------------------------------------------------------

from chatforge.engine import DecodeBatch  # noqa: E402


def run_to_end(batch, joins):
    """Step `batch`, adding each (step, prompts, params, n) of `joins` before that step; the tokens of
    every row by (group number, prompt, sample)."""
    out, groups, step = {}, [], 0
    while len(batch) or joins:
        while joins and joins[0][0] == step:
            _, prompts, params, n = joins.pop(0)
            groups.append(batch.add(prompts, params, n=n))
        for group, event in batch.step():
            out.setdefault((groups.index(group), event.prompt, event.sample), []).append(event.token)
        step += 1
    return out


def test_sequences_joining_a_running_batch_get_what_they_get_alone(model):
    """Rows join while others decode (longer and shorter prompts than the running ones, so the cache is
    right-aligned both ways), with their own sampling settings; each row's tokens equal its solo run."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    seeded = SamplingParams(max_new_tokens=9, temperature=1.3, top_p=0.9, seed=7)
    joins = [(0, [PROMPTS[0]], greedy, 1), (3, [PROMPTS[3], PROMPTS[2]], greedy, 1), (5, [PROMPTS[1]], seeded, 3),
             (14, [PROMPTS[2]], greedy, 1)]
    expected = {}
    for g, (_, prompts, params, n) in enumerate(joins):
        for p, samples in enumerate(generate_batch(model, prompts, params, n=n)) if n > 1 else \
                ((p, generate_batch(model, [prompt], params)[0]) for p, prompt in enumerate(prompts)):
            for s, completion in enumerate(samples):
                expected[(g, p, s)] = completion.tokens
    assert run_to_end(DecodeBatch(model), list(joins)) == expected


def test_the_cache_stays_short_and_cancelled_rows_leave(model):
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    batch = DecodeBatch(model)
    first = batch.add([PROMPTS[3]], greedy)  # 14 prompt tokens, 26 to make at most
    for _ in range(10):
        batch.step()
    second = batch.add([PROMPTS[2]], greedy, n=2)  # joins at slot 24, right-aligned: 23 slots of padding
    assert batch.cache.length == 24 and batch.cache.pad.tolist() == [0, 23, 23]
    alone = generate(model, PROMPTS[2], greedy)
    made = [e.token for g, e in batch.step() if g is second and e.sample == 0]
    batch.cancel(first)  # its rows leave; the padding every remaining row has is dropped at the next join
    assert len(batch) == 2 and batch.groups == [second] and batch.cache.keys[0].shape[0] == 2
    third = batch.add([PROMPTS[0]], greedy)
    assert batch.cache.length == 3 and batch.cache.pad.tolist() == [1, 1, 0]  # 2 slots used by each sample, 3 by the prompt
    while len(batch):
        made += [e.token for g, e in batch.step() if g is second and e.sample == 0]
    assert made == alone and third not in batch.groups
    with pytest.raises(ValueError, match="eval mode"):
        DecodeBatch(GPT(model.config))


def test_sampling_by_the_inverse_cdf_follows_the_distribution_and_never_picks_a_zero():
    from chatforge.engine import sample_categorical

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    draws = sample_categorical(probs, g)
    counts = draws.bincount(minlength=6) / len(draws)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.015)
    one_hot = torch.zeros(3, 50)
    one_hot[torch.arange(3), torch.tensor([0, 17, 49])] = 1  # the first and last entries are reachable
    assert sample_categorical(one_hot, g).tolist() == [0, 17, 49]


def test_greedy_argmax_by_blocks_equals_argmax_ties_and_nan_included():
    from chatforge.engine import argmax_rows
    torch.manual_seed(0)
    for vocab in (512, 8192, 1000):  # 1000 is no multiple of the block: plain argmax
        logits = torch.randn(9, vocab)
        logits[1] = 0.0  # all tied: the first
        logits[2, [5, 300, vocab - 1]] = 50.0  # tied maxima in different blocks
        logits[3, [7, 9]] = 50.0  # tied within one block
        logits[4, [100, 400]] = float("nan")  # NaN counts as the largest, as in argmax
        logits[5, vocab - 1] = float("inf")
        logits[6] = float("-inf")
        assert argmax_rows(logits).tolist() == logits.argmax(-1).tolist()
        assert argmax_rows(logits[2:5]).tolist() == [5, 7, 100]
        assert argmax_rows(logits[2:3]).tolist() == [5]
