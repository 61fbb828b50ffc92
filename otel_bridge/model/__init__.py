"""Plain data: what Prefect puts on the wire, and the spans we make of it."""

from otel_bridge.model.events import (
    Event,
    EventRejected,
    ReceivedEvent,
    parse_wire_event,
)
from otel_bridge.model.spans import Span, SpanEvent, SpanLink
from otel_bridge.model.states import StateType

__all__ = [
    "Event",
    "EventRejected",
    "ReceivedEvent",
    "Span",
    "SpanEvent",
    "SpanLink",
    "StateType",
    "parse_wire_event",
]
