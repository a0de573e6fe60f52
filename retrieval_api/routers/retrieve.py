"""`POST /retrieve`: the top-k ads for one user, scored in batches by the served model over its index."""

from __future__ import annotations

import time

from fastapi import APIRouter

from retrieval_api.dependencies import Metrics, RequestQueue, Serving, Settings
from retrieval_api.errors import DOMAIN_ERRORS
from retrieval_api.errors import outcome as error_outcome
from retrieval_api.openapi import NOT_JSON, RETRY_AFTER, TOO_LARGE
from retrieval_api.routing import ApiRoute
from retrieval_api.schemas import Cost, Problem, RetrieveRequest, RetrieveResponse, ScoredAd
from retrieval_api.scoring import InvalidRequest, NotReady, Query
from streaming.validation import user_problems

router = APIRouter(route_class=ApiRoute)  # bodies read with JSON Schema's integers (5.0 is 5)


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses={
        400: NOT_JSON,
        413: TOO_LARGE,
        422: {"description": "The request is malformed or does not fit the served model's features."},
        429: {"model": Problem, "description": "Too many requests wait; retry later.", "headers": RETRY_AFTER},
        503: {"model": Problem, "description": "No model is loaded yet.", "headers": RETRY_AFTER},
        504: {"model": Problem, "description": "The deadline passed before scoring started."},
    },
)
async def retrieve_ads(
    request: RetrieveRequest, state: Serving, batcher: RequestQueue, metrics: Metrics, settings: Settings
) -> RetrieveResponse:
    """Retrieve the top-k ads for one user.

    The user tower and the layer-wise search run on the model and index that are current
    when the request's batch starts; both versions are returned, and they always belong together.
    """
    started = time.perf_counter()
    outcome = "ok"
    try:
        pair = state.current()
        if pair is None:
            raise NotReady("no model/index pair is loaded yet")
        if problems := user_problems(request.user, pair.schema, settings.user_limits):
            raise InvalidRequest(problems)
        query = Query(request.user, request.k, request.exclude_ad_ids, checked_against=pair.schema)
        answer = await batcher.submit(query, request.deadline_ms)
    except DOMAIN_ERRORS as exc:  # answered by the handlers of retrieval_api.errors
        outcome = error_outcome(exc)
        raise
    except Exception:
        outcome = "internal"
        raise
    finally:
        if outcome != "ok":
            metrics.errors.labels(outcome=outcome).inc()
        metrics.latency.labels(outcome=outcome).observe(time.perf_counter() - started)
    result = answer.result
    return RetrieveResponse(
        ads=[
            ScoredAd(ad_id=ad_id, score=score)
            for ad_id, score in zip(result.item_ids.tolist(), result.scores.tolist(), strict=True)
        ],
        model_version=answer.pair.model_version,
        index_version=answer.pair.index_version,
        cost=Cost(
            nodes_scored=result.cost.nodes_scored, items_scored=result.cost.items_scored, flops=result.cost.flops
        ),
    )
