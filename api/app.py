"""The API's application factory: one settings object in, a FastAPI app out.

    app = create_app(settings, channels, rules)   # uvicorn serves it (`serve --role api`)

The store's pool opens with the app and closes with it; handlers are thin and reach the
store through ``deps.py``. So far the hotlines' side (acknowledgements, a dispatch's status)
and health; the API issue grows the rest on the same factory and dependencies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from eldercare.alerts.dispatch.channels import Channels
from eldercare.alerts.dispatch.routing import Routing
from eldercare.alerts.rules import RuleSet
from eldercare.api.deps import ApiState
from eldercare.api.routes import dispatches, health
from eldercare.gateway.settings import Settings

PROBLEM = "application/problem+json"


def create_app(settings: Settings, channels: Channels, rules: RuleSet) -> FastAPI:
    """The API over the store at ``settings.database_url``, for these channels and routes."""
    pool = ConnectionPool(settings.database_url, min_size=1, max_size=8, open=False, name="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="eldercare-gateway", version="1", lifespan=lifespan)
    app.state.api = ApiState(
        pool=pool,
        channels=channels,
        routing=Routing(rules.routes, frozenset(channels.by_name), channels.notify_only),
    )
    app.include_router(health.router)
    app.include_router(dispatches.router, prefix="/api/v1")

    @app.exception_handler(HTTPException)
    async def problem(request: Request, exc: HTTPException) -> JSONResponse:
        """Errors as RFC 9457 problem details: one shape for every client."""
        body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers, media_type=PROBLEM)

    return app
