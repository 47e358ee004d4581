"""The one-token decoding step, and the layout of the weights it reads.

A decoding step of a small model costs more in calls than in arithmetic, so the engine's steps do not
run `GPT.forward`: `decode_step` is `forward` for one new token per row with the calls taken out (no module
calls, no general case), reading the weights from a `DecodeWeights` laid out for it. That layout is a copy,
made by `DecodeStep` at the start of each generation and dropped with it, so a generation decodes with the
weights of the moment it starts, whatever changed them before (an optimizer step, a write through `.data`,
a replaced module).

The copy is only a faithful reading of the model when each projection computes `x @ W^T` for a matrix W
that can be read: a plain `nn.Linear`, or peft's LoRA layer, which computes `x @ (W + (α/r)·B A)^T` in eval
mode, so its adapters are folded into the copy (one matmul per projection, as without adapters). Anything
else (a hook, DoRA, another wrapper) makes `DecodeStep` run `forward` on the one new token instead, so that
decoding never uses other weights than the model does.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.engine.kv_cache import KVCache
from chatforge.model import GPT, MLP, Attention, Block, RMSNorm, attention_mask, is_plain_linear, rms_norm, split_heads

_STOCK_MODULES = (GPT, Block, Attention, MLP, RMSNorm, nn.ModuleList, nn.Embedding, nn.Dropout)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _lora_linear_class() -> type | None:
    """peft's LoRA `Linear`, if peft is in use (a model with adapters imported it); not importing it otherwise."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "Linear", None)


def projection_weight(linear: nn.Module) -> torch.Tensor | None:
    """The (out, in) matrix W for which `linear(x)` computes `x @ W^T` in eval mode, or None where it computes
    something else. For peft's LoRA layer that is the base weight plus each active adapter's (α/r)·B A
    (peft's own `get_delta_weight`): vanilla adapters only, no DoRA or other variant, no bias on B."""
    if is_plain_linear(linear):
        return linear.weight
    if type(linear) is not _lora_linear_class() or linear.training or any(_hooked(m) for m in linear.modules()):
        return None
    base = linear.get_base_layer()
    if not is_plain_linear(base) or linear.fan_in_fan_out:
        return None
    if linear.merged:  # the adapters already in the base weight; disabled, forward would unmerge them first
        return None if linear.disable_adapters else base.weight
    weight = base.weight
    for name in [] if linear.disable_adapters else linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if name in linear.lora_variant or linear.lora_B[name].bias is not None:
            return None
        weight = weight + linear.get_delta_weight(name)
    return weight


def reads_as_stock(model: GPT) -> bool:
    """Whether `decode_step` computes what `model.forward` does: every module of the exact class a `GPT`
    builds, with no forward hook, every projection one whose `projection_weight` can be read."""
    read = set()  # the modules inside a readable projection (a LoRA layer's A, B and dropout)
    for module in model.modules():
        if id(module) in read:
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "get_base_layer"):
            if projection_weight(module) is None:
                return False
            read.update(id(m) for m in module.modules())
        elif type(module) not in _STOCK_MODULES or _hooked(module):
            return False
    return True


class DecodeWeights:
    """The weights of `decode_step`, laid out for it: per layer q/k/v and gate/up concatenated (one matmul
    each), every matrix transposed to (in, out), since for a few rows `x @ W^T` with W^T contiguous runs
    faster on CPU than `F.linear` on the (out, in) weight; LoRA adapters folded in. A copy: it does not
    follow later changes of the parameters, which is why each generation makes its own."""

    @torch.no_grad()
    def __init__(self, model: GPT):
        def transposed(*linears: nn.Module) -> torch.Tensor:
            return torch.cat([projection_weight(linear).t() for linear in linears], dim=1)  # one copy, contiguous

        self.layers = [SimpleNamespace(
            attention_norm=block.input_layernorm.weight.detach(), mlp_norm=block.post_attention_layernorm.weight.detach(),
            qkv=transposed(block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
            out=transposed(block.self_attn.o_proj), gate_up=transposed(block.mlp.gate_proj, block.mlp.up_proj),
            down=transposed(block.mlp.down_proj)) for block in model.layers]
        self.embedding, self.norm = model.embed_tokens.weight.detach(), model.norm.weight.detach()
        self.head = projection_weight(model.lm_head).t().contiguous()


def decode_step(model: GPT, tokens: torch.Tensor, cache: KVCache, weights: DecodeWeights) -> torch.Tensor:
    """Next-token logits (B, vocab) after one new token per row (tokens: (B,)), appended to the cache: what
    `model(tokens[:, None], cache)[:, -1]` computes, to float rounding (tested), for a model that
    `reads_as_stock`. No gradient reaches the parameters.

    The query heads sharing a key/value head attend as that head's query rows, so no key or value is
    repeated for grouped-query attention."""
    c = model.config
    B, H, KV, D = tokens.shape[0], c.n_head, c.n_kv_head, c.head_dim
    cos, sin = model.rotary(cache.length, 1, cache.pad)
    mask = attention_mask(cache.length, 1, cache.pad, tokens.device)
    x = F.embedding(tokens, weights.embedding)  # (B, d_model): one position, so no time axis
    for layer, w in enumerate(weights.layers):
        qkv = (rms_norm(x, w.attention_norm, c.norm_eps) @ w.qkv).view(B, H + 2 * KV, 1, D)
        q, k, v = split_heads(qkv, cos, sin, c)
        k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, D), k, v, attn_mask=mask)
        x = x + y.reshape(B, c.d_model) @ w.out  # not addmm: under autocast it would make x bf16
        gate, up = (rms_norm(x, w.mlp_norm, c.norm_eps) @ w.gate_up).chunk(2, dim=-1)
        x = x + F.silu(gate).mul_(up) @ w.down
    cache.length += 1
    return rms_norm(x, weights.norm, c.norm_eps) @ weights.head


class DecodeStep:
    """One generation's decoding step: `step(tokens, cache)` -> next-token logits (B, vocab) after one new
    token per row. Made when a generation starts, with the model's weights of that moment laid out for
    `decode_step` when the model `reads_as_stock`, else running `forward`; dropped when it ends."""

    def __init__(self, model: GPT):
        if model.training:
            raise ValueError("decode with the model in eval mode (model.eval())")
        if model.config.head != "lm":
            raise ValueError(f"only a language model decodes; this one has the {model.config.head!r} head")
        self.model = model
        self.weights = DecodeWeights(model) if reads_as_stock(model) else None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.weights is None:
            return self.model(tokens[:, None], cache, last_only=True)[:, -1]
        return decode_step(self.model, tokens, cache, self.weights)
