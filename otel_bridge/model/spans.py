"""Spans as plain values.

The translation core produces and consumes these; the sinks turn them into the
OpenTelemetry SDK's `ReadableSpan` or OTLP. Keeping them plain (no SDK objects,
no clocks) makes them easy to compare field by field in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from opentelemetry.trace import SpanKind, StatusCode

AttributeValue = Union[str, bool, int, float, Sequence[str], Sequence[bool],
                       Sequence[int], Sequence[float]]
Attributes = Mapping[str, AttributeValue]


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_unix_nano: int
    attributes: Attributes = field(default_factory=dict)


@dataclass(frozen=True)
class SpanLink:
    trace_id: int
    span_id: int
    attributes: Attributes = field(default_factory=dict)
    # W3C trace-flags of the linked context (01 = sampled).
    trace_flags: int = 1


class TraceContextIds:
    """`trace_id` and `span_id` as W3C trace context and OTLP/JSON write them
    (lower-case hex), for what carries both: a span, a log record."""

    trace_id: int
    span_id: int

    @property
    def trace_id_hex(self) -> str:
        return format(self.trace_id, "032x")

    @property
    def span_id_hex(self) -> str:
        return format(self.span_id, "016x")


@dataclass(frozen=True)
class Span(TraceContextIds):
    trace_id: int
    span_id: int
    parent_span_id: Optional[int]
    name: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: Attributes = field(default_factory=dict)
    events: Sequence[SpanEvent] = ()
    links: Sequence[SpanLink] = ()
    kind: SpanKind = SpanKind.INTERNAL
    status_code: StatusCode = StatusCode.UNSET
    status_message: str = ""
