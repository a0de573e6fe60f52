"""Sync and async clients of POST /retrieve, POST /items/events and GET /schema.

What is retried: 429 (queue full) and 503 (no model yet, broker did not acknowledge item events, or an
overloaded Kafka pool) after the server's `Retry-After` seconds (capped by `max_delay_s`), and connection
errors and timeouts with exponential back-off. Retrying item events is safe: the indexer applies an event
only when its `sequence` is newer. What raises at once: 4xx other than 429 (`RequestRejected`, with the
server's detail; a 422 lists the fields). After the last attempt: `Unavailable`.

Request building, the retry delay and the answer parsing are shared; the clients differ in how they send and sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from retrieval_api.schema_route import ServedSchema
from retrieval_api.schemas import ItemEventsAccepted, ItemEventsRequest, RetrieveRequest, RetrieveResponse
from streaming.events import ItemEvent, UserFeatures
from streaming.version import package_version

RETRYABLE_STATUS = frozenset({429, 503})


class ApiError(Exception):
    """The API did not give what was asked; `status` is the HTTP status (None: no answer at all)."""

    def __init__(self, status: int | None, detail: Any):
        super().__init__(f"{status}: {detail}" if status is not None else str(detail))
        self.status = status
        self.detail = detail


class RequestRejected(ApiError):
    """A 4xx other than 429: retrying the same request would fail the same way."""


class Unavailable(ApiError):
    """Still 429/503 or unreachable after every attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; Retry-After wins over the back-off when the server sends it."""

    attempts: int = 4
    backoff_s: float = 0.1
    max_delay_s: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0)."""
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after is not None:
            try:
                return min(self.max_delay_s, max(0.0, float(retry_after)))
            except ValueError:  # an HTTP date: not sent by this API; fall back to the back-off
                pass
        return min(self.max_delay_s, self.backoff_s * 2**attempt)


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


@dataclass
class _Call:
    """One logical request: method, path, JSON body and the model its 2xx answer parses into."""

    method: str
    path: str
    body: dict[str, Any] | None
    answer: type[BaseModel]
    headers: dict[str, str]


def _outcome(call: _Call, response: httpx.Response) -> BaseModel | None:
    """The parsed answer, None to retry, or raise for a final refusal."""
    if response.is_success:
        return call.answer.model_validate_json(response.content)
    if response.status_code in RETRYABLE_STATUS:
        return None
    raise RequestRejected(response.status_code, _detail(response))


class _ClientBase:
    def __init__(self, items_token: str | None, retry: RetryPolicy | None):
        self.items_token = items_token
        self.retry = retry or RetryPolicy()

    def _retrieve_call(
        self, user: UserFeatures | dict[str, Any], k: int, exclude_ad_ids: Sequence[int], deadline_ms: int | None
    ) -> _Call:
        request = RetrieveRequest.model_validate(
            {"user": user, "k": k, "exclude_ad_ids": list(exclude_ad_ids), "deadline_ms": deadline_ms}
        )
        return _Call("POST", "/retrieve", request.model_dump(mode="json", exclude_none=True), RetrieveResponse, {})

    def _item_events_call(self, events: Sequence[ItemEvent | dict[str, Any]]) -> _Call:
        if self.items_token is None:
            raise ValueError("sending item events needs items_token (the API's HSNN_API_ITEMS_TOKEN)")
        body = ItemEventsRequest.model_validate(
            {"events": [e.model_dump(mode="json") if isinstance(e, BaseModel) else e for e in events]}
        )
        headers = {"Authorization": f"Bearer {self.items_token}"}
        return _Call("POST", "/items/events", body.model_dump(mode="json"), ItemEventsAccepted, headers)

    @staticmethod
    def _schema_call() -> _Call:
        return _Call("GET", "/schema", None, ServedSchema, {})

    @staticmethod
    def _default_headers() -> dict[str, str]:
        return {"User-Agent": f"hsnn-client/{package_version()}"}


class RetrievalClient(_ClientBase):
    """Blocking client. Pass `http_client` to reuse a configured `httpx.Client` (or a test transport)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        items_token: str | None = None,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__(items_token, retry)
        self.http = http_client or httpx.Client(base_url=base_url, timeout=timeout_s, headers=self._default_headers())
        self._sleep = sleep

    def retrieve(
        self,
        user: UserFeatures | dict[str, Any],
        k: int = 100,
        exclude_ad_ids: Sequence[int] = (),
        deadline_ms: int | None = None,
    ) -> RetrieveResponse:
        """The top-k ads for `user`, with the model and index versions that scored them."""
        return self._send(self._retrieve_call(user, k, exclude_ad_ids, deadline_ms))  # type: ignore[return-value]

    def send_item_events(self, events: Sequence[ItemEvent | dict[str, Any]]) -> ItemEventsAccepted:
        """Forward ad create/update/expire events; returns once Kafka acknowledged every one."""
        return self._send(self._item_events_call(events))  # type: ignore[return-value]

    def schema(self) -> ServedSchema:
        """The feature schema of the served model (what `user` must carry)."""
        return self._send(self._schema_call())  # type: ignore[return-value]

    def _send(self, call: _Call) -> BaseModel:
        response: httpx.Response | None = None
        error: Exception | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                self._sleep(self.retry.delay(attempt - 1, response))
            try:
                response = self.http.request(call.method, call.path, json=call.body, headers=call.headers)
                error = None
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                response, error = None, exc
                continue
            if (answer := _outcome(call, response)) is not None:
                return answer
        raise _gave_up(response, error)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRetrievalClient(_ClientBase):
    """asyncio client, same methods as `RetrievalClient`, awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        items_token: str | None = None,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        super().__init__(items_token, retry)
        self.http = http_client or httpx.AsyncClient(
            base_url=base_url, timeout=timeout_s, headers=self._default_headers()
        )
        self._sleep = sleep

    async def retrieve(
        self,
        user: UserFeatures | dict[str, Any],
        k: int = 100,
        exclude_ad_ids: Sequence[int] = (),
        deadline_ms: int | None = None,
    ) -> RetrieveResponse:
        return await self._send(self._retrieve_call(user, k, exclude_ad_ids, deadline_ms))  # type: ignore[return-value]

    async def send_item_events(self, events: Sequence[ItemEvent | dict[str, Any]]) -> ItemEventsAccepted:
        return await self._send(self._item_events_call(events))  # type: ignore[return-value]

    async def schema(self) -> ServedSchema:
        return await self._send(self._schema_call())  # type: ignore[return-value]

    async def _send(self, call: _Call) -> BaseModel:
        response: httpx.Response | None = None
        error: Exception | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                await self._sleep(self.retry.delay(attempt - 1, response))
            try:
                response = await self.http.request(call.method, call.path, json=call.body, headers=call.headers)
                error = None
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                response, error = None, exc
                continue
            if (answer := _outcome(call, response)) is not None:
                return answer
        raise _gave_up(response, error)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _gave_up(response: httpx.Response | None, error: Exception | None) -> Unavailable:
    if response is not None:
        return Unavailable(response.status_code, _detail(response))
    return Unavailable(None, f"no answer: {error!r}")
