"""Reading what users give: text sources (.txt/.md/.rst files, folders of them, .jsonl and .parquet
records) for the tokenizer and the shards, and records for every stage (`parse_records`), with errors that
name the file and line; and the zero-install sample corpus (Python's own documentation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from chatforge.errors import UserError
from chatforge.files import atomic_open

if TYPE_CHECKING:
    pass


T = TypeVar("T")

TEXT_SUFFIXES = (".txt", ".md", ".rst")


# --- reading documents -----------------------------------------------------------------------------

def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a .jsonl or .parquet file; `where` is "file:line" or "file: row N",
    for error messages that point at the record."""
    if path.suffix == ".parquet":
        yield from _parquet_records(path, columns)
        return
    with path.open("rb") as f:  # line by line: a corpus file may be larger than memory
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def parse_records(paths: list[str], parse: Callable[[dict], T], skip_invalid: bool | None, what: str) -> tuple[list[tuple[str, T]], int]:
    """(where, parse(record)) for the records of .jsonl/.parquet files, and how many invalid records were
    skipped. `parse` raises ValueError or TypeError saying what is wrong; that stops with a one-line error
    naming the file and line, or with `skip_invalid` the record is counted and skipped (None: the command
    has no --skip-invalid, so the error does not suggest it)."""
    items, skipped = [], 0
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: {what} file does not exist")
        if path.suffix not in (".jsonl", ".parquet"):
            raise UserError(f"{path}: {what} files must be .jsonl or .parquet")
        for where, record in read_records(path):
            try:
                items.append((where, parse(record)))
            except (ValueError, TypeError) as e:
                if not skip_invalid:
                    hint = " (or pass --skip-invalid)" if skip_invalid is not None else ""
                    raise UserError(f"{where}: {e}{hint}") from None
                skipped += 1
    if not items:
        raise UserError(f"no valid {what} records in {', '.join(paths)}")
    return items, skipped


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install 'chatforge[parquet]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in columns or [] if c not in table.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=columns):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def _record_texts(path: Path, field: str) -> Iterator[str]:
    for where, record in read_records(path, columns=[field]):
        if field not in record:
            raise UserError(f"{where}: expected a JSON object with a {field!r} field")
        if not isinstance(record[field], str):
            raise UserError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
        yield record[field]


def source_files(sources: list[str | Path]) -> list[Path]:
    """The files that `sources` (files and folders) name, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise UserError(f"{path}: corpus path does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
            if not found:
                raise UserError(f"{path}: folder holds no .txt/.md/.rst/.jsonl/.parquet files")
            files.extend(found)
        else:
            files.append(path)
    return files


def read_documents(sources: list[str | Path], field: str = "text") -> Iterator[str]:
    """Every document of the sources: a whole text file, or one record's `field` of a JSONL/Parquet file."""
    for path in source_files(sources):
        if path.suffix in (".jsonl", ".parquet"):
            yield from _record_texts(path, field)
        else:
            yield _read_utf8(path)


def nonempty_documents(sources: list[str | Path], field: str = "text") -> Iterator[str]:
    """Documents with text in them; a corpus with none at all is an error."""
    found = False
    for doc in read_documents(sources, field):
        if doc.strip():
            found = True
            yield doc
    if not found:
        raise UserError(f"corpus {', '.join(map(str, sources))} is empty: no document has any text")


def stdlib_docstrings(min_chars: int = 40) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the modules, classes and functions of Python's standard library.

    Read from the source files with `ast` (nothing is imported, so nothing runs); tests and bundled
    third-party code are left out.
    """
    import ast
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__"}
    for path in sorted(lib.rglob("*.py")):
        relative = path.relative_to(lib)
        if skip.intersection(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield (module if isinstance(node, ast.Module) else f"{module}.{node.name}"), doc


def write_sample_corpus(out: str | Path, docstrings: bool = True) -> tuple[Path, int]:
    """Python's own documentation as JSONL: zero-install text for tests and the first demo.

    The documentation topics shipped with CPython in `pydoc_data.topics` (~80 documents, 0.5 MB) and,
    with `docstrings`, the docstrings of the standard library (~6,000 documents, 1.6 MB).
    """
    from pydoc_data.topics import topics

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_open(out) as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name].strip(), "source": f"topic:{name}"}) + "\n")
            count += 1
        for name, doc in stdlib_docstrings() if docstrings else ():
            f.write(json.dumps({"text": doc, "source": f"docstring:{name}"}) + "\n")
            count += 1
    return out, count


@dataclass
class SourcesConfig:
    """What a command that reads text sources is given (`tokenizer train`, `data prepare`)."""

    inputs: list[str] = field(default_factory=list, metadata={
        "help": ".txt/.md/.rst files, folders of them, .jsonl or .parquet files", "positional": True, "metavar": "SOURCE"})
    field: str = field(default="text", metadata={"help": "text field of .jsonl/.parquet records"})


@dataclass
class SampleCorpusConfig:
    out: str = field(default="", metadata={"help": "JSONL file to write", "required": True, "metavar": "FILE"})
    docstrings: bool = field(default=True, metadata={
        "help": "include the standard library's docstrings (--no-docstrings: the documentation topics only)"})


def sample_corpus(config: SampleCorpusConfig) -> Path:
    """`chatforge data sample-corpus`: `write_sample_corpus` with the command's settings."""
    path, count = write_sample_corpus(config.out, docstrings=config.docstrings)
    print(f"sample corpus: {count:,} documents of Python's documentation -> {path}")
    return path
