"""The web pages (chat.html for `chatforge serve`, label.html and stats.html for `chatforge label serve`) and
what the two apps share, so that both answer alike:

- `page(name)`: an endpoint that serves a page with a Content-Security-Policy allowing exactly its own inline
  `<script>` and `<style>` (by sha256 hash, no 'unsafe-inline') and requests to this server, plus the other
  security headers;
- `error_response(...)`: every error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
  which the API's clients parse and the pages read;
- `BodyLimit`: the ASGI middleware that refuses bodies over a size before they are read into memory.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

WEB_DIR = Path(__file__).parent


# --- pages -------------------------------------------------------------------------------------------

def _hashes(html: str, tag: str) -> str:
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL))


def page_headers(html: str) -> dict[str, str]:
    """Nothing runs but the page's own inline script and style, nothing loads from elsewhere, and no other site
    may frame the page (clickjacking) or learn where its visitors come from. Inline event handlers (onclick="...")
    and style="..." attributes are refused too: the pages set both from their script."""
    csp = (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def page(name: str) -> Callable[[Request], Awaitable[HTMLResponse]]:
    """An endpoint (Starlette or FastAPI) serving WEB_DIR/name, read once."""
    html = (WEB_DIR / name).read_text(encoding="utf-8")
    headers = page_headers(html)

    async def endpoint(request: Request) -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return endpoint


# --- errors ------------------------------------------------------------------------------------------

def error_response(status: int, message: str, type: str | None = None, code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape; its type defaults to the one OpenAI gives such a status."""
    type = type or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def http_error(e: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body over the limit) in OpenAI's shape."""
    return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else None,
                          code="request_too_large" if e.status_code == 413 else None, headers=e.headers)


# --- the body limit ----------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: refuses request bodies over `limit` bytes with 413 before they are read into memory.

    A declared Content-Length over the limit is answered here, before the app sees the request, and
    `on_refuse(scope)` is told (the API server counts it in its metrics). A body that grows past the limit as
    it streams in (chunked, no length) raises HTTPException(413) from `receive` inside the app, whose
    HTTPException handler answers it."""

    def __init__(self, app, limit: int, on_refuse: Callable[[dict], None] | None = None):
        self.app, self.limit, self.on_refuse = app, limit, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, limited_receive, send)

    @property
    def too_large(self) -> str:
        return f"the request body is larger than {self.limit} bytes"

    async def _refuse(self, scope, receive, send):
        if self.on_refuse:
            self.on_refuse(scope)
        await error_response(413, self.too_large, code="request_too_large")(scope, receive, send)
