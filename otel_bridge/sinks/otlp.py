"""OTLP export through the official OpenTelemetry exporters.

Endpoint, headers, timeout, compression and certificates come from the
standard `OTEL_EXPORTER_OTLP_*` / `OTEL_EXPORTER_OTLP_TRACES_*` variables,
read by the exporters themselves. The protocol comes from
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`:
`grpc` or `http/protobuf` (the specification's default).

Each span is encoded once, by `model.otlp_protobuf`, and requests are cut by
their encoded size. The bytes go out through the official exporter's own
transport (its retries, TLS, headers and compression): the gRPC exporter's
request hook, the HTTP exporter's client. Those are not public API, so they
are used only with the exporter versions the tests ran with
(`TESTED_EXPORTER_VERSIONS`); with any other the sink goes through the
exporters' public `export` and the SDK's encoder, and says so once.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Callable, Iterator, Optional, Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel_bridge.model.otlp import span_from_proto
from otel_bridge.model.otlp_protobuf import TraceRequest, Unencodable, encode_span
from otel_bridge.model.spans import Span
from otel_bridge.sinks import Sink
from otel_bridge.sinks.sdk import to_readable_spans

__all__ = ["EXPORTER_LOGGER", "ExportFailed", "MAX_REQUEST_BYTES", "OnUnencodable", "OtlpSink",
           "PROTOCOLS", "encoding_exporter", "exporter_complaints", "exporter_from_env",
           "log_unencodable", "protocol_from_env", "requests_by_size", "trace_request"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
# Bytes per request. Jaeger's and Tempo's OTLP receivers refuse a request over
# gRPC's default 4 MiB whole, every span in it lost, and a span can carry
# messages of up to 100,000 characters; so requests are cut by encoded size,
# with room to spare. A span bigger than this goes alone.
MAX_REQUEST_BYTES = 3_000_000
# major.minor of opentelemetry-exporter-otlp-proto-{grpc,http} whose
# transport the sink hands encoded requests to.
TESTED_EXPORTER_VERSIONS = ("1.45",)


class ExportFailed(RuntimeError):
    pass


def protocol_from_env(signal: str = "traces") -> str:
    """The OTLP protocol for a signal (traces, metrics, logs), as the
    specification reads it: `OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`, else
    `OTEL_EXPORTER_OTLP_PROTOCOL`, else http/protobuf."""
    protocol = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    return protocol


def exporter_from_env(protocol: Optional[str] = None) -> SpanExporter:
    """The official exporter for the protocol, configured by the
    environment; one that also takes encoded requests where its version
    was tested."""
    return encoding_exporter("traces", protocol or protocol_from_env())


def _tested(distribution: str) -> bool:
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    if ".".join(version.split(".")[:2]) in TESTED_EXPORTER_VERSIONS:
        return True
    logger.warning("%s %s is not a version otel-bridge was tested with (%s): spans and log "
                   "records go through its public API, several times slower", distribution, version,
                   ", ".join(TESTED_EXPORTER_VERSIONS))
    return False


def trace_request(resource: Resource) -> TraceRequest:
    """Requests of this resource and otel-bridge's scope, as the SDK's
    encoder writes their resource and scope."""
    from otel_bridge.sinks.sdk import SCOPE, to_readable_span

    probe = Span(trace_id=1, span_id=1, parent_span_id=None, name="",
                 start_time_unix_nano=0, end_time_unix_nano=0)
    resource_spans = encode_spans([to_readable_span(probe, resource)]).resource_spans[0]
    assert resource_spans.scope_spans[0].scope.name == SCOPE.name
    return TraceRequest(resource_spans.resource.SerializeToString(),
                        resource_spans.scope_spans[0].scope.SerializeToString())


class _Encoded:
    """An encoded export request and how many items (spans, log records) it holds."""

    __slots__ = ("request", "spans")

    def __init__(self, request: bytes, spans: int):
        self.request, self.spans = request, spans


def _official_exporter(signal: str, protocol: str) -> type:
    """The official OTLP exporter class of a signal ("traces", "logs") and protocol."""
    if signal == "logs":
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        return OTLPLogExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter


def _results(signal: str) -> type:
    if signal == "logs":
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        return LogRecordExportResult
    return SpanExportResult


def _grpc_exporter_class(signal: str = "traces") -> type:
    if signal == "logs":
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest as request_type,
        )
    else:
        request_type = ExportTraceServiceRequest

    class GrpcExporter(_official_exporter(signal, "grpc")):
        """The official gRPC exporter, which also sends an encoded request
        (parsed back by protobuf's C parser, as the stub serialises messages)."""

        def _translate_data(self, data):
            if isinstance(data, _Encoded):
                return request_type.FromString(data.request)
            return super()._translate_data(data)

        def _count_data(self, data):
            return data.spans if isinstance(data, _Encoded) else super()._count_data(data)

        def export_encoded(self, request: bytes, items: int):
            return self._export(_Encoded(request, items))

    return GrpcExporter


def _http_exporter_class(signal: str = "traces") -> type:
    result = _results(signal)
    what = "log records" if signal == "logs" else "spans"

    class HttpExporter(_official_exporter(signal, "http/protobuf")):
        """The official HTTP exporter, which also sends an encoded request
        through its client (retries, compression, headers)."""

        def export_encoded(self, request: bytes, items: int):
            if self._shutdown:
                return result.FAILURE
            sent = self._client.export(request)
            if not sent.success:
                logging.getLogger(EXPORTER_LOGGER).warning(
                    "OTLP/HTTP export of %d %s failed: %s", items, what,
                    sent.error or sent.reason or sent.status_code)
                return result.FAILURE
            return result.SUCCESS

    return HttpExporter


def encoding_exporter(signal: str, protocol: str):
    """The official exporter of a signal for the protocol, configured by the
    environment, that also takes encoded requests (`export_encoded`) where
    its version was tested; else the plain one."""
    if not _tested(f"opentelemetry-exporter-otlp-proto-{protocol.split('/')[0]}"):
        return _official_exporter(signal, protocol)()
    return (_grpc_exporter_class if protocol == "grpc" else _http_exporter_class)(signal)()


OnUnencodable = Callable[[Span, Unencodable], None]


def log_unencodable(span: Span, error: Unencodable) -> None:
    logger.error("span %s of trace %s cannot be encoded in OTLP and is set aside: %s",
                 span.span_id_hex, span.trace_id_hex, error)


class _ExporterComplaints(logging.Handler):
    """The official exporters say why an export failed only in their log;
    the last thing they said, for `ExportFailed`'s message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()[:300]


EXPORTER_LOGGER = "opentelemetry.exporter.otlp"
# What the official exporters last said (reset before each request).
exporter_complaints = _ExporterComplaints()
logging.getLogger(EXPORTER_LOGGER).addHandler(exporter_complaints)


class OtlpSink(Sink[Span]):
    """Sends spans with an official exporter, in requests of at most
    `MAX_REQUEST_BYTES`; the exporter retries what the protocol says is
    retryable (gRPC UNAVAILABLE..., HTTP 429/502/503/504). A span OTLP
    cannot carry is set aside alone, counted in `spans_unencodable` and
    handed to `on_unencodable`: the others in its batch still go."""

    def __init__(self, exporter: SpanExporter, resource: Resource,
                 on_unencodable: OnUnencodable = log_unencodable):
        self._exporter = exporter
        self._resource = resource
        self._request = trace_request(resource)
        self._send_encoded = getattr(exporter, "export_encoded", None)
        self._on_unencodable = on_unencodable
        self.spans_written = 0
        self.spans_unencodable = 0

    def export(self, spans: Sequence[Span]) -> None:
        encoded = []
        for span in spans:
            try:
                encoded.append(encode_span(span))
            except Unencodable as error:
                self.spans_unencodable += 1
                self._on_unencodable(span, error)
        self.export_encoded(encoded)

    def export_encoded(self, spans: Sequence[bytes]) -> None:
        """Send spans already encoded (`model.otlp_protobuf.encode_span`),
        as the service's outbox keeps them."""
        fields = [TraceRequest.span_field(span) for span in spans]
        for batch in requests_by_size(fields, self._request):
            exporter_complaints.last = ""  # (what it says of this request, not an earlier one)
            if self._send_encoded is not None:
                result = self._send_encoded(self._request.encode(batch), len(batch))
            else:
                result = self._exporter.export(to_readable_spans(
                    [span_from_proto(ProtoSpan.FromString(_field_content(f))) for f in batch],
                    self._resource))
            if result is not SpanExportResult.SUCCESS:
                raise ExportFailed(f"the OTLP endpoint did not take {len(batch)} spans: "
                                   f"{exporter_complaints.last or 'the exporter said no more'}")
            self.spans_written += len(batch)

    def close(self) -> None:
        self._exporter.shutdown()


def requests_by_size(
    fields: Sequence[bytes], request: TraceRequest, limit: int = MAX_REQUEST_BYTES
) -> Iterator[list[bytes]]:
    """Consecutive runs of encoded span fields (`TraceRequest.span_field`)
    whose request stays under `limit` bytes; a span bigger than that alone."""
    batch: list[bytes] = []
    size = 0
    for field in fields:
        if batch and request.size(size + len(field)) > limit:
            yield batch
            batch, size = [], 0
        batch.append(field)
        size += len(field)
    if batch:
        yield batch


def _field_content(field: bytes) -> bytes:
    """A length-delimited field's content: past its tag and length varint."""
    at = 1
    while field[at] & 0x80:
        at += 1
    return field[at + 1:]
