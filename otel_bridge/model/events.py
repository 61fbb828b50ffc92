"""Prefect events as they travel on the wire.

These mirror `prefect.events.schemas.events` (Prefect 3.9) closely enough to
accept what Prefect accepts and reject what it rejects, without importing
Prefect: otel-bridge runs where Prefect is not installed.

Three wire forms are read (`parse_wire_event`): a bare `Event`, a server-side
`ReceivedEvent` (adds `received`), and the websocket frame
`{"type": "event", "event": {...}}` that `/api/events/out` sends.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Prefect's defaults (PREFECT_EVENTS_MAXIMUM_LABELS_PER_RESOURCE,
# PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES, PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES).
MAX_LABELS_PER_RESOURCE = 500
MAX_RELATED_RESOURCES = 100
MAX_EVENT_SIZE_BYTES = 1_500_000
# The server's column for event names.
MAX_EVENT_NAME_LENGTH = 1024

Labels = dict[str, str]

# Where Prefect puts a task run's W3C trace context when an OpenTelemetry SDK
# is installed: `payload.task_run.labels[PREFECT_TRACEPARENT_LABEL]`.
PREFECT_TRACEPARENT_LABEL = "__OTEL_TRACEPARENT"


class EventRejected(ValueError):
    """An input that is not a valid Prefect event; `reason` is a short, stable
    word fit for a metric label, `detail` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_resource(labels: Labels, *, related: bool) -> Labels:
    if len(labels) > MAX_LABELS_PER_RESOURCE:
        raise ValueError(
            f"The maximum number of labels per resource is {MAX_LABELS_PER_RESOURCE}"
        )
    if not labels.get("prefect.resource.id"):
        raise ValueError("Resources must include a non-empty prefect.resource.id label")
    if related and not labels.get("prefect.resource.role"):
        raise ValueError(
            "Related resources must include a non-empty prefect.resource.role label"
        )
    return labels


class Event(BaseModel):
    """The client-side view of an event, as Prefect's `Event`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    occurred: datetime
    event: str = Field(min_length=1, max_length=MAX_EVENT_NAME_LENGTH)
    resource: Labels
    related: list[Labels] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID
    follows: Optional[UUID] = None

    @field_validator("occurred")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Prefect treats naive timestamps as UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: Labels) -> Labels:
        return _check_resource(value, related=False)

    @field_validator("related")
    @classmethod
    def _related(cls, value: list[Labels]) -> list[Labels]:
        if len(value) > MAX_RELATED_RESOURCES:
            raise ValueError(
                f"The maximum number of related resources is {MAX_RELATED_RESOURCES}"
            )
        for labels in value:
            _check_resource(labels, related=True)
        return value

    @property
    def resource_id(self) -> str:
        return self.resource["prefect.resource.id"]

    def related_in_role(self, role: str) -> Optional[Labels]:
        """The first related resource with this role, as Prefect's
        `Event.resource_in_role` picks it."""
        for labels in self.related:
            if labels.get("prefect.resource.role") == role:
                return labels
        return None

    def to_json_dict(self) -> dict[str, Any]:
        """The event as Prefect serialises it (`Event.model_dump(mode="json")`)."""
        return self.model_dump(mode="json")


class ReceivedEvent(Event):
    """The server-side view: adds when the server received the event."""

    received: datetime


def parse_wire_event(raw: str | bytes | dict[str, Any]) -> Optional[Event]:
    """Parse one wire object into an `Event` (a `ReceivedEvent` when it has
    `received`).

    Returns None for a websocket frame that carries no event (`auth_success`,
    ...). Raises `EventRejected` for anything that is not a valid event.
    """
    if isinstance(raw, (str, bytes)):
        size = len(raw)
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventRejected("malformed_json", str(exc)) from None
    else:
        obj, size = raw, None
    if not isinstance(obj, dict):
        raise EventRejected(
            "not_an_object", f"expected a JSON object, got {type(obj).__name__}"
        )
    if "type" in obj and "resource" not in obj:
        # A websocket frame: {"type": "event", "event": {...}}, or a control frame.
        if obj["type"] != "event":
            return None
        obj = obj.get("event")
        if not isinstance(obj, dict):
            raise EventRejected("invalid_event", "event frame without an event object")
    return validate_event(obj, size)


def validate_event(obj: dict[str, Any], size: Optional[int] = None) -> Event:
    """An `Event` (a `ReceivedEvent` when it has `received`) from a JSON
    object, checked as Prefect checks it. `size` is the object's encoded size
    when known. Raises `EventRejected`."""
    model = ReceivedEvent if "received" in obj else Event
    try:
        event = model.model_validate(obj)
    except ValidationError as exc:
        raise EventRejected("invalid_event", _describe(exc)) from None
    # Prefect measures the serialised client-side event; only look closer when
    # the raw text is near the limit, since serialising costs as much as parsing.
    if size is None or size > MAX_EVENT_SIZE_BYTES:
        encoded = len(event.model_dump_json(exclude={"received"}).encode())
        if encoded > MAX_EVENT_SIZE_BYTES:
            raise EventRejected(
                "too_large",
                f"event is {encoded} bytes, Prefect's limit is {MAX_EVENT_SIZE_BYTES}",
            )
    return event


_object_setattr = object.__setattr__
_EVENT_FIELDS = frozenset(Event.model_fields)


def _checked_event(fields: dict[str, Any]) -> Event:
    """An `Event` from values its builder has already checked, in exactly the
    form validation would give them (every field present; `occurred` aware
    and UTC; `resource` and each of `related` fresh `dict[str, str]`;
    `payload` a fresh dict): `Event.model_construct` without its overhead,
    for the hot path of dual emission. Anything not known to be in that form
    must go through `validate_event`."""
    event = Event.__new__(Event)
    _object_setattr(event, "__dict__", fields)
    _object_setattr(event, "__pydantic_fields_set__", set(_EVENT_FIELDS))
    _object_setattr(event, "__pydantic_extra__", None)
    _object_setattr(event, "__pydantic_private__", None)
    return event


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
