"""The API's dependencies, as typed aliases handlers declare (``StoreDep``, ``ChannelDep``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from eldercare.alerts.dispatch.channels import Channels
from eldercare.alerts.dispatch.routing import Routing


@dataclass(frozen=True, slots=True)
class ApiState:
    """What every request may need: the store's pool, the channels and their routes."""

    pool: ConnectionPool
    channels: Channels
    routing: Routing


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


def connection(state: Annotated[ApiState, Depends(api_state)]) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection for one request (503 while the database does not answer)."""
    try:
        with state.pool.connection(timeout=5) as conn:
            yield conn
    except psycopg.OperationalError:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the store does not answer") from None


_bearer = HTTPBearer(auto_error=False)


def calling_channel(
    state: Annotated[ApiState, Depends(api_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The channel whose API key the request carries (``Authorization: Bearer <key>``)."""
    channel = state.channels.channel_for_key(credentials.credentials) if credentials else None
    if channel is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a channel's API key is needed", {"WWW-Authenticate": "Bearer"}
        )
    return channel


StateDep = Annotated[ApiState, Depends(api_state)]
StoreDep = Annotated[psycopg.Connection[Any], Depends(connection)]
ChannelDep = Annotated[str, Depends(calling_channel)]
