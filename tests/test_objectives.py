import pytest
import torch
import torch.nn.functional as F

from chatforge import objectives as losses
from chatforge.objectives import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("chunk", [16, 7, 1000])
def test_fused_head_and_cross_entropy_equal_the_plain_ones(monkeypatch, chunk):
    """Loss and both gradients match F.cross_entropy over materialised logits, with ignored targets and ragged chunks."""
    monkeypatch.setattr(losses, "_chunk_tokens", lambda vocab, device: chunk)
    torch.manual_seed(0)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    targets[::3] = IGNORE_INDEX
    upstream = torch.tensor(2.5)  # a non-unit gradient from above, as under gradient accumulation

    fused = linear_cross_entropy(hidden, weight, targets)
    (fused * upstream).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    (plain * upstream).backward()

    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grads[0], hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_grads[1], weight.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the evaluation path computes no gradients and gives the same number
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), plain, atol=1e-6, rtol=1e-6)



def test_fused_head_under_bf16_autocast_follows_the_plain_one(monkeypatch):
    """Mixed precision (CPU autocast stands in for the GPU's): fp32 weights and hidden states, bf16 products;
    the loss and gradients come back in the inputs' dtypes, near the plain head's under the same autocast."""
    monkeypatch.setattr(losses, "_chunk_tokens", lambda vocab, device: 16)
    torch.manual_seed(0)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets)
        fused.backward()
        fused_grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        plain = F.cross_entropy(hidden @ weight.t(), targets)
        plain.backward()
    assert fused_grads[0].dtype == fused_grads[1].dtype == torch.float32
    torch.testing.assert_close(fused.float(), plain.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(fused_grads[0], hidden.grad, atol=0.02, rtol=0.05)
    torch.testing.assert_close(fused_grads[1], weight.grad, atol=0.02, rtol=0.05)


def test_fused_head_with_a_frozen_weight_computes_no_weight_gradient(monkeypatch):
    """A frozen head (LoRA's, a tied embedding not trained): the hidden states' gradient as before, none for it."""
    monkeypatch.setattr(losses, "_chunk_tokens", lambda vocab, device: 16)
    torch.manual_seed(0)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = torch.randn(97, 24)
    targets = torch.randint(0, 97, (50,))
    targets[::3] = IGNORE_INDEX
    linear_cross_entropy(hidden, weight, targets).backward()
    fused = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX).backward()
    torch.testing.assert_close(fused, hidden.grad, atol=1e-6, rtol=1e-5)
    assert weight.grad is None

def test_model_loss_equals_cross_entropy_of_its_logits():
    from chatforge.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, n_layer=1, d_model=32, n_head=2, max_seq_len=16, tie_embeddings=True))
    x, y = torch.randint(0, 61, (2, 2, 16))
    loss = model(x, targets=y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
