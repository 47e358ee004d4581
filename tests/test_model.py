import pytest
import torch

from chatforge.engine import new_cache
from chatforge.model import GPT, GPTConfig, attention_mask, from_hf_state_dict, hf_llama_config, hf_state_dict

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
        cache = new_cache(model, batch_size=2, max_len=24)
        pieces = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]
        pieces += [model(idx[:, t : t + 1], cache) for t in range(9, 24)]
    incremental = torch.cat(pieces, dim=1)
    assert cache.length == 24
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-5)


def test_cache_overflow_is_an_error():
    model = make_model(CONFIGS["gqa"])
    cache = new_cache(model, 1, max_len=4)
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


def test_one_token_mask_is_the_general_rule():
    """The decoding steps' shortcut mask is the last query row of the general one (causal, never a row's
    padding, a padding slot attends to itself), also for rows whose new slot is still padding."""
    pad = torch.tensor([0, 1, 3, 5, 7])
    for start in range(1, 7):
        general = attention_mask(start - 1, 2, pad, "cpu")[:, :, -1:]
        assert torch.equal(attention_mask(start, 1, pad, "cpu"), general)


def test_activation_checkpointing_gives_the_same_gradients_in_less_memory():
    """Recomputing each block in the backward pass (with dropout: the same masks again) changes no number,
    and keeps one block's activations instead of every block's."""
    from chatforge.runtime import peak_memory

    config = GPTConfig(vocab_size=97, n_layer=4, d_model=64, n_head=4, max_seq_len=64, dropout=0.1)
    idx = torch.randint(0, 97, (8, 64), generator=torch.Generator().manual_seed(1))

    def gradients(recompute: bool):
        model = make_model(config).train()
        model.activation_checkpointing = recompute

        def step():
            torch.manual_seed(2)  # the same dropout masks in both runs
            model(idx[:, :-1], targets=idx[:, 1:]).backward()

        _, peak = peak_memory(step, torch.device("cpu"))
        return {name: p.grad for name, p in model.named_parameters()}, peak

    kept, kept_peak = gradients(False)
    recomputed, recomputed_peak = gradients(True)
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)
    assert recomputed_peak < 0.7 * kept_peak, (recomputed_peak, kept_peak)
