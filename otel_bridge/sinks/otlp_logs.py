"""Log records out through the official SDK: its `LoggerProvider`, and its
OTLP log exporter or OTLP/JSON lines (the Collector file exporter's format).

Each plain `LogRecord` is emitted on the provider's logger named after the
record's logger (the instrumentation scope, as OpenTelemetry's own logging
bridges name it), with the trace context of its run's span; the provider
applies the resource and the record limits (`OTEL_ATTRIBUTE_*`), and a
processor of ours hands each export's records to the exporter in one call,
so `export` returns only once the endpoint took them (the `Sink` contract:
the service's outbox keeps what failed), not when a background batch
thread gets round to it.

The exporter is configured by the standard variables, the logs' own first:
`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` / `_HEADERS` / `_TIMEOUT` / ... over
`OTEL_EXPORTER_OTLP_*`, read by the exporter itself; the protocol from
`OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`.

The logs SDK and exporters are still under underscored modules in Python
(`opentelemetry.sdk._logs`, `..._log_exporter`): their API may change in
any release. So they are used as the versions the tests ran with
(`TESTED_LOGS_SDK_VERSIONS`); with another, the sink says so once and tries,
and fails with `LogsUnavailable` if the API moved.
"""

from __future__ import annotations

import base64
import logging
from importlib import metadata
from typing import IO, Any, Iterator, Sequence

import pydantic_core
from google.protobuf import json_format
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from otel_bridge.model.logs import LogRecord
from otel_bridge.model.otlp_protobuf import LogsRequest, encode_log_record
from otel_bridge.sinks import Sink
from otel_bridge.sinks.otlp import (
    MAX_REQUEST_BYTES,
    ExportFailed,
    encoding_exporter,
    exporter_complaints,
    protocol_from_env,
)

__all__ = ["LogsUnavailable", "OtlpJsonLogWriter", "OtlpLogSink", "SdkLogRecords", "logs_request",
           "TESTED_LOGS_SDK_VERSIONS", "batches_by_size", "log_exporter_from_env",
           "logs_request_json"]

logger = logging.getLogger(__name__)

# major.minor of opentelemetry-sdk whose (underscored) logs API is used.
TESTED_LOGS_SDK_VERSIONS = ("1.45",)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# A record's bytes in a request besides its body and attributes (ids, times,
# severity, field tags), rounded up.
_RECORD_OVERHEAD = 128


class LogsUnavailable(RuntimeError):
    """The installed OpenTelemetry SDK does not have the logs API the sink uses."""


def _check_version() -> None:
    try:
        version = metadata.version("opentelemetry-sdk")
    except metadata.PackageNotFoundError:
        return
    if ".".join(version.split(".")[:2]) not in TESTED_LOGS_SDK_VERSIONS:
        logger.warning("opentelemetry-sdk %s is not a version otel-bridge was tested with (%s); "
                       "its logs API is still experimental and may have changed", version,
                       ", ".join(TESTED_LOGS_SDK_VERSIONS))


def log_exporter_from_env(protocol: str | None = None) -> Any:
    """The official OTLP log exporter for the protocol, configured by the
    environment; one that also takes encoded requests where its version was
    tested (`sinks.otlp.encoding_exporter`)."""
    protocol = protocol or protocol_from_env("logs")
    _check_version()
    try:
        return encoding_exporter("logs", protocol)
    except ImportError as exc:
        raise LogsUnavailable(f"no OTLP log exporter for {protocol}: {exc}") from None


class SdkLogRecords:
    """Plain log records -> the SDK's `ReadableLogRecord`s, made by its
    `LoggerProvider` (resource, scope, limits as the SDK applies them)."""

    def __init__(self, resource: Resource):
        _check_version()
        try:
            from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor, ReadableLogRecord
        except ImportError as exc:
            raise LogsUnavailable(f"the OpenTelemetry SDK has no logs API: {exc}") from None

        made: list[Any] = []

        class Collect(LogRecordProcessor):
            """Keeps what the provider's loggers emit, for `convert` to take."""

            def on_emit(self, record: Any) -> None:
                made.append(ReadableLogRecord(
                    log_record=record.log_record, resource=record.resource or resource,
                    instrumentation_scope=record.instrumentation_scope, limits=record.limits))

            def shutdown(self) -> None:
                pass

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        self._made = made
        # Not shut down at exit: nothing is buffered here.
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_log_record_processor(Collect())

    def convert(self, records: Sequence[LogRecord]) -> list[Any]:
        from opentelemetry._logs import SeverityNumber

        for record in records:
            context = set_span_in_context(NonRecordingSpan(SpanContext(
                record.trace_id, record.span_id, is_remote=False, trace_flags=_SAMPLED)))
            self._provider.get_logger(record.logger_name).emit(
                timestamp=record.time_unix_nano,
                observed_timestamp=record.observed_time_unix_nano,
                context=context,
                severity_number=SeverityNumber(record.severity_number),
                severity_text=record.severity_text,
                body=record.body,
                attributes=dict(record.attributes),
            )
        made, self._made[:] = list(self._made), []
        return made


def logs_request(resource: Resource) -> LogsRequest:
    """Requests of this resource, its `Resource` message as the SDK's
    encoder writes it."""
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs

    probe = LogRecord(1, 1, 9, "INFO", "", 1, 1, "probe")
    resource_logs = encode_logs(SdkLogRecords(resource).convert([probe])).resource_logs[0]
    return LogsRequest(resource_logs.resource.SerializeToString())


def batches_by_size(records: Sequence[LogRecord],
                    limit: int = MAX_REQUEST_BYTES) -> Iterator[Sequence[LogRecord]]:
    """Consecutive runs of records whose request stays under about `limit`
    bytes (a record bigger than that alone): an OTLP receiver refuses a
    request over its limit whole (gRPC's default: 4 MiB)."""
    start, size = 0, 0
    for index, record in enumerate(records):
        weight = _RECORD_OVERHEAD + len(record.body.encode("utf-8", "replace")) + sum(
            len(key) + len(str(value)) for key, value in record.attributes.items())
        if index > start and size + weight > limit:
            yield records[start:index]
            start, size = index, 0
        size += weight
    if start < len(records):
        yield records[start:]


class OtlpLogSink(Sink[LogRecord]):
    """Sends log records with the official OTLP log exporter (its retries,
    TLS, headers, compression), in requests cut by size. Each record is
    encoded once, by `model.otlp_protobuf` (the SDK's very bytes, tested),
    and the request goes out through the exporter's own transport, as spans
    do (`sinks.otlp`): the SDK's `LoggerProvider` and encoder took three
    times as long as the rest of a line's way through `serve`. An exporter
    of an untested version gets the SDK's records through its public API."""

    def __init__(self, exporter: Any, resource: Resource):
        self._exporter = exporter
        self._send_encoded = getattr(exporter, "export_encoded", None)
        self._request = logs_request(resource) if self._send_encoded is not None else None
        self._sdk = SdkLogRecords(resource)
        self.records_written = 0

    def export(self, records: Sequence[LogRecord]) -> None:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        for batch in batches_by_size(records):
            exporter_complaints.last = ""
            if self._request is not None:
                request = self._request.encode(
                    (record.logger_name, encode_log_record(record)) for record in batch)
                result = self._send_encoded(request, len(batch))
            else:
                result = self._exporter.export(self._sdk.convert(batch))
            if result is not LogRecordExportResult.SUCCESS:
                raise ExportFailed(f"the OTLP endpoint did not take {len(batch)} log records: "
                                   f"{exporter_complaints.last or 'the exporter said no more'}")
            self.records_written += len(batch)

    def close(self) -> None:
        self._exporter.shutdown()


class OtlpJsonLogWriter(Sink[LogRecord]):
    """One `ExportLogsServiceRequest` per line as OTLP/JSON (ids as hex, as
    OTLP/JSON requires), encoded by the official encoder."""

    def __init__(self, stream: IO[str], resource: Resource):
        self._stream = stream
        self._sdk = SdkLogRecords(resource)
        self.records_written = 0

    def export(self, records: Sequence[LogRecord]) -> None:
        from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs

        for batch in batches_by_size(records):
            request = encode_logs(self._sdk.convert(batch))
            line = pydantic_core.to_json(logs_request_json(request)).decode()
            self._stream.write(line + "\n")
            self.records_written += len(batch)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


def logs_request_json(request: Any) -> dict[str, Any]:
    """An `ExportLogsServiceRequest` as OTLP/JSON: protobuf's JSON mapping
    with trace and span ids as hex."""
    obj = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_logs in obj.get("resourceLogs", ()):
        for scope_logs in resource_logs.get("scopeLogs", ()):
            for record in scope_logs.get("logRecords", ()):
                for key in ("traceId", "spanId"):
                    if record.get(key):
                        record[key] = base64.b64decode(record[key]).hex()
    return obj
