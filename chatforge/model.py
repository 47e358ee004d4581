"""The GPT: a decoder-only transformer in the Llama style.

Token embedding -> N x [RMSNorm -> attention (rotary positions, grouped-query) -> residual,
RMSNorm -> SwiGLU feed-forward -> residual] -> RMSNorm -> head.

The head is either the language-model head (logits over the vocabulary, next-token prediction) or a
scalar head (one number per position) that the reward and value models read.

Module names follow Hugging Face's `LlamaForCausalLM` (`layers.0.self_attn.q_proj` ...), so that
converting a checkpoint either way is a plain name mapping: see `hf_state_dict` / `from_hf_state_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatforge.linear import Linear, linear
from chatforge.objectives import linear_cross_entropy

if TYPE_CHECKING:
    from chatforge.engine import KVCache


@dataclass
class GPTConfig:
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size (taken from the tokenizer when training)"})
    n_layer: int = field(default=6, metadata={"help": "number of transformer blocks"})
    d_model: int = field(default=256, metadata={"help": "width of the residual stream"})
    n_head: int = field(default=8, metadata={"help": "number of attention (query) heads"})
    n_kv_head: int = field(default=0, metadata={"help": "key/value heads for grouped-query attention (0: same as n_head)"})
    ffn_hidden: int = field(default=0, metadata={"help": "SwiGLU hidden width (0: 8/3 * d_model rounded up to a multiple of 64)"})
    max_seq_len: int = field(default=256, metadata={"help": "longest sequence the model is trained and sampled on"})
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the rotary position frequencies"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of RMSNorm"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share the token embedding with the output head"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on the query, key and value projections (Qwen2's)"})
    dropout: float = field(default=0.0, metadata={"help": "residual dropout probability during training"})
    head: str = field(default="lm", metadata={
        "help": "output head: 'lm' (next-token logits), 'scalar' (one value per position: reward and value "
                "models) or 'classifier' (num_labels logits per position)"})
    num_labels: int = field(default=1, metadata={"help": "outputs of the classifier head"})
    labels: list[str] = field(default_factory=list, metadata={"help": "class names of the classifier head's outputs"})
    score_offset: float = field(default=0.0, metadata={
        "help": "subtracted from the scalar head's output (a reward model's mean score on its training answers, so they average 0)"})

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.n_kv_head < 0 or self.ffn_hidden < 0:
            raise ValueError("n_kv_head and ffn_hidden must be >= 0 (0 picks the default)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head size d_model/n_head ({self.d_model // self.n_head}) must be even for rotary encoding")
        if self.head not in ("lm", "scalar", "classifier"):
            raise ValueError(f"head must be 'lm', 'scalar' or 'classifier', got {self.head!r}")
        if self.num_labels < 1 or (self.head == "scalar" and self.num_labels != 1):
            raise ValueError(f"num_labels must be >= 1 (and 1 for the scalar head), got {self.num_labels}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"{len(self.labels)} label names for {self.num_labels} outputs")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in fp32 for stability under bf16."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # the usual case: one call
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of position x frequency for every position of the context, (max_seq_len,
    head_dim), in the 'rotate half' layout of HF Llama: pair i is (x_i, x_{i+d/2}). The sin of the first
    half is negated, which is the minus sign of the rotation, so `apply_rotary` needs no negation."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    angles = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its position's angle: x·cos + swap_halves(x)·signed_sin.
    x: (B, H, T, D). The minus sign is in the table, so there is no negation to run (this runs in every
    layer of every decoding step). HF Llama's rotate_half to float rounding: the swap is a roll by half,
    and the product added inside addcmul, one operation fewer than cat and add in every decoding step."""
    rotated = torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
    return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)


def rotary_positions(start: int, new_tokens: int, pad: torch.Tensor | None, device) -> torch.Tensor:
    """Rotary positions of slots [start, start + new_tokens): (T,), or (B, T) counted from each row's first
    real token when rows are left-padded (`pad[i]` padding slots), so a row computes what it would alone."""
    slots = torch.arange(start, start + new_tokens, device=device)
    return slots if pad is None else (slots - pad[:, None]).clamp(min=0)


def attention_mask(start: int, new_tokens: int, pad: torch.Tensor | None, device) -> torch.Tensor | None:
    """Which slots [0, start + new_tokens) each new token may attend to: the causal ones, never a row's
    left padding. None where plain causal attention is right (no padding, and a whole sequence or one
    new token)."""
    if pad is None and (start == 0 or new_tokens == 1):
        return None
    end = start + new_tokens
    key = torch.arange(end, device=device)
    if new_tokens == 1:  # every decoding step: the rule below, with the one query at the last slot
        return (key >= pad.clamp(max=start)[:, None])[:, None, None]
    query = torch.arange(start, end, device=device)[:, None]
    allowed = key <= query
    if pad is not None:  # padding slots attend to themselves only, so no row is empty (no NaN)
        allowed = allowed[None] & ((key >= pad[:, None, None]) | (key == query))
        return allowed[:, None]  # (B, 1, T, end): broadcast over heads
    return allowed


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes exactly `x @ weight.T`: a bias-free `Linear` itself (not a subclass or a
    wrapper such as a LoRA layer) with no forward hook, so that its weight may be read instead of calling it."""
    return type(module) is Linear and module.bias is None and not (module._forward_hooks or module._forward_pre_hooks)


def fused_linear(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor:
    """Projections of the same input (q/k/v, gate/up), as one matmul when they are plain linear layers.
    The parameters stay separate, so that their names map one to one onto Hugging Face Llama's; gradients
    flow back through the concatenation. Layers that compute something else (wrapped or hooked, as LoRA
    does) are called one by one, so that the model computes what its modules do."""
    if all(is_plain_linear(module) for module in linears):
        return linear(x, torch.cat([module.weight for module in linears]))
    return torch.cat([module(x) for module in linears], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = Linear(config.d_model, config.d_model, bias=config.qkv_bias)
        self.k_proj = Linear(config.d_model, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.d_model, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cos, sin, cache, mask: torch.Tensor | None):
        B, T, _ = x.shape
        c = self.config
        qkv = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = split_heads(qkv.view(B, T, c.n_head + 2 * c.n_kv_head, c.head_dim).transpose(1, 2), cos, sin, c)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # no mask: a whole sequence (causal) or one new token, which sees every slot (is_causal would
        # align its one query with the first key)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=c.n_kv_head != c.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.d_model))


def split_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: GPTConfig):
    """(B, q + 2 kv heads, T, head_dim) projections -> rotated queries, rotated keys, values."""
    queries_keys = config.n_head + config.n_kv_head
    qk = apply_rotary(qkv.narrow(1, 0, queries_keys), cos, sin)  # queries and keys rotated together
    q, k, v = qk.narrow(1, 0, config.n_head), qk.narrow(1, config.n_head, config.n_kv_head), qkv.narrow(1, queries_keys, config.n_kv_head)
    if torch.compiler.is_compiling():
        # Compiled, q and k get buffers of their own, laid out unlike these views; attention saves them for
        # the backward pass, which torch then compiles for their strides at the first length it sees
        # (concrete, not symbolic: "expected size 8==8, stride 1600==1728" at the next length). Contiguous
        # here, the layout the compiler gives them anyway, their strides stay symbolic.
        q, k = q.contiguous(), k.contiguous()
    return q, k, v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x):
        gate, up = fused_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self._dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def _dropout(self, x):
        return self.dropout(x) if self.training and self.dropout.p > 0 else x  # no call at all when off


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if config.head == "lm":
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        else:
            self.score = Linear(config.d_model, config.num_labels, bias=False)
        cos, sin = rotary_tables(config)  # computed once; looked up by position in every forward pass
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # recompute each block's activations in the backward pass instead of keeping them (a training
        # setting, like dropout, not part of the model): less memory for about a third more compute
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02), output projections of the residual branches scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                last_only: bool = False, pad: torch.Tensor | None = None, head_from: int = 0,
                positions: torch.Tensor | None = None, attend: torch.Tensor | None = None):
        """idx: (B, T) token ids -> logits (B, T, vocab) for the lm head, values (B, T) for the scalar head,
        or (B, T, num_labels) logits for the classifier head.

        With a cache (`chatforge.engine.KVCache`: the model calls its `update(layer, keys, values)`, reads its
        `pad` and reads and advances its `length`), `idx` holds only the new tokens; their positions continue
        after the cached ones.
        Without one, `pad` (B,) marks rows left-padded by that many tokens: they are neither attended to nor
        counted in positions, so every row computes exactly what it would alone.
        With `targets` (B, T) the lm head returns the mean next-token loss instead of the logits, computed
        chunk by chunk so the full logits never exist (see `losses.linear_cross_entropy`).
        With `last_only`, only the last position goes through the head (prefilling a prompt for generation);
        with `head_from`, only the positions from there on (the answers of a PPO batch, not their prompts).
        Rows that pack several sequences (`packing.pack_shared_prefix`: one prompt, then each of its answers)
        give each token's rotary `positions` (B, T) and the boolean `attend` (B, 1, T, T) of the keys each
        query sees, instead of `pad`.
        """
        T = idx.shape[1]
        if cache is not None:
            if pad is not None:
                raise ValueError("a cache holds its rows' padding: pass it to new_cache(model, ..., pad=...)")
            start, pad = cache.length, cache.pad
        else:
            start, pad = 0, pad.to(idx.device) if pad is not None and bool(pad.any()) else None
        if positions is not None:
            if cache is not None or pad is not None or attend is None:
                raise ValueError("packed rows take positions and attend together, without a cache or padding")
            cos, sin, mask = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None], attend
        else:
            cos, sin = self.rotary(start, T, pad)
            mask = attention_mask(start, T, pad, idx.device)
        x = self.embed_tokens(idx)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.layers:
            if recompute:  # the same dropout masks in the recomputation (checkpoint restores the RNG state)
                x = checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        x = self.norm(x[:, -1:] if last_only else x[:, head_from:])
        if self.config.head == "lm" and targets is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if self.config.head == "lm":
            return self.lm_head(x)
        if self.config.head == "classifier":
            return self.score(x)
        return self.score(x).squeeze(-1).float() - self.config.score_offset  # fp32: the offset is not lost in bf16

    def rotary(self, start: int, new_tokens: int, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for slots [start, start + new_tokens), shaped to broadcast over (B, H, T, D)."""
        if pad is None:  # every row at the same positions: a slice of the tables, no lookup
            return self.rope_cos[start : start + new_tokens], self.rope_sin[start : start + new_tokens]
        positions = rotary_positions(start, new_tokens, pad, self.rope_cos.device)  # (B, T): each row its own
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def set_dropout(self, p: float) -> None:
        """Change the residual dropout (e.g. for fine-tuning a model pretrained without it)."""
        self.config = dataclasses.replace(self.config, dropout=p)  # validates p
        for block in self.layers:  # the residual dropouts only: an adapter's own dropout is its own setting
            block.dropout.p = p

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (shared tensors counted once); without the token embedding if embedding=False."""
        total = sum(p.numel() for p in self.parameters())
        if not embedding:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores.

        6·N for the weights (2 forward, 4 backward) where N excludes the embedding lookup but includes
        the output head, plus 12·L·d·T for QK^T and attention·V (PaLM appendix B, as in nanoGPT).
        """
        c = self.config
        seq_len = seq_len or c.max_seq_len
        n = self.num_params(embedding=False)
        if c.tie_embeddings and c.head == "lm":
            n += self.lm_head.weight.numel()  # the tied head is still a matmul
        return 6 * n + 12 * c.n_layer * c.d_model * seq_len


def with_head(model: GPT, head: str, labels: list[str] | None = None) -> GPT:
    """A new model with `model`'s body (embedding, blocks, final norm) and a fresh `head`. A new score head
    starts at zero: every input scores the same, so a reward model starts at exactly log 2 per pair and
    the body's features are not disturbed by a random head's first gradients."""
    config = dataclasses.replace(model.config, head=head, num_labels=len(labels) if labels else 1,
                                 labels=list(labels or []), score_offset=0.0)
    new = GPT(config).to(model.embed_tokens.weight.device)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(("lm_head.", "score."))}
    missing, _ = new.load_state_dict(body, strict=False)
    assert set(missing) <= {"lm_head.weight", "score.weight"}, missing
    if head != "lm":
        nn.init.zeros_(new.score.weight)
    return new


# --- Hugging Face Llama name mapping -------------------------------------------------------------

def hf_name(name: str) -> str:
    """chatforge parameter name -> `LlamaForCausalLM` / `LlamaForSequenceClassification` name."""
    return name if name.startswith(("lm_head.", "score.")) else "model." + name


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face Llama names (load with `LlamaForCausalLM.load_state_dict`)."""
    return {hf_name(k): v for k, v in model.state_dict().items()}


def hf_model_type(config: GPTConfig) -> str:
    """The Hugging Face family of the network: Qwen2 is Llama with biases on q, k and v."""
    return "qwen2" if config.qkv_bias else "llama"


def hf_llama_config(config: GPTConfig) -> dict:
    """The fields of a `transformers.LlamaConfig` (or `Qwen2Config`, see `hf_model_type`) describing the
    same network."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        **({"use_sliding_window": False} if config.qkv_bias else {}),
    )


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names -> chatforge names."""
    return {k.removeprefix("model."): v for k, v in state.items()}
