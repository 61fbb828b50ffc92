"""Log records as plain values, as `spans` is for spans.

`translate.logs` makes them of Prefect's log lines; the sinks hand them to
the OpenTelemetry SDK's `LoggerProvider`. Plain (no SDK objects, no clocks),
so tests compare them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otel_bridge.model.spans import Attributes, TraceContextIds

__all__ = ["LogRecord", "MAX_LOG_MESSAGE_CHARS"]

# Prefect's own cap on a log line sent to its API
# (PREFECT_LOGGING_TO_API_MAX_LOG_SIZE's default): a longer message was not
# written by a Prefect client with default settings.
MAX_LOG_MESSAGE_CHARS = 1_000_000


@dataclass(frozen=True)
class LogRecord(TraceContextIds):
    """One OTLP log record, in the terms of the OpenTelemetry logs data model."""

    time_unix_nano: int
    observed_time_unix_nano: int
    severity_number: int  # the data model's SeverityNumber, 0..24
    severity_text: str
    body: str
    trace_id: int
    span_id: int
    # The emitting logger's name: the record's instrumentation scope, as
    # OpenTelemetry's own logging bridges name it.
    logger_name: str
    attributes: Attributes = field(default_factory=dict)
