from types import SimpleNamespace

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

from chatforge.engine import DecodeStep, apply_repetition_penalty, beam_search, generate_batch, generate_stream  # noqa: E402


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
    forward, decode = GPT.forward, DecodeStep.__call__

    def spy_forward(self, idx, cache=None, **kwargs):
        calls.append(tuple(idx.shape))
        return forward(self, idx, cache, **kwargs)

    def spy_decode(self, tokens, cache):
        calls.append((tokens.shape[0], 1))
        return decode(self, tokens, cache)

    monkeypatch.setattr(GPT, "forward", spy_forward)
    monkeypatch.setattr(DecodeStep, "__call__", spy_decode)
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


def stop_string_case(tokenizer_dir):
    """A small model, a prompt, and a stop string the model is going to write: (tokenizer, model, params,
    prompt, the free greedy answer, the stop string, the answer stopped there)."""
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=64)).eval()
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompt = tokenizer.encode("The list")
    (free,) = generate_batch(m, [prompt], params, tokenizer=tokenizer)[0]
    stop = free.text[5:8]  # a piece of text the model is going to write
    (stopped,) = generate_batch(m, [prompt], params, stop_strings=[stop], tokenizer=tokenizer)[0]
    return tokenizer, m, params, prompt, free, stop, stopped


def test_stop_strings_end_the_text(tokenizer_dir):
    tokenizer, m, params, prompt, free, stop, stopped = stop_string_case(tokenizer_dir)
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


# --- the decoding step: equal to forward, with the weights of the generation's start ---------------------

import torch.nn as nn  # noqa: E402

from chatforge.engine import DecodeWeights, new_cache, reads_as_stock  # noqa: E402
from chatforge.engine.decode import PackedMatrix, TransposedMatrix, packs_matrices  # noqa: E402
from chatforge.model import MLP  # noqa: E402
from test_model import CONFIGS, make_model  # noqa: E402


@pytest.mark.parametrize("layout", ["transposed", "packed"])
@pytest.mark.parametrize("name", CONFIGS)
def test_decode_step_equals_full_forward_with_and_without_padding(name, layout):
    """The engine's one-token step gives every row the logits one full pass over its own tokens gives;
    row 1 is left-padded by 3 slots (a shorter prompt in the batch). In both layouts of the weights:
    packed for oneDNN (where torch has it), and transposed (where nothing packs: GPUs, bf16)."""
    if layout == "packed" and not packs_matrices(torch.device("cpu"), torch.float32):
        pytest.skip("this build of torch has no oneDNN")
    model = make_model(CONFIGS[name])
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = [model(idx[:1]), model(idx[1:, 3:])]
    padded = idx.clone()
    padded[1, :3] = 0
    for pad in (None, torch.tensor([0, 3])):
        with torch.inference_mode():
            cache = new_cache(model, batch_size=2, max_len=20, pad=pad)
            model(padded[:, :6], cache)
            step = DecodeStep(model, packed=layout == "packed")
            assert step.weights is not None  # the step's own reading of the weights, not forward
            assert isinstance(step.weights.layers[0].qkv, PackedMatrix if layout == "packed" else TransposedMatrix)
            steps = torch.stack([step(padded[:, t], cache) for t in range(6, 20)], dim=1)
        assert cache.length == 20
        torch.testing.assert_close(steps[:1], full[0][:, 6:], rtol=0, atol=1e-5)
        if pad is not None:
            torch.testing.assert_close(steps[1:], full[1][:, 3:], rtol=0, atol=1e-5)


@pytest.mark.skipif(not packs_matrices(torch.device("cpu"), torch.float32), reason="this build of torch has no oneDNN")
def test_a_packed_matrix_multiplies_any_number_of_rows():
    """One packing serves every batch size a generation passes through as its rows finish."""
    weight = torch.randn(300, 96)
    matrix = PackedMatrix(weight)
    for rows in [*range(1, 41), 64, 65, 130]:
        x = torch.randn(rows, 96)
        torch.testing.assert_close(matrix(x), x @ weight.t(), rtol=0, atol=1e-4)


def test_decode_step_under_autocast_keeps_forward_precision():
    """PPO samples under bf16 autocast: the step keeps the residual stream in fp32 as `forward` does, so
    both give the same log-probs."""
    model = make_model(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 12))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        by_forward, by_step = new_cache(model, 2, 12), new_cache(model, 2, 12)
        model(idx[:, :4], by_forward), model(idx[:, :4], by_step)
        forward = torch.stack([model(idx[:, t : t + 1], by_forward)[:, -1] for t in range(4, 12)], 1)
        step = DecodeStep(model)
        steps = torch.stack([step(idx[:, t], by_step) for t in range(4, 12)], 1)
    torch.testing.assert_close(steps.float().log_softmax(-1), forward.float().log_softmax(-1), rtol=0, atol=1e-3)


def test_decode_step_needs_eval_mode_and_the_lm_head():
    model = make_model(CONFIGS["gqa"]).train()
    with pytest.raises(ValueError, match="eval mode"):
        DecodeStep(model)
    scalar = make_model(GPTConfig(vocab_size=97, n_layer=1, d_model=32, n_head=2, head="scalar"))
    with pytest.raises(ValueError, match="only a language model decodes"):
        DecodeStep(scalar)
    with pytest.raises(ValueError, match="do not pack for oneDNN"):
        DecodeStep(make_model(CONFIGS["gqa"]).double(), packed=True)


def test_each_generation_decodes_with_the_weights_of_its_start():
    """No layout of the weights outlives its generation: after any change of the parameters, whichever way
    it was made (even through `.data`, which no version counter sees), the next step equals `forward`."""
    model = make_model(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 6))

    def decode_and_forward(atol=1e-5):
        with torch.no_grad():
            expected = model(idx)[:, 5]
        # both layouts, where the weights' dtype packs (a float64 model does not)
        for packed in (False, True) if packs_matrices(torch.device("cpu"), model.embed_tokens.weight.dtype) else (False,):
            with torch.inference_mode():
                cache = new_cache(model, 2, 8)
                model(idx[:, :5], cache)
                step = DecodeStep(model, packed)(idx[:, 5], cache)
            torch.testing.assert_close(step, expected, rtol=0, atol=atol)

    decode_and_forward()
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(2.0)  # an in-place update
        model.layers[1].mlp.up_proj.weight.add_(0.1)
    decode_and_forward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # still in eval mode
    model(idx, targets=idx).backward()
    optimizer.step()
    decode_and_forward()
    model.layers[1].self_attn.q_proj.weight.data.mul_(-1.5)  # through .data: no version counter moves
    decode_and_forward()
    with torch.no_grad():  # a new tensor behind the same parameter
        model.layers[0].mlp.down_proj.weight.data = model.layers[0].mlp.down_proj.weight.data * 3
    decode_and_forward()
    model.layers[1].self_attn.o_proj.weight = torch.nn.Parameter(torch.randn(64, 64) * 0.1)  # replaced outright
    decode_and_forward()
    model.layers[0].mlp = MLP(model.config)  # a module holding parameters replaced
    decode_and_forward()
    model.double()  # swaps every weight's storage
    decode_and_forward(atol=1e-12)
    assert not any(isinstance(value, DecodeWeights) for value in vars(model).values())  # the model holds no copy


def greedy_equals_forward(model, prompts, batch=None):
    """Greedy answers (by `generate_batch`, or by a long-lived `DecodeBatch`) whose every token and log-prob
    is what `forward` over the whole sequence gives; the answers."""
    params = SamplingParams(max_new_tokens=8, temperature=0)
    if batch is None:
        completions = [c for (c,) in generate_batch(model, prompts, params, logprobs=True)]
    else:
        groups = [batch.add([p], params, logprobs=True) for p in prompts]
        events = {}
        while len(batch):
            for group, event in batch.step():
                events.setdefault(groups.index(group), []).append(event)
        completions = [SimpleNamespace(tokens=[e.token for e in events[g]], logprobs=[e.logprob for e in events[g]])
                       for g in range(len(prompts))]
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            full = model(torch.tensor([prompt + completion.tokens]))[0, len(prompt) - 1 : -1].log_softmax(-1)
        assert completion.tokens == full.argmax(-1).tolist()
        # fp32 rounding grows with the logits (a test scales the weights by 3): 1e-5 failed on an AMD EPYC's MKL
        assert completion.logprobs == pytest.approx(full.max(-1).values.tolist(), abs=1e-4)
    return [c.tokens for c in completions]


def test_a_generation_after_a_weight_change_uses_the_new_weights():
    """Also in a `DecodeBatch` that lives on, as the server's does: rows that join it once it has emptied
    decode with the weights of that moment."""
    model = make_model(CONFIGS["gqa"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # greedy paths far from ties
    batch = DecodeBatch(model)
    before = greedy_equals_forward(model, PROMPTS[:2])
    assert greedy_equals_forward(model, PROMPTS[:2], batch) == before
    model.layers[0].mlp.up_proj.weight.data.mul_(-1)  # in place, through .data
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    after = greedy_equals_forward(model, PROMPTS[:2])
    assert after != before
    assert greedy_equals_forward(model, PROMPTS[:2], batch) == after


class Shifted(nn.Module):
    """A projection that computes more than its weight, as a LoRA layer does."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.shift = nn.Parameter(torch.randn(linear.out_features) * 0.3)

    def forward(self, x):
        return self.linear(x) + self.shift


def test_a_model_with_wrapped_or_hooked_projections_decodes_through_forward():
    """The step's own reading of the weights is only for a stock model: with a wrapped projection (one that
    forward fuses with its neighbours, one it calls) or a forward hook, decoding runs forward and equals it."""
    wrapped = make_model(CONFIGS["gqa"])
    attention, mlp = wrapped.layers[1].self_attn, wrapped.layers[0].mlp
    attention.k_proj, mlp.down_proj = Shifted(attention.k_proj), Shifted(mlp.down_proj)
    hooked = make_model(CONFIGS["mha-tied"])
    hooked.layers[0].mlp.gate_proj.register_forward_hook(lambda module, args, out: out * 1.5)
    for model in (wrapped, hooked):
        stock = make_model(model.config)
        assert reads_as_stock(stock) and not reads_as_stock(model)
        idx = torch.randint(0, 97, (2, 12))
        with torch.no_grad():
            full = model(idx)
            assert (full - stock(idx)).abs().max() > 1e-3  # forward computes what the wrap or hook adds
        with torch.inference_mode():
            cache = new_cache(model, 2, 12)
            model(idx[:, :4], cache)
            step = DecodeStep(model)
            assert step.weights is None
            steps = torch.stack([step(idx[:, t], cache) for t in range(4, 12)], 1)
        torch.testing.assert_close(steps, full[:, 4:], rtol=0, atol=1e-5)
        greedy_equals_forward(model, [[5, 6, 7], list(range(10, 19))])


# --- beam search through the sampling settings -----------------------------------------------------------

def test_num_beams_in_the_sampling_params_is_beam_search(model):
    params = SamplingParams(max_new_tokens=8, num_beams=3, length_penalty=0.5)
    out = generate_batch(model, PROMPTS[:2], params, n=2, logprobs=True)
    for prompt, answers in zip(PROMPTS[:2], out):
        beams = beam_search(model, prompt, num_beams=3, max_new_tokens=8, length_penalty=0.5)
        assert [(c.tokens, c.logprobs, c.finish_reason) for c in answers] == \
            [(b.tokens, b.logprobs, b.finish_reason) for b in beams[:2]]
    events = list(generate_stream(model, PROMPTS[:1], params, n=3))
    assert [e.finish_reason is not None for e in events].count(True) == 3
    with pytest.raises(ValueError, match="num_beams = 3"):
        generate_batch(model, PROMPTS[:1], params, n=4)
    for bad in (dict(num_beams=0), dict(length_penalty=float("inf"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="beam search"):
        DecodeBatch(model).add(PROMPTS[:1], params)


def test_beam_search_stops_at_stop_strings(tokenizer_dir):
    tokenizer, m, params, prompt, free, stop, stopped = stop_string_case(tokenizer_dir)
    (beam,) = beam_search(m, prompt, 1, 30, stop_strings=[stop], tokenizer=tokenizer)
    assert beam.tokens == stopped.tokens and beam.finish_reason == "stop"
