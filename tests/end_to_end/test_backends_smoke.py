"""Smoke tests of the real backends the suite runs: Jaeger v2 and the
Collector built with ocb. Spans are made with the OpenTelemetry Python SDK,
sent over OTLP gRPC and OTLP HTTP, and read back through Jaeger's query API
and the Collector's file exporter.

Grafana Tempo is not run (it is AGPL-3.0): users send to it over plain OTLP
(collector-config/tempo.yaml), the same OTLP these tests check.

The binaries come from scripts/build-backends.sh (run by tests.support.backends
when needed; from a cold cache that takes minutes, hence the long timeout).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from support import backends

pytestmark = [pytest.mark.timeout(1800), pytest.mark.backend, pytest.mark.integration]


# ---------------------------------------------------------------- helpers


def make_span(service: str, name: str) -> tuple[ReadableSpan, str]:
    """One finished span with attributes, an event and an error status."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service, "smoke.run": "yes"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("otel-bridge.smoke", "0.1.0")
    with tracer.start_as_current_span(
        name,
        kind=SpanKind.SERVER,
        attributes={"smoke.str": "hello", "smoke.int": 42, "smoke.bool": True, "smoke.float": 2.5},
    ) as span:
        span.add_event("smoke-event", {"event.detail": "something happened", "event.n": 7})
        span.set_status(Status(StatusCode.ERROR, "smoke failure"))
    provider.shutdown()
    (finished,) = memory.get_finished_spans()
    return finished, format(finished.context.trace_id, "032x")


def export(exporter: SpanExporter, span: ReadableSpan) -> None:
    try:
        assert exporter.export([span]) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


def grpc_exporter(endpoint: str) -> SpanExporter:
    return GrpcExporter(endpoint=endpoint, insecure=True, timeout=10)


def http_exporter(traces_url: str) -> SpanExporter:
    return HttpExporter(endpoint=traces_url, timeout=10)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_jaeger_span(trace: dict, service: str, name: str) -> None:
    span = backends.jaeger_span(trace, name)
    process = trace["processes"][span["processID"]]
    assert process["serviceName"] == service
    assert backends.jaeger_tags(process["tags"])["smoke.run"] == "yes"
    tags = backends.jaeger_tags(span["tags"])
    assert tags["smoke.str"] == "hello"
    assert int(tags["smoke.int"]) == 42
    assert tags["smoke.bool"] is True
    assert tags["smoke.float"] == 2.5
    # Jaeger's model has no status or kind: they become tags.
    assert tags["otel.status_code"] == "ERROR"
    assert tags["otel.status_description"] == "smoke failure"
    assert tags["error"] is True
    assert tags["span.kind"] == "server"
    assert tags["otel.scope.name"] == "otel-bridge.smoke"
    # Events become logs; the event name is the "event" field.
    (log,) = span["logs"]
    fields = backends.jaeger_tags(log["fields"])
    assert fields == {"event": "smoke-event", "event.detail": "something happened", "event.n": 7}


def assert_otlp_span(doc: dict, service: str, name: str, trace_id: str) -> None:
    spans = [s for s in backends.otlp_json_spans(doc) if s["name"] == name]
    assert len(spans) == 1, backends.otlp_json_spans(doc)
    span = spans[0]
    assert backends.otlp_id_hex(span["traceId"], 16) == trace_id
    assert span["resource"]["service.name"] == service
    assert span["scope"]["name"] == "otel-bridge.smoke"
    attrs = backends.otlp_attrs(span["attributes"])
    assert attrs == {"smoke.str": "hello", "smoke.int": 42, "smoke.bool": True, "smoke.float": 2.5}
    (event,) = span["events"]
    assert event["name"] == "smoke-event"
    assert backends.otlp_attrs(event["attributes"]) == {"event.detail": "something happened", "event.n": 7}
    assert span["status"].get("message") == "smoke failure"
    assert span["status"]["code"] in (2, "STATUS_CODE_ERROR")
    assert span["kind"] in (2, "SPAN_KIND_SERVER")


# ---------------------------------------------------------------- fixtures


# The backend's exporters, the file one (a copy to compare with) and debug.
EXPORTERS = {
    "otlp_grpc": {"endpoint": "${env:BACKEND_OTLP_GRPC}", "tls": {"insecure": True}},
    "otlp_http": {"endpoint": "${env:BACKEND_OTLP_HTTP}"},
    "file": {"path": "${env:COPY_FILE}"},
    "debug": {"verbosity": "basic"},
}


def write_collector_config(tmp_path: Path, exporter: str) -> Path:
    path = tmp_path / f"collector-{exporter}.yaml"
    config = backends.test_collector_config(EXPORTERS, [exporter, "file", "debug"])
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def collector_env(backend, tmp_path: Path) -> dict[str, str]:
    return {
        "BACKEND_OTLP_GRPC": backend.otlp_grpc_endpoint,
        "BACKEND_OTLP_HTTP": backend.otlp_http_endpoint,
        "COPY_FILE": str(tmp_path / "copy.jsonl"),
    }


# ---------------------------------------------------------------- (a) Jaeger


def test_binaries_are_stamped():
    for name in (backends.JAEGER, backends.COLLECTOR):
        assert backends.binary(name).is_file()
        assert backends.binary_version(name), f"{name} has no version stamp"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_jaeger_otlp_roundtrip(jaeger, protocol):
    service = unique(f"smoke-jaeger-{protocol}")
    span, trace_id = make_span(service, f"smoke-{protocol}")
    exporter = (grpc_exporter(jaeger.otlp_grpc_endpoint) if protocol == "grpc"
                else http_exporter(jaeger.otlp_http_traces_url))
    export(exporter, span)

    by_id = jaeger.wait_for_trace(trace_id)
    assert by_id["traceID"] == trace_id
    assert_jaeger_span(by_id, service, f"smoke-{protocol}")

    (by_service,) = jaeger.wait_for_service(service)
    assert by_service["traceID"] == trace_id
    assert_jaeger_span(by_service, service, f"smoke-{protocol}")

    # Jaeger v2's OTLP-shaped API gives the span back in OTLP terms.
    assert_otlp_span(jaeger.trace_otlp(trace_id), service, f"smoke-{protocol}", trace_id)


def test_jaeger_unknown_trace_is_none(jaeger):
    assert jaeger.trace("0" * 31 + "1") is None
    assert jaeger.traces_by_service(unique("no-such-service")) == []


# ---------------------------------------------------------------- (b) Collector


def test_collector_config_validation(tmp_path, jaeger):
    env = collector_env(jaeger, tmp_path)
    ok, output = backends.validate_collector_config(write_collector_config(tmp_path, "otlp_grpc"), env)
    assert ok, output
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_collector_config(tmp_path, "no_such_exporter").read_text())
    ok, output = backends.validate_collector_config(bad, env)
    assert not ok
    assert "no_such_exporter" in output


@pytest.mark.parametrize("exporter", ["otlp_grpc", "otlp_http"])
def test_collector_forwards_to_jaeger(tmp_path, jaeger, exporter):
    config = write_collector_config(tmp_path, exporter)
    with backends.collector(config, collector_env(jaeger, tmp_path)) as col:
        assert col.process.alive()
        service = unique(f"smoke-collector-{exporter}")
        span, trace_id = make_span(service, "via-collector")
        export(grpc_exporter(col.otlp_grpc_endpoint), span)
        trace = jaeger.wait_for_trace(trace_id)
        assert_jaeger_span(trace, service, "via-collector")
        # The file exporter wrote the same span as OTLP/JSON lines.
        copy = backends.wait_until(
            lambda: (tmp_path / "copy.jsonl").is_file() and (tmp_path / "copy.jsonl").read_text().strip(),
            10, what="file exporter output")
        doc = json.loads(copy.splitlines()[0])
        assert_otlp_span(doc, service, "via-collector", trace_id)
