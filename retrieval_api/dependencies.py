"""FastAPI dependencies: what a route needs, taken from the app that `create_app` wired (`app.state`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from retrieval_api.batcher import Batcher
from retrieval_api.items import ItemForwarder, check_token
from retrieval_api.metrics import ApiMetrics
from retrieval_api.settings import ApiSettings
from retrieval_api.state import IndexSource, ServingState
from streaming.snapshots import SnapshotStore

BEARER = HTTPBearer(auto_error=False, description="The token in HSNN_API_ITEMS_TOKEN.")


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_serving(request: Request) -> ServingState:
    return request.app.state.serving


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_forwarder(request: Request) -> ItemForwarder:
    return request.app.state.forwarder


def get_store(request: Request) -> SnapshotStore | None:
    return request.app.state.store


def get_index_source(request: Request) -> IndexSource | None:
    return request.app.state.index_source


Settings = Annotated[ApiSettings, Depends(get_settings)]
Serving = Annotated[ServingState, Depends(get_serving)]
RequestQueue = Annotated[Batcher, Depends(get_batcher)]
Metrics = Annotated[ApiMetrics, Depends(get_metrics)]
Forwarder = Annotated[ItemForwarder, Depends(get_forwarder)]
Store = Annotated[SnapshotStore | None, Depends(get_store)]
Source = Annotated[IndexSource | None, Depends(get_index_source)]


def authorize(settings: Settings, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """The bearer token of POST /items/events.

    The request gate has already checked the token before reading the body; this documents the
    scheme in the OpenAPI and guards the route should the gate ever be bypassed.
    """
    check_token(settings, credentials)
