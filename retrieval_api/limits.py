"""The request gate: size limit and authentication before a request body is read.

FastAPI reads and parses a whole body before any endpoint code or dependency runs, so a
200 MB JSON body would be buffered and parsed before a size check could refuse it, and an
unauthenticated caller would have its body parsed before its token is checked. This ASGI
middleware sits in front of the routes and, for every request that carries a body:

1. runs the route's check first, if it has one (authentication, or shedding load while the
   batcher's queue is full: `refuse_when_full`); the body is not read at all when it fails;
2. answers 413 at once when the declared Content-Length is over the limit;
3. otherwise reads the body itself, counting bytes as they stream in (chunked uploads have no
   Content-Length), and answers 413 as soon as the count passes the limit; at most the limit
   is ever held in memory;
4. hands the buffered body on to the application unchanged, with the time it arrived
   (`request.state.received_at`, `time.monotonic()`) for the routes' time budgets.

A 413 closes the connection, so the unread rest of an oversized body is never consumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from fastapi import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Authenticate = Callable[[str | None], None]
"""Called with the Authorization header (None if absent); raises HTTPException to refuse the request."""

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class TooLarge(Exception):
    pass


class Queue(Protocol):
    depth: int
    queue_size: int


def refuse_when_full(queue: Queue) -> Authenticate:
    """A gate check answering 429 before the body is read while `queue` (the batcher) is full.

    The batcher would refuse the request anyway once it was read, parsed and validated; under a
    flood (chaos E8: 1,000 clients) doing that work for every refusal kept the event loop busy for
    seconds at a time, long enough for uvicorn's keep-alive timer to close connections whose next
    request was already waiting to be read.
    """

    def check(_authorization: str | None) -> None:
        if queue.depth >= queue.queue_size:
            raise HTTPException(429, f"{queue.queue_size} requests are already waiting; retry later")

    return check


class RequestGate:
    """ASGI middleware: `authenticate[(method, path)]` runs before the body is read; over `max_body_bytes`: 413."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        authenticate: Mapping[tuple[str, str], Authenticate] | None = None,
        retry_after_s: int = 1,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.authenticate = dict(authenticate or {})
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["received_at"] = time.monotonic()  # time budgets count from here
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        check = self.authenticate.get((scope["method"], scope["path"]))
        if check is not None:
            authorization = headers.get(b"authorization")
            try:
                check(None if authorization is None else authorization.decode("latin-1"))
            except HTTPException as refused:
                extra = dict(refused.headers or {})
                if refused.status_code in (429, 503):
                    extra.setdefault("Retry-After", str(self.retry_after_s))
                await _answer(send, refused.status_code, str(refused.detail), extra)
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            if not declared.isdigit():
                await _answer(send, 400, "invalid Content-Length", {"Connection": "close"})
            else:
                await self._too_large(send, f"the body declares {int(declared)} bytes")
            return
        try:
            body = await self._read_body(receive)
        except TooLarge:
            await self._too_large(send, "the body streamed past the limit")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, send: Send, what: str) -> None:
        detail = f"{what}; at most {self.max_body_bytes} bytes are accepted"
        await _answer(send, 413, detail, {"Connection": "close"})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body once, then defers to the real one (disconnects)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, detail: str, headers: Mapping[str, str]) -> None:
    payload = json.dumps({"detail": detail}).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
