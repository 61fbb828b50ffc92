"""OTLP/JSON, as the Collector's file exporter writes it: one
`ExportTraceServiceRequest` JSON object per line, ids as hex strings, enums as
integers, 64-bit integers as decimal strings, lowerCamelCase keys.

The encoder is `model.otlp.request_json`, held equal by test to the official
protobuf encoder put through protobuf's JSON mapping (with hex ids, as OTLP
requires), and several times faster.
"""

from __future__ import annotations

from typing import IO, Any, Iterable, Optional, Sequence

import pydantic_core
from opentelemetry.sdk.resources import Resource

from otel_bridge.model.otlp import request_json
from otel_bridge.model.otlp_protobuf import Unencodable, encode_span
from otel_bridge.model.spans import Span
from otel_bridge.sinks import Sink
from otel_bridge.sinks.otlp import OnUnencodable, log_unencodable
from otel_bridge.sinks.sdk import SCOPE

__all__ = ["OtlpJsonWriter", "encode_request", "group_by_trace"]


def encode_request(spans: Sequence[Span], resource: Resource) -> dict[str, Any]:
    """One `ExportTraceServiceRequest` as an OTLP/JSON object."""
    return request_json(spans, dict(resource.attributes), SCOPE.name, SCOPE.version or "")


class OtlpJsonWriter(Sink[Span]):
    """Writes one request line per trace, so a file of many traces can be read
    back one trace at a time, and a partial file is still valid line by line.
    A span OTLP cannot carry (as `model.otlp_protobuf` judges it: a time
    before 1970, text that is not Unicode, an integer past 64 bits) is set
    aside alone, counted in `spans_unencodable` and handed to
    `on_unencodable`; the rest of its trace is written."""

    def __init__(self, stream: IO[str], resource: Resource,
                 on_unencodable: Optional[OnUnencodable] = None):
        self._stream = stream
        self._resource = resource
        self._on_unencodable = on_unencodable or log_unencodable
        self.spans_written = 0
        self.spans_unencodable = 0

    def export(self, spans: Sequence[Span]) -> None:
        for trace in group_by_trace(spans):
            try:
                line = self._line(trace)
            except (Unencodable, pydantic_core.PydanticSerializationError):
                trace = [span for span in trace if self._encodable(span)]
                if not trace:
                    continue
                line = self._line(trace)
            self._stream.write(line)
            self.spans_written += len(trace)
        self._stream.flush()

    def _line(self, trace: Sequence[Span]) -> str:
        request = encode_request(trace, self._resource)
        # Compact UTF-8 JSON, as json.dumps(separators=(",", ":"),
        # ensure_ascii=False) writes it, several times faster.
        return pydantic_core.to_json(request).decode() + "\n"

    def _encodable(self, span: Span) -> bool:
        try:
            encode_span(span)
        except Unencodable as error:
            self.spans_unencodable += 1
            self._on_unencodable(span, error)
            return False
        return True

    def close(self) -> None:
        self._stream.flush()


def group_by_trace(spans: Iterable[Span]) -> list[list[Span]]:
    """Spans grouped by trace, traces by their earliest start, spans in a
    trace by start time then id: a stable order for any input order."""
    traces: dict[int, list[Span]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    ordered = [
        sorted(trace, key=lambda s: (s.start_time_unix_nano, s.span_id))
        for trace in traces.values()
    ]
    ordered.sort(key=lambda t: (t[0].start_time_unix_nano, t[0].trace_id))
    return ordered
