"""The training loop every stage shares.

Every stage (pretrain, SFT, reward model, classifier, PPO) supplies a `Task`: its batches and loss (or
its own step), its evaluation, samples and pictures. The `Trainer` owns everything else: AdamW, warmup + cosine schedule, gradient
accumulation, clipping, mixed precision, torch.compile, DistributedDataParallel, metrics (JSON lines),
the progress bar, checkpoints and exact resume.

Batch sizes are global: `batch_size` sequences per optimizer step, whatever the number of processes,
so a run on N processes takes the same steps as a run on one (accumulation = batch_size / (micro x N)).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from chatforge import config as cfg, sharding
from chatforge.checkpoint import (
    CHECKPOINT_DIR, CONFIG_FILE, OPTIMIZER_DIR, load_trainer_state, prune_checkpoints, resolve_checkpoint,
    save_checkpoint, step_checkpoints, step_dir,
)
from chatforge.data import BucketedEpochs
from chatforge.errors import UserError
from chatforge.files import atomic_write
from chatforge.lora import LoRAOptions, add_adapters, has_adapters, merge_adapters
from chatforge.model import GPT, with_head
from chatforge.plots import CURVES_FILE, plot_training_curves
from chatforge.runtime import (
    Dist, all_reduce_mean, autocast, init_distributed, peak_flops, pick_device, pick_dtype, shutdown_distributed,
)
from chatforge.tokenizer import Tokenizer

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"


@dataclass
class TrainConfig:
    out: str = field(default="runs/run", metadata={"help": "run folder: config, metrics.jsonl and checkpoints/"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(default=32, metadata={"help": "sequences per optimizer step, over all processes"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass on one process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of lr (cosine decay)"})
    warmup_steps: int = field(default=50, metadata={"help": "steps of linear warmup from 0 to lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not on norms)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: off)"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every this many steps (and at the end)"})
    eval_batches: int = field(default=8, metadata={"help": "global batches in one evaluation"})
    checkpoint_every: int = field(default=250, metadata={"help": "write a checkpoint every this many steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep only the newest this many checkpoints"})
    seed: int = field(default=1337, metadata={"help": "random seed (data order, initialisation, dropout)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={"help": "autocast precision: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) instead of "
                "copying them to each (DDP); the optimizer state is checkpointed sharded (torch.distributed.checkpoint)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block's activations in the backward pass instead of keeping them: less memory "
                "(the activations of one block, not of all), about a third more compute"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    strict: bool = field(default=False, metadata={"help": "stop with a non-zero exit at the first alarm"})

    def __post_init__(self):
        cfg.require_positive(self, "max_steps", "batch_size", "micro_batch_size", "eval_every", "eval_batches", "checkpoint_every")
        if self.warmup_steps < 0 or self.keep_checkpoints < 0 or self.lr <= 0:
            raise ValueError("warmup_steps and keep_checkpoints must be >= 0, lr > 0")


@dataclass
class FineTuneConfig(TrainConfig, LoRAOptions):
    """What the stages that fine-tune on a fixed set of records share (SFT, reward model, classifier)."""

    init: str = field(default="", metadata={"help": "checkpoint (or run folder) to start from"})
    data: list[str] = field(default_factory=list, metadata={"help": "training files (.jsonl/.parquet)"})
    val_data: list[str] = field(default_factory=list, metadata={"help": "held-out files (default: val_fraction of --data)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of --data held out when no --val-data"})
    skip_invalid: bool = field(default=False, metadata={"help": "count and skip invalid records instead of stopping"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the training records; sets max_steps when > 0"})

    def __post_init__(self):
        super().__post_init__()
        self.check_lora()


def merged_start(model: GPT, tokenizer: Tokenizer, init: Path, config: TrainConfig | LoRAOptions) -> tuple[GPT, Path]:
    """`model` (loaded from `init`) with the adapters of a LoRA run merged into it, and the checkpoint new
    adapters stand on: `init`, or, when `init` was itself a LoRA run and this run trains adapters of its own,
    the merged model written to OUT/base (adapters on adapters would make "the adapters switched off" mean the
    base before that run, not `init`)."""
    if has_adapters(model):
        model = merge_adapters(model)
        if config.lora_r:
            base = Path(config.out) / "base"
            # written once (a resumed run's adapters stand on it), by one process
            if not (base / CONFIG_FILE).is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
                save_checkpoint(base, model, tokenizer)
            if dist.is_initialized():
                dist.barrier()
            init = base
    return model, init


def fine_tuning_start(model: GPT, tokenizer: Tokenizer, init: Path, config: FineTuneConfig, head: str | None = None,
                      labels: list[str] | None = None) -> GPT:
    """The model a fine-tuning run starts from (`merged_start`), with a new `head` if one is given, and with
    fresh LoRA adapters when `config.lora_r` > 0."""
    model, init = merged_start(model, tokenizer, init, config)
    if head is not None:
        model = with_head(model, head, labels)
    if config.lora_r:
        model = add_adapters(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, init)
    return model


class Task:
    """What a stage gives the trainer. A stage subclasses this and overrides what it has; the defaults are
    a stage with nothing more to say (no held-out metrics, samples, pictures or state beyond the step).

    A stage whose step is one gradient step gives `micro_batches` and `loss`; a stage whose step is more
    (PPO: a rollout, then epochs of minibatch updates) overrides `train_step` instead.
    """

    tokens_per_step: int  # tokens per optimizer step over all processes, for tokens/s and MFU
    seq_len: int  # the typical sequence length, for the attention FLOPs
    progress_keys: tuple[str, ...] = ("loss",)  # the metrics shown on the progress bar
    # True for a stage whose own train_step sums the processes' gradients (PPO): the model is then not
    # wrapped in DDP (under --fsdp its gradients are summed, not averaged), and batch_size need not split
    # into micro-batches per process
    syncs_own_gradients: bool = False
    # True where the sharded model must compute as an fp32 copy of it does under autocast: --fsdp then
    # gathers fp32 weights, not the run's dtype
    fsdp_gathers_fp32: bool = False

    def micro_batches(self, step: int, accumulation: int) -> Iterable[Any]:
        """This process's `accumulation` micro-batches for optimizer step `step`."""
        raise NotImplementedError(f"{type(self).__name__} gives neither micro_batches nor its own train_step")

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """This micro-batch's share of the step's loss: the step's loss is the sum of the shares of a
        process's micro-batches, averaged over processes (as DDP averages gradients)."""
        raise NotImplementedError(f"{type(self).__name__} gives micro_batches but no loss")

    def train_step(self, trainer: Trainer) -> dict:
        """One step and its metrics: by default one gradient step over `micro_batches`. A stage's own step
        may report "tokens" and "flops" (for tokens/s and MFU), "skipped", and "alarms" (messages; with
        `strict` the run stops)."""
        return trainer.gradient_step()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics, averaged over processes (called on every process)."""
        return {}

    def samples(self, model: GPT) -> list[str]:
        """A few generations to eyeball (called on the main process only)."""
        return []

    def plot(self, metrics: list[dict], run_dir: Path) -> None:
        """The stage's own pictures, drawn at each evaluation next to the training curves."""

    def finish(self, model: GPT) -> None:
        """Called on every process after the last step, before the final checkpoint (the reward model
        stores its score offset here)."""

    def state_dict(self) -> dict:
        """What a resume needs beyond the step: nothing when batches are a pure function of (seed, step)."""
        return {}

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """The optimizers the task steps itself, by name, with their models (PPO's value model's): under
        --fsdp checkpointed sharded with the trainer's (and loaded from such a checkpoint, whether the
        resumed run shards or not), else part of the task's `state_dict`."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FineTuneTask(Task):
    """A stage that passes over a fixed list of training items in length-bucketed batches (SFT, reward
    model, classifier), with held-out items for evaluation."""

    def __init__(self, config: FineTuneConfig, tokenizer: Tokenizer, train: list, val: list, d: Dist,
                 device: torch.device, lengths: list[int], items: str):
        self.config, self.tokenizer, self.train, self.val, self.d, self.device = config, tokenizer, train, val, d, device
        self.batches = BucketedEpochs(lengths, config.batch_size, config.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise UserError(f"{len(train)} training {items}, fewer than one batch (batch_size {config.batch_size})")

    def step_items(self, step: int) -> list:
        """The training items of optimizer step `step` (over all processes)."""
        return [self.train[i] for i in self.batches.batch(step)]

    def held_out(self) -> list:
        """This process's share of the held-out items an evaluation reads (`eval_batches` batches)."""
        return self.val[: self.config.eval_batches * self.config.batch_size][self.d.rank :: self.d.world_size]


def process_share(batch: list, d: Dist, accumulation: int) -> Iterator[list]:
    """This process's micro-batches of a global batch: every world_size-th item (so that every process
    gets short and long ones), cut into `accumulation` parts."""
    mine = batch[d.rank :: d.world_size]
    size = len(mine) // accumulation
    for start in range(0, len(mine), size):
        yield mine[start : start + size]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel on GPU and CPU (on CPU much faster than
    foreach for small models: one pass over each tensor instead of a dozen small ops)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    impl = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **impl)


def gradient_accumulation(config: TrainConfig, world_size: int) -> int:
    per_step = config.micro_batch_size * world_size
    if config.batch_size % per_step:
        raise UserError(
            f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({config.micro_batch_size} x {world_size} = {per_step})"
        )
    return config.batch_size // per_step


class MetricsLog:
    """metrics.jsonl of a run: one JSON object per line, written by the main process only. It is appended
    to, not rewritten atomically: a kill can only cut the last line, which readers skip (`_parse`) and a
    resumed run drops (`truncate_after`)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop what a killed run logged past the checkpoint it resumes from (rewritten atomically)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if (r := _parse(line)) and r["step"] <= step]
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _parse(line: str) -> dict | None:
    """One metrics line; None for a line a killed (or still writing) process left half-written."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [r for line in path.read_text().splitlines() if (r := _parse(line)) is not None]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and the GPU's when training on one (dropout draws from it there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _say(bar: tqdm | None, text: str) -> None:
    """Print a line above the progress bar (or plainly when there is none)."""
    (bar.write if bar else print)(text)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model: GPT,
        tokenizer: Tokenizer,
        task: Task,
        *,
        d: Dist,
        device: torch.device,
        dtype: torch.dtype,
        stage: str,
        run_config: dict,
        resume_from: Path | None = None,
    ):
        self.config, self.raw_model, self.tokenizer, self.task = config, model, tokenizer, task
        self.d, self.device, self.dtype, self.stage, self.run_config = d, device, dtype, stage, run_config
        self.run_dir = Path(config.out)
        self.accumulation = 1 if task.syncs_own_gradients else gradient_accumulation(config, d.world_size)
        model.activation_checkpointing = config.activation_checkpointing
        self.sharded = config.fsdp and d.enabled
        if self.sharded:
            sharding.shard(model, torch.float32 if task.fsdp_gathers_fp32 else dtype, average=not task.syncs_own_gradients)
        self.model: torch.nn.Module = torch.compile(model) if config.compile else model
        if d.enabled and not task.syncs_own_gradients and not self.sharded:
            # broadcast_buffers=False: the only buffers (rotary tables) are identical on every process, and a
            # broadcast in evaluation would hang when processes run different numbers of forward passes
            self.model = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None,
                                                 broadcast_buffers=False)
        self.optimizer = make_optimizer(model, config, device)
        self.metrics = MetricsLog(self.run_dir, d.is_main)
        self.step = 0
        if resume_from is not None:
            self._load_state(resume_from)

    # --- checkpoint state ---------------------------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, torch.Tensor]]:
        state = _rng_state(self.device)
        if not self.d.enabled:
            return [state]
        states: list = [None] * self.d.world_size
        dist.all_gather_object(states, state)
        return states

    def _state(self) -> dict:
        state = {"step": self.step, "rng": self._gather_rng(), "task": self.task.state_dict(),
                 "world_size": self.d.world_size}
        if not self.config.fsdp:  # with --fsdp, sharded in the checkpoint's optimizer/ folder
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _load_state(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.step = state["step"]
        if (checkpoint / OPTIMIZER_DIR).is_dir():
            sharding.load_optimizers(self.all_optimizers(), checkpoint / OPTIMIZER_DIR)
        elif self.sharded:
            raise UserError(f"{checkpoint}: written without --fsdp; resume it without --fsdp (--no-fsdp)")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        if len(state["rng"]) == self.d.world_size:
            _set_rng_state(state["rng"][self.d.rank], self.device)
        self.metrics.truncate_after(self.step)

    def save(self, whole: GPT | None = None) -> None:
        """A checkpoint of the step (collectives: every process takes part), of `whole` (`consolidated()`)
        when given. With --fsdp every process first writes its shard of the optimizer state to a staging
        folder, moved into the checkpoint as it is committed; a crash before that leaves the staging folder,
        which the next save clears."""
        whole = whole or self.consolidated()
        folder = step_dir(self.run_dir, self.step)
        state = self._state()
        folders = {}
        if self.config.fsdp:
            staging = self.run_dir / CHECKPOINT_DIR / f".{folder.name}.tmp-{OPTIMIZER_DIR}"
            if self.d.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            self.barrier()
            sharding.save_optimizers(self.all_optimizers(), staging)
            folders[OPTIMIZER_DIR] = staging
        if self.d.is_main:
            save_checkpoint(folder, whole, self.tokenizer, trainer_state=state, folders=folders,
                            extra={"stage": self.stage, "step": self.step, "run_config": self.run_config})
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        self.barrier()

    def all_optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return {"optimizer": (self.raw_model, self.optimizer), **self.task.optimizers()}

    def barrier(self) -> None:
        if self.d.enabled:
            dist.barrier()

    def consolidated(self) -> GPT:
        """The whole model: this process's own when it is not sharded; with FSDP a copy gathered on every
        process (a collective)."""
        return sharding.consolidated(self.raw_model, self.device) if self.sharded else self.raw_model

    # --- the loop -----------------------------------------------------------------------------------

    def evaluate(self, bar: tqdm | None, whole: GPT | None = None) -> None:
        """Held-out metrics, samples and pictures, on `whole` (`consolidated()`) when given."""
        # no DDP hooks or FSDP collectives: processes may differ in work
        if self.sharded:
            model = whole = whole or self.consolidated()
        else:
            model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
            whole = self.raw_model
        model.eval()
        with torch.no_grad(), self.autocast():
            record = {"step": self.step, **self.task.evaluate(model)}
        model.train()
        if self.d.is_main:
            samples = self.task.samples(whole)
            if samples:
                record["samples"] = samples
            self.metrics.write(record)
            text = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            _say(bar, f"step {self.step}: {text}")
            for s in samples:
                _say(bar, f"  sample: {s!r}")
            metrics = read_metrics(self.run_dir)
            plot_training_curves(metrics, self.run_dir / CURVES_FILE, f"{self.stage}: {self.run_dir}")
            self.task.plot(metrics, self.run_dir)

    def learning_rate(self) -> float:
        """The schedule is a function of the step alone, so a resumed run (even with a new max_steps or lr)
        needs no scheduler state."""
        c = self.config
        return c.lr * lr_factor(self.step, c.warmup_steps, c.max_steps, c.min_lr_ratio)

    def train_step(self) -> dict:
        """One step (the task's: by default one optimizer step over `batch_size` sequences); its metrics."""
        t0 = time.perf_counter()
        record = {"step": self.step + 1, **self.task.train_step(self)}
        self.step += 1
        record["step_time"] = time.perf_counter() - t0
        return record

    def gradient_sync(self, enabled: bool):
        """Whether this backward pass reduces the gradients over processes (the last micro-batch's does)."""
        if self.sharded:
            self.raw_model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        return self.model.no_sync() if self.d.enabled and not enabled else contextlib.nullcontext()

    def autocast(self):
        """The mixed-precision context of this run's forward passes."""
        return autocast(self.device, self.dtype)

    def gradient_step(self) -> dict:
        """One optimizer step over the task's micro-batches: accumulated, averaged over processes, clipped;
        skipped (with an alarm) when the loss or the gradient is not finite."""
        total = torch.zeros((), device=self.device)
        batches = list(self.task.micro_batches(self.step, self.accumulation))
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self.gradient_sync(last):
                with self.autocast():
                    loss = self.task.loss(self.model, batch)
                loss.backward()
            total += loss.detach()
        total = all_reduce_mean(total, self.d)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.raw_model.parameters(), self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        )
        lr = self.learning_rate()
        record = {"loss": total.item(), "lr": lr, "grad_norm": grad_norm.item()}
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        else:  # never let one bad batch poison the weights
            record["skipped"] = True
            record["alarms"] = ["non-finite loss or gradient: update skipped"]
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def fit(self) -> None:
        c = self.config
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        peak = peak_flops(self.device, self.dtype) * self.d.world_size
        flops_per_token = self.raw_model.flops_per_token(self.task.seq_len)
        bar = None
        if self.d.is_main and c.progress:
            bar = tqdm(total=c.max_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True)
        if self.step == 0:  # a fresh start (or a resume before any checkpoint): no metrics of an older attempt
            self.metrics.reset()
            self.evaluate(bar)
        self.model.train()
        while self.step < c.max_steps:
            record = self.train_step()
            tokens = record.pop("tokens", self.task.tokens_per_step)
            flops = record.pop("flops", tokens * flops_per_token)
            record.update(tokens_per_s=tokens / record["step_time"], mfu=flops / record["step_time"] / peak)
            self.metrics.write(record)
            alarms = record.get("alarms", [])
            if self.d.is_main:
                for alarm in alarms:
                    _say(bar, f"step {self.step}: ALARM: {alarm}")
            if alarms and c.strict:
                raise UserError(f"step {self.step}: stopped by --strict: {'; '.join(alarms)}")
            if bar:
                shown = {k: f"{record[k]:.3f}" for k in self.task.progress_keys if k in record}
                bar.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:,.0f}", mfu=f"{record['mfu']:.0%}")
                bar.update(1)
            last = self.step == c.max_steps
            evaluating, saving = last or self.step % c.eval_every == 0, last or self.step % c.checkpoint_every == 0
            if not (evaluating or saving):
                continue
            whole = self.consolidated()  # under FSDP one gathered copy serves evaluation, finish and checkpoint
            if evaluating:
                self.evaluate(bar, whole)
            if last:
                self.task.finish(whole)
                self.raw_model.config = whole.config  # what finish stores there (the reward model's offset)
            if saving:
                self.save(whole)
        if bar:
            bar.close()


# --- running a stage ---------------------------------------------------------------------------------

def resolve_run_config(cls, stage: str, preset: str | None, overrides: dict, resume: str | None,
                       needs: dict[str, str] | None = None):
    """A stage's config and the checkpoint to resume from (or None).

    Fresh run: dataclass defaults < the preset's [stage] table < command line. Resume: the run's saved
    run_config.json < command line (so `--max-steps` can extend a run). `needs` maps the fields that must be
    set to how their flag is used (e.g. {"init": "CHECKPOINT (the SFT model)"}).
    """
    checkpoint = None
    if resume:
        run_dir = Path(resume)
        saved = run_dir / RUN_CONFIG_FILE
        if not saved.is_file():
            raise UserError(f"{run_dir}: not a {stage} run folder (no {RUN_CONFIG_FILE})")
        checkpoint = resolve_checkpoint(run_dir) if step_checkpoints(run_dir) else None
        base = {**cfg.load_json(saved), "out": str(run_dir)}
    else:
        base = cfg.load_preset(preset, stage) if preset else {}
    config = cfg.from_dict(cls, cfg.merge(base, overrides), f"{stage} config")
    missing = [f"--{name.replace('_', '-')} {usage}" for name, usage in (needs or {}).items() if not getattr(config, name)]
    if missing:
        raise UserError(f"{stage} needs {' and '.join(missing)}")
    if isinstance(config, FineTuneConfig) and config.epochs > 0 and "max_steps" in overrides:
        if "epochs" in overrides:
            raise UserError(f"--max-steps and --epochs ({config.epochs:g}) both set the length of the run: "
                            f"give one of them")
        # the command line wins over the preset (or the resumed run's config), and says what it overrode
        print(f"{stage}: --max-steps {config.max_steps} overrides epochs = {config.epochs:g} "
              f"from {'the run' if resume else 'the preset' if preset else 'the defaults'}")
        config.epochs = 0.0
    if not resume and step_checkpoints(config.out):
        raise UserError(f"{config.out} already holds a run with checkpoints: continue it with "
                        f"`--resume {config.out}`, or choose another --out")
    return config, checkpoint


def set_max_steps_from_epochs(config: FineTuneConfig, steps_per_epoch: int) -> None:
    """`epochs` > 0 sets the run's length in steps."""
    if config.epochs > 0:
        config.max_steps = max(1, math.ceil(config.epochs * steps_per_epoch))


Setup = Callable[[torch.device, Dist], tuple[GPT, Tokenizer, Task]]


def run_stage(config: TrainConfig, stage: str, setup: Setup, resume_from: Path | None = None) -> Path:
    """Run a stage on this process (one of several under torchrun): `setup` builds its model, tokenizer and
    task (and may complete `config`, e.g. the vocabulary size); returns the run folder."""
    device = pick_device(config.device)
    d = init_distributed(device)
    try:
        return _train(config, stage, setup, resume_from, device, d)
    finally:
        # the models, and any collective's work they hold (FSDP2's), are gone before the process group: gloo
        # can abort the process when such work outlives it until the interpreter's teardown
        gc.collect()
        shutdown_distributed()


def _train(config: TrainConfig, stage: str, setup: Setup, resume_from: Path | None, device: torch.device,
           d: Dist) -> Path:
    dtype = pick_dtype(config.dtype, device)
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model, tokenizer, task = setup(device, d)
    torch.manual_seed(config.seed + d.rank)  # different dropout masks on each process
    run_dir = Path(config.out)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_json(config, run_dir / RUN_CONFIG_FILE)
    trainer = Trainer(config, model, tokenizer, task, d=d, device=device, dtype=dtype, stage=stage,
                      run_config=cfg.to_dict(config), resume_from=resume_from)
    if d.is_main:
        how = [f"{d.world_size} process(es) on {device}", str(dtype)]
        if not task.syncs_own_gradients:
            how.append(f"{trainer.accumulation} micro-batch(es) per step")
        if trainer.sharded:
            how.append("FSDP2")
        if resume_from:
            how.append(f"resuming at step {trainer.step}")
        print(f"{stage}: {model.num_params() / 1e6:.2f}M parameters, "
              f"{model.flops_per_token(task.seq_len) / 1e6:.1f} MFLOP/token, {', '.join(how)}")
    trainer.fit()
    return run_dir
