"""GGUF files (llama.cpp's format, which Ollama runs too), read and written with the `gguf` package.

Reading a Llama-family model: the metadata mapped onto `GPTConfig`, every tensor dequantised to float32 with
llama.cpp's rotary row order of Q and K undone, and the BPE tokenizer and chat template rebuilt from the
metadata. Writing (`write_gguf`): the same layout the other way, in f32, f16 or q8_0. No training framework
writes GGUF itself; llama.cpp's converter is a script in its repository, which is why this is here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from chatforge.chat_format import end_of_turn_token
from chatforge.errors import UserError
from chatforge.interop.hf import load_weights
from chatforge.model import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

# llama.cpp's tensor names -> Hugging Face Llama's, per layer and for the rest
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_NAMES = {**{hf: gguf for gguf, hf in LAYER_TENSORS.items()},
              **{hf.removeprefix("model."): gguf for gguf, hf in MODEL_TENSORS.items()}}  # chatforge's -> llama.cpp's
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special tokens


def _field(reader, key: str, default=None, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise UserError(f"{reader.path}: no {key!r} in the GGUF metadata")
        return default
    return field.contents()


def read_config(reader) -> GPTConfig:
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise UserError(f"{reader.path}: general.architecture = {architecture!r}: chatforge reads Llama-family GGUF "
                        "files ('llama')")
    if _field(reader, "llama.rope.scaling.type", required=False) not in (None, "none"):
        raise UserError(f"{reader.path}: llama.rope.scaling.type = {_field(reader, 'llama.rope.scaling.type')!r}: "
                        "rotary scaling is not implemented")
    heads, width = _field(reader, "llama.attention.head_count"), _field(reader, "llama.embedding_length")
    rotary = _field(reader, "llama.rope.dimension_count", width // heads, required=False)
    if rotary != width // heads:
        raise UserError(f"{reader.path}: llama.rope.dimension_count = {rotary}: chatforge rotates whole heads "
                        f"({width // heads} wide)")
    tensors = {t.name for t in reader.tensors}
    return GPTConfig(
        vocab_size=_field(reader, "llama.vocab_size", len(_field(reader, "tokenizer.ggml.tokens")), required=False),
        n_layer=_field(reader, "llama.block_count"), d_model=width, n_head=heads,
        n_kv_head=_field(reader, "llama.attention.head_count_kv", heads, required=False),
        ffn_hidden=_field(reader, "llama.feed_forward_length"), max_seq_len=_field(reader, "llama.context_length"),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors)


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a Q or K projection's rows: its converter interleaves the two halves of
    each head ("rotate half", Hugging Face's layout) into pairs (the original Llama's layout)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_weights(reader, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32, under Hugging Face Llama names, Q and K in Hugging Face's row order."""
    weights = {}
    for tensor in reader.tensors:
        base, suffix = tensor.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, layer, kind = base.split(".", 2)
            if kind not in LAYER_TENSORS:
                raise UserError(f"{reader.path}: unknown tensor {tensor.name}")
            name = f"model.layers.{layer}.{LAYER_TENSORS[kind]}.{suffix}"
        elif base in MODEL_TENSORS:
            name = f"{MODEL_TENSORS[base]}.{suffix}"
        else:
            raise UserError(f"{reader.path}: unknown tensor {tensor.name}")
        try:
            array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        except (NotImplementedError, ValueError) as e:
            raise UserError(f"{reader.path}: cannot dequantise {tensor.name} ({tensor.tensor_type.name}: {e})") from None
        if base.endswith("attn_q"):
            array = unpermute_rotary_rows(array, config.n_head)
        elif base.endswith("attn_k"):
            array = unpermute_rotary_rows(array, config.n_kv_head)
        weights[name] = torch.from_numpy(np.ascontiguousarray(array))
    return weights


def read_tokenizer(reader) -> Tokenizer:
    """The byte-level BPE of a 'gpt2'-model GGUF (tokens, merges, token types, special ids, chat template) as a
    `tokenizers` tokenizer, splitting text the way llama.cpp's pre-tokenizer named in the file does."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{reader.path}: tokenizer.ggml.model = {kind!r}: chatforge reads byte-level BPE ('gpt2') tokenizers")
    splitting = _field(reader, "tokenizer.ggml.pre", "default", required=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = {"default": byte_level, "gpt2": byte_level,  # llama.cpp's "smollm" splits digits one by one first
           "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])}
    if splitting not in pre:
        raise UserError(f"{reader.path}: tokenizer.ggml.pre = {splitting!r}: this pre-tokenizer is not implemented "
                        f"({', '.join(pre)} are)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer, hf.decoder = pre[splitting], decoders.ByteLevel()
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])

    def token(key: str) -> str | None:
        index = _field(reader, key, required=False)
        return None if index is None else tokens[index]

    bos = token("tokenizer.ggml.bos_token_id")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", False, required=False):
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tokens.index(bos))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": token("tokenizer.ggml.eos_token_id"), "unk_token": token("tokenizer.ggml.unknown_token_id"),
              "pad_token": token("tokenizer.ggml.padding_token_id"), "clean_up_tokenization_spaces": False,
              "chat_template": _field(reader, "tokenizer.chat_template", required=False),
              "model_max_length": _field(reader, "llama.context_length")}
    tokenizer = Tokenizer(hf, config)
    end = end_of_turn_token(tokenizer) if config["chat_template"] else None
    return Tokenizer(hf, {**config, "end_of_turn_token": end}) if end else tokenizer


def read_gguf(path: Path) -> tuple[GPT, Tokenizer]:
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # a truncated file fails while its tensors are mapped
        raise UserError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {e})") from None
    config = read_config(reader)
    return load_weights(GPT(config), read_weights(reader, config), path), read_tokenizer(reader)


# --- writing -------------------------------------------------------------------------------------------

GGUF_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a Q or K projection (the inverse of `unpermute_rotary_rows`)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for how the tokenizer splits text before merging (the inverse of `read_tokenizer`)."""
    pre = json.loads(tokenizer.hf.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [(step.get("type"), step.get("individual_digits", step.get("use_regex"))) for step in steps]
    names = {(("ByteLevel", True),): "gpt2", (("Digits", True), ("ByteLevel", True)): "smollm"}
    if tuple(kinds) not in names:
        raise UserError(f"this tokenizer splits text in a way llama.cpp has no name for ({[k for k, _ in kinds]})")
    return names[tuple(kinds)]


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path, precision: str = "f16", name: str = "chatforge") -> Path:
    """`model` as a Llama-architecture GGUF that llama.cpp and Ollama run: its tensors in `precision` (f32, f16
    or q8_0; norms stay f32, as llama.cpp keeps them), Q and K rows in llama.cpp's order, and the tokenizer
    (BPE tokens, merges, token types, special ids) and chat template in the metadata."""
    c = model.config
    if c.head != "lm" or c.qkv_bias:
        raise UserError("GGUF export writes Llama language models (no reward or classifier head, no q/k/v biases)")
    state = json.loads(tokenizer.hf.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    tokens = [token for token, _ in sorted(tokenizer.hf.get_vocab(with_added_tokens=True).items(), key=lambda t: t[1])]
    special = set(tokenizer.special.values())
    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[precision])
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(tokenizer.encode_document("a")[:1] == [tokenizer.bos_id])
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.end_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.native or tokenizer.config.get("chat_template"):  # a base model may have none
        writer.add_chat_template(tokenizer.chat_template)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        module, suffix = key.rsplit(".", 1)
        if module.startswith("layers."):
            _, layer, module = module.split(".", 2)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"
        else:
            gguf_name = f"{GGUF_NAMES[module]}.{suffix}"
        array = tensor.detach().float().cpu().numpy()
        if ".attn_q." in gguf_name:
            array = permute_rotary_rows(array, c.n_head)
        elif ".attn_k." in gguf_name:
            array = permute_rotary_rows(array, c.n_kv_head)
        kind = GGMLQuantizationType.F32 if array.ndim == 1 else GGUF_TYPES[precision]
        if kind == GGMLQuantizationType.Q8_0:
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
