"""A Hugging Face model folder as a chatforge model: config.json mapped onto `GPTConfig` (or a one-line error
naming the field chatforge cannot represent), the safetensors weights (one file or shards), and the model's own
tokenizer and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from chatforge.chat_format import end_of_turn_token
from chatforge.errors import UserError
from chatforge.model import GPT, GPTConfig, from_hf_state_dict
from chatforge.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer

FAMILIES = ("llama", "mistral", "qwen2")  # Llama's network; Qwen2 adds biases to q, k and v


def read_config(folder: Path) -> GPTConfig:
    """`GPTConfig` of a Llama, Mistral or Qwen2 config.json; anything it cannot represent is an error naming
    the field, never a silently different model."""
    file = folder / "config.json"
    try:
        hf = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: cannot read the model's config ({e})") from None
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{file}: model_type {family!r} is not one chatforge can represent ({', '.join(FAMILIES)})")

    def refuse(field: str, why: str) -> None:
        raise UserError(f"{file}: {field} = {hf[field]!r}: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "chatforge's feed-forward is SwiGLU (silu)")
    # transformers 5 writes rope_parameters (theta and type); older folders rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or {}
    for field in ("rope_scaling", "rope_parameters"):
        kind = (hf.get(field) or {}).get("rope_type", (hf.get(field) or {}).get("type", "default"))
        if kind != "default":
            refuse(field, f"rotary scaling ({kind}) is not implemented; the model would compute other positions")
    if hf.get("attention_bias") and family != "qwen2":
        refuse("attention_bias", "biases on every attention projection are not implemented (Qwen2's q/k/v biases are)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "feed-forward biases are not implemented")
    if family == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        refuse("sliding_window", "sliding-window attention is not implemented")
    if family == "qwen2" and hf.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not implemented")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in hf]
    if missing:
        raise UserError(f"{file}: missing {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        refuse("head_dim", f"chatforge's heads are hidden_size / num_attention_heads = {hf['hidden_size'] // heads} wide")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2")
    except ValueError as e:
        raise UserError(f"{file}: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (sharded or not), in float32, under Hugging Face names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (chatforge reads safetensors, not pickled .bin files)")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: truncated or corrupt weights ({e})") from None
    return {name: tensor.float() for name, tensor in weights.items()}


def load_weights(model: GPT, weights: dict[str, torch.Tensor], source: Path) -> GPT:
    """`model` with `weights` (Hugging Face names) in it: a missing tensor, an unknown one or a shape that does
    not fit is an error naming it."""
    expected = model.state_dict()
    given = from_hf_state_dict(weights)
    given = {k: v for k, v in given.items() if not k.endswith("rotary_emb.inv_freq")}  # derived, not learned
    if model.config.tie_embeddings:
        given.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unknown:
        what = f"missing tensor {missing[0]}" if missing else f"unknown tensor {unknown[0]}"
        raise UserError(f"{source}: {what} ({len(missing)} missing, {len(unknown)} unknown)")
    for name, tensor in given.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(expected[name].shape)}")
    model.load_state_dict(given, strict=False)
    return model


def read_tokenizer(folder: Path) -> Tokenizer:
    """The model's own tokenizer (tokenizer.json and tokenizer_config.json, with its chat template)."""
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (chatforge reads the fast tokenizer's files)")
    tokenizer = Tokenizer.load(folder)
    if tokenizer.native:
        return tokenizer
    template = tokenizer.config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # where transformers 5 writes it
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    tokenizer = Tokenizer(tokenizer.hf, {**tokenizer.config, "chat_template": template})
    if not template:
        return tokenizer
    end = end_of_turn_token(tokenizer)
    return Tokenizer(tokenizer.hf, {**tokenizer.config, "end_of_turn_token": end}) if end else tokenizer


def read_hf_folder(folder: Path) -> tuple[GPT, Tokenizer]:
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    return load_weights(GPT(config), read_weights(folder), folder), tokenizer
