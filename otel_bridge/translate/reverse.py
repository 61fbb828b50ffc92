"""OpenTelemetry spans -> Prefect run-state events (pure).

Spans that otel-bridge made carry every event whole on their span events
(`forward._span_event`); those come back exactly as they went in.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Optional

from otel_bridge.model.events import Event, EventRejected, validate_event
from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.translate.forward import (
    ATTR_EVENT_FOLLOWS,
    ATTR_EVENT_ID,
    ATTR_EVENT_PAYLOAD,
    ATTR_RELATED,
)

# Span event attributes that are not resource labels.
_EVENT_FIELDS = frozenset({ATTR_EVENT_ID, ATTR_EVENT_FOLLOWS, ATTR_EVENT_PAYLOAD, ATTR_RELATED})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def is_bridge_span(span: Span) -> bool:
    """Whether otel-bridge made this span (its events carry whole events)."""
    return any(ATTR_EVENT_ID in e.attributes for e in span.events)


def events_from_bridge_span(span: Span) -> list[Event]:
    """The events a span made by the forward bridge came from, exactly.

    Raises `EventRejected` when a span event that claims to carry an event
    does not hold a valid one (a span changed on its way, or truncated by a
    backend's attribute limit)."""
    span_related = span.attributes.get(ATTR_RELATED)
    return [
        _event(span_event, span_related)
        for span_event in span.events
        if ATTR_EVENT_ID in span_event.attributes
    ]


def _event(span_event: SpanEvent, span_related: Optional[object]) -> Event:
    attrs = span_event.attributes
    related = attrs.get(ATTR_RELATED, span_related)
    try:
        payload = json.loads(attrs.get(ATTR_EVENT_PAYLOAD, "{}"))
        related = json.loads(related) if isinstance(related, str) else []
    except ValueError as exc:
        raise EventRejected(
            "invalid_event", f"span event {span_event.name}: payload or related is not JSON ({exc})"
        ) from None
    return validate_event(
        {
            "occurred": from_unix_nano(span_event.time_unix_nano),
            "event": span_event.name,
            "resource": {k: v for k, v in attrs.items() if k not in _EVENT_FIELDS},
            "related": related,
            "payload": payload,
            "id": attrs[ATTR_EVENT_ID],
            "follows": attrs.get(ATTR_EVENT_FOLLOWS),
        }
    )


def from_unix_nano(nanos: int) -> datetime:
    # Integer arithmetic: a float of nanoseconds since 1970 loses microseconds.
    return _EPOCH + timedelta(microseconds=nanos // 1000)
