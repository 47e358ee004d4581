"""`chatforge label`: the human-feedback step of InstructGPT, where people rank a model's answers.

Candidates (a prompt and K >= 2 sampled completions per JSONL line) are loaded into a SQLite database; a
small web app (Starlette + uvicorn) shows each annotator a prompt and its answers in a stable random order;
the annotator ranks them best to worst, flags unacceptable ones and rates each 1-7 for helpful, honest and
harmless. `export` writes the rankings as JSONL for the reward model, `stats` reports progress and how often
annotators agree (pairwise agreement and Kendall's tau).

The database is the only state, so the server can be killed at any moment: a ranking is acknowledged only
after its transaction has committed (WAL, synchronous=FULL), and every request opens its own connection, so
concurrent requests never share one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import secrets
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from chatforge.chat_format import check_text, prompt_messages
from chatforge.data import parse_records
from chatforge.errors import UserError
from chatforge.runtime import listen

RATING_ASPECTS = ("helpful", "honest", "harmless")
RATING_MIN, RATING_MAX = 1, 7
MAX_COMPLETIONS = 26  # the page labels answers A-Z
MAX_BODY_BYTES = 1 << 20
WEB_DIR = Path(__file__).parent / "web"

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
    from chatforge.reward import sampled_tokens  # the reward model's rule for these fields

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
    db, out = existing_database(db), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    try:
        with connect(db) as conn, transaction(conn, "DEFERRED"), tmp.open("w", encoding="utf-8") as f:
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
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return count


# --- agreement -------------------------------------------------------------------------------------

def concordant_pairs(a: list[int], b: list[int]) -> tuple[int, int]:
    """(concordant, discordant): of all pairs of answers, how many two rankings (best first) order the same
    way and how many the opposite way. Both rankings must order the same answers, at least two."""
    if sorted(a) != sorted(b) or len(set(a)) != len(a) or len(a) < 2:
        raise ValueError("rankings must order the same answers, each once, at least two")
    place_a = {answer: place for place, answer in enumerate(a)}
    place_b = {answer: place for place, answer in enumerate(b)}
    concordant = sum((place_a[x] < place_a[y]) == (place_b[x] < place_b[y]) for x, y in combinations(a, 2))
    return concordant, len(a) * (len(a) - 1) // 2 - concordant


def pairwise_agreement(a: list[int], b: list[int]) -> float:
    """Share of answer pairs two rankings order the same way: 1 identical, 0 reversed, 0.5 unrelated. The
    figure InstructGPT reports for its labelers (about 73%): it bounds how well a reward model trained on one
    person's comparisons can predict another's."""
    concordant, discordant = concordant_pairs(a, b)
    return concordant / (concordant + discordant)


def kendall_tau(a: list[int], b: list[int]) -> float:
    """Kendall's tau of two rankings without ties: (concordant - discordant) / pairs, from 1 (identical)
    through 0 (unrelated) to -1 (reversed)."""
    concordant, discordant = concordant_pairs(a, b)
    return (concordant - discordant) / (concordant + discordant)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def agreement(rankings: dict[object, dict[str, list[int]]]) -> dict:
    """Inter-annotator agreement. `rankings` maps each prompt to {annotator: ranking}; every two annotators
    who ranked the same prompt are one comparison, and the means weigh comparisons equally.

    Returns the overall pairwise agreement and Kendall's tau with the numbers of prompts and comparisons
    behind them, and per annotator the mean of their own comparisons (None without any): an annotator far
    below the others is worth a talk about the guidelines.
    """
    agree, tau = [], []
    per_annotator: dict[str, list[float]] = defaultdict(list)
    prompts = 0
    for by_annotator in rankings.values():
        if len(by_annotator) < 2:
            continue
        prompts += 1
        for (name_a, a), (name_b, b) in combinations(sorted(by_annotator.items()), 2):
            agree.append(pairwise_agreement(a, b))
            tau.append(kendall_tau(a, b))
            per_annotator[name_a].append(agree[-1])
            per_annotator[name_b].append(agree[-1])
    return {
        "prompts": prompts, "comparisons": len(agree),
        "pairwise_agreement": _mean(agree), "kendall_tau": _mean(tau),
        "per_annotator": {name: {"comparisons": len(v), "pairwise_agreement": _mean(v)}
                          for name, v in per_annotator.items()},
    }


def compute_stats(conn: sqlite3.Connection, per_prompt: int) -> dict:
    """Progress per annotator and overall, and agreement: what /api/stats and `chatforge label stats` show."""
    with transaction(conn, "DEFERRED"):
        names = [row["name"] for row in conn.execute("SELECT name FROM annotators ORDER BY name")]
        rows = conn.execute("SELECT r.prompt_id, a.name, r.ranking FROM rankings r "
                            "JOIN annotators a ON a.id = r.annotator_id").fetchall()
        prompts = count_prompts(conn)
    by_prompt: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for row in rows:
        by_prompt[row["prompt_id"]][row["name"]] = json.loads(row["ranking"])
    submitted = defaultdict(int)
    for row in rows:
        submitted[row["name"]] += 1
    overall = agreement(by_prompt)
    per_annotator = overall.pop("per_annotator")
    return {
        "per_prompt": per_prompt,
        "prompts": prompts,
        "complete_prompts": sum(len(r) >= per_prompt for r in by_prompt.values()),
        "rankings": len(rows),
        "annotators": [{"name": name, "rankings": submitted[name],
                        **per_annotator.get(name, {"comparisons": 0, "pairwise_agreement": None})} for name in names],
        "agreement": overall,
    }


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_stats(stats: dict) -> str:
    """The stats as text for the terminal."""
    agree = stats["agreement"]
    lines = [f"prompts: {stats['prompts']}, complete (>= {stats['per_prompt']} rankings): {stats['complete_prompts']}, "
             f"rankings: {stats['rankings']}",
             f"agreement over {agree['prompts']} prompts ranked by 2+ annotators ({agree['comparisons']} comparisons): "
             f"pairwise {_fraction(agree['pairwise_agreement'])}, Kendall's tau {_fraction(agree['kendall_tau'])}",
             f"{'annotator':<24} {'rankings':>8} {'comparisons':>11} {'agreement':>9}"]
    for a in stats["annotators"]:
        lines.append(f"{a['name']:<24} {a['rankings']:>8} {a['comparisons']:>11} {_fraction(a['pairwise_agreement']):>9}")
    return "\n".join(lines)


def database_stats(db: str | Path, per_prompt: int | None = None) -> dict:
    with connect(existing_database(db)) as conn:
        return compute_stats(conn, per_prompt or stored_per_prompt(conn))


# --- the web app -----------------------------------------------------------------------------------

class ClientError(Exception):
    """An error the client caused; sent as {"error": message} with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _page(name: str):
    """An endpoint for a static page, with a Content-Security-Policy that allows exactly its own inline
    script and style and requests to this server: nothing else runs, nothing is fetched from elsewhere."""
    html = (WEB_DIR / name).read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    headers = {"Cache-Control": "no-store", "Content-Security-Policy": (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")}

    async def endpoint(request: Request) -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return endpoint


async def _in_db(request: Request, function, *args):
    """Run `function(conn, *args)` on a connection of its own in a worker thread (sqlite3 blocks)."""
    def call():
        with connect(request.app.state.db) as conn:
            return function(conn, *args)

    return await run_in_threadpool(call)


async def _annotator(request: Request) -> sqlite3.Row:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ClientError(401, "missing 'Authorization: Bearer TOKEN' header")
    annotator = await _in_db(request, annotator_for_token, token.strip())
    if annotator is None:
        raise ClientError(401, "unknown token")
    return annotator


async def _json_body(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ClientError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClientError(400, "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ClientError(400, "request body must be a JSON object")
    return value


async def _me(request: Request) -> JSONResponse:
    annotator = await _annotator(request)
    return JSONResponse({"name": annotator["name"], "per_prompt": request.app.state.per_prompt})


async def _next(request: Request) -> JSONResponse:
    annotator = await _annotator(request)
    return JSONResponse(await _in_db(request, next_task, annotator["id"], request.app.state.per_prompt))


async def _submit(request: Request) -> JSONResponse:
    annotator = await _annotator(request)
    body = await _json_body(request)
    try:
        stored = await _in_db(request, submit_ranking, annotator["id"], body)
    except ValueError as e:
        raise ClientError(400, str(e)) from None
    except Conflict as e:
        raise ClientError(409, str(e)) from None
    return JSONResponse(stored)


async def _stats(request: Request) -> JSONResponse:
    await _annotator(request)
    return JSONResponse(await _in_db(request, compute_stats, request.app.state.per_prompt))


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _api_error(request: Request, e: ClientError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)


def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


def _server_error(request: Request, e: Exception) -> JSONResponse:
    """The traceback goes to the server's log (uvicorn prints it), never to the client."""
    return JSONResponse({"error": "internal server error"}, status_code=500)


def create_app(db: str | Path, per_prompt: int = 1) -> Starlette:
    """The Starlette app on an initialised database; every error reaches the client as JSON {"error": ...}."""
    app = Starlette(routes=[
        Route("/", _page("label.html")), Route("/stats", _page("stats.html")), Route("/health", _health),
        Route("/api/me", _me), Route("/api/next", _next), Route("/api/rankings", _submit, methods=["POST"]),
        Route("/api/stats", _stats),
    ], exception_handlers={ClientError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.db = str(db)
    app.state.per_prompt = per_prompt
    return app


def serve(db: str | Path, candidates_file: str | Path | None = None, per_prompt: int = 1,
          host: str = "127.0.0.1", port: int = 8001) -> None:
    """Load the candidates (all checked first: bad input writes nothing), then serve until interrupted."""
    if per_prompt < 1:
        raise UserError("--per-prompt must be at least 1")
    db = Path(db)
    candidates = load_candidates(candidates_file) if candidates_file is not None else []
    if candidates_file is None and not db.is_file():
        raise UserError(f"{db}: no such database; pass --input FILE with the candidates to rank")
    sock = listen(host, port)
    init_database(db)
    with connect(db) as conn:
        added = add_prompts(conn, candidates)
        with transaction(conn):
            set_per_prompt(conn, per_prompt)
        total = count_prompts(conn)
    if candidates_file is not None:
        print(f"{added} new prompts from {candidates_file} ({len(candidates) - added} already loaded)")
    if total == 0:
        raise UserError(f"{db} holds no prompts; pass --input FILE with the candidates to rank")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: tokens travel unencrypted; put HTTPS in front of it", file=sys.stderr)
    print(f"{total} prompts, {per_prompt} ranking(s) each; labeling on http://{host}:{sock.getsockname()[1]}/ "
          f"(progress: /stats); Ctrl-C stops", flush=True)
    config = uvicorn.Config(create_app(db, per_prompt), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
