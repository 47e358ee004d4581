"""Serve the assistant: an OpenAI-compatible API with continuous batching, and a web chat page.

    chatforge serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--api-key KEY ...]

`POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events or not),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text) and the chat page at `/`; the OpenAPI
schema at `/openapi.json` is generated from the same pydantic models that validate the requests.

One `Scheduler` thread owns the model. Requests wait in a bounded queue, join the running `DecodeBatch`
between decoding steps as soon as there is room (continuous batching), and leave it when they finish or
their client goes away, so concurrent users share the model instead of waiting in line. Tokens travel
from the scheduler thread to each request's asyncio queue.

Safe by default: it listens on 127.0.0.1, checks `Authorization: Bearer KEY` on every API call when keys
are given, bounds the body size, `max_tokens`, `n` and the queue, and answers errors in OpenAI's shape
without stack traces.
"""

from chatforge.serve.app import create_app, serve
from chatforge.serve.schemas import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
