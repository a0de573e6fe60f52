"""`POST /items/events`: ad create/update/expire events from ad systems, forwarded to the items topic."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import JSONResponse, Response

from retrieval_api.dependencies import Forwarder, Metrics, Settings, authorize
from retrieval_api.openapi import NOT_JSON, RETRY_AFTER, TOO_LARGE
from retrieval_api.routing import ApiRoute
from retrieval_api.schemas import ItemEventsAccepted, ItemEventsFailed, ItemEventsRequest, Problem

log = logging.getLogger("hsnn.retrieval_api")

router = APIRouter(route_class=ApiRoute)  # bodies read with JSON Schema's integers (5.0 is 5)


@router.post(
    "/items/events",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ItemEventsAccepted,
    dependencies=[Depends(authorize)],
    responses={
        401: {"model": Problem, "description": "No bearer token was sent (checked before the body is read)."},
        403: {"model": Problem, "description": "The bearer token is wrong (checked before the body is read)."},
        400: NOT_JSON,
        413: TOO_LARGE,
        422: {"description": "An event breaks the contract of docs/events.md (the error names the field)."},
        503: {
            "model": ItemEventsFailed | Problem,
            "description": "Item events are disabled (no token configured), or the broker did not acknowledge "
            "every event within `kafka_ack_timeout_s` (`not_acknowledged` lists them; retrying the batch is "
            "safe).",
            "headers": RETRY_AFTER,
        },
    },
)
async def item_events(
    body: ItemEventsRequest, request: Request, forwarder: Forwarder, metrics: Metrics, settings: Settings
) -> ItemEventsAccepted | Response:
    """Forward ad create/update/expire events to the items topic.

    Answers 202 only after the broker acknowledged every event (acks=all). Events are keyed by
    ad id, so one ad's events keep their order; the indexer applies them by `sequence`.
    """
    received_at = getattr(request.state, "received_at", None)  # set by the request gate, before the body was read
    acknowledged, failed = await forwarder.forward_async(body.events, received_at)
    metrics.item_events.labels(outcome="acknowledged").inc(len(acknowledged))
    if failed:
        metrics.item_events.labels(outcome="not_acknowledged").inc(len(failed))
        log.warning("%d of %d item events not acknowledged: %s", len(failed), len(body.events), failed[0].error)
        problem = ItemEventsFailed(
            detail=f"{len(failed)} of {len(body.events)} events were not acknowledged by Kafka; "
            "retry the batch (events are idempotent by sequence)",
            not_acknowledged=failed,
        )
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content=problem.model_dump(),
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    accepted = ItemEventsAccepted(accepted=len(acknowledged), topic=forwarder.topic, records=acknowledged)
    # Serialized here in one call: FastAPI's response_model path re-validates and walks 1,000 records in
    # Python on the event loop (tens of ms a batch, which /retrieve would wait for).
    return Response(accepted.model_dump_json(), status_code=status.HTTP_202_ACCEPTED, media_type="application/json")
