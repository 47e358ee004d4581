"""The labeling web app (Starlette + uvicorn): the pages, the annotators' API, and `serve`.
"""

import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatforge.errors import UserError
from chatforge.label.database import (
    Conflict, add_prompts, annotator_for_token, connect, count_prompts, init_database, load_candidates, next_task,
    set_per_prompt, submit_ranking, transaction,
)
from chatforge.label.stats import compute_stats
from chatforge.runtime import listen
from chatforge.web import BodyLimit, error_response, http_error, page

MAX_BODY_BYTES = 1 << 20
# --- the web app -----------------------------------------------------------------------------------

class ClientError(Exception):
    """An error the client caused; sent in OpenAI's error shape with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
    try:
        value = json.loads(await request.body())  # BodyLimit bounds its size
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
    return error_response(e.status, e.message, headers=headers)


def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return http_error(e)


def _server_error(request: Request, e: Exception) -> JSONResponse:
    """The traceback goes to the server's log (uvicorn prints it), never to the client."""
    return error_response(500, "internal server error")


def create_app(db: str | Path, per_prompt: int = 1) -> Starlette:
    """The Starlette app on an initialised database; every error reaches the client in OpenAI's shape,
    {"error": {"message", "type", "param", "code"}}, as the API server's do."""
    app = Starlette(routes=[
        Route("/", page("label.html")), Route("/stats", page("stats.html")), Route("/health", _health),
        Route("/api/me", _me), Route("/api/next", _next), Route("/api/rankings", _submit, methods=["POST"]),
        Route("/api/stats", _stats),
    ], exception_handlers={ClientError: _api_error, HTTPException: _http_error, Exception: _server_error},
        middleware=[Middleware(BodyLimit, limit=MAX_BODY_BYTES)])
    app.state.db = str(db)
    app.state.per_prompt = per_prompt
    return app


@dataclass
class LabelServeConfig:
    db: str = field(default="", metadata={"help": "SQLite database of prompts, annotators and rankings (created if missing)",
                                          "required": True, "metavar": "FILE"})
    input: str = field(default="", metadata={
        "help": "candidates JSONL to load; may be left out when the database holds prompts", "metavar": "FILE"})
    per_prompt: int = field(default=1, metadata={"help": "how many different annotators rank each prompt"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8001, metadata={"help": "port to listen on (0: any free port)"})

    def __post_init__(self):
        if self.per_prompt < 1:
            raise ValueError(f"per_prompt must be at least 1, got {self.per_prompt}")


def serve(config: LabelServeConfig) -> None:
    """`chatforge label serve`: load the candidates (all checked first: bad input writes nothing), then
    serve until interrupted."""
    db = Path(config.db)
    candidates = load_candidates(config.input) if config.input else []
    if not config.input and not db.is_file():
        raise UserError(f"{db}: no such database; pass --input FILE with the candidates to rank")
    sock = listen(config.host, config.port)
    init_database(db)
    with connect(db) as conn:
        added = add_prompts(conn, candidates)
        with transaction(conn):
            set_per_prompt(conn, config.per_prompt)
        total = count_prompts(conn)
    if config.input:
        print(f"{added} new prompts from {config.input} ({len(candidates) - added} already loaded)")
    if total == 0:
        raise UserError(f"{db} holds no prompts; pass --input FILE with the candidates to rank")
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}: tokens travel unencrypted; put HTTPS in front of it", file=sys.stderr)
    print(f"{total} prompts, {config.per_prompt} ranking(s) each; labeling on "
          f"http://{config.host}:{sock.getsockname()[1]}/ (progress: /stats); Ctrl-C stops", flush=True)
    server = uvicorn.Config(create_app(db, config.per_prompt), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(server).run(sockets=[sock])
