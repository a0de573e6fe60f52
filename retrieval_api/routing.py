"""JSON numbers read the way the published JSON Schema means them.

In JSON Schema an integer is any number with a zero fractional part, so `5.0` is a valid
`"type": "integer"` and a client (or a generator such as schemathesis) may send it. Python's
`json` reads `5.0` as a float, which the strict request models refuse. `ApiRoute` parses
request bodies with integral numbers written with a fraction or exponent read as integers;
float fields still accept them (strict floats take integers), integer fields now do too, and a
JSON `true` remains a bool, refused where an integer is expected. Nothing else changes: the
forwarded item events are re-encoded canonically by `streaming.events.encode`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _number(literal: str) -> float | int:
    value = float(literal)
    # 1e309 reads as inf, which is not an integer: kept, refused by the request models, echoed as "inf" in the 422
    return int(value) if value.is_integer() else value


def _not_json(constant: str) -> float:
    """NaN and Infinity are not JSON (Python's reader accepts them): a body that spells them is not JSON, so 400."""
    raise ValueError(f"{constant} is not a JSON number")


class JsonSchemaNumbersRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=_number, parse_constant=_not_json)
        return self._json


class ApiRoute(APIRoute):
    """An APIRoute whose handlers see `JsonSchemaNumbersRequest`s."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(JsonSchemaNumbersRequest(request.scope, request.receive))

        return route
