"""The labels' only state, a SQLite database: candidates (a prompt and its K answers), annotators (by token
hash), rankings with flags and ratings; tasks handed out so each prompt gets `per_prompt` rankings.
"""

import hashlib
import json
import random
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from chatforge.chat_format import check_text, prompt_messages
from chatforge.errors import UserError
from chatforge.files import atomic_open
from chatforge.sources import parse_records

RATING_ASPECTS = ("helpful", "honest", "harmless")
RATING_MIN, RATING_MAX = 1, 7
MAX_COMPLETIONS = 26  # the page labels answers A-Z

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL UNIQUE,     -- sha256 of the prompt and its completions: loading is idempotent
    prompt      TEXT NOT NULL,            -- JSON, as given: a string or a list of messages
    completions TEXT NOT NULL,            -- JSON list of strings
    sampling    TEXT,                     -- JSON object or NULL
    created_at  TEXT NOT NULL,
    tokens      TEXT                      -- JSON {completion_ids, finish_reasons, tokenizer} as sampled, or NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,     -- sha256 of the token: the database holds no usable credential
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rankings (
    id           INTEGER PRIMARY KEY,
    prompt_id    INTEGER NOT NULL REFERENCES prompts(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    ranking      TEXT NOT NULL,           -- JSON list of completion indices, best first
    unacceptable TEXT NOT NULL,           -- JSON sorted list of completion indices
    ratings      TEXT NOT NULL,           -- JSON list, one {helpful, honest, harmless} per completion
    submitted_at TEXT NOT NULL,
    UNIQUE (prompt_id, annotator_id)
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _canonical(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --- candidates ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One prompt with the completions to rank, as read from the input file."""

    prompt: str | list[dict]
    completions: list[str]
    sampling: dict | None
    tokens: dict | None = None  # the completions' token ids as sampled, for the reward model (see reward_ids)

    @property
    def key(self) -> str:
        """The prompt's identity: the same prompt with the same completions is the same task."""
        return hashlib.sha256(_canonical({"prompt": self.prompt, "completions": self.completions}).encode()).hexdigest()


def parse_candidate(record: dict) -> Candidate:
    """A checked candidate from one input record; ValueError says what is wrong."""
    if "prompt" not in record:
        raise ValueError("expected a 'prompt' field (a string or a list of {role, content} messages)")
    prompt = record["prompt"]
    prompt_messages(prompt)
    completions = record.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise ValueError("expected 'completions': a list of strings")
    if not 2 <= len(completions) <= MAX_COMPLETIONS:
        raise ValueError(f"'completions' has {len(completions)}; ranking needs 2 to {MAX_COMPLETIONS}")
    for i, completion in enumerate(completions):
        check_text(completion, f"completion {i}")
    sampling = record.get("sampling")
    if sampling is not None and not isinstance(sampling, dict):
        raise ValueError(f"'sampling' must be an object, got {type(sampling).__name__}")
    from chatforge.comparisons import sampled_tokens  # the reward model's rule for these fields

    ids, _ = sampled_tokens(record, len(completions), "completion_ids", "finish_reasons")
    tokens = {key: record[key] for key in SAMPLED_FIELDS if key in record} if ids is not None else None
    return Candidate(prompt, completions, sampling, tokens)


# What `chatforge sample` writes beside the text, kept through labeling so that the reward model reads the
# tokens that were sampled, not their text encoded again.
SAMPLED_FIELDS = ("completion_ids", "finish_reasons", "tokenizer")


def load_candidates(path: str | Path) -> list[Candidate]:
    """Every candidate of a JSONL (or Parquet) file, all checked before anything is stored."""
    return [c for _, c in parse_records([str(path)], parse_candidate, skip_invalid=None, what="candidates")[0]]


def prompt_dicts(prompt: str | list[dict]) -> list[dict]:
    """The prompt as a conversation: a bare string is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


# --- the database ----------------------------------------------------------------------------------

@contextmanager
def connect(db: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own for one request or command (sqlite3 connections must not be shared between
    threads). Autocommit mode: writes go through `transaction`."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")  # concurrent writers wait for each other
        conn.execute("PRAGMA synchronous = FULL")    # a commit survives a power cut, not just a killed process
        conn.execute("PRAGMA foreign_keys = ON")
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT, or ROLLBACK on any error. IMMEDIATE takes the write lock at the start, so two
    writers queue (busy_timeout) instead of failing on a lock upgrade."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # some errors (a full disk) have rolled it back already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init_database(db: str | Path) -> None:
    """Create the schema if missing and switch to WAL (readers never wait for the writer)."""
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with connect(db) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(SCHEMA)
            if "tokens" not in {row[1] for row in conn.execute("PRAGMA table_info(prompts)")}:  # made before it existed
                conn.execute("ALTER TABLE prompts ADD COLUMN tokens TEXT")
    except sqlite3.DatabaseError as e:
        raise UserError(f"{db}: not a usable SQLite database ({e})") from None


def existing_database(db: str | Path) -> Path:
    """A database that commands reading labels need to exist already."""
    db = Path(db)
    if not db.is_file():
        raise UserError(f"{db}: no such label database (chatforge label serve creates it)")
    init_database(db)
    return db


def add_prompts(conn: sqlite3.Connection, candidates: list[Candidate]) -> int:
    """Store the candidates not stored yet, in one transaction; how many were new."""
    with transaction(conn):
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO prompts (key, prompt, completions, sampling, created_at, tokens) VALUES (?, ?, ?, ?, ?, ?)",
            [(c.key, json.dumps(c.prompt), json.dumps(c.completions),
              None if c.sampling is None else json.dumps(c.sampling), _now(),
              None if c.tokens is None else json.dumps(c.tokens)) for c in candidates])
        return conn.total_changes - before


def count_prompts(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]


def set_per_prompt(conn: sqlite3.Connection, per_prompt: int) -> None:
    """Remember the server's --per-prompt, so that `stats` counts complete prompts the same way."""
    conn.execute("INSERT INTO settings (name, value) VALUES ('per_prompt', ?) "
                 "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (str(per_prompt),))


def stored_per_prompt(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM settings WHERE name = 'per_prompt'").fetchone()
    return int(row[0]) if row else 1


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_annotator(db: str | Path, name: str) -> str:
    """Create an annotator and return their new token (only its hash is stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise UserError("an annotator name needs 1 to 100 characters")
    init_database(db)
    token = secrets.token_urlsafe(24)
    with connect(db) as conn:
        try:
            with transaction(conn):
                conn.execute("INSERT INTO annotators (name, token_hash, created_at) VALUES (?, ?, ?)",
                             (name, _token_hash(token), _now()))
        except sqlite3.IntegrityError:
            raise UserError(f"annotator {name!r} already exists in {db} (names are unique)") from None
    return token


def annotator_for_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    return conn.execute("SELECT id, name FROM annotators WHERE token_hash = ?", (_token_hash(token),)).fetchone()


# --- tasks and rankings ----------------------------------------------------------------------------

# Prompts this annotator may rank: fewer than :per_prompt rankings, none of them theirs.
OPEN_PROMPTS = """
WITH open AS (
    SELECT p.id, (SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = p.id) AS n
    FROM prompts p
    WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_id = p.id AND r.annotator_id = :me)
)
SELECT {columns} FROM open WHERE n < :per_prompt
"""


def display_order(prompt_key: str, annotator_id: int, k: int) -> list[int]:
    """The answers' order on the page: random, so that position does not bias the ranking, but the same
    every time this annotator sees this prompt."""
    order = list(range(k))
    random.Random(f"{prompt_key}:{annotator_id}").shuffle(order)
    return order


def next_task(conn: sqlite3.Connection, annotator_id: int, per_prompt: int) -> dict:
    """The prompt this annotator should rank next (fewest rankings first, then oldest), or {"done": true};
    both with the annotator's progress."""
    me = {"me": annotator_id, "per_prompt": per_prompt}
    with transaction(conn, "DEFERRED"):  # one snapshot for the task and the counts
        submitted = conn.execute("SELECT COUNT(*) FROM rankings WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        available = conn.execute(OPEN_PROMPTS.format(columns="COUNT(*)"), me).fetchone()[0]
        prompt = conn.execute("SELECT id, key, prompt, completions FROM prompts WHERE id = (" +
                              OPEN_PROMPTS.format(columns="id") + " ORDER BY n, id LIMIT 1)", me).fetchone()
    progress = {"submitted": submitted, "available": available}
    if prompt is None:
        return {"done": True, "progress": progress}
    completions = json.loads(prompt["completions"])
    return {
        "done": False,
        "prompt_id": prompt["id"],
        "messages": prompt_dicts(json.loads(prompt["prompt"])),
        "answers": [{"index": i, "text": completions[i]}
                    for i in display_order(prompt["key"], annotator_id, len(completions))],
        "progress": progress,
    }


def _index_list(value, k: int, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i < k for i in value):
        raise ValueError(f"'{what}' must be a list of answer indices 0..{k - 1}")
    if len(set(value)) != len(value):
        raise ValueError(f"'{what}' names an answer twice")
    return value


def _ratings(value, k: int) -> list[dict]:
    expected = (f"'ratings' must be a list of {k} objects (one per answer, in the original order) with integer "
                f"{', '.join(RATING_ASPECTS)} from {RATING_MIN} to {RATING_MAX}")
    if not isinstance(value, list) or len(value) != k:
        raise ValueError(expected)
    for rating in value:
        if not isinstance(rating, dict) or set(rating) != set(RATING_ASPECTS) or not all(
                type(rating[a]) is int and RATING_MIN <= rating[a] <= RATING_MAX for a in RATING_ASPECTS):
            raise ValueError(expected)
    return [{a: rating[a] for a in RATING_ASPECTS} for rating in value]


def check_submission(body: dict, k: int) -> tuple[list[int], list[int], list[dict]]:
    """(ranking, unacceptable, ratings) of a submitted body for a prompt with k answers; ValueError says what
    is wrong."""
    ranking = _index_list(body.get("ranking"), k, "ranking")
    if len(ranking) != k:
        raise ValueError(f"'ranking' must order all {k} answers, best first (a permutation of 0..{k - 1})")
    unacceptable = sorted(_index_list(body.get("unacceptable", []), k, "unacceptable"))
    return ranking, unacceptable, _ratings(body.get("ratings"), k)


class Conflict(Exception):
    """A second, different ranking of a prompt by the same annotator: rankings are final."""


def submit_ranking(conn: sqlite3.Connection, annotator_id: int, body: dict) -> dict:
    """Store one ranking in one transaction and return it as stored.

    Idempotent: sending the same ranking again (a retry after a lost response) returns the stored one with
    "duplicate": true; a different ranking of a prompt the annotator already ranked raises Conflict.
    """
    prompt_id = body.get("prompt_id")
    if type(prompt_id) is not int:
        raise ValueError("'prompt_id' must be an integer")
    with transaction(conn):
        prompt = conn.execute("SELECT completions FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        if prompt is None:
            raise ValueError(f"unknown prompt_id {prompt_id}")
        ranking, unacceptable, ratings = check_submission(body, len(json.loads(prompt["completions"])))
        new = (json.dumps(ranking), json.dumps(unacceptable), json.dumps(ratings))
        inserted = conn.execute(
            "INSERT INTO rankings (prompt_id, annotator_id, ranking, unacceptable, ratings, submitted_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, annotator_id) DO NOTHING",
            (prompt_id, annotator_id, *new, _now())).rowcount
        stored = conn.execute("SELECT id, ranking, unacceptable, ratings, submitted_at FROM rankings "
                              "WHERE prompt_id = ? AND annotator_id = ?", (prompt_id, annotator_id)).fetchone()
    if not inserted and (stored["ranking"], stored["unacceptable"], stored["ratings"]) != new:
        raise Conflict(f"you already ranked prompt {prompt_id} differently; a ranking cannot be changed")
    return {"id": stored["id"], "prompt_id": prompt_id, "ranking": ranking, "unacceptable": unacceptable,
            "ratings": ratings, "submitted_at": stored["submitted_at"], "duplicate": not inserted}


def export_rankings(db: str | Path, out: str | Path) -> int:
    """Write every ranking as a JSONL line, in submission order, atomically; how many."""
    db = existing_database(db)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with connect(db) as conn, transaction(conn, "DEFERRED"), atomic_open(out) as f:
        for row in conn.execute(
                "SELECT p.prompt, p.completions, p.tokens, r.ranking, r.unacceptable, r.ratings, a.name, r.submitted_at "
                "FROM rankings r JOIN prompts p ON p.id = r.prompt_id JOIN annotators a ON a.id = r.annotator_id "
                "ORDER BY r.id"):
            f.write(json.dumps({
                "prompt": json.loads(row["prompt"]), "completions": json.loads(row["completions"]),
                **(json.loads(row["tokens"]) if row["tokens"] else {}), "ranking": json.loads(row["ranking"]), "unacceptable": json.loads(row["unacceptable"]),
                "ratings": json.loads(row["ratings"]), "annotator": row["name"],
                "submitted_at": row["submitted_at"]}, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- the commands: label add-annotator, label export -------------------------------------------------

@dataclass
class AnnotatorConfig:
    name: str = field(default="", metadata={"help": "the annotator's name, unique in the database", "positional": True})
    db: str = field(default="", metadata={"help": "SQLite database of prompts, annotators and rankings (created if missing)", "required": True, "metavar": "FILE"})


def new_annotator(config: AnnotatorConfig) -> str:
    """`chatforge label add-annotator`: the annotator, and their token printed (the only time it is shown)."""
    token = add_annotator(config.db, config.name)
    print(f"annotator {config.name.strip()!r} added; their token (shown only now, keep it secret):")
    print(token)
    return token


@dataclass
class RankingsExportConfig:
    db: str = field(default="", metadata={"help": "SQLite database of prompts, annotators and rankings", "required": True, "metavar": "FILE"})
    out: str = field(default="", metadata={"help": "JSONL file to write", "required": True, "metavar": "FILE"})


def export(config: RankingsExportConfig) -> int:
    """`chatforge label export`: the rankings as JSONL; how many."""
    count = export_rankings(config.db, config.out)
    print(f"{count} rankings -> {config.out}")
    return count

