"""A real flow run with Prefect's own OpenTelemetry spans switched on, its
spans written as OTLP/JSON lines (the Collector file exporter's format) to the
file named on the command line:

    python -m tests.support.prefect_flows.telemetry SPANS.jsonl

Prefect makes spans only when an SDK TracerProvider is installed; the spans
here are the real ones its RunTelemetry makes, encoded by the official OTLP
encoder.

Any flow process can switch them on the same way: `install_from_env()` (called
by scenarios.py and big_map.py at import) installs the provider when
OTEL_BRIDGE_CAPTURE_PREFECT_SPANS names a file, and appends the spans there."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prefect import flow, task

from otel_bridge.model.otlp import request_to_json


CAPTURE_ENV = "OTEL_BRIDGE_CAPTURE_PREFECT_SPANS"


class OtlpJsonFileExporter(SpanExporter):
    """Appends one OTLP/JSON request per export, each line in one write() to
    an O_APPEND file, so that several processes (a scenario and the children
    it starts, which inherit CAPTURE_ENV) can share the file."""

    def __init__(self, path: str):
        self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        line = (json.dumps(request_to_json(encode_spans(spans))) + "\n").encode()
        while line:  # one write() for a regular file; the loop is only a safeguard
            line = line[os.write(self._fd, line):]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def install(path: str) -> TracerProvider:
    """Switch Prefect's own spans on in this process, written to `path`.
    SimpleSpanProcessor writes each span as it ends; the provider registers
    its own shutdown with atexit (shutdown_on_exit), which closes the file."""
    provider = TracerProvider(shutdown_on_exit=True)
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path)))
    trace.set_tracer_provider(provider)
    return provider


def install_from_env() -> Optional[TracerProvider]:
    """`install` to the file CAPTURE_ENV names, if it is set; else nothing."""
    path = os.environ.get(CAPTURE_ENV)
    return install(path) if path else None


@task(retries=1, retry_delay_seconds=0)
def flaky(state: dict) -> int:
    state["calls"] = state.get("calls", 0) + 1
    if state["calls"] == 1:
        raise ConnectionError("first attempt fails")
    return 1


@task
def inner(x: int) -> int:
    return x + 1


@task(tags=["etl"])
def outer(x: int) -> int:
    return inner(x)


@task
def boom() -> None:
    raise ValueError("telemetry boom")


@flow(name="s-telemetry")
def telemetry_flow() -> None:
    flaky({})
    outer(1)
    boom(return_state=True)


if __name__ == "__main__":
    provider = install(sys.argv[1])
    telemetry_flow()
    provider.shutdown()
