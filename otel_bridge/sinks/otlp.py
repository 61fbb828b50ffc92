"""OTLP export through the official OpenTelemetry exporters.

Endpoint, headers, timeout, compression and certificates come from the
standard `OTEL_EXPORTER_OTLP_*` / `OTEL_EXPORTER_OTLP_TRACES_*` variables,
read by the exporters themselves. The protocol comes from
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`:
`grpc` or `http/protobuf` (the specification's default).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel_bridge.model.spans import Span
from otel_bridge.sinks.sdk import to_readable_spans

PROTOCOLS = ("grpc", "http/protobuf")
# Spans per request: well under gRPC's default 4 MiB message limit for spans
# of ordinary size (a span carries every state event of its run).
BATCH_SIZE = 128


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


class OtlpSink:
    """Sends spans with an SDK exporter, in batches; the exporter retries what
    the protocol says is retryable (gRPC UNAVAILABLE..., HTTP 429/502/503/504)."""

    def __init__(self, exporter: SpanExporter, resource: Resource):
        self._exporter = exporter
        self._resource = resource
        self.spans_written = 0

    def export(self, spans: Sequence[Span]) -> None:
        for start in range(0, len(spans), BATCH_SIZE):
            batch = to_readable_spans(spans[start : start + BATCH_SIZE], self._resource)
            if self._exporter.export(batch) is not SpanExportResult.SUCCESS:
                raise ExportFailed(
                    f"the OTLP endpoint did not accept {len(batch)} spans "
                    "(see the exporter's log above for the reason)"
                )
            self.spans_written += len(batch)

    def close(self) -> None:
        self._exporter.shutdown()
