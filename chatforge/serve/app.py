"""The FastAPI app: the OpenAI-compatible endpoints, the chat page, health and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from chatforge import web
from chatforge.chat_format import Message, check_conversation, render
from chatforge.engine import SamplingParams, TokenEvent, cut_at_stop
from chatforge.serve.metrics import Metrics
from chatforge.serve.scheduler import Job, QueueFull, Scheduler
from chatforge.serve.schemas import (
    LOAD_FAILED, ApiError, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, CompletionChoice,
    CompletionRequest, ErrorResponse, Health, ModelCard, ModelList, SamplingRequest, ServeConfig, TextCompletion,
    Usage,
)
from chatforge.tokenizer import IncrementalDecoder

log = logging.getLogger("chatforge.serve")
API_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_STOP_CHARS = 100  # every token is checked against every stop string's prefixes


# --- answers: text per choice, streamed or not ---------------------------------------------------------

class ChoiceText:
    """One choice's text as its tokens arrive. Text that might be the start of a stop string is held back
    until it is clear it is not; the answer ends before the stop string."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.decoder, self.stop_strings = IncrementalDecoder(tokenizer), stop_strings
        self.text, self.sent, self.tokens, self.finish_reason = "", 0, 0, None

    def push(self, event: TokenEvent) -> str:
        """The text that can be shown now (a delta)."""
        self.tokens += 1
        self.text += self.decoder.push(event.token)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            self.text += self.decoder.flush()
        text, stopped = cut_at_stop(self.text, self.stop_strings)
        if not stopped and not event.finish_reason:
            held = max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta

    @property
    def answer(self) -> str:
        return cut_at_stop(self.text, self.stop_strings)[0]


@dataclass
class Prepared:
    """A validated request turned into the scheduler's terms."""

    kind: Literal["chat", "completion"]
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stop_ids: list[int]
    stop_strings: list[str]
    stream: bool
    include_usage: bool


class Server:
    """The app's state: config, model (once loaded), scheduler and metrics."""

    def __init__(self, config: ServeConfig, checkpoint: str | Path):
        self.config, self.checkpoint = config, Path(checkpoint)
        self.model_name = config.model_name or self.checkpoint.resolve().name
        self.created = int(time.time())
        self.scheduler: Scheduler | None = None
        self.tokenizer = self.context = None
        self.load_error: str | None = None
        self.metrics = Metrics()

    def load(self) -> None:
        from chatforge.checkpoint import load_model
        from chatforge.runtime import pick_device, pick_dtype

        try:
            device = pick_device(self.config.device)
            model, self.tokenizer, _ = load_model(self.checkpoint, device)
            model.to(pick_dtype(self.config.dtype, device)).eval()  # inference: no fp32 master copy needed
            self.context = model.config.max_seq_len
            self.scheduler = Scheduler(model, self.tokenizer, self.config.max_batch, self.config.max_queue, self.metrics)
            log.warning("model %s loaded: %s parameters, context %d, %s on %s", self.model_name,
                        f"{model.num_params():,}", self.context, str(next(model.parameters()).dtype).removeprefix("torch."), device)
        except Exception as e:  # noqa: BLE001 - reported by /health and every API call
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load %s: %s", self.checkpoint, self.load_error)

    def ready(self) -> Scheduler:
        if self.load_error:
            raise ApiError(500, LOAD_FAILED, "server_error")
        if self.scheduler is None:
            raise ApiError(503, "the model is loading; try again in a few seconds", "service_unavailable",
                           headers={"Retry-After": "2"})
        return self.scheduler

    def prepare(self, body: SamplingRequest) -> Prepared:
        """Check the request against the model and the server's limits; tokenize it."""
        self.ready()
        if body.model != self.model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist (this server has '{self.model_name}')",
                           code="model_not_found", param="model")
        limits = self.config
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}, this server allows at most {limits.max_tokens}", param="max_tokens")
        if body.n > limits.max_n:
            raise ApiError(400, f"n is {body.n}, this server allows at most {limits.max_n}", param="n")
        prompts_given = len(body.prompt) if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) else 1
        if prompts_given * body.n > limits.max_batch:
            raise ApiError(400, f"{prompts_given} prompts x n = {body.n} answers; this server makes at most "
                           f"{limits.max_batch} at once", param="n")
        if body.num_beams > 1 and body.n > body.num_beams:
            raise ApiError(400, f"n is {body.n}, but num_beams = {body.num_beams} beams give at most that many answers",
                           param="n")
        if prompts_given * body.num_beams > limits.max_batch:
            raise ApiError(400, f"{prompts_given} prompts x num_beams = {body.num_beams} beams; this server decodes "
                           f"at most {limits.max_batch} sequences at once", param="num_beams")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop must be up to 4 strings of 1 to {MAX_STOP_CHARS} characters", param="stop")
        tok = self.tokenizer
        if isinstance(body, ChatCompletionRequest):
            messages = [Message(m.role, m.content) for m in body.messages]
            try:
                check_conversation(messages, final_assistant=False)
                if messages[-1].role != "user":
                    raise ValueError("the last message must be the user's (the answer replies to it)")
            except ValueError as e:
                raise ApiError(400, f"messages: {e}", param="messages") from None
            kind, prompts, stop_ids = "chat", [render(messages, tok, add_generation_prompt=True)], [tok.end_id]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts:
                raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
            kind, prompts, stop_ids = "completion", [tok.encode_document(t) for t in texts], list(tok.document_stops)
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise ApiError(400, f"the prompt is {longest} tokens; the model's context is {self.context} tokens, "
                           "with room for at least one new token", code="context_length_exceeded", param="messages" if kind == "chat" else "prompt")
        params = SamplingParams(max_new_tokens=min(max_tokens or self.context, limits.max_tokens),
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                num_beams=body.num_beams, length_penalty=body.length_penalty)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(kind, prompts, params, body.n, stop_ids, stop, body.stream, include_usage)

    def submit(self, prepared: Prepared) -> Job:
        job = Job(prepared.prompts, prepared.params, prepared.n, prepared.stop_ids, prepared.stop_strings,
                  asyncio.get_running_loop())
        try:
            self.ready().submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: {self.config.max_queue} requests are waiting; retry later",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return job


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def events_of(job: Job, server: Server, request: Request) -> AsyncIterator[list[TokenEvent]]:
    """The job's token events as they come. A watcher asks twice a second whether the client is still
    there, whatever the tokens do (ClientGone); the job is cancelled if the consumer stops early."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        job.queue.put_nowait(ClientGone())

    watcher, done = asyncio.create_task(watch()), False
    try:
        while True:
            item = await job.queue.get()
            if item is None:
                done = True
                return
            if isinstance(item, ClientGone):
                raise item
            if isinstance(item, Exception):
                done = True
                raise ApiError(500, "generation failed (see the server's log)", "server_error")
            yield item
    finally:
        watcher.cancel()
        if not done:
            server.scheduler.cancel(job)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(checkpoint: str | Path, config: ServeConfig, load_in_background: bool = True) -> FastAPI:
    """The API and the page; the model loads in a thread (the API answers 503 until it is ready)."""
    server = Server(config, checkpoint)

    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=server.load, name="chatforge-load", daemon=True).start()
        else:
            server.load()
        yield
        if server.scheduler:
            server.scheduler.stop()

    app = FastAPI(title="chatforge", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible API for a chatforge model.")
    app.state.server = server
    errors = {400: {"model": ErrorResponse, "description": "bad request"},
              401: {"model": ErrorResponse, "description": "missing or wrong API key"},
              404: {"model": ErrorResponse, "description": "unknown model"},
              413: {"model": ErrorResponse, "description": "request body too large"},
              429: {"model": ErrorResponse, "description": "queue full"},
              500: {"model": ErrorResponse, "description": "the model failed to load, or generation failed"},
              503: {"model": ErrorResponse, "description": "the model is loading"}}

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in config.api_key):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    api = [Depends(authorize)]

    @app.get("/health", response_model=Health, responses={503: {"model": Health}, 500: {"model": ErrorResponse}})
    def health():
        if server.load_error:
            raise ApiError(500, LOAD_FAILED, "server_error")
        if server.scheduler is not None and not server.scheduler.thread.is_alive():
            raise ApiError(500, "the scheduler thread has stopped (see the server's log)", "server_error")
        if server.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, dependencies=api, responses=errors)
    def models():
        return ModelList(data=[ModelCard(id=server.model_name, created=server.created)])

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=api, responses=errors)
    def model_card(model: str):
        if model != server.model_name:
            raise ApiError(404, f"the model '{model}' does not exist", code="model_not_found", param="model")
        return ModelCard(id=server.model_name, created=server.created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=api, responses={
        **errors, 200: {"content": {"text/event-stream": {}}, "description": "a completion, or with stream: "
                        "server-sent chat.completion.chunk events ending with [DONE]"}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await complete(server, server.prepare(body), request, "/v1/chat/completions")

    @app.post("/v1/completions", response_model=TextCompletion, dependencies=api, responses={
        **errors, 200: {"content": {"text/event-stream": {}}, "description": "a completion, or with stream: "
                        "server-sent text_completion events ending with [DONE]"}})
    async def completions(body: CompletionRequest, request: Request):
        return await complete(server, server.prepare(body), request, "/v1/completions")

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        scheduler = server.scheduler
        return server.metrics.render(scheduler.queue_depth if scheduler else 0, len(scheduler.batch) if scheduler else 0)

    app.get("/", response_class=HTMLResponse, include_in_schema=False)(web.page("chat.html"))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(server, request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = first["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
        return error_response(server, request, ApiError(400, f"{where or 'body'}: {message}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        count(server, endpoint_label(request.scope), e.status_code)
        return web.http_error(e)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return error_response(server, request, ApiError(500, "internal server error", "server_error"))

    def openapi():  # requests that fail validation get 400 in OpenAI's shape, not FastAPI's 422
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def refused(scope) -> None:  # a body over the limit, refused before any route saw it
        path = scope.get("path", "")
        count(server, path if path in API_PATHS else "other", 413)

    app.add_middleware(web.BodyLimit, limit=config.max_body_bytes, on_refuse=refused)
    return app


def endpoint_label(scope) -> str:
    """The metrics label of a request: its route's template, never the raw path (no label injection, and
    no new series per unknown path)."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


def count(server: Server, endpoint: str, status: int) -> None:
    with server.metrics.lock:
        server.metrics.requests[(endpoint, status)] += 1


def client_gone(server: Server, endpoint: str) -> Response:
    """Count a request whose client left (nginx's 499); the response goes nowhere."""
    count(server, endpoint, 499)
    return Response(status_code=499)


def error_response(server: Server, request: Request, e: ApiError) -> JSONResponse:
    count(server, endpoint_label(request.scope), e.status)
    return web.error_response(e.status, headers=e.headers, **e.body.model_dump())


async def complete(server: Server, prepared: Prepared, request: Request, endpoint: str):
    start = time.monotonic()
    job = server.submit(prepared)
    request_id = ("chatcmpl-" if prepared.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created, model = int(time.time()), server.model_name
    choices = [ChoiceText(server.tokenizer, prepared.stop_strings) for _ in range(len(prepared.prompts) * prepared.n)]
    prompt_tokens = sum(len(p) for p in prepared.prompts)

    def finished(status: int = 200) -> Usage:
        completion_tokens = sum(c.tokens for c in choices)
        with server.metrics.lock:
            metrics = server.metrics
            metrics.requests[(endpoint, status)] += 1
            metrics.prompt_tokens += prompt_tokens
            metrics.completion_tokens += completion_tokens
            metrics.latency.observe(time.monotonic() - start)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    first_token = True

    def deltas(events: list[TokenEvent]) -> list[tuple[int, str, str | None]]:
        nonlocal first_token
        if first_token:
            first_token = False
            with server.metrics.lock:
                server.metrics.first_token.observe(time.monotonic() - start)
        out = []
        for e in events:
            index = e.prompt * prepared.n + e.sample
            out.append((index, choices[index].push(e), e.finish_reason))
        return out

    if not prepared.stream:
        try:
            async for events in events_of(job, server, request):
                deltas(events)
        except ClientGone:
            return client_gone(server, endpoint)
        usage = finished()
        if prepared.kind == "chat":
            return ChatCompletion(id=request_id, created=created, model=model, usage=usage, choices=[
                ChatChoice(index=i, message=ChatMessage(role="assistant", content=c.answer.strip()), finish_reason=c.finish_reason)
                for i, c in enumerate(choices)])
        return TextCompletion(id=request_id, created=created, model=model, usage=usage, choices=[
            CompletionChoice(index=i, text=c.answer, finish_reason=c.finish_reason) for i, c in enumerate(choices)])

    def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if prepared.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    leading = [prepared.kind == "chat"] * len(choices)  # chat answers start without the model's leading space
    # a text chunk is the same JSON each time but for its text: built once, filled per token
    templates = [sse(chunk(i, "\0", None)).split('"\\u0000"') for i in range(len(choices))]

    def events_as_sse(events: list[TokenEvent]) -> list[str]:
        out = []
        for index, text, finish_reason in deltas(events):
            if leading[index]:
                text = text.lstrip()
                leading[index] = not text
            if text:
                head, tail = templates[index]
                out.append(head + json.dumps(text, ensure_ascii=False) + tail)
            if finish_reason:
                out.append(sse(chunk(index, None, finish_reason)))
        return out

    async def stream() -> AsyncIterator[str]:
        if prepared.kind == "chat":
            for i in range(len(choices)):
                yield sse(chunk(i, None, None, role=True))
        try:
            async for events in events_of(job, server, request):
                if data := "".join(events_as_sse(events)):  # nothing while text is held back
                    yield data
        except ApiError as e:  # the status line is sent already: the error travels as an event
            yield sse({"error": e.body.model_dump()})
            return
        except ClientGone:
            client_gone(server, endpoint)
            return
        usage = finished()
        if prepared.include_usage:
            yield sse({"id": request_id, "object": "chat.completion.chunk" if prepared.kind == "chat" else "text_completion",
                       "created": created, "model": model, "choices": [], "usage": usage.model_dump()})
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serve(checkpoint: str | Path, config: ServeConfig) -> None:
    """Serve until interrupted; the port is bound first, so that a taken port is a one-line error."""
    import uvicorn

    from chatforge.checkpoint import resolve_checkpoint
    from chatforge.runtime import listen

    if not config.model_name:
        config = dataclasses.replace(config, model_name=Path(checkpoint).resolve().name)
    checkpoint = resolve_checkpoint(checkpoint)
    sock = listen(config.host, config.port)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}: requests travel unencrypted; put HTTPS in front of it", flush=True)
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: no --api-key: anyone who can reach this address can use the model", flush=True)
    host, port = sock.getsockname()[:2]
    print(f"chatforge serving {checkpoint} on http://{host}:{port}/ (API: /v1, docs: /docs); Ctrl-C stops", flush=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    app = create_app(checkpoint, config)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                  lifespan="on")).run(sockets=[sock])

