"""Small shared helpers for the tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterable

from otel_bridge.model.events import Event, parse_wire_event
from otel_bridge.model.spans import Span
from otel_bridge.translate.assembler import Assembler, AssemblerOptions

ROOT = Path(__file__).resolve().parents[2]
# The samples handed to the project (shared/samples), kept with the tests.
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "samples-3.9.1"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prefect-3.9.1"


def events(dicts: Iterable[dict]) -> list[Event]:
    return [e for e in (parse_wire_event(d) for d in dicts) if e is not None]


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def convert(dicts: Iterable[dict], options: AssemblerOptions = AssemblerOptions()) -> list[Span]:
    assembler = Assembler(options)
    spans: list[Span] = []
    for event in events(dicts):
        spans.extend(assembler.add(event))
    spans.extend(assembler.flush())
    return spans


def by_name(spans: Iterable[Span]) -> dict[str, Span]:
    out = {}
    for span in spans:
        assert span.name not in out, f"two spans named {span.name}"
        out[span.name] = span
    return out


def state_names(span: Span) -> list[str]:
    """The states a bridge span went through: its span events are named
    after them."""
    return [e.name for e in span.events]


def convert_to_otlp(inputs, receiver, protocol: str, service: str) -> None:
    """Run `otel-bridge convert INPUTS --to otlp` as a real process, pointed at
    `receiver` (anything with `otlp_grpc_endpoint` / `otlp_http_endpoint`: a
    Jaeger, a Collector) through the standard OTEL_* variables only."""
    import os
    import subprocess
    import sys

    endpoint = (f"http://{receiver.otlp_grpc_endpoint}" if protocol == "grpc"
                else receiver.otlp_http_endpoint)
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
               OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_SERVICE_NAME=service)
    result = subprocess.run(
        [sys.executable, "-m", "otel_bridge", "convert", *map(str, inputs), "--to", "otlp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


def engine_trace(exporters=()) -> list:
    """Spans from an engine that knows nothing of Prefect, made by the real
    SDK: a run with a tagged step and a failing step that retried. The tracer
    also sends them through `exporters`; returned as the SDK made them."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "some-engine"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    tracer = provider.get_tracer("some-engine")
    with tracer.start_as_current_span("nightly-etl"):
        with tracer.start_as_current_span("extract") as span:
            span.set_attribute("tags", ["etl", "nightly"])
        with tracer.start_as_current_span("load") as span:
            span.add_event("Retrying")
            span.record_exception(ConnectionError("warehouse gone"))
            span.set_status(Status(StatusCode.ERROR, "warehouse gone"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made by openssl, for TLS tests."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def metric_points(data) -> dict:
    """The SDK's `MetricsData` as {(metric, attributes): values}, without
    times: a histogram's (count, sum, bucket counts, min, max), a sum's or
    gauge's value. Sums rounded to the microsecond."""
    out = {}
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    key = (metric.name, tuple(sorted(p.attributes.items())))
                    if hasattr(p, "bucket_counts"):
                        out[key] = (p.count, round(p.sum, 6), tuple(p.bucket_counts), p.min, p.max)
                    else:
                        out[key] = round(p.value, 6)
    return out


def totals_points(totals) -> dict:
    """`metric_points`'s form of series totals (`translate.metric_totals`)."""
    return {key: ((t.count, round(t.sum, 6), tuple(t.bucket_counts), t.min, t.max)
                  if t.bucket_counts is not None else round(t.sum, 6))
            for key, t in totals.items()}


def measured_runs(captures: Iterable[Path]) -> list:
    """The run measurements of the captures' runs, each run once, as the
    pure core measures them (`translate.run_metrics`)."""
    from otel_bridge.translate.run_metrics import CountedRuns, run_measurements

    counted, out = CountedRuns(), []
    for capture in captures:
        for span in convert(load_jsonl(capture)):
            found = run_measurements(span)
            if found is not None and counted.first_time(found.span_id):
                out.append(found)
    return out
