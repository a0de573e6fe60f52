"""Probes and metrics: `GET /livez`, `GET /readyz` (a model/index pair is loaded), `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from retrieval_api.dependencies import Metrics, Serving, Settings
from retrieval_api.errors import problem
from retrieval_api.openapi import RETRY_AFTER
from retrieval_api.routing import ApiRoute
from retrieval_api.schemas import Problem

router = APIRouter(route_class=ApiRoute)  # bodies read with JSON Schema's integers (5.0 is 5)


@router.get("/livez", response_model=Problem)
async def livez() -> Problem:
    """The process is up (always 200)."""
    return Problem(detail="alive")


@router.get(
    "/readyz",
    response_model=Problem,
    responses={503: {"model": Problem, "description": "Not ready.", "headers": RETRY_AFTER}},
)
async def readyz(state: Serving, settings: Settings) -> Problem | JSONResponse:
    """200 once a model/index pair is loaded, 503 with the reason before."""
    pair = state.current()
    if pair is None:
        return problem(status.HTTP_503_SERVICE_UNAVAILABLE, "no model/index pair is loaded yet", settings.retry_after_s)
    return Problem(detail=f"serving model {pair.model_version} with index {pair.index_version}")


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(metrics: Metrics) -> PlainTextResponse:
    """Prometheus text exposition of this app's registry."""
    return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
