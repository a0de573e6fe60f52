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
    return int(value) if value.is_integer() else value  # inf and nan are not integers: kept (and refused later)


def _not_json(constant: str) -> float:
    """NaN and Infinity are not JSON (Python's reader accepts them); refusing them here keeps them out of the
    422 body too, which could not be encoded with one in it."""
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
