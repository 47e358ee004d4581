"""The one checkpoint format of every stage: a folder that is also a Hugging Face Llama model folder.

    step_000500/
      model.safetensors       weights under Hugging Face Llama names (model.layers.0.self_attn.q_proj.weight ...)
      config.json             a LlamaConfig, plus chatforge's own GPTConfig under "chatforge"
      tokenizer.json          the BPE tokenizer, and tokenizer_config.json for AutoTokenizer
      generation_config.json  where generation stops, for transformers (language models)
      trainer_state.pt        optimizer, LR schedule, RNG states, data position, step (training only)
      optimizer/              instead of the optimizer in trainer_state.pt, with --fsdp: its state sharded, one
                              file per process (torch.distributed.checkpoint), loadable on any number of them

So `LlamaForCausalLM.from_pretrained(step_000500)` loads it with no conversion. A checkpoint is written
under a temporary name and swapped in when complete (`files.atomic_dir`): a crash, even while re-saving a
step, leaves either the old folder or the new one, and the readers here find whichever it is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chatforge import __version__
from chatforge.config import from_dict
from chatforge.errors import UserError
from chatforge.files import atomic_dir, current_dir, recover_dir
from chatforge.lora import add_adapters, adapter_settings, check_base, has_adapters, trained_state, weights_sha256
from chatforge.model import GPT, GPTConfig, from_hf_state_dict, hf_llama_config, hf_model_type, hf_state_dict, with_head
from chatforge.tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"  # with --fsdp: the optimizer state, sharded (torch.distributed.checkpoint)
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpoint: its adapters (and a head it trained), not its base
REQUIRED_FILES = (CONFIG_FILE, TOKENIZER_FILE)
CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
SET_ASIDE_STEP = re.compile(r"^\.(step_\d+)\.old-\d+$")  # a step folder that a killed re-save set aside


def model_config_json(config: GPTConfig, tokenizer: Tokenizer, extra: dict | None = None) -> dict:
    family = hf_model_type(config)
    architecture = {"llama": "Llama", "qwen2": "Qwen2"}[family] + (
        "ForCausalLM" if config.head == "lm" else "ForSequenceClassification")
    hf = {"architectures": [architecture], "model_type": family, "torch_dtype": "float32", **hf_llama_config(config),
          "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if config.head != "lm":
        hf["num_labels"] = config.num_labels
    if config.labels:
        hf["id2label"] = dict(enumerate(config.labels))
        hf["label2id"] = {name: i for i, name in enumerate(config.labels)}
    return {**hf, "chatforge": {"version": __version__, "model": dataclasses.asdict(config), **(extra or {})}}


def generation_config(tokenizer: Tokenizer) -> dict:
    """transformers' generation_config.json: generation stops where chatforge's does, at the end of a turn
    (<|end|>), of a text (<|eos|>), or at the <|bos|> that starts the next document in pretraining data."""
    stops = list(dict.fromkeys((tokenizer.end_id, *tokenizer.document_stops)))  # no BOS: no None
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": tokenizer.pad_id}


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    trainer_state: dict | None = None,
    extra: dict | None = None,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically: a crash leaves the old version or the new one. A model
    with LoRA adapters is written as what it trained and a pointer to its base (`lora`). `folders` (name ->
    a folder already written, e.g. by every process through torch.distributed.checkpoint) are moved in."""
    directory = Path(directory)
    if has_adapters(model):
        adapter = adapter_settings(model)
        adapter["base_sha256"] = weights_sha256(resolve_checkpoint(adapter["base"]) / WEIGHTS_FILE)
        weights, file, extra = trained_state(model), ADAPTER_FILE, {**(extra or {}), "adapter": adapter}
    else:
        weights, file = hf_state_dict(model), WEIGHTS_FILE
        if model.config.tie_embeddings and model.config.head == "lm":
            weights.pop("lm_head.weight")  # stored once, as Hugging Face does for tied embeddings
    with atomic_dir(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / file,
                  metadata={"format": "pt", "producer": f"chatforge {__version__}"})
        (tmp / CONFIG_FILE).write_text(json.dumps(model_config_json(model.config, tokenizer, extra), indent=2) + "\n")
        tokenizer.save(tmp)
        if model.config.head == "lm":
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        for name, folder in (folders or {}).items():
            shutil.move(folder, tmp / name)
    return directory


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    # a step whose folder is missing because a re-save was killed mid-swap is read from its set-aside copy
    listing = [p.name for p in root.iterdir()]
    names = {n for n in listing if STEP_DIR.match(n)} | {m.group(1) for n in listing if (m := SET_ASIDE_STEP.match(n))}
    found = [(int(STEP_DIR.match(name).group(1)), current_dir(root / name)) for name in names]
    return sorted((step, path) for step, path in found if path.is_dir())


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}"


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all), and clear what crashed writers left behind."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for name in {m.group(1) for p in root.iterdir() if (m := SET_ASIDE_STEP.match(p.name))}:
        recover_dir(root / name)  # a set-aside copy goes back under its name before the leftovers go
    stale = [p for p in root.glob(".step_*") if ".tmp-" in p.name or ".old-" in p.name]
    old = [path for _, path in step_checkpoints(run_dir)[:-keep]] if keep > 0 else []
    for path in stale + old:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (then its latest checkpoint); checked for completeness."""
    path = current_dir(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint or run folder does not exist")
    found = step_checkpoints(path)
    if found:
        path = found[-1][1]
    elif not any((path / f).exists() for f in (*REQUIRED_FILES, WEIGHTS_FILE, ADAPTER_FILE)):
        raise UserError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints")
    weights = [f for f in (WEIGHTS_FILE, ADAPTER_FILE) if (path / f).is_file()]
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()] + ([] if weights else [WEIGHTS_FILE])
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return path


def read_model_config(path: Path) -> GPTConfig:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        return from_dict(GPTConfig, meta["chatforge"]["model"], str(path / CONFIG_FILE))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / CONFIG_FILE}: not a chatforge model config ({e.__class__.__name__}: {e})") from None


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, Path]:
    """The model and tokenizer of a checkpoint (or of a run folder's latest checkpoint); a LoRA run's checkpoint
    is its base with the adapters (and head) it trained on top."""
    path = resolve_checkpoint(path)
    config = read_model_config(path)
    if (path / ADAPTER_FILE).is_file():
        return _load_adapted(path, config, device)
    try:
        weights = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS_FILE}: truncated or corrupt weights ({e})") from None
    model = GPT(config)
    try:
        missing, unexpected = model.load_state_dict(from_hf_state_dict(weights), strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{path / WEIGHTS_FILE}: weights do not match config.json ({first})") from None
    if config.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS_FILE}: weights do not match config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), Tokenizer.load(path), path


def _load_adapted(path: Path, config: GPTConfig, device) -> tuple[GPT, Tokenizer, Path]:
    adapter = json.loads((path / CONFIG_FILE).read_text())["chatforge"]["adapter"]
    base, _, base_path = load_model(adapter["base"], device)
    check_base(adapter["base_sha256"], weights_sha256(base_path / WEIGHTS_FILE), base_path)
    if config.head != "lm" and (config.head, config.labels, config.num_labels) != (
            base.config.head, base.config.labels, base.config.num_labels):
        base = with_head(base, config.head, config.labels)  # the adapter's file holds the trained head
    base.config = config  # the trained head's score offset, dropout and the rest
    model = add_adapters(base, adapter["r"], adapter["alpha"], adapter["dropout"], adapter["targets"], adapter["base"])
    try:
        weights = load_file(path / ADAPTER_FILE)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / ADAPTER_FILE}: truncated or corrupt adapter ({e})") from None
    unknown = sorted(set(weights) - set(model.state_dict()))
    if unknown:
        raise UserError(f"{path / ADAPTER_FILE}: tensors the adapted model does not have ({unknown[:3]})")
    model.load_state_dict(weights, strict=False)
    return model.to(device), Tokenizer.load(path), path


def load_trainer_state(path: Path) -> dict:
    file = path / TRAINER_STATE_FILE
    if not file.is_file():
        raise UserError(f"{path}: checkpoint has no {TRAINER_STATE_FILE}, so training cannot resume from it")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{file}: truncated or corrupt training state ({e.__class__.__name__})") from None
