"""`GET /schema`: the feature schema of the model being served, so callers can build valid requests.

A `/retrieve` request is checked against the served model's `FeatureSchema` (dense width, sparse feature
names and cardinalities, history attributes); a mismatch is a 422. This route publishes that schema with
the model and index versions it belongs to, and answers 503 (with Retry-After) before a model is loaded.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hsnn.config import FeatureSchema
from retrieval_api.schemas import Problem
from retrieval_api.state import ServingState


class ServedSchema(BaseModel):
    """The feature schema requests must fit, and the model/index pair it was read from."""

    model_config = ConfigDict(extra="forbid")

    model_version: int = Field(description="Snapshot version of the served model.")
    index_version: int = Field(description="Index version served with it.")
    features: FeatureSchema = Field(description="What `user` in POST /retrieve must carry (see docs/api.md).")


def schema_router(state: ServingState, retry_after_s: int) -> APIRouter:
    router = APIRouter(tags=["schema"])

    @router.get(
        "/schema",
        response_model=ServedSchema,
        responses={503: {"model": Problem, "description": "No model is loaded yet."}},
    )
    async def served_schema() -> ServedSchema | JSONResponse:
        """The served model's feature schema (it changes only when a new snapshot is swapped in)."""
        pair = state.current()
        if pair is None:
            return JSONResponse(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                content={"detail": "no model/index pair is loaded yet"},
                headers={"Retry-After": str(retry_after_s)},
            )
        return ServedSchema(model_version=pair.model_version, index_version=pair.index_version, features=pair.schema)

    return router
