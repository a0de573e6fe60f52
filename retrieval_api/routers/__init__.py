"""The API's routes, one router per concern; `create_app` includes them in this order (the OpenAPI's)."""

from fastapi import APIRouter

from retrieval_api.routers import health, items, retrieve

ROUTERS: tuple[APIRouter, ...] = (retrieve.router, items.router, health.router)

__all__ = ["ROUTERS"]
