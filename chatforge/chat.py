"""Talk to a model: `chatforge chat CHECKPOINT` in a terminal, and the prompt helpers it shares with
`chatforge generate` (few-shot examples and chain-of-thought).

In-context learning, as in GPT-3 and the chain-of-thought papers:
- few-shot: solved examples come before the question, as earlier turns of the conversation (chat) or as
  Q:/A: blocks (a plain language model);
- chain of thought: the question is followed by an instruction to reason step by step (Kojima et al.).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.chat_format import Message, check_text, render
from chatforge.checkpoint import load_model
from chatforge.config import DEVICE_HELP
from chatforge.engine import SamplingParams, generate_stream, stream
from chatforge.errors import UserError
from chatforge.files import atomic_write
from chatforge.model import GPT
from chatforge.runtime import pick_device
from chatforge.sources import read_records
from chatforge.tokenizer import IncrementalDecoder, Tokenizer

COT_INSTRUCTION = "Let's think step by step."
HELP = """commands:
  /reset              start a new conversation (keeps the system prompt and few-shot examples)
  /save FILE          write the conversation as a JSONL {"messages": [...]} record
  /params [k=v ...]   show or change sampling: temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed,
                      num_beams (beam search when above 1), length_penalty
  /help               this text
  /quit               leave (Ctrl-D too)"""


def load_few_shot(path: str | Path) -> list[Message]:
    """Solved examples: JSONL/Parquet records in any SFT format, their turns concatenated (system messages
    are dropped: the conversation has its own)."""
    from chatforge.sft import conversation_from_record  # the SFT formats, one parser

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: few-shot file does not exist")
    turns: list[Message] = []
    for where, record in read_records(path):
        try:
            turns += [m for m in conversation_from_record(record) if m.role != "system"]
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    if not turns:
        raise UserError(f"{path}: no examples")
    return turns


def with_cot(question: str, cot: bool) -> str:
    return f"{question}\n{COT_INSTRUCTION}" if cot else question


def completion_prompt(question: str, examples: list[Message], cot: bool) -> str:
    """A plain language model's few-shot prompt: Q:/A: blocks, then the question and an open answer."""
    blocks = [f"Q: {q.content}\nA: {a.content}\n\n" for q, a in zip(examples[::2], examples[1::2])]
    return "".join(blocks) + f"Q: {question}\nA:" + (f" {COT_INSTRUCTION}" if cot else "")


class ChatSession:
    """A conversation with a model: history, sampling settings, and the commands of the terminal chat."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, params: SamplingParams, *, system: str = "",
                 examples: list[Message] | None = None, cot: bool = False):
        self.model, self.tokenizer, self.params, self.cot = model, tokenizer, params, cot
        if system:
            check_text(system, "the system prompt")
        self.preamble = ([Message("system", system)] if system else []) + (examples or [])
        self.turns: list[Message] = []

    def prompt_ids(self) -> list[int]:
        """The conversation rendered for the model's answer; the oldest turns go first when it is too long."""
        room = self.model.config.max_seq_len - min(self.params.max_new_tokens, self.model.config.max_seq_len // 2)
        turns = list(self.turns)
        while True:
            ids = render(self.preamble + turns, self.tokenizer, add_generation_prompt=True)
            if len(ids) <= room or len(turns) <= 1:
                return ids
            turns = turns[2:]  # drop the oldest question and its answer

    def reply(self, text: str, out=sys.stdout) -> str:
        """Answer `text`, streaming the answer to `out`; the exchange joins the history.
        Raises ValueError for a message that holds special tokens."""
        check_text(text, "your message")
        self.turns.append(Message("user", with_cot(text, self.cot)))
        decoder = IncrementalDecoder(self.tokenizer)
        end = self.tokenizer.end_id
        answer = []
        for event in generate_stream(self.model, [self.prompt_ids()], self.params, stop_ids=[end]):
            if event.token != end:
                piece = decoder.push(event.token)
                answer.append(piece)
                out.write(piece)
                out.flush()
        out.write("\n")
        content = "".join(answer).strip() or "…"
        self.turns.append(Message("assistant", content))
        return content

    def command(self, line: str, out=sys.stdout) -> bool:
        """Run a /command; False when the user asked to leave."""
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            out.write("(new conversation)\n")
        elif name == "/save":
            if not rest.strip():
                out.write("usage: /save FILE\n")
            else:
                try:
                    self.save(Path(rest.strip()))
                    out.write(f"(saved {len(self.preamble) + len(self.turns)} messages to {rest.strip()})\n")
                except OSError as e:
                    out.write(f"error: cannot save to {rest.strip()}: {e.strerror or e}\n")
        elif name == "/params":
            try:
                self.set_params(rest.split())
            except ValueError as e:
                out.write(f"error: {e}\n")
            out.write(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.params).items()) + "\n")
        else:
            out.write(HELP + "\n")
        return True

    def set_params(self, assignments: list[str]) -> None:
        fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
        changes = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"expected key=value with key one of {', '.join(fields)}, got {assignment!r}")
            kind = int if key in ("top_k", "max_new_tokens", "seed", "num_beams") else float
            changes[key] = None if key == "seed" and value == "none" else kind(value)
        self.params = dataclasses.replace(self.params, **changes)

    def save(self, path: Path) -> None:
        messages = [m.to_dict() for m in self.preamble + self.turns]
        atomic_write(path, json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def run_terminal_chat(session: ChatSession, stdin=sys.stdin, out=sys.stdout) -> None:
    interactive = stdin.isatty()
    if interactive:
        out.write("chatforge chat: type a message, /help for commands, Ctrl-D to leave\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, out):
                return
            continue
        if not interactive:
            out.write(f"> {line}\n")
        try:
            session.reply(line, out)
        except ValueError as e:
            out.write(f"error: {e}\n")


# --- the commands: generate, chat ------------------------------------------------------------------------

@dataclass
class PromptingConfig:
    """What `chatforge generate` and `chatforge chat` share."""

    checkpoint: str = field(default="", metadata={
        "help": "checkpoint folder, or run folder (its latest checkpoint)", "positional": True})
    few_shot: str = field(default="", metadata={
        "help": "solved examples (JSONL in an SFT format) placed before the question: in-context learning",
        "metavar": "FILE"})
    cot: bool = field(default=False, metadata={"help": "chain of thought: add \"Let's think step by step.\""})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128, temperature=0.8))

    def load(self) -> tuple[list[Message], GPT, Tokenizer]:
        """The few-shot examples (read first, so that bad input fails before the model loads), the model
        and its tokenizer."""
        examples = load_few_shot(self.few_shot) if self.few_shot else []
        model, tokenizer, _ = load_model(self.checkpoint, pick_device(self.device))
        return examples, model, tokenizer


@dataclass
class GenerateConfig(PromptingConfig):
    prompt: str = field(default="", metadata={"help": "text to continue (empty: the start of a document)"})


@dataclass
class ChatConfig(PromptingConfig):
    system: str = field(default="", metadata={"help": "system prompt at the start of the conversation"})
    prompt: str | None = field(default=None, metadata={"help": "answer this one message and exit (for scripts)"})
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256, temperature=0.8))


def generate_text(config: GenerateConfig) -> None:
    """`chatforge generate`: the prompt (as Q:/A: blocks with few-shot examples or chain of thought) and
    its continuation, streamed to stdout."""
    examples, model, tokenizer = config.load()
    text = completion_prompt(config.prompt, examples, config.cot) if examples or config.cot else config.prompt
    print(text, end="", flush=True)
    decoder = IncrementalDecoder(tokenizer)
    prompt = tokenizer.encode_document(text)
    for token in stream(model, prompt, config.sampling, stop_ids=tokenizer.document_stops):
        print(decoder.push(token), end="", flush=True)
    print()


def chat(config: ChatConfig) -> None:
    """`chatforge chat`: a conversation in the terminal, or one answer to `prompt`."""
    examples, model, tokenizer = config.load()
    try:  # a system prompt or one-shot message with special tokens in it (the terminal chat reports its own)
        session = ChatSession(model, tokenizer, config.sampling, system=config.system, examples=examples, cot=config.cot)
        if config.prompt is not None:
            session.reply(config.prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    if config.prompt is None:
        run_terminal_chat(session)
