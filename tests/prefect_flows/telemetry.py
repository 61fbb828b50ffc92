"""A real flow run with Prefect's own OpenTelemetry spans switched on, its
spans written as OTLP/JSON lines (the Collector file exporter's format) to the
file named on the command line:

    python -m tests.prefect_flows.telemetry SPANS.jsonl

Prefect makes spans only when an SDK TracerProvider is installed; the spans
here are the real ones its RunTelemetry makes, encoded by the official OTLP
encoder."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prefect import flow, task

from otel_bridge.model.otlp import request_to_json


class OtlpJsonFileExporter(SpanExporter):
    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._file.write(json.dumps(request_to_json(encode_spans(spans))) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()


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
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(sys.argv[1])))
    trace.set_tracer_provider(provider)
    telemetry_flow()
    provider.shutdown()
