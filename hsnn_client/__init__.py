"""A typed Python client of the retrieval API: `RetrievalClient` (sync) and `AsyncRetrievalClient`.

    from hsnn_client import RetrievalClient
    with RetrievalClient("http://retrieval-api:8000", items_token=token) as api:
        answer = api.retrieve({"dense": [...], "sparse": {...}}, k=20)
        print([ad.ad_id for ad in answer.ads], answer.model_version)

Bodies are the API's own pydantic contracts (retrieval_api.schemas). 429 and 503 are retried after the
server's Retry-After; see hsnn_client/client.py for what is retried and what raises.
"""

from hsnn_client.client import (
    ApiError,
    AsyncRetrievalClient,
    RequestRejected,
    RetrievalClient,
    RetryPolicy,
    Unavailable,
)

__all__ = ["ApiError", "AsyncRetrievalClient", "RequestRejected", "RetrievalClient", "RetryPolicy", "Unavailable"]
