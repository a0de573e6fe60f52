"""Connections that never deliver a request: uvicorn's HTTP protocol with a header timeout (slowloris).

uvicorn closes a kept-alive connection that stays idle for `timeout_keep_alive` after an answer,
but it sets no limit on how long a client may take to send a request's headers: a fresh
connection, or one that starts a request and then sends its header bytes one at a time, is kept
for as long as the client likes (`limit_concurrency` would not help: held connections count
against it, so it refuses the honest clients instead). `header_timeout_protocol(seconds)` is the
protocol `python -m retrieval_api` serves with: a connection must complete each request's headers
within `seconds` of opening, or of the first byte of that request after the previous answer, or
it is closed. The limit is on the whole header, not per byte, so trickling bytes does not extend
it. A body that trickles is the request gate's business (it reads bodies), not this one's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's automatic HTTP protocol (httptools, else h11), closing connections slower than `seconds` to
    deliver a request's headers; pass it as `uvicorn.run(..., http=...)`."""

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        header_timeout_s = seconds

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_since_cycle:
                self._disarm()  # the headers are complete: uvicorn started a new request cycle

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._waiting_since_cycle = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_since_cycle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
