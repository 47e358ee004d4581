"""`chatforge export CKPT OUT --format hf`: a checkpoint as the folder the rest of the ecosystem loads.

`hf` writes a Hugging Face model folder: `config.json` (`LlamaForCausalLM`, or
`LlamaForSequenceClassification` with one label for a reward model), `model.safetensors`, `tokenizer.json`
(which adds <|bos|> before a text, as chatforge does), `tokenizer_config.json` with the chat template, and
`generation_config.json` (where generation stops). `AutoModelForCausalLM`, `AutoTokenizer` and vLLM load it
offline. A reward model's scores in other tools are before its `score_offset` (kept in config.json under
"chatforge"), since `LlamaForSequenceClassification`'s score head has no bias to hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chatforge.checkpoint import CONFIG_FILE, load_model, save_checkpoint
from chatforge.config import DEVICE_HELP
from chatforge.errors import UserError

FORMATS = ("hf",)


@dataclass
class ExportConfig:
    checkpoint: str = field(default="", metadata={"help": "checkpoint folder, or run folder (its latest checkpoint)",
                                                  "positional": True})
    out: str = field(default="", metadata={"help": "folder to write (an earlier export there is replaced whole)",
                                           "positional": True})
    format: str = field(default="hf", metadata={"help": f"what to write: {', '.join(FORMATS)}"})
    device: str = field(default="cpu", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")


def export(config: ExportConfig) -> Path:
    """`chatforge export`: the checkpoint written in `format` to `out`; the folder."""
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise UserError(f"{out}: a folder with other files in it; export into a new or empty folder")
    model, tokenizer, path = load_model(config.checkpoint, config.device)
    save_checkpoint(out, model, tokenizer, extra={"exported_from": str(path)})
    kind = "LlamaForCausalLM" if model.config.head == "lm" else "LlamaForSequenceClassification"
    print(f"{path} -> {out} (a Hugging Face {kind} folder)")
    return out
