"""The model's products on oneDNN: the same values and gradients as `F.linear`, taken only where they run
faster, and taken by the frozen products under LoRA adapters too (the training step that LoRA SFT runs)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from chatforge.linear import ONEDNN_MIN_ROWS, linear
from chatforge.lora import add_adapters, trained_state
from chatforge.model import GPT, GPTConfig

from conftest import reference_kernels

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")


def onednn_calls(fn) -> int:
    """How many products `fn()` ran on oneDNN."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("rows", [3, 2 * ONEDNN_MIN_ROWS])
@pytest.mark.parametrize("trained", ["input", "weight", "both"])
@pytest.mark.parametrize("outputs", [48, 160])  # fewer and more outputs than inputs: dW transposes either side
def test_linear_gives_f_linears_values_and_gradients(rows, trained, outputs):
    torch.manual_seed(0)
    x = torch.randn(2, rows, 96, requires_grad=trained != "weight")
    weight, bias = (torch.randn(outputs, 96, requires_grad=trained != "input"),
                    torch.randn(outputs, requires_grad=trained != "input"))
    out = linear(x, weight, bias)
    grad = torch.randn(2, outputs, rows).transpose(1, 2)  # an upstream gradient that is not contiguous
    out.backward(grad)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    expected = F.linear(*exact)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    for ours, reference in zip((x, weight, bias), exact):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-4)
        else:
            assert ours.grad is None


@needs_onednn
def test_products_go_to_onednn_only_where_they_run_faster():
    weight = torch.randn(48, 96)
    many, few = torch.randn(ONEDNN_MIN_ROWS, 96), torch.randn(ONEDNN_MIN_ROWS - 1, 96)
    assert onednn_calls(lambda: linear(many, weight)) == 1
    assert onednn_calls(lambda: linear(few, weight)) == 0
    assert onednn_calls(lambda: linear(many.bfloat16(), weight.bfloat16())) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_calls(lambda: linear(many, weight)) == 0
    with reference_kernels():
        assert onednn_calls(lambda: linear(many, weight)) == 0
    x = many.requires_grad_()
    assert onednn_calls(lambda: linear(x, weight.requires_grad_()).sum().backward()) == 3  # forward, dX, dW


@needs_onednn
def test_a_lora_training_step_runs_its_frozen_products_on_onednn_and_equals_f_linears(tmp_path):
    config = GPTConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)
    torch.manual_seed(0)
    model = add_adapters(GPT(config), r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"],
                         base=tmp_path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B starts at zero, which would hide an adapter that is not computed
    idx, targets = torch.randint(0, 97, (2, 48)), torch.randint(0, 97, (2, 48))
    targets[:, :16] = -100

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets=targets)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    # per layer, forward: q's and v's base layers, k, o, gate/up fused, down's base layer; backward: the dX of
    # each (no dW: the base is frozen), but for q, k and v in the first layer, whose input (the normed
    # embedding) needs no gradient; the head: forward and dX over the 64 positions with a target
    expected = config.n_layer * 2 * 6 - 3 + 2
    calls = onednn_calls(step)
    assert calls == expected, calls
    loss, grads = step()
    with reference_kernels():
        reference_loss, reference_grads = step()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys() == {k for k in trained_state(model)}
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6)
