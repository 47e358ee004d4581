"""The one-token decoding step, and the layout of the weights it reads.

A decoding step of a small model costs more in calls than in arithmetic, so the engine's steps do not
run `GPT.forward`: `decode_step` is `forward` for one new token per row with the calls taken out (no module
calls, no general case), reading the weights from a `DecodeWeights` laid out for it. That layout is a copy,
made by `DecodeStep` at the start of each generation and dropped with it, so a generation decodes with the
weights of the moment it starts, whatever changed them before (an optimizer step, a write through `.data`,
a replaced module).

The copy is only a faithful reading of the model when each projection computes `x @ W^T` for a matrix W
that can be read: a plain `Linear` (`chatforge.linear`), or peft's LoRA layer, which computes
`x @ (W + (α/r)·B A)^T` in eval mode, so its adapters are folded into the copy (one matmul per projection, as
without adapters). Anything else (a hook, DoRA, another wrapper) makes `DecodeStep` run `forward` on the one
new token instead, so that decoding never uses other weights than the model does.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.engine.kv_cache import KVCache
from chatforge.linear import onednn_enabled, onednn_product
from chatforge.model import GPT, MLP, Attention, Block, RMSNorm, attention_mask, is_plain_linear, rms_norm, split_heads

_STOCK_MODULES = (GPT, Block, Attention, MLP, RMSNorm, nn.ModuleList, nn.Embedding, nn.Dropout)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _lora_linear_class() -> type | None:
    """peft's LoRA `Linear`, if peft is in use (a model with adapters imported it); not importing it otherwise."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "Linear", None)


Adapter = tuple[torch.Tensor, torch.Tensor, float]  # LoRA's (B, A, scale): adds scale·B A to a weight


def projection_parts(linear: nn.Module) -> tuple[torch.Tensor, list[Adapter]] | None:
    """(W, adapters) for which `linear(x)` computes `x @ (W + Σ scale·B A)^T` in eval mode, or None where it
    computes something else: a plain `Linear` (no adapters), or peft's LoRA layer with each active
    adapter's B, A and α/r (what peft's `get_delta_weight` multiplies): vanilla adapters only, no DoRA or
    other variant, no bias on B. Cheap: nothing is computed until `folded` writes the sum."""
    if is_plain_linear(linear):
        return linear.weight, []
    if type(linear) is not _lora_linear_class() or linear.training or any(_hooked(m) for m in linear.modules()):
        return None
    base = linear.get_base_layer()
    if not is_plain_linear(base) or linear.fan_in_fan_out:
        return None
    if linear.merged:  # the adapters already in the base weight; disabled, forward would unmerge them first
        return None if linear.disable_adapters else (base.weight, [])
    adapters = []
    for name in [] if linear.disable_adapters else linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if name in linear.lora_variant or linear.lora_B[name].bias is not None:
            return None
        adapters.append((linear.lora_B[name].weight, linear.lora_A[name].weight, linear.scaling[name]))
    return base.weight, adapters


def folded(parts: list[tuple[torch.Tensor, list[Adapter]]], transposed: bool) -> torch.Tensor:
    """The projections' matrices W + Σ scale·B A stacked into one (out, in) matrix, or its transpose (in, out):
    one copy of the weights, then each adapter added in place by one `addmm_` (not peft's `get_delta_weight`,
    which makes each delta a matrix of its own and the sum another: twice the memory traffic of the copy)."""
    weight = torch.cat([w.t() for w, _ in parts], dim=1) if transposed else torch.cat([w for w, _ in parts])
    start = 0
    for w, adapters in parts:
        rows = slice(start, start + w.shape[0])
        start = rows.stop
        for b, a, scale in adapters:
            b, a = b.to(weight.dtype), a.to(weight.dtype)
            if transposed:
                weight[:, rows].addmm_(a.t(), b.t(), alpha=scale)
            else:
                weight[rows].addmm_(b, a, alpha=scale)
    return weight


def stacked(parts: list[tuple[torch.Tensor, list[Adapter]]]) -> torch.Tensor:
    """`folded(parts, transposed=False)`, except that a lone matrix without adapters is the parameter itself
    (detached): a copy only to stack or fold (SmolLM2's head alone is 113 MB)."""
    if len(parts) == 1 and not parts[0][1]:
        return parts[0][0].detach()
    return folded(parts, transposed=False)


def reads_as_stock(model: GPT) -> bool:
    """Whether `decode_step` computes what `model.forward` does: every module of the exact class a `GPT`
    builds, with no forward hook, every projection one whose `projection_parts` can be read."""
    read = set()  # the modules inside a readable projection (a LoRA layer's A, B and dropout)
    for module in model.modules():
        if id(module) in read:
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "get_base_layer"):
            if projection_parts(module) is None:
                return False
            read.update(id(m) for m in module.modules())
        elif type(module) not in _STOCK_MODULES or _hooked(module):
            return False
    return True


def packs_matrices(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `DecodeWeights` may hold its matrices packed for oneDNN: fp32 on a CPU build of torch with
    oneDNN (mkldnn) not switched off (`torch.backends.mkldnn.enabled`), outside autocast (which would hand
    the packed GEMM bf16 rows)."""
    return (device.type == "cpu" and dtype == torch.float32 and onednn_enabled()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class TransposedMatrix:
    """A matrix W (out, in) held as W^T, contiguous, used where nothing packs (a GPU, bf16, autocast): on a
    CPU one row's `x @ W^T` runs faster this way than `F.linear` on W. Called on x, it gives `x @ W^T`."""

    def __init__(self, weight_t: torch.Tensor):
        self.weight_t = weight_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


class InPlaceMatrix:
    """A matrix W (out, in) read where it is, through `F.linear`: for the output head at one row where
    nothing packs, whose (in, out) copy costs more to make than it saves in a few hundred tokens."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PackedMatrix:
    """A matrix W (out, in) packed once in oneDNN's blocked layout, so that `x @ W^T` for a few rows skips
    the repacking that plain `matmul` (MKL) does on every call. PyTorch offers it as the private
    `mkldnn._reorder_linear_weight` / `mkldnn._linear_pointwise` pair, which its compiler uses for CPU
    linear layers of changing batch size; no public API packs. One packing serves any number of rows (tested
    for 1 to 130). Measured on SmolLM2's 121 matrices (2 cores, AMD EPYC, medians): 16-18 ms a step for 1 to
    8 rows, against 25 (1 row, transposed) and 42-46 (8 rows, `F.linear`)."""

    PACKED_FOR_ROWS = 64  # oneDNN's hint of the rows to expect: 1, 2 and 8 rows ran fastest packed for 64

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.PACKED_FOR_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_product(x, self.packed)


class DecodeWeights:
    """The weights of `decode_step`, laid out for it: per layer q/k/v and gate/up concatenated (one matmul
    each); LoRA adapters folded in; each matrix a `PackedMatrix` where the CPU packs (`packed`), else a
    `TransposedMatrix` (the head an `InPlaceMatrix`). The matrices are copies: they do not follow
    later changes of the parameters, which is why each generation makes its own. The embedding, the norms'
    weights and an in-place head are the parameters themselves, which a change made during a generation
    would reach; nothing in chatforge changes weights while a generation runs."""

    @torch.no_grad()
    def __init__(self, model: GPT, packed: bool = False):
        def matrix(*linears: nn.Module) -> TransposedMatrix | PackedMatrix:
            parts = [projection_parts(linear) for linear in linears]
            return PackedMatrix(stacked(parts)) if packed else TransposedMatrix(folded(parts, transposed=True))

        def in_place(linear: nn.Module) -> InPlaceMatrix:
            return InPlaceMatrix(stacked([projection_parts(linear)]))

        self.layers = [SimpleNamespace(
            attention_norm=block.input_layernorm.weight.detach(), mlp_norm=block.post_attention_layernorm.weight.detach(),
            qkv=matrix(block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
            out=matrix(block.self_attn.o_proj), gate_up=matrix(block.mlp.gate_proj, block.mlp.up_proj),
            down=matrix(block.mlp.down_proj)) for block in model.layers]
        self.embedding, self.norm = model.embed_tokens.weight.detach(), model.norm.weight.detach()
        self.head = matrix(model.lm_head) if packed else in_place(model.lm_head)


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
        qkv = w.qkv(rms_norm(x, w.attention_norm, c.norm_eps)).view(B, H + 2 * KV, 1, D)
        q, k, v = split_heads(qkv, cos, sin, c)
        k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, D), k, v, attn_mask=mask)
        x = x + w.out(y.reshape(B, c.d_model))  # not addmm: under autocast it would make x bf16
        gate, up = w.gate_up(rms_norm(x, w.mlp_norm, c.norm_eps)).chunk(2, dim=-1)
        x = x + w.down(F.silu(gate).mul_(up))
    cache.length += 1
    return weights.head(rms_norm(x, weights.norm, c.norm_eps))


class DecodeStep:
    """One generation's decoding step: `step(tokens, cache)` -> next-token logits (B, vocab) after one new
    token per row. Made when a generation starts, with the model's weights of that moment laid out for
    `decode_step` when the model `reads_as_stock` (packed where `packs_matrices`; `packed` overrides that,
    for tests of both layouts), else running `forward`; dropped when it ends."""

    def __init__(self, model: GPT, packed: bool | None = None):
        if model.training:
            raise ValueError("decode with the model in eval mode (model.eval())")
        if model.config.head != "lm":
            raise ValueError(f"only a language model decodes; this one has the {model.config.head!r} head")
        self.model = model
        weight = model.embed_tokens.weight
        if packed is None:
            packed = packs_matrices(weight.device, weight.dtype)
        elif packed and not packs_matrices(weight.device, weight.dtype):
            raise ValueError(f"weights of {weight.dtype} on {weight.device} do not pack for oneDNN here")
        self.weights = DecodeWeights(model, packed) if reads_as_stock(model) else None

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.weights is None:
            return self.model(tokens[:, None], cache, last_only=True)[:, -1]
        return decode_step(self.model, tokens, cache, self.weights)
