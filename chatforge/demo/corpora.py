"""The demo's real, freely licensed data, read straight from what the package registries install:

- WordNet 3.0 (Debian `wordnet-base`, /usr/share/wordnet; the WordNet 3.0 licence): words, parts of speech,
  definitions, example sentences and synonyms, read from its database files (`read_wordnet`);
- the Python 3.11 documentation (Debian `python3.11-doc`, PSF licence), reStructuredText sources turned into
  plain English (`python_docs`, `rst_to_text`);
- chatterbot-corpus (PyPI, BSD): short human-written conversations in YAML (`chatterbot_conversations`).

Nothing is downloaded at run time; `find_data` says what to install when something is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import UserError

WORDNET_DIRS = ("/usr/share/wordnet",)
PYTHON_DOCS_DIRS = ("/usr/share/doc/python3.11/html/_sources",)
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
WORDNET_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}


# --- WordNet ---------------------------------------------------------------------------------------------

@dataclass
class Synset:
    """One sense: the words that share it (synonyms), its part of speech, definition and example sentences."""

    offset: int
    pos: str  # noun, verb, adjective, adverb
    words: list[str]
    definition: str
    examples: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """A word with one part of speech and its senses, most frequent first (WordNet's index order)."""

    word: str
    pos: str
    senses: list[Synset]
    tagged: int = 0  # senses seen in WordNet's sense-tagged corpus: how common the word is, roughly

    def synonyms(self, sense: int = 0) -> list[str]:
        return [w for w in self.senses[sense].words if w.lower() != self.word.lower()]


QUOTED = re.compile(r'"([^"]*)"')
ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")  # syntactic markers on adjectives: "galore(ip)"


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """A gloss "definition; "example"; "example"" -> (definition, examples)."""
    gloss = gloss.strip()
    first_quote = gloss.find('"')
    definition = (gloss if first_quote < 0 else gloss[:first_quote]).strip().rstrip(";").strip()
    examples = [e.strip() for e in QUOTED.findall(gloss[max(first_quote, 0):]) if e.strip()] if first_quote >= 0 else []
    return definition, examples


def parse_data_line(line: str) -> Synset:
    """One line of a WordNet data file:
    offset lex_filenum ss_type w_cnt(hex) [word lex_id(hex)]... p_cnt [ptr]... [frames] | gloss"""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, ss_type, count = int(fields[0]), fields[2], int(fields[3], 16)
    words = [ADJECTIVE_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
    definition, examples = parse_gloss(gloss)
    return Synset(offset, POS_NAMES[ss_type], words, definition, examples)


def _database_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a WordNet database file, past its licence header (lines starting with spaces)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line[:1].isalnum():
                yield lineno, line.rstrip("\n")


def read_wordnet(directory: str | Path) -> list[Entry]:
    """Every (word, part of speech) of a WordNet 3.0 database folder with its senses in frequency order.
    A malformed line is an error naming its file and line."""
    directory = Path(directory)
    entries = []
    for pos, suffix in WORDNET_FILES.items():
        synsets: dict[int, Synset] = {}
        data = directory / f"data.{suffix}"
        for lineno, line in _database_lines(data):
            try:
                synset = parse_data_line(line)
            except (ValueError, IndexError, KeyError) as e:
                raise UserError(f"{data}:{lineno}: not a WordNet data line ({e})") from None
            synsets[synset.offset] = synset
        index = directory / f"index.{suffix}"
        for lineno, line in _database_lines(index):
            fields = line.split()
            try:
                senses = int(fields[2])
                offsets = [int(o) for o in fields[-senses:]]
                entries.append(Entry(fields[0].replace("_", " "), pos, [synsets[o] for o in offsets],
                                     tagged=int(fields[-senses - 1])))
            except (ValueError, IndexError, KeyError) as e:
                raise UserError(f"{index}:{lineno}: not a WordNet index line ({e.__class__.__name__}: {e})") from None
    return entries


PROSE_SENSES = 3  # senses of an entry written into the pretraining text


def wordnet_prose(entry: Entry, senses: int = PROSE_SENSES) -> str:
    """An entry written as prose for pretraining: the word, its part of speech, definitions, examples and
    synonyms of its first `senses` senses."""
    lines = []
    for i, synset in enumerate(entry.senses[:senses]):
        sentence = f"{entry.word} ({entry.pos}): {synset.definition}."
        if synset.examples:
            sentence += " For example: " + " ".join(f'"{e}".' for e in synset.examples[:2])
        others = entry.synonyms(i)
        if others:
            sentence += f" Synonyms: {', '.join(others[:4])}."
        lines.append(sentence)
    return "\n".join(lines)


# --- the Python documentation ----------------------------------------------------------------------------

BLOCK_START = re.compile(r"^\s*\.\.( |$)")  # ".. note::", ".. code-block:: python", ".. _label:", ".. comment"
FIELD_OPTION = re.compile(r"^\s+:[\w -]+:")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
TABLE_LINE = re.compile(r"^\s*[+|]")  # grid tables and line blocks
SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")  # :func:`len`, :class:`~a.B`, :ref:`the text <label>`
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")
LITERAL = re.compile(r"``(.+?)``")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
REFERENCE = re.compile(r"`([^`]+)`_{1,2}|\|([^|\s][^|]*)\|")


def _role_text(match: re.Match) -> str:
    content = match.group(1).lstrip("!")
    if content.endswith(">") and "<" in content:  # an explicit title
        return content[: content.index("<")].strip()
    return content[1:].split(".")[-1] if content.startswith("~") else content  # ~ shows the last part


def _inline(text: str) -> str:
    text = ROLE.sub(_role_text, text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    text = REFERENCE.sub(lambda m: m.group(1) or m.group(2), text)
    return text.replace("\\", "")


def rst_to_text(source: str) -> str:
    """reStructuredText as plain prose: directives, comments, link targets, option lists, tables, literal
    blocks and section underlines go; roles, links, literals and emphasis keep their text."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a block to drop (a directive's body or a literal block)
    lines = source.splitlines()
    in_table = False
    for i, line in enumerate(lines):
        if SIMPLE_TABLE_BORDER.match(line):  # a simple table runs to a border followed by a blank line
            in_table = not (in_table and (i + 1 == len(lines) or not lines[i + 1].strip()))
            continue
        if in_table:
            continue
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if BLOCK_START.match(line):  # a directive, comment or link target, with its indented body
            skip_indent = indent
            continue
        if FIELD_OPTION.match(line) or UNDERLINE.match(line) or TABLE_LINE.match(line):
            continue
        if line.rstrip().endswith("::"):  # "text::" introduces a literal (code) block
            line = line.rstrip()[:-1].rstrip(":") + ("." if line.rstrip() != "::" else "")
            skip_indent = indent
        out.append(_inline(line.strip()))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def python_docs(directory: str | Path, min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """(relative path, plain text) of every .rst.txt source under `directory` with at least `min_chars`."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*.rst.txt")):
        text = rst_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= min_chars:
            yield str(path.relative_to(directory)), text


# --- chatterbot-corpus -----------------------------------------------------------------------------------

def chatterbot_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise UserError("chatterbot-corpus is not installed: pip install chatterbot-corpus") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def chatterbot_conversations(directory: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """(file:index, turns) of every conversation in the English YAML files: turns alternate user and
    assistant. A file that is not a chatterbot corpus is an error naming it."""
    import yaml

    directory = Path(directory) if directory else chatterbot_dir()
    out = []
    for path in sorted(directory.glob("*.yml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            raise UserError(f"{path}: expected a 'conversations' list")
        for i, turns in enumerate(conversations):
            if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) and t.strip() for t in turns):
                out.append((f"{path.name}:{i}", [t.strip() for t in turns]))
    return out


# --- where the data is -----------------------------------------------------------------------------------

def find_data(data_dir: str | Path | None = None) -> dict[str, Path]:
    """The three sources: under `data_dir` (wordnet/, python-docs/, chatterbot/) when given, else where the
    packages install them. Missing ones are one error that says what to install."""
    root = Path(data_dir) if data_dir else None
    candidates = {
        "wordnet": [root / "wordnet"] if root else [Path(d) for d in WORDNET_DIRS],
        "python_docs": [root / "python-docs"] if root else [Path(d) for d in PYTHON_DOCS_DIRS],
    }
    found, missing = {}, []
    for name, paths in candidates.items():
        hit = next((p for p in paths if p.is_dir()), None)
        if hit is None:
            missing.append({"wordnet": "WordNet 3.0 (Debian: apt-get install wordnet-base)",
                            "python_docs": "the Python 3.11 documentation (Debian: apt-get install python3.11-doc)"}[name])
        else:
            found[name] = hit
    if root and (root / "chatterbot").is_dir():
        found["chatterbot"] = root / "chatterbot"
    else:
        try:
            found["chatterbot"] = chatterbot_dir()
        except UserError:
            missing.append("chatterbot-corpus (pip install chatterbot-corpus)")
    if missing:
        where = f" under {root}" if root else ""
        raise UserError(f"missing demo data{where}: {'; '.join(missing)}")
    return found
