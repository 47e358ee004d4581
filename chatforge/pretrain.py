"""Stage 1, pretraining: next-token prediction on the token shards of `chatforge data prepare`.

    loss = -1/T · Σ_t log p_θ(x_{t+1} | x_≤t)        (`GPT.forward(x, targets=y)`, see losses.py)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatforge import config as cfg
from chatforge.checkpoint import load_model, resolve_checkpoint, step_checkpoints
from chatforge.data import TokenWindows, load_meta
from chatforge.engine import SamplingParams, generate
from chatforge.errors import UserError
from chatforge.model import GPT, GPTConfig
from chatforge.runtime import Dist, all_reduce_mean, init_distributed, pick_device, pick_dtype, shutdown_distributed
from chatforge.tokenizer import Tokenizer
from chatforge.train import Trainer, TrainConfig

RUN_CONFIG_FILE = "run_config.json"


@dataclass
class PretrainConfig(TrainConfig):
    data: str = field(default="", metadata={"help": "prepared data folder (from `chatforge data prepare`)"})
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "A list is"],
                                      metadata={"help": "prompts sampled at each evaluation"})
    sample_tokens: int = field(default=32, metadata={"help": "tokens generated per sample prompt"})
    model: GPTConfig = field(default_factory=GPTConfig)


class PretrainTask:
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
        return zip(x.to(self.device).chunk(accumulation), y.to(self.device).chunk(accumulation))

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return model(x, targets=y)

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
        out = []
        for prompt in self.config.sample_prompts:
            ids = generate(model, [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)], params,
                           stop_ids=(self.tokenizer.bos_id,))
            out.append(prompt + self.tokenizer.decode(ids, skip_special=True))
        return out

    def state_dict(self) -> dict:
        return {}  # the data position is the step: windows are a pure function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        pass


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[PretrainConfig, Path | None]:
    """The run's config: preset < command line; on resume the run's saved config < command line."""
    checkpoint = None
    if resume:
        run_dir = Path(resume)
        saved = run_dir / RUN_CONFIG_FILE
        if not saved.is_file():
            raise UserError(f"{run_dir}: not a pretraining run folder (no {RUN_CONFIG_FILE})")
        checkpoint = resolve_checkpoint(run_dir) if step_checkpoints(run_dir) else None
        base = cfg.load_json(saved)
        base["out"] = str(run_dir)
    else:
        base = cfg.load_preset(preset) if preset else {}
    config = cfg.from_dict(PretrainConfig, cfg.merge(base, overrides), "pretrain config")
    if not resume and step_checkpoints(config.out):
        raise UserError(f"{config.out} already holds a run with checkpoints: continue it with "
                        f"`--resume {config.out}`, or choose another --out")
    if not config.data:
        raise UserError("no data: give --data DATA_DIR (a folder made by `chatforge data prepare`)")
    return config, checkpoint


def pretrain(config: PretrainConfig, resume_from: Path | None = None) -> Path:
    """Train (or continue training) a GPT; returns the run folder."""
    device = pick_device(config.device)
    d = init_distributed(device)
    try:
        dtype = pick_dtype(config.dtype, device)
        meta = load_meta(config.data)
        tokenizer = Tokenizer.load(Path(config.data) / "tokenizer")
        torch.manual_seed(config.seed + d.rank)
        if resume_from is not None:
            model, _, _ = load_model(resume_from, device)
            config.model = model.config
            if model.config.vocab_size != meta["vocab_size"]:
                raise UserError(f"{config.data}: data has vocabulary size {meta['vocab_size']}, the model in "
                                f"{resume_from} has {model.config.vocab_size}: resume with the run's own data")
        else:
            config.model = dataclasses.replace(config.model, vocab_size=meta["vocab_size"])
            torch.manual_seed(config.seed)  # the same initial weights on every process
            model = GPT(config.model).to(device)
            torch.manual_seed(config.seed + d.rank)
        run_dir = Path(config.out)
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_json(config, run_dir / RUN_CONFIG_FILE)
        task = PretrainTask(config, tokenizer, d, device)
        trainer = Trainer(config, model, tokenizer, task, d=d, device=device, dtype=dtype, stage="pretrain",
                          run_config=cfg.to_dict(config), resume_from=resume_from)
        if d.is_main:
            n = model.num_params()
            print(f"pretrain: {n / 1e6:.2f}M parameters, {model.flops_per_token(task.seq_len) / 1e6:.1f} MFLOP/token, "
                  f"{d.world_size} process(es) on {device}, {dtype}, {trainer.accumulation} micro-batch(es) per step"
                  + (f", resuming at step {trainer.step}" if resume_from else ""))
        trainer.fit()
        return run_dir
    finally:
        shutdown_distributed()
