"""OTLP export through the official OpenTelemetry exporters.

Endpoint, headers, timeout, compression and certificates come from the
standard `OTEL_EXPORTER_OTLP_*` / `OTEL_EXPORTER_OTLP_TRACES_*` variables,
read by the exporters themselves. The protocol comes from
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`:
`grpc` or `http/protobuf` (the specification's default).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel_bridge.model.spans import Span
from otel_bridge.sinks._otlp_size import field_size, span_size_bound
from otel_bridge.sinks.sdk import to_readable_spans

PROTOCOLS = ("grpc", "http/protobuf")
# Bytes per request. Jaeger's and Tempo's OTLP receivers refuse a request over
# gRPC's default 4 MiB whole, every span in it lost, and a span carries every
# state of its run, messages of up to 100,000 characters included; so
# requests are cut by encoded size, with room to spare. A span bigger than this
# goes alone.
MAX_REQUEST_BYTES = 3_000_000


class ExportFailed(RuntimeError):
    pass


def protocol_from_env() -> str:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    return protocol


def exporter_from_env(protocol: Optional[str] = None) -> SpanExporter:
    protocol = protocol or protocol_from_env()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def batches_by_size(
    spans: Sequence[Span], limit: int = MAX_REQUEST_BYTES, overhead: int = 0
) -> Iterator[list[Span]]:
    """Consecutive runs of spans whose encoded request stays under `limit`,
    `overhead` being what a request takes besides its spans (its resource
    and scope). Sizes are worked out, not encoded: the spans are encoded
    once, when they are sent."""
    batch: list[Span] = []
    size = overhead
    for span in spans:
        span_size = span_size_bound(span)
        if batch and size + span_size > limit:
            yield batch
            batch, size = [], overhead
        batch.append(span)
        size += span_size
    if batch:
        yield batch


def request_overhead(resource: Resource) -> int:
    """What an OTLP request with `resource` takes besides its spans."""
    request = encode_spans(to_readable_spans([_EMPTY], resource))
    span = request.resource_spans[0].scope_spans[0].spans[0].ByteSize()
    return request.ByteSize() - field_size(span)


_EMPTY = Span(trace_id=1, span_id=1, parent_span_id=None, name="", start_time_unix_nano=0,
              end_time_unix_nano=0)


class OtlpSink:
    """Sends spans with an SDK exporter, in batches; the exporter retries what
    the protocol says is retryable (gRPC UNAVAILABLE..., HTTP 429/502/503/504)."""

    def __init__(self, exporter: SpanExporter, resource: Resource):
        self._exporter = exporter
        self._resource = resource
        self._overhead = request_overhead(resource)
        self.spans_written = 0

    def export(self, spans: Sequence[Span]) -> None:
        for batch in batches_by_size(spans, overhead=self._overhead):
            if self._exporter.export(to_readable_spans(batch, self._resource)) \
                    is not SpanExportResult.SUCCESS:
                raise ExportFailed(
                    f"the OTLP endpoint did not accept {len(batch)} spans "
                    "(see the exporter's log above for the reason)"
                )
            self.spans_written += len(batch)

    def close(self) -> None:
        self._exporter.shutdown()
