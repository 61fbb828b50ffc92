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
from typing import Any, Optional, Sequence, Union
from uuid import UUID

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticSerializationError

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
        try:
            return value.astimezone(timezone.utc)
        except OverflowError:  # 9999-12-31T23:59:59-05:00 is past year 9999 in UTC
            raise ValueError("the time is out of range in UTC") from None

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
        event = _event_as_written(raw)
        if event is not None:
            return _within_size(event, size)
        obj = _loads(raw)
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


_decode = msgspec.json.Decoder().decode


def _loads(raw: str | bytes) -> Any:
    """JSON text as Python's `json` reads it: by msgspec (C, a quarter of the
    time, the same values: big integers stay integers), and by `json` itself
    for what msgspec refuses that `json` takes (NaN, a lone surrogate)."""
    try:
        return _decode(raw)
    except (msgspec.DecodeError, UnicodeEncodeError):  # (a str with a lone surrogate)
        pass
    except RecursionError:
        raise EventRejected("malformed_json", "nested too deeply") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        # Its own position, not json's "line 2 column 1": the caller says
        # where the text came from (a file's line, a body's item).
        raise EventRejected("malformed_json", f"{exc.msg}, at character {exc.pos + 1}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventRejected("malformed_json", str(exc)) from None
    except RecursionError:
        raise EventRejected("malformed_json", "nested too deeply") from None


def validate_event(obj: dict[str, Any], size: Optional[int] = None) -> Event:
    """An `Event` (a `ReceivedEvent` when it has `received`) from a JSON
    object, checked as Prefect checks it. `size` is the object's encoded size
    when known. Raises `EventRejected`."""
    model = ReceivedEvent if "received" in obj else Event
    try:
        event = model.model_validate(obj)
    except ValidationError as exc:
        raise EventRejected("invalid_event", _describe(exc)) from None
    except RecursionError:
        raise EventRejected("invalid_event", "nested too deeply") from None
    return _within_size(event, size)


def _within_size(event: Event, size: Optional[int]) -> Event:
    # Prefect measures the serialised client-side event; only look closer when
    # the raw text is near the limit, since serialising costs as much as parsing.
    if size is None or size > MAX_EVENT_SIZE_BYTES:
        try:
            encoded = len(event.model_dump_json(exclude={"received"}).encode())
        except PydanticSerializationError:  # text UTF-8 cannot carry: as JSON escapes it
            encoded = len(json.dumps(event.model_dump(mode="json", exclude={"received"})))
        if encoded > MAX_EVENT_SIZE_BYTES:
            raise EventRejected(
                "too_large",
                f"event is {encoded} bytes, Prefect's limit is {MAX_EVENT_SIZE_BYTES}",
            )
    return event


class _WireEvent(msgspec.Struct):
    """An event as Prefect writes it, for msgspec to decode and type-check
    in one pass; unknown fields are passed over, as `Event` does."""

    occurred: str
    event: str
    resource: dict[str, str]
    id: UUID
    # UNSET when absent: validation counts only the fields given as set.
    related: Union[list[dict[str, str]], msgspec.UnsetType] = msgspec.UNSET
    payload: Union[dict[str, Any], msgspec.UnsetType] = msgspec.UNSET
    follows: Union[UUID, None, msgspec.UnsetType] = msgspec.UNSET
    received: Union[str, msgspec.UnsetType] = msgspec.UNSET


_decode_wire = msgspec.json.Decoder(_WireEvent).decode


def _event_as_written(raw: str | bytes) -> Optional[Event]:
    """The event `json.loads` and validation make of `raw`, when `raw` is an
    event in the form Prefect writes it (times in UTC to the microsecond,
    canonical UUIDs, labels of strings within Prefect's limits): decoded and
    type-checked by msgspec in one pass, a fifth of the cost. None for
    anything else, which the general path takes (and rejects, with its own
    reasons). Held equal to it by a property test
    (tests/model/test_events.py)."""
    try:
        wire = _decode_wire(raw)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):  # (a str not UTF-8)
        return None
    given = set(_REQUIRED)
    occurred = _utc_time(wire.occurred)
    related = _given(wire.related, [], "related", given)
    payload = _given(wire.payload, {}, "payload", given)
    follows = _given(wire.follows, None, "follows", given)
    if (occurred is None or not 0 < len(wire.event) <= MAX_EVENT_NAME_LENGTH
            or not _labels_ok(wire.resource) or len(related) > MAX_RELATED_RESOURCES
            or not all(_labels_ok(labels) and labels.get("prefect.resource.role")
                       for labels in related)):
        return None
    fields = {"occurred": occurred, "event": wire.event, "resource": wire.resource,
              "related": related, "payload": payload, "id": wire.id, "follows": follows}
    model: type = Event
    if wire.received is not msgspec.UNSET:
        fields["received"] = _utc_time(wire.received)
        if fields["received"] is None:
            return None
        given.add("received")
        model = ReceivedEvent
    return checked_event(fields, model, given)


_REQUIRED = ("occurred", "event", "resource", "id")


def _given(value: Any, default: Any, name: str, given: set[str]) -> Any:
    if value is msgspec.UNSET:
        return default
    given.add(name)
    return value


def _utc_time(value: str) -> Optional[datetime]:
    """A time as Prefect writes it, `2026-11-28T17:50:55.248180Z` (or without
    the fraction), as validation reads it; None for any other form."""
    if (len(value) not in (20, 27) or value[-1] != "Z" or value[10] != "T"
            or (len(value) == 27 and value[19] != ".") or not value[:19].isascii()):
        return None
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _labels_ok(labels: dict[str, str]) -> bool:
    return len(labels) <= MAX_LABELS_PER_RESOURCE and bool(labels.get("prefect.resource.id"))


_object_setattr = object.__setattr__


def checked_event(fields: dict[str, Any], model: type = Event,
                   given: Optional[set[str]] = None) -> Event:
    """An `Event` (or `model`) from values already checked, in exactly the
    form validation would give them (every field present; `occurred` aware
    and UTC; `resource` and each of `related` fresh `dict[str, str]`;
    `payload` a fresh dict): `model_construct` without its overhead, for the
    hot paths. `given`: the fields the input gave, as validation counts them
    (default: all). Anything not known to be in that form must go through
    `validate_event`."""
    event = model.__new__(model)
    _object_setattr(event, "__dict__", fields)
    _object_setattr(event, "__pydantic_fields_set__", set(fields) if given is None else given)
    _object_setattr(event, "__pydantic_extra__", None)
    _object_setattr(event, "__pydantic_private__", None)
    return event


def related_valid(related: Sequence[Labels]) -> bool:
    """Whether related resources pass `Event`'s checks as they are (so a hot
    path may take them into `checked_event` without validating them)."""
    if len(related) > MAX_RELATED_RESOURCES:
        return False
    for labels in related:
        if (len(labels) > MAX_LABELS_PER_RESOURCE or not labels.get("prefect.resource.id")
                or not labels.get("prefect.resource.role")):
            return False
        for key, value in labels.items():
            if type(key) is not str or type(value) is not str:
                return False
    return True


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
