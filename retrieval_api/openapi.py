"""The published OpenAPI document: shared response descriptions, and integer bounds kept exact."""

from __future__ import annotations

from typing import Any

from retrieval_api.schemas import Problem
from streaming.events import MAX_ID

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
NOT_JSON = {"model": Problem, "description": "The body is not UTF-8 text."}
TOO_LARGE = {
    "model": Problem,
    "description": "The body is over `max_body_bytes` (declared or streamed); refused before it is buffered.",
}


def exact_integer_bounds(node: Any) -> Any:
    """FastAPI's OpenAPI model stores bounds as floats, so the id bound 2^63-1 would be published as 2^63
    (which the API refuses). Integer schemas get their bounds back as exact integers."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = MAX_ID if value == float(MAX_ID) else int(value)
        for value in node.values():
            exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_integer_bounds(value)
    return node
