"""The hotlines' side of a dispatch: acknowledge it, read its status and attempts.

A channel sees only its own dispatches: another's is 404, as if it did not exist.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from eldercare.alerts.dispatch.routing import AckStatus
from eldercare.api.deps import ChannelDep, StateDep, StoreDep
from eldercare.gateway.store import dispatches as store

router = APIRouter(prefix="/dispatches", tags=["dispatches"])

Text = Annotated[str | None, Field(max_length=500)]


class AckIn(BaseModel):
    """An acknowledgement (hotline-dispatch.md): status only moves forward."""

    model_config = ConfigDict(extra="ignore")

    status: AckStatus
    operator: Text = None
    reference: Text = None
    note: Annotated[str | None, Field(max_length=2000)] = None


class AckOut(BaseModel):
    dispatch_id: UUID
    ack_status: str | None
    moved: bool = Field(description="false: a repeated or out-of-order ack, kept but changing nothing")
    alert_acknowledged: bool
    superseded: list[UUID]
    escalated_to_step: int | None = Field(None, description="1-based route step a decline opened")


@router.post("/{dispatch_id}/ack")
def acknowledge(
    dispatch_id: UUID, ack: AckIn, channel: ChannelDep, conn: StoreDep, state: StateDep
) -> AckOut:
    """Acknowledge a dispatch of the calling channel's; idempotent, forward only."""
    now = datetime.fromtimestamp(time.time(), UTC)
    done = store.acknowledge(
        conn,
        dispatch_id,
        channel,
        ack.status,
        state.routing,
        now,
        operator=ack.operator,
        reference=ack.reference,
        note=ack.note,
    )
    if done is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dispatch for this channel")
    return AckOut(
        dispatch_id=done.dispatch_id,
        ack_status=done.ack_status,
        moved=done.moved,
        alert_acknowledged=done.alert_acknowledged,
        superseded=list(done.superseded),
        escalated_to_step=None if done.escalated_to is None else done.escalated_to + 1,
    )


@router.get("/{dispatch_id}")
def dispatch(dispatch_id: UUID, channel: ChannelDep, conn: StoreDep) -> dict[str, Any]:
    """The dispatch's status and every attempt at it."""
    found = store.dispatch_status(conn, dispatch_id, channel)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such dispatch for this channel")
    return found
