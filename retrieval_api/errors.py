"""Domain errors -> HTTP answers: the one place the API maps what went wrong on /retrieve to a status code.

Routes raise the batcher's and the scorer's errors; the handlers installed here answer them, each with `{"detail": ...}`
(a list of problems for a 422) and, where retrying later helps (429, 503), a Retry-After header.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from retrieval_api.batcher import DeadlineExceeded, Overloaded, QueryFailed
from retrieval_api.scoring import ConfigurationError, InvalidRequest, NotReady

# error -> (metric outcome label, status code, answer carries Retry-After)
ERRORS: dict[type[Exception], tuple[str, int, bool]] = {
    InvalidRequest: ("invalid", status.HTTP_422_UNPROCESSABLE_CONTENT, False),
    Overloaded: ("overloaded", status.HTTP_429_TOO_MANY_REQUESTS, True),
    NotReady: ("not_ready", status.HTTP_503_SERVICE_UNAVAILABLE, True),
    DeadlineExceeded: ("deadline", status.HTTP_504_GATEWAY_TIMEOUT, False),
    ConfigurationError: ("configuration", status.HTTP_500_INTERNAL_SERVER_ERROR, False),
    QueryFailed: ("internal", status.HTTP_500_INTERNAL_SERVER_ERROR, False),  # this request alone, not its batch
}
DOMAIN_ERRORS = tuple(ERRORS)


def _mapping(exc: BaseException) -> tuple[str, int, bool] | None:
    return next((ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), None)


def outcome(exc: BaseException) -> str:
    """The `outcome` label of a failed request (anything unexpected is "internal")."""
    known = _mapping(exc)
    return known[0] if known else "internal"


def problem(code: int, detail: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return JSONResponse(status_code=code, content={"detail": detail}, headers=headers)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    _, code, retry = _mapping(exc) or ("internal", status.HTTP_500_INTERNAL_SERVER_ERROR, False)
    if isinstance(exc, InvalidRequest):  # the validator's problems, in the shape of FastAPI's own 422s
        detail = [{"type": "value_error", "loc": ["body", *p.path], "msg": p.message} for p in exc.problems]
        return JSONResponse(status_code=code, content={"detail": detail})
    return problem(code, str(exc), request.app.state.settings.retry_after_s if retry else None)


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float as its name ("inf", "nan"): strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, except that it can answer a body holding 1e309: the echoed `input` would be inf,
    which strict JSON cannot write, and FastAPI's default handler answered 500. A /retrieve body refused here
    counts as outcome "invalid", like one refused against the served model's schema."""
    if getattr(request.scope.get("route"), "path", None) == "/retrieve":
        request.app.state.metrics.errors.labels(outcome="invalid").inc()
    detail = _json_safe(jsonable_encoder(exc.errors()))
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    for error in ERRORS:
        app.add_exception_handler(error, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
