"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter

from eldercare.api.deps import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(conn: StoreDep) -> dict[str, str]:
    """The store answers too (503 otherwise, from the dependency)."""
    conn.execute("SELECT 1")
    return {"status": "ready"}
