"""Stage 2, supervised fine-tuning (SFT): the pretrained model learns to answer like the demonstrations.

    loss = -1/|A| · Σ_{t ∈ A} log p_θ(x_t | x_<t)        A = the assistant's tokens of the whole batch

Only what the assistant says is learned (`chat_format.render_for_training` marks it); every assistant token
of a step weighs the same, however the batch is cut into micro-batches and processes (`token_share`).
Conversations of similar length are batched together so that little compute goes to padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatforge.chat_format import Message, answer_text, check_conversation, fit_prompt, render, render_for_training
from chatforge.checkpoint import load_model
from chatforge.data import load_splits
from chatforge.engine import SamplingParams, generate_batch
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.objectives import IGNORE_INDEX
from chatforge.runtime import Dist, all_reduce_mean
from chatforge.sources import parse_records
from chatforge.tokenizer import Tokenizer
from chatforge.train import (
    FineTuneConfig, FineTuneTask, fine_tuning_start, process_share, resolve_run_config, run_stage,
    set_max_steps_from_epochs,
)


@dataclass
class SFTConfig(FineTuneConfig):
    init: str = field(default="", metadata={"help": "pretrained checkpoint (or run folder) to start from"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "conversation files (.jsonl/.parquet): {messages}, {prompt, completion} or ShareGPT {conversations}"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --val-data"})
    dropout: float = field(default=0.0, metadata={"help": "residual dropout while fine-tuning (InstructGPT used 0.2)"})
    sample_prompts: list[str] = field(default_factory=lambda: ["What can you do?"],
                                      metadata={"help": "user messages answered at each evaluation"})
    sample_tokens: int = field(default=48, metadata={"help": "most tokens per sample answer"})


# --- conversations ---------------------------------------------------------------------------------

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _messages(items, role_key: str, content_key: str, roles: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise ValueError("expected a list of message objects")
    out = []
    for i, m in enumerate(items):
        if role_key not in m or content_key not in m:
            raise ValueError(f"message {i}: expected {role_key!r} and {content_key!r} fields")
        role, content = m[role_key], m[content_key]
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {i}: {role_key!r} and {content_key!r} must be strings")
        if roles is not None:
            if role not in roles:
                raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(roles)})")
            role = roles[role]
        out.append(Message(role, content))
    return out


def conversation_from_record(record: dict) -> list[Message]:
    """A checked conversation from any of the common formats; ValueError names what is wrong."""
    if "messages" in record:
        messages = _messages(record["messages"], "role", "content")
    elif "conversations" in record:
        messages = _messages(record["conversations"], "from", "value", SHAREGPT_ROLES)
    elif "prompt" in record and "completion" in record:
        system = [Message("system", record["system"])] if record.get("system") else []
        if not all(isinstance(record.get(k, ""), str) for k in ("system", "prompt", "completion")):
            raise ValueError("'system', 'prompt' and 'completion' must be strings")
        messages = [*system, Message("user", record["prompt"]), Message("assistant", record["completion"])]
    else:
        raise ValueError("expected a 'messages', 'conversations' or 'prompt'+'completion' record")
    check_conversation(messages)
    return messages


@dataclass
class Example:
    """A tokenized conversation: inputs ids[:-1] predict ids[1:] where `trained` (shifted) is set."""

    ids: np.ndarray
    trained: np.ndarray
    where: str
    truncated: bool = False  # earlier turns (or the start of the last question) dropped to fit the context

    @property
    def targets(self) -> int:
        return int(self.trained[1:].sum())


def load_examples(paths: list[str], tokenizer: Tokenizer, max_seq_len: int, skip_invalid: bool) -> tuple[list[Example], int]:
    """Tokenized conversations of `paths`, and how many invalid records were skipped. A conversation longer
    than the context is cut as TRL's `max_length` users expect: the oldest turns go first, and the final
    assistant answer stays whole (`chat_format.fit_prompt`); one whose final answer alone is too long is
    invalid."""

    def parse(record: dict) -> tuple[list[int], list[bool], bool]:
        messages = conversation_from_record(record)
        ids, trained = render_for_training(messages, tokenizer)
        if len(ids) <= max_seq_len + 1:  # the model reads ids[:-1]
            return ids, trained, False
        answer = len(ids) - len(render(messages[:-1], tokenizer, add_generation_prompt=True))
        prompt, _ = fit_prompt(messages[:-1], tokenizer, max_seq_len + 1 - answer)
        ids, trained = render_for_training([*prompt, messages[-1]], tokenizer)
        if len(ids) > max_seq_len + 1:  # a template that renders earlier turns differently once some are gone
            raise ValueError(f"{len(ids)} tokens even cut, longer than the model's context ({max_seq_len}) allows")
        return ids, trained, True

    items, skipped = parse_records(paths, parse, skip_invalid, "conversation")
    return [Example(np.array(ids, dtype=np.int64), np.array(trained), where, truncated)
            for where, (ids, trained, truncated) in items], skipped


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets (IGNORE_INDEX wherever nothing is learned): causal attention means
    padding after a sequence never changes it."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[row, :n] = torch.from_numpy(e.ids[:-1])
        targets[row, :n] = torch.from_numpy(np.where(e.trained[1:], e.ids[1:], IGNORE_INDEX))
    return inputs, targets


def token_share(targets: torch.Tensor, step_targets: int, world_size: int) -> float:
    """Weight that turns a micro-batch's mean token loss into its share of the step's token mean:
    count_mb / count_step, times the number of processes (DDP averages the processes' gradients)."""
    return int((targets != IGNORE_INDEX).sum()) * world_size / step_targets


class SFTTask(FineTuneTask):
    def __init__(self, config: SFTConfig, tokenizer: Tokenizer, train: list[Example], val: list[Example],
                 d: Dist, device: torch.device):
        super().__init__(config, tokenizer, train, val, d, device, [len(e.ids) for e in train], "conversations")
        lengths = [len(e.ids) - 1 for e in train]
        self.seq_len = round(float(np.mean(lengths)))  # for FLOPs/token: attention cost at the typical length
        self.tokens_per_step = round(float(np.mean(lengths)) * config.batch_size)

    def micro_batches(self, step: int, accumulation: int):
        batch = self.step_items(step)
        step_targets = sum(e.targets for e in batch)
        for part in process_share(batch, self.d, accumulation):
            inputs, targets = pad_batch(part, self.tokenizer.pad_id)
            yield inputs.to(self.device), targets.to(self.device), token_share(targets, step_targets, self.d.world_size)

    def loss(self, model, batch) -> torch.Tensor:
        inputs, targets, share = batch
        return model(inputs, targets=targets) * share

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:  # nothing held out (a validation fraction of 0)
            return {}
        held_out = self.held_out()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for start in range(0, len(held_out), self.config.micro_batch_size):
            inputs, targets = pad_batch(held_out[start : start + self.config.micro_batch_size], self.tokenizer.pad_id)
            n = (targets != IGNORE_INDEX).sum()
            total += model(inputs.to(self.device), targets=targets.to(self.device)) * n
            count += n
        return {"val_loss": (all_reduce_mean(total, self.d) / all_reduce_mean(count, self.d).clamp(min=1)).item()}

    def samples(self, model: GPT) -> list[str]:
        if not self.config.sample_prompts:
            return []
        params = SamplingParams(max_new_tokens=self.config.sample_tokens, temperature=0, seed=self.config.seed)
        prompts = [render([Message("user", p)], self.tokenizer, add_generation_prompt=True)
                   for p in self.config.sample_prompts]
        completions = generate_batch(model, prompts, params, stop_ids=(self.tokenizer.end_id,))
        return [f"{question} -> {answer_text(completion.tokens, self.tokenizer)}"
                for question, (completion,) in zip(self.config.sample_prompts, completions)]


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[SFTConfig, Path | None]:
    return resolve_run_config(SFTConfig, "sft", preset, overrides, resume, needs={
        "init": "CHECKPOINT (a pretrained model)", "data": "FILE [FILE ...] (conversations)"})


def sft(config: SFTConfig, resume_from: Path | None = None) -> Path:
    """Fine-tune a pretrained model on conversations; returns the run folder."""

    def setup(device: torch.device, d: Dist):
        model, tokenizer, path = load_model(resume_from or config.init, device)
        if model.config.head != "lm":
            raise UserError(f"{config.init}: SFT starts from a language model, this checkpoint has a {model.config.head} head")
        if resume_from is None:
            model = fine_tuning_start(model, tokenizer, path, config)
        model.set_dropout(config.dropout)
        max_len = model.config.max_seq_len
        train, val, skipped = load_splits(lambda paths: load_examples(paths, tokenizer, max_len, config.skip_invalid),
                                          config.data, config.val_data, config.val_fraction, config.seed)
        if d.is_main:
            truncated = sum(e.truncated for e in train + val)
            print(f"sft: {len(train):,} training and {len(val):,} held-out conversations"
                  + (f", {truncated:,} cut to the context (oldest turns first)" if truncated else "")
                  + (f", {skipped:,} invalid record(s) skipped" if skipped else ""))
        task = SFTTask(config, tokenizer, train, val, d, device)
        set_max_steps_from_epochs(config, task.steps_per_epoch)
        return model, tokenizer, task

    return run_stage(config, "sft", setup, resume_from)
