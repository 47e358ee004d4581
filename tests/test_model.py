import copy

import pytest
import torch

from chatforge.model import GPT, MLP, GPTConfig, attention_mask, from_hf_state_dict, hf_llama_config, hf_state_dict

CONFIGS = {
    "gqa": GPTConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32),
    "mha-tied": GPTConfig(vocab_size=97, n_layer=3, d_model=48, n_head=3, max_seq_len=32, tie_embeddings=True),
}


def make_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm implementation shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_changing_a_future_token_never_changes_past_logits(name):
    model = make_model(CONFIGS[name])
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 18):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4  # the change itself is seen


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_equals_full_forward(name):
    """Prefill 5 tokens, append 4 at once, then one at a time: logits within 1e-5 of one full pass (fp32)."""
    model = make_model(CONFIGS[name])
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2, max_len=24)
        pieces = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]
        pieces += [model(idx[:, t : t + 1], cache) for t in range(9, 24)]
    incremental = torch.cat(pieces, dim=1)
    assert cache.length == 24
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-5)


def test_cache_overflow_is_an_error():
    model = make_model(CONFIGS["gqa"])
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_scalar_head_gives_one_value_per_position():
    config = GPTConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, max_seq_len=16, head="scalar")
    model = make_model(config)
    values = model(torch.randint(0, 97, (3, 10)))
    assert values.shape == (3, 10)
    assert not hasattr(model, "lm_head") and model.score.weight.shape == (1, 32)


def test_parameter_count_and_flops_per_token():
    config = GPTConfig(vocab_size=100, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128, max_seq_len=16)
    model = GPT(config)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q,o + k,v (GQA) + SwiGLU + 2 norms
    expected = 100 * 64 + 2 * per_layer + 64 + 100 * 64  # embedding + layers + final norm + head
    assert model.num_params() == expected
    assert model.num_params(embedding=False) == expected - 100 * 64
    assert model.flops_per_token(16) == 6 * (expected - 100 * 64) + 12 * 2 * 64 * 16
    tied = GPT(GPTConfig(vocab_size=100, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128, tie_embeddings=True))
    assert tied.num_params() == expected - 100 * 64
    assert tied.flops_per_token(16) == model.flops_per_token(16)  # the tied head still costs its matmul


@pytest.mark.parametrize("name", CONFIGS)
def test_hugging_face_llama_gives_the_same_logits(name):
    """The architecture is Llama in fact: LlamaForCausalLM with chatforge's weights (by name) agrees < 1e-4."""
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[name]
    model = make_model(config)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(config))).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_embeddings else set())  # tied: the embedding
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # and back: Hugging Face names map onto chatforge's exactly
    assert set(from_hf_state_dict(hf.state_dict())) == set(model.state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=8, n_kv_head=3)
    with pytest.raises(ValueError, match="head must be"):
        GPTConfig(head="value")


def test_scalar_head_is_hugging_face_sequence_classification():
    """The reward/value model's weights load into LlamaForSequenceClassification, which reads the last token."""
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16, head="scalar")
    model = make_model(config)
    hf = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**hf_llama_config(config), num_labels=1, pad_token_id=0)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=True)
    idx = torch.randint(1, 97, (1, 12))
    with torch.no_grad():
        assert (model(idx)[:, -1] - hf(idx).logits[:, 0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_step_equals_full_forward_with_and_without_padding(name):
    """The engine's one-token step gives every row the logits one full pass over its own tokens gives;
    row 1 is left-padded by 3 slots (a shorter prompt in the batch)."""
    model = make_model(CONFIGS[name])
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = [model(idx[:1]), model(idx[1:, 3:])]
    padded = idx.clone()
    padded[1, :3] = 0
    for pad in (None, torch.tensor([0, 3])):
        with torch.inference_mode():
            cache = model.new_cache(batch_size=2, max_len=20, pad=pad)
            model(padded[:, :6], cache)
            steps = torch.stack([model.decode_step(padded[:, t], cache) for t in range(6, 20)], dim=1)
        assert cache.length == 20
        torch.testing.assert_close(steps[:1], full[0][:, 6:], rtol=0, atol=1e-5)
        if pad is not None:
            torch.testing.assert_close(steps[1:], full[1][:, 3:], rtol=0, atol=1e-5)


def test_decode_step_under_autocast_keeps_forward_precision():
    """PPO samples under bf16 autocast: the step keeps the residual stream in fp32 as `forward` does, so
    both give the same log-probs."""
    model = make_model(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 12))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        by_forward, by_step = model.new_cache(2, 12), model.new_cache(2, 12)
        model(idx[:, :4], by_forward), model(idx[:, :4], by_step)
        forward = torch.stack([model(idx[:, t : t + 1], by_forward)[:, -1] for t in range(4, 12)], 1)
        steps = torch.stack([model.decode_step(idx[:, t], by_step) for t in range(4, 12)], 1)
    torch.testing.assert_close(steps.float().log_softmax(-1), forward.float().log_softmax(-1), rtol=0, atol=1e-3)


def test_decode_step_needs_eval_mode_and_the_lm_head():
    model = make_model(CONFIGS["gqa"]).train()
    with pytest.raises(ValueError, match="eval mode"):
        model.decode_step(torch.zeros(1, dtype=torch.long), model.new_cache(1))
    scalar = make_model(GPTConfig(vocab_size=97, n_layer=1, d_model=32, n_head=2, head="scalar"))
    with pytest.raises(ValueError, match="only a language model decodes"):
        scalar.decode_step(torch.zeros(1, dtype=torch.long), scalar.new_cache(1))


def test_decoding_weights_follow_the_parameters():
    """decode_step's transposed copy of the weights is kept between generations while nothing changes, and
    made again after any change of the parameters, whichever way they changed."""
    model = make_model(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 6))

    def decode_and_forward(atol=1e-6):
        with torch.inference_mode():
            cache = model.new_cache(2, 8)
            model(idx[:, :5], cache)
            step = model.decode_step(idx[:, 5], cache, model.step_weights())
        with torch.no_grad():
            expected = model(idx)[:, 5]
        torch.testing.assert_close(step, expected, rtol=0, atol=atol)

    decode_and_forward()  # makes the copy
    kept = model.step_weights()
    assert model.step_weights() is kept and copy.deepcopy(model)._step_weights is None
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(2.0)  # an in-place update
        model.layers[1].mlp.up_proj.weight.add_(0.1)
    decode_and_forward()
    # a fused optimizer, still in eval mode: no version counter moves
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(idx, targets=idx).backward()
    optimizer.step()
    decode_and_forward()
    with torch.no_grad():  # a new tensor behind the same parameter: no version bump, a new storage
        model.layers[0].mlp.down_proj.weight.data = model.layers[0].mlp.down_proj.weight.data * 3
    decode_and_forward()
    model.layers[1].self_attn.o_proj.weight = torch.nn.Parameter(torch.randn(64, 64) * 0.1)  # replaced outright
    decode_and_forward()
    model.layers[0].mlp = MLP(model.config)  # a module holding parameters replaced
    decode_and_forward()
    model.double()  # swaps every weight's storage
    decode_and_forward(atol=1e-12)
    model.train()
    assert model._step_weights is None  # no copy held in training


def test_one_token_mask_is_the_general_rule():
    """The decoding steps' shortcut mask is the last query row of the general one (causal, never a row's
    padding, a padding slot attends to itself), also for rows whose new slot is still padding."""
    pad = torch.tensor([0, 1, 3, 5, 7])
    for start in range(1, 7):
        general = attention_mask(start - 1, 2, pad, "cpu")[:, :, -1:]
        assert torch.equal(attention_mask(start, 1, pad, "cpu"), general)
