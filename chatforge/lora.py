"""LoRA (Hu et al. 2021) through peft: each chosen projection computes W x + (α/r)·B A x, with W frozen and
only A (r x in) and B (out x r, starting at 0) trained. peft's own `LoraConfig` and `inject_adapter_in_model`
put the adapters in place, so the model stays a `GPT`: its forward pass calls the wrapped projections (see
`model.fused_linear`), and the engine decodes through that forward pass for a wrapped model (see
`engine.decode`), so every path computes with the adapted weights.

A LoRA run's checkpoints hold what it trained (the adapters, and a new head) and a pointer to its base
checkpoint with the SHA-256 of the base's weights; `checkpoint.load_model` puts them back together.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatforge.errors import UserError
from chatforge.model import GPT

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAOptions:
    """The LoRA fields of a fine-tuning stage's config."""

    lora_r: int = field(default=0, metadata={"help": "rank of the LoRA adapters (0: full fine-tuning)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA's α: the adapters' output is scaled by α / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    lora_targets: list[str] = field(default_factory=lambda: list(PROJECTIONS), metadata={
        "help": f"projections that get adapters ({', '.join(PROJECTIONS)})"})

    def check_lora(self) -> None:
        if self.lora_r < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_r must be >= 0 and lora_dropout in [0, 1)")
        unknown = sorted(set(self.lora_targets) - set(PROJECTIONS))
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets must be some of {', '.join(PROJECTIONS)}, got {self.lora_targets}")


def _peft():
    """peft, which LoRA needs and nothing else does (`pip install chatforge[lora]`)."""
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'chatforge[lora]' (or peft)") from None
    return peft, LoraLayer


def has_adapters(model: torch.nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None  # what peft's inject_adapter_in_model sets


def add_adapters(model: GPT, r: int, alpha: float, dropout: float, targets: list[str], base: Path) -> GPT:
    """`model` with fresh adapters on `targets`, everything else frozen except a classifier or scalar head
    (a new head is trained whole); `base` is the checkpoint the frozen weights come from."""
    peft, _ = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             base_model_name_or_path=str(Path(base).resolve()))  # wherever the run is read from
    model = peft.inject_adapter_in_model(config, model)
    if model.config.head != "lm":
        model.score.requires_grad_(True)
    return model


def adapter_settings(model: GPT) -> dict:
    config = model.peft_config["default"]
    return {"base": config.base_model_name_or_path, "r": config.r, "alpha": config.lora_alpha,
            "dropout": config.lora_dropout, "targets": sorted(config.target_modules)}


def trained_state(model: GPT) -> dict[str, torch.Tensor]:
    """What a LoRA run changes: the adapters, and a head it trains."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in trained or "lora_" in name}


def merge_adapters(model: GPT) -> GPT:
    """The adapters added into the weights they adapt (peft's `merge`), and each wrapped projection replaced by
    its plain layer again: a full model, with every parameter trainable as a plain model's."""
    _, LoraLayer = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config
    return model.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: GPT) -> Iterator[GPT]:
    """The base model: the adapters switched off for the duration."""
    _, LoraLayer = _peft()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def weights_sha256(file: Path) -> str:
    """The SHA-256 of a weights file, read once per version of the file: a LoRA run writes it into every
    checkpoint, and reading a 540 MB base at each save would cost more than the save."""
    stat = Path(file).stat()
    return _sha256(str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, modified_ns: int) -> str:  # size and time: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_base(expected: str, actual: str, base: Path) -> None:
    if expected != actual:
        raise UserError(f"{base}: its weights changed since the adapter was trained on them (SHA-256 {actual[:12]}, "
                        f"the adapter's base had {expected[:12]})")


class WithoutAdapters(torch.nn.Module):
    """A model with its adapters switched off, as a module of its own that shares the model's weights: PPO's
    reference policy under LoRA, one copy of the weights in memory instead of two."""

    def __init__(self, model: GPT):
        super().__init__()
        self._model = (model,)  # a tuple, not a submodule: the parameters stay the policy's alone

    @property
    def config(self):
        return self._model[0].config

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._model[0]) as base:
            return base(*args, **kwargs)
