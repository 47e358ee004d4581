"""Candidates for human feedback: the SFT model answers each prompt K times.

    {"prompt": "What is a tuple?", "completions": ["...", "...", "...", "..."],
     "completion_ids": [[...], [...], [...], [...]], "finish_reasons": ["stop", "stop", "length", "stop"],
     "tokenizer": "3f0c...", "sampling": {...}}

The text is for people (and the labeling app); the token ids, exactly as sampled (the stop token included
when the answer finished), are what the reward model reads (`comparisons.reward_ids`), so that it scores what
PPO will score. `tokenizer` is the fingerprint of the tokenizer the ids belong to.

People (`chatforge label serve`) or a rule then rank the K answers, and the reward model learns from the
C(K,2) pairs of each ranking. The K samples of a prompt share one prefill in the engine. Samples may cycle
through several temperatures, for more varied answers to rank; with `num_beams` (at least K) in the sampling
settings, the K answers are the K best beams of a beam search instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from chatforge.chat_format import Message, prompt_messages, render
from chatforge.checkpoint import load_model
from chatforge.config import DEVICE_HELP
from chatforge.engine import Completion, SamplingParams, generate_batch
from chatforge.errors import UserError
from chatforge.files import atomic_write_jsonl
from chatforge.model import GPT
from chatforge.runtime import pick_device
from chatforge.sources import parse_records
from chatforge.tokenizer import Tokenizer


def read_prompts(path: str) -> list[tuple[str, list[Message]]]:
    """(where, conversation to answer) for each prompt: a .txt file holds one user message per line;
    .jsonl/.parquet records hold `prompt` (a string, or messages ending with the user's turn)."""
    if Path(path).suffix == ".txt":
        if not Path(path).is_file():
            raise UserError(f"{path}: prompt file does not exist")
        prompts = []
        with Path(path).open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                    if line:
                        prompts.append((f"{path}:{lineno}", prompt_messages(line)))
                except (UnicodeDecodeError, ValueError) as e:
                    raise UserError(f"{path}:{lineno}: {'not valid UTF-8' if isinstance(e, UnicodeDecodeError) else e}") from None
        if not prompts:
            raise UserError(f"{path}: no prompts")
        return prompts

    def parse(record: dict) -> list[Message]:
        if "prompt" not in record:
            raise ValueError("expected a 'prompt' field")
        return prompt_messages(record["prompt"])

    return parse_records([path], parse, skip_invalid=None, what="prompt")[0]


def sample_candidates(model: GPT, tokenizer: Tokenizer, prompts: list[tuple[str, list[Message]]], k: int,
                      params: SamplingParams, temperatures: list[float] | None = None, batch_size: int = 8,
                      progress: bool = True) -> list[dict]:
    """K answers to each (where, prompt): records {prompt, completions, finish_reasons, sampling}.
    A prompt that leaves no room for an answer and the <|end|> the reward model reads after it in the model's
    context is an error naming its line; answers near the context's end are cut so that the <|end|> fits."""
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    context = model.config.max_seq_len
    for where, prompt in prompts:
        length = len(render(prompt, tokenizer, add_generation_prompt=True))
        if length + 1 >= context:
            raise UserError(f"{where}: the prompt is {length} tokens, the model's context is {context}")
    temperatures = temperatures or [params.temperature]
    per_temperature = {t: sum(1 for j in range(k) if temperatures[j % len(temperatures)] == t) for t in temperatures}
    stop = (tokenizer.end_id,)
    records = []
    bar = tqdm(total=len(prompts) * k, desc="sample", unit="answer", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        batch = [p for _, p in prompts[start : start + batch_size]]
        ids = [render(p, tokenizer, add_generation_prompt=True) for p in batch]
        room = context - 1 - max(map(len, ids))  # for the answer, before the reward model's closing <|end|>
        answers: list[list[tuple[float, Completion]]] = [[] for _ in batch]
        for i, (temperature, n) in enumerate(per_temperature.items()):
            seed = None if params.seed is None else params.seed + 1000 * start + i
            setting = dataclasses.replace(params, temperature=temperature, seed=seed,
                                          max_new_tokens=min(params.max_new_tokens, room))
            for row, samples in enumerate(generate_batch(model, ids, setting, n=n, stop_ids=stop, tokenizer=tokenizer)):
                answers[row] += [(temperature, c) for c in samples]
        for prompt, row in zip(batch, answers):
            records.append({
                "prompt": prompt[0].content if len(prompt) == 1 else [m.to_dict() for m in prompt],
                "completions": [c.text.strip() for _, c in row],
                "completion_ids": [c.tokens for _, c in row],
                "finish_reasons": [c.finish_reason for _, c in row],  # "length": cut off at max_new_tokens
                "tokenizer": tokenizer.fingerprint,
                "sampling": {**dataclasses.asdict(params), "temperatures": [t for t, _ in row]},
            })
        bar.update(len(batch) * k)
    bar.close()
    return records


@dataclass
class SampleConfig:
    checkpoint: str = field(default="", metadata={"help": "SFT checkpoint, or its run folder", "positional": True})
    prompts: str = field(default="", metadata={
        "help": ".txt (one user message per line) or .jsonl/.parquet with 'prompt' (a string or messages)",
        "required": True, "metavar": "FILE"})
    k: int = field(default=4, metadata={"help": "answers per prompt (InstructGPT: 4 to 9)", "aliases": ["-k"]})
    out: str = field(default="", metadata={"help": "JSONL file to write", "required": True, "metavar": "FILE"})
    temperatures: list[float] = field(default_factory=list, metadata={
        "help": "cycle the samples of each prompt through these temperatures (none: --temperature)"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128, temperature=0.8))

    def __post_init__(self):  # the messages name the flags: the command line is where these come from
        if self.k < 2:
            raise ValueError(f"-k must be at least 2 (answers to rank per prompt), got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        for t in self.temperatures:
            if not t >= 0:
                raise ValueError(f"--temperatures must be >= 0, got {t}")
        beams = self.sampling.num_beams
        if beams > 1 and self.k > beams:
            raise ValueError(f"-k is {self.k}, but --num-beams {beams} finds only {beams} answers per prompt")
        if beams > 1 and self.temperatures:
            raise ValueError("--temperatures and --num-beams exclude each other: beam search does not sample")


def sample_to_file(config: SampleConfig) -> list[dict]:
    """`chatforge sample`: K answers to each prompt of `prompts`, written to `out`; the records."""
    prompts = read_prompts(config.prompts)
    model, tokenizer, _ = load_model(config.checkpoint, pick_device(config.device))
    records = sample_candidates(model, tokenizer, prompts, config.k, config.sampling, config.temperatures or None,
                                config.batch_size, progress=config.progress)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(config.out, records)
    print(f"{len(records):,} prompts x {config.k} answers -> {config.out}")
    return records
