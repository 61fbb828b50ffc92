"""otel-bridge: Prefect task-run events <-> OpenTelemetry traces.

The public API:

- `parse_wire_event` reads an event in any of Prefect's wire forms.
- `run_span` turns all the events of one run into its span (pure).
- `Assembler` turns a stream of events into finished spans.
- `trace_id_for` / `span_id_for` are the deterministic id scheme.
"""

from otel_bridge._version import __version__
from otel_bridge.model import (
    Event,
    EventRejected,
    ReceivedEvent,
    Span,
    SpanEvent,
    SpanLink,
    StateType,
    parse_wire_event,
)
from otel_bridge.translate.assembler import Assembler, AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions, SyntheticEnd, run_span
from otel_bridge.translate.ids import span_id_for, trace_id_for

__all__ = [
    "Assembler",
    "AssemblerOptions",
    "Event",
    "EventRejected",
    "ForwardOptions",
    "ReceivedEvent",
    "Span",
    "SpanEvent",
    "SpanLink",
    "StateType",
    "SyntheticEnd",
    "__version__",
    "parse_wire_event",
    "run_span",
    "span_id_for",
    "trace_id_for",
]
