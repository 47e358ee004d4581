"""Stage 1, pretraining: next-token prediction on the token shards of `chatforge data prepare`.

    loss = -1/T · Σ_t log p_θ(x_{t+1} | x_≤t)        (`GPT.forward(x, targets=y)`, see losses.py)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatforge.checkpoint import load_model
from chatforge.data import TokenWindows, load_data_tokenizer, load_meta
from chatforge.engine import SamplingParams, generate_batch
from chatforge.errors import UserError
from chatforge.model import GPT, GPTConfig
from chatforge.runtime import Dist, all_reduce_mean
from chatforge.tokenizer import Tokenizer
from chatforge.train import Task, TrainConfig, resolve_run_config, run_stage


@dataclass
class PretrainConfig(TrainConfig):
    data: str = field(default="", metadata={"help": "prepared data folder (from `chatforge data prepare`)"})
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "A list is"],
                                      metadata={"help": "prompts sampled at each evaluation"})
    sample_tokens: int = field(default=32, metadata={"help": "tokens generated per sample prompt"})
    model: GPTConfig = field(default_factory=GPTConfig)


class PretrainTask(Task):
    """Random windows of the train split; validation on the first windows of the val split."""

    def __init__(self, config: PretrainConfig, tokenizer: Tokenizer, d: Dist, device: torch.device):
        self.config, self.tokenizer, self.d, self.device = config, tokenizer, d, device
        self.seq_len = config.model.max_seq_len
        self.train = TokenWindows(config.data, "train", self.seq_len, mode="random", seed=config.seed)
        self.val = TokenWindows(config.data, "val", self.seq_len, mode="sequential")
        self.tokens_per_step = config.batch_size * self.seq_len

    def _rows(self) -> slice:
        per_rank = self.config.batch_size // self.d.world_size
        return slice(self.d.rank * per_rank, (self.d.rank + 1) * per_rank)

    def micro_batches(self, step: int, accumulation: int):
        x, y = self.train.batch(step, self.config.batch_size, self._rows())
        share = 1.0 / accumulation  # equal-sized micro-batches: the step's loss is their mean
        return [(xm, ym, share) for xm, ym in zip(x.to(self.device).chunk(accumulation), y.to(self.device).chunk(accumulation))]

    def loss(self, model, batch) -> torch.Tensor:
        x, y, share = batch
        return model(x, targets=y) * share

    def evaluate(self, model) -> dict[str, float]:
        total = torch.zeros((), device=self.device)
        for i in range(self.config.eval_batches):
            x, y = self.val.batch(i, self.config.batch_size, self._rows())
            for xm, ym in zip(x.split(self.config.micro_batch_size), y.split(self.config.micro_batch_size)):
                total += model(xm.to(self.device), targets=ym.to(self.device)) * len(xm)
        mean = total / (self.config.eval_batches * self.config.batch_size // self.d.world_size)
        return {"val_loss": all_reduce_mean(mean, self.d).item()}

    def samples(self, model: GPT) -> list[str]:
        params = SamplingParams(max_new_tokens=self.config.sample_tokens, temperature=0.8, top_k=50, seed=self.config.seed)
        prompts = [self.tokenizer.encode_document(p) for p in self.config.sample_prompts]
        completions = generate_batch(model, prompts, params, stop_ids=self.tokenizer.document_stops)
        return [p + self.tokenizer.decode(c.tokens, skip_special=True)
                for p, (c,) in zip(self.config.sample_prompts, completions)]


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[PretrainConfig, Path | None]:
    return resolve_run_config(PretrainConfig, "pretrain", preset, overrides, resume,
                              needs={"data": "DATA_DIR (a folder made by `chatforge data prepare`)"})


def pretrain(config: PretrainConfig, resume_from: Path | None = None) -> Path:
    """Train (or continue training) a GPT; returns the run folder."""

    def setup(device: torch.device, d: Dist):
        meta = load_meta(config.data)
        tokenizer = load_data_tokenizer(config.data)
        if resume_from is not None:
            model, _, _ = load_model(resume_from, device)
            if model.config.vocab_size != meta["vocab_size"]:
                raise UserError(f"{config.data}: data has vocabulary size {meta['vocab_size']}, the model in "
                                f"{resume_from} has {model.config.vocab_size}: resume with the run's own data")
            config.model = model.config
        else:
            config.model = dataclasses.replace(config.model, vocab_size=meta["vocab_size"])
            model = GPT(config.model).to(device)
        return model, tokenizer, PretrainTask(config, tokenizer, d, device)

    return run_stage(config, "pretrain", setup, resume_from)
