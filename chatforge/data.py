"""Text sources -> token shards on disk -> batches of training windows; and the fine-tuning stages' batches.

`prepare` reads documents (`sources.read_documents`: .txt files and folders, .jsonl and .parquet),
tokenizes them in worker processes, separates documents with the BOS token, splits them into
train/validation by document and writes `.npy` shards (uint16 when the vocabulary fits) with a
`meta.json`. `TokenWindows` serves fixed-length windows from those shards as a pure function of (seed,
batch index), so a checkpoint only has to remember an integer to resume the exact data stream, on any
number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from tqdm import tqdm

from chatforge.errors import UserError
from chatforge.files import atomic_dir, current_dir
from chatforge.sources import SourcesConfig, nonempty_documents, source_files
from chatforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

META_FILE = "meta.json"
DATA_TOKENIZER_DIR = "tokenizer"
DATA_FORMAT_VERSION = 1


class BucketedEpochs:
    """Global batches of item indices, epoch after epoch: each epoch shuffled, sorted by length within
    windows of `window` batches (so a batch pads little), the batches shuffled again. A pure function of
    (seed, step), so a resumed run needs no data state. The remainder that fills no batch is left out."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 32):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.steps_per_epoch = len(lengths) // batch_size
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._batches(epoch))
        return self._epoch[1][index]

    def _batches(self, epoch: int) -> list[np.ndarray]:
        g = np.random.default_rng([self.seed, epoch])
        order = g.permutation(len(self.lengths))[: self.steps_per_epoch * self.batch_size]
        span = self.window * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [np.array(chunk[b : b + self.batch_size]) for b in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in g.permutation(len(batches))]


def load_splits(load: Callable[[list[str]], tuple[list[T], int]], data: list[str], val_data: list[str],
                val_fraction: float, seed: int, key: Callable[[T], str] | None = None) -> tuple[list[T], list[T], int]:
    """Training and held-out items, and how many invalid records were skipped: `val_data` when given,
    else the `val_fraction` of `data` that `is_validation` picks, by index or by `key(item)`, so that items
    sharing a key (one prompt ranked by several people) stay on one side. When the draw picks nothing from
    a small set, the last training item (with every item sharing its key) moves out of training: held-out
    items are never trained on. `val_fraction` 0 holds nothing out (the stage then evaluates nothing)."""
    items, skipped = load(data)
    if val_data:
        val, skipped_val = load(val_data)
        return items, val, skipped + skipped_val
    if not val_fraction:
        return items, [], skipped
    held_out = [is_validation(key(x) if key else i, val_fraction, seed) for i, x in enumerate(items)]
    if items and not any(held_out):
        last = key(items[-1]) if key else None
        held_out = [key(x) == last if key else i == len(items) - 1 for i, x in enumerate(items)]
    train = [x for x, v in zip(items, held_out) if not v]
    val = [x for x, v in zip(items, held_out) if v]
    if items and not train:
        raise UserError(f"{', '.join(data)}: {len(items)} item(s), too few to hold one out for validation: "
                        "give --val-data (--val-prompts for ppo) or --val-fraction 0")
    return train, val, skipped


# --- writing shards --------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_validation(doc_index: int | str, val_fraction: float, seed: int) -> bool:
    """Assign a document to the validation split by a hash of its index (or key): stable for any worker count."""
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_chunk(docs: list[str]) -> tuple[list[np.ndarray], int]:
    """Each document as the model reads it (`Tokenizer.encode_documents`: <|bos|> first for chatforge's own
    tokenizer), and the documents' size in UTF-8 bytes (for the progress bar)."""
    assert _worker_tokenizer is not None
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    arrays = [np.array(ids, dtype=dtype) for ids in tok.encode_documents(docs)]
    return arrays, sum(len(d.encode("utf-8")) for d in docs)


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends token arrays to `{split}_{n:05d}.npy` shards of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.directory, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.tokens += len(tokens)
        self.documents += 1
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.pending_tokens:
            self._flush(self.pending_tokens)

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.pending)
        name = f"{self.split}_{len(self.shards):05d}.npy"
        np.save(self.directory / name, joined[:count])
        self.shards.append({"file": name, "tokens": count})
        rest = joined[count:]
        self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)


@dataclass
class PrepareResult:
    out: Path
    meta: dict


def prepare(
    sources: list[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize the corpus into train/val shards in `out` (written to a temporary folder, then swapped in)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1 or workers < 0:
        raise UserError(f"shard_tokens must be >= 1 and workers >= 0, got {shard_tokens} and {workers}")
    tokenizer = Tokenizer.load(tokenizer_path)
    out = Path(out).resolve()
    if out.exists() and not (out / META_FILE).is_file():
        raise UserError(f"{out}: exists and is not a prepared data folder; refusing to replace it")
    files = source_files(sources)  # fail on a missing path before any work
    dtype = token_dtype(tokenizer.vocab_size)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    docs = nonempty_documents(files, field)
    # progress in bytes of the source files: known up front, so the bar has an ETA (JSON syntax is not counted)
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(desc="tokenizing", total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, dynamic_ncols=True)
    # the old folder stays readable until the complete new one is swapped in (`files.atomic_dir`)
    with contextlib.closing(bar), atomic_dir(out) as tmp:
        writers = {s: _ShardWriter(tmp, s, shard_tokens, dtype) for s in ("train", "val")}
        with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
            doc_index = 0
            for encoded, nbytes in pool.imap(_encode_chunk, _chunks(docs, 256)):
                for tokens in encoded:
                    split = "val" if is_validation(doc_index, val_fraction, seed) else "train"
                    writers[split].add(tokens)
                    doc_index += 1
                bar.update(min(nbytes, total_bytes - bar.n))
                bar.set_postfix(docs=f"{doc_index:,}", tokens=f"{writers['train'].tokens + writers['val'].tokens:,}")
        bar.update(total_bytes - bar.n)
        bar.close()
        if writers["val"].documents == 0 or writers["train"].documents == 0:
            raise UserError(
                f"corpus has {doc_index} document(s): too few for a train and a validation split "
                f"with val_fraction={val_fraction}; add documents or raise val_fraction"
            )
        for w in writers.values():
            w.close()
        tokenizer.save(tmp / DATA_TOKENIZER_DIR)
        meta = {
            "format_version": DATA_FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "sources": [str(f) for f in files],
            "field": field,
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": {
                s: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards} for s, w in writers.items()
            },
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return PrepareResult(out, meta)


# --- serving windows -------------------------------------------------------------------------------

def load_meta(data_dir: str | Path) -> dict:
    path = current_dir(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir}: not a prepared data folder (no {META_FILE}; run `chatforge data prepare`)")
    return json.loads(path.read_text())


def load_data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared data folder was made with (saved in it by `prepare`)."""
    return Tokenizer.load(current_dir(data_dir) / DATA_TOKENIZER_DIR)


class TokenWindows:
    """Windows of `seq_len + 1` tokens from one split, as (inputs, targets) batches.

    Batch `index` is a pure function of (seed, index): `mode="random"` draws window starts uniformly
    from the whole split, `mode="sequential"` walks through it in order (wrapping around). A data
    position is therefore just the next batch index. Each batch is a *global* batch; `rows` picks one
    process's slice of it, so N processes together see exactly the batch one process would.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, *, mode: str = "random", seed: int = 0):
        folder = current_dir(data_dir)  # read meta.json and the shards from the same version
        meta = load_meta(folder)
        if split not in meta["splits"]:
            raise UserError(f"{data_dir}: no {split!r} split in {META_FILE}")
        self.shards = [np.load(folder / s["file"], mmap_mode="r") for s in meta["splits"][split]["shards"]]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.shard_starts[-1])
        self.seq_len, self.mode, self.seed = seq_len, mode, seed
        self.num_windows = self.num_tokens - seq_len
        if self.num_windows < 1:
            raise UserError(
                f"{data_dir}: the {split} split has {self.num_tokens} tokens, fewer than one window of "
                f"seq_len+1 = {seq_len + 1}; use more text or a shorter seq_len"
            )

    def starts(self, index: int, batch_size: int) -> np.ndarray:
        if self.mode == "random":
            g = np.random.default_rng([self.seed, index])
            return g.integers(0, self.num_windows, size=batch_size)
        first = index * batch_size * self.seq_len
        return (first + np.arange(batch_size) * self.seq_len) % self.num_windows

    def window(self, start: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) of the split, read across shard boundaries (memory-mapped)."""
        end = start + self.seq_len + 1
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        parts, shard = [], first
        while start < end:
            offset = start - self.shard_starts[shard]
            take = min(end - start, len(self.shards[shard]) - offset)
            parts.append(self.shards[shard][offset : offset + take])
            start += take
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, index: int, batch_size: int, rows: slice = slice(None)) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch  # here, so that tokenizer worker processes need not import torch

        starts = self.starts(index, batch_size)[rows]
        windows = np.stack([self.window(s) for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


# --- the command: data prepare ---------------------------------------------------------------------------

@dataclass
class PrepareConfig(SourcesConfig):
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer folder or tokenizer.json", "required": True, "metavar": "PATH"})
    out: str = field(default="", metadata={
        "help": "data folder to write (swapped in whole when complete)", "required": True, "metavar": "DIR"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of documents held out for validation"})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard file"})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0: one per core, at most 8)"})
    seed: int = field(default=0, metadata={"help": "seed of the train/val split"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def prepare_data(config: PrepareConfig) -> PrepareResult:
    """`chatforge data prepare`: `prepare` with the command's settings, and what it wrote."""
    result = prepare(config.inputs, config.tokenizer, config.out, field=config.field, val_fraction=config.val_fraction,
                     shard_tokens=config.shard_tokens, workers=config.workers, seed=config.seed,
                     progress=config.progress)
    for split, info in result.meta["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s)")
    print(f"data -> {result.out}")
    return result
