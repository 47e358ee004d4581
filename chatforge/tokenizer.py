"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers` (Rust) and saved as `tokenizer.json`.

Byte-level means every UTF-8 string encodes (no unknown token) and decodes back exactly. The special
tokens take the first ids; SFT's chat template is built from the role tokens.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from chatforge.errors import UserError
from chatforge.files import atomic_write
from chatforge.sources import SourcesConfig, nonempty_documents

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def _own_template() -> str:
    from chatforge.chat_format import JINJA_TEMPLATE  # the chat format is built on the tokenizer's tokens

    return JINJA_TEMPLATE


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: chatforge's own (its special tokens, its chat template), or
    an imported model's (`config`: its tokenizer_config.json, with the special tokens and the Jinja chat
    template it names, and `end_of_turn_token`, which `chatforge import` finds in the template)."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None):
        self.hf = hf
        self.config = config or {}
        own_template = self.config.get("chat_template") in (None, _own_template())
        self.native = own_template and all(hf.token_to_id(t) is not None for t in SPECIAL_TOKENS)
        if self.native:
            self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
            self.bos_id, self.eos_id, self.pad_id = self.special[BOS], self.special[EOS], self.special[PAD]
            self.end_id = self.special[END_OF_TURN]
            # What a document is to the model: <|bos|> then its text. chatforge encodes without special tokens and
            # adds <|bos|> itself; this makes other tools (transformers' tokenizer(text)) read text the same way.
            hf.post_processor = processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)])
            return
        self.special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.bos_id = self._token_id("bos_token", required=False)
        self.eos_id = self._token_id("eos_token")
        self.pad_id = self._token_id("pad_token", required=False)
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.end_id = self._token_id("end_of_turn_token", required=False)
        self.end_id = self.eos_id if self.end_id is None else self.end_id

    def _token_id(self, field: str, required: bool = True) -> int | None:
        token = self.config.get(field)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None and not required:
            return None
        if not isinstance(token, str) or self.hf.token_to_id(token) is None:
            raise UserError(f"{TOKENIZER_CONFIG_FILE}: {field} {token!r} is not a token of tokenizer.json")
        return self.hf.token_to_id(token)

    @property
    def chat_template(self) -> str:
        """The Jinja chat template (chatforge's own for its tokenizers)."""
        if self.native:
            return _own_template()
        if not self.config.get("chat_template"):
            raise UserError("this tokenizer has no chat template: the model continues text, it does not chat")
        return self.config["chat_template"]

    def encode_document(self, text: str) -> list[int]:
        """A text as the model reads a document: with the <|bos|> chatforge puts first, or, for an imported
        tokenizer, what its own post-processor adds (as `transformers` reads text for it)."""
        if self.native:
            return [self.bos_id, *self.encode(text)]
        return self.hf.encode(text, add_special_tokens=True).ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """`encode_document` of each text, encoded in parallel."""
        if self.native:
            return [[self.bos_id, *ids] for ids in self.encode_batch(texts)]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=True)]

    @property
    def document_stops(self) -> tuple[int, ...]:
        """Where a text ends when it is continued: its <|eos|>, or the <|bos|> that starts the next document."""
        return tuple(dict.fromkeys(i for i in (self.eos_id, self.bos_id) if i is not None))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer: token ids stored in a file are only meaningful to a tokenizer
        with the same fingerprint."""
        # what text means in ids, not what a tokenizer adds around it: hashed without the post-processor, so a
        # tokenizer hashes as it did before chatforge gave its tokenizers one (stored ids stay valid)
        vocabulary = HFTokenizer.from_str(self.hf.to_str())
        vocabulary.post_processor = None
        return hashlib.sha256(vocabulary.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that `AutoTokenizer.from_pretrained` understands,
        with the chat template, so `apply_chat_template` renders conversations as chatforge does."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        hf_config = self.config if not self.native else {
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN],
            "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write(directory / TOKENIZER_CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a tokenizer.json file or a folder that contains one."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{file}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{file}: not a valid tokenizer.json ({e})") from None
        config_file = file.with_name(TOKENIZER_CONFIG_FILE)
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else None
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls(hf, config)


class IncrementalDecoder:
    """Text of a growing token sequence, piece by piece, for streaming: a piece is released only once its
    bytes form whole UTF-8 characters (a character may span several byte-level tokens). Each token costs
    the decoding of the few tokens since the last released piece, not of the whole sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.tokens: list[int] = []
        self.released = 0  # tokens whose text is out; the pending ones follow

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens[self.released:], skip_special=self.skip_special)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            return ""
        self.released = len(self.tokens)
        return text

    def flush(self) -> str:
        """What is still held back when the sequence ends (an incomplete character, as U+FFFD)."""
        text = self.tokenizer.decode(self.tokens[self.released:], skip_special=self.skip_special)
        self.released = len(self.tokens)
        return text


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes included)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab size {vocab_size} is too small: it must hold the {BYTE_ALPHABET_SIZE} bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}"
        )
    hf = HFTokenizer(models.BPE())
    # GPT-style splitting (words, numbers, punctuation, whitespace) before merging; no prefix space so
    # that decode(encode(text)) == text exactly.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


@dataclass
class TokenizerTrainConfig(SourcesConfig):
    out: str = field(default="", metadata={
        "help": "folder to write tokenizer.json and tokenizer_config.json to", "required": True, "metavar": "DIR"})
    vocab_size: int = field(default=8192, metadata={"help": "tokens in the vocabulary, special tokens included"})
    min_frequency: int = field(default=2, metadata={"help": "least count of a pair to merge it"})
    progress: bool = field(default=True, metadata={"help": "show the trainer's progress bars on a terminal"})


def train_tokenizer(config: TokenizerTrainConfig) -> Tokenizer:
    """`chatforge tokenizer train`: a BPE trained on the sources' non-empty documents, saved to `out`."""
    tokenizer = train_bpe(nonempty_documents(config.inputs, config.field), config.vocab_size, config.min_frequency,
                          progress=config.progress and sys.stderr.isatty())
    tokenizer.save(config.out)
    print(f"tokenizer: {tokenizer.vocab_size} tokens -> {config.out}/tokenizer.json")
    return tokenizer
