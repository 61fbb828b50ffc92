"""What the real backend (Jaeger v2.13) does to otel-bridge's data, pinned:
each test asserts what really happens today, so a change in it shows up here.

Grafana Tempo is not run: it is AGPL-3.0, and the project uses no AGPL
software, not even in tests. Tempo stays a target users send to over plain
OTLP (collector-config/tempo.yaml); the limits it documents that otel-bridge
honours are checked here on otel-bridge's own output instead: span attribute
values cut to fit Tempo 2's 2,048 bytes, requests cut at 3,000,000 bytes
under the 4 MiB its receiver (like Jaeger's) takes.

Spans are otel-bridge's own (real captured Prefect events converted), with
fresh run UUIDs per test so the ids never collide; where a test needs a
property the captures lack (a 100,000-character message), it is put on a
real span. They are sent straight to each backend's OTLP/gRPC receiver.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid

import grpc
import pytest
from support.helpers import FIXTURES, SAMPLES, convert, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from support import backends

from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.sinks.otlp import MAX_REQUEST_BYTES, OtlpSink
from otel_bridge.sinks.sdk import to_readable_spans
from otel_bridge.translate.forward import MAX_SPAN_ATTRIBUTE_CHARS

# A cold cache builds Jaeger from source first.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.backend, pytest.mark.integration]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LONG = 100_000  # the longest prefect.state-message our spans carry
TEMPO_2_MAX_ATTRIBUTE_BYTES = 2048  # Tempo 2's default max_attribute_bytes
GRPC_MAX = 4 * 1024 * 1024


def real_spans(sample: str) -> list[Span]:
    """otel-bridge's spans of a real capture, with fresh UUIDs for the runs."""
    mapping: dict[str, str] = {}
    text = (SAMPLES / sample).read_text()
    text = UUID.sub(lambda m: mapping.setdefault(m.group(0), str(uuid.uuid4())), text)
    return convert([json.loads(line) for line in text.splitlines() if line.strip()])


def is_flow_run(span: Span) -> bool:
    return span.attributes["prefect.resource.id"].startswith("prefect.flow-run.")


def flow_and_task(sample: str = "task_fails.jsonl") -> tuple[Span, Span]:
    spans = real_spans(sample)
    (flow,) = [s for s in spans if is_flow_run(s)]
    task = [s for s in spans if not is_flow_run(s)][0]
    return flow, task


def service() -> str:
    return f"behaviour-{uuid.uuid4().hex[:8]}"


def send(endpoint: str, spans: list[Span], svc: str, timeout: float = 10) -> None:
    """One OTLP/gRPC Export request, no retries: raises grpc.RpcError when refused."""
    request = encode_spans(to_readable_spans(spans, Resource({"service.name": svc})))
    with grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", -1)]) as ch:
        trace_service_pb2_grpc.TraceServiceStub(ch).Export(request, timeout=timeout)


def request_size(spans: list[Span]) -> int:
    return encode_spans(to_readable_spans(spans, Resource({"service.name": "x"}))).ByteSize()


def jaeger_span(j, span: Span, n: int = 1) -> dict:
    trace = j.wait_for_trace(span.trace_id_hex, min_spans=n)
    (got,) = [s for s in trace["spans"] if s["spanID"] == span.span_id_hex]
    return got


def fields(log: dict) -> dict:
    return backends.jaeger_tags(log["fields"])


# ---------------------------------------------------------------- value length


def with_long_message(task: Span) -> Span:
    message = "ValueError: " + "x" * (LONG - 12)
    events = [dataclasses.replace(e, attributes={**e.attributes, "prefect.state.message": message})
              if e.name == "Failed" else e for e in task.events]
    assert events != list(task.events), "no Failed span event to put the message on"
    return dataclasses.replace(task, attributes={**task.attributes, "prefect.state-message": message},
                               status_message=message, events=events)


def test_jaeger_keeps_long_values_whole(jaeger):
    flow, task = flow_and_task()
    task = with_long_message(task)
    send(jaeger.otlp_grpc_endpoint, [flow, task], service())
    got = jaeger_span(jaeger, task, 2)
    tags = backends.jaeger_tags(got["tags"])
    assert len(tags["prefect.state-message"]) == LONG
    assert len(tags["otel.status_description"]) == LONG
    (failed,) = [fields(log) for log in got["logs"] if fields(log)["event"] == "Failed"]
    assert len(failed["prefect.state.message"]) == LONG
    assert failed["prefect.state.message"] == task.status_message


def test_our_span_attribute_values_fit_tempo_2s_limit():
    """Tempo 2 cuts attribute values over 2,048 bytes by default, silently.
    otel-bridge cuts a label value longer than MAX_SPAN_ATTRIBUTE_CHARS on the
    span attribute itself and says so in otel_bridge.truncated.<key>; the
    whole text stays in the status and on the span event. Checked on the spans
    of every real capture, huge-message's 100,000-character message among
    them: no attribute value of ours reaches Tempo's limit."""
    cut = []
    for path in sorted([*FIXTURES.glob("*.jsonl"), *SAMPLES.glob("*.jsonl")]):
        for span in convert(load_jsonl(path)):
            for key, value in span.attributes.items():
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(item, str):
                        assert len(item) <= MAX_SPAN_ATTRIBUTE_CHARS, (path.name, span.name, key)
                        assert len(item.encode()) <= TEMPO_2_MAX_ATTRIBUTE_BYTES, (path.name, span.name, key)
                if key.startswith("otel_bridge.truncated."):
                    cut.append((span, key.removeprefix("otel_bridge.truncated."), value))
    assert cut, "no capture has a value long enough to be cut"
    for span, key, length in cut:
        assert length > MAX_SPAN_ATTRIBUTE_CHARS
        assert span.attributes[key].endswith("...")
        if key == "prefect.state-message":
            assert len(span.status_message) == length
            assert length in [len(e.attributes.get("prefect.state.message", ""))
                              for e in span.events]


# ---------------------------------------------------------------- request size


def long_spans(n: int = 25) -> list[Span]:
    """``n`` failed task spans with 100,000-character messages (about 7 MB
    for 25): too big for one request."""
    return [with_long_message(flow_and_task()[1]) for _ in range(n)]


def test_a_request_over_4_mib_is_refused_whole(jaeger):
    """Jaeger's receiver keeps gRPC's default 4 MiB limit (Tempo's does too):
    a request of 25 spans with 100,000-character messages (about 7 MB) is
    refused with RESOURCE_EXHAUSTED and none of its spans is stored."""
    spans = long_spans()
    size = request_size(spans)
    assert size > GRPC_MAX
    with pytest.raises(grpc.RpcError) as err:
        send(jaeger.otlp_grpc_endpoint, spans, service())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    got = re.search(r"received message larger than max \((\d+) vs\. (\d+)\)", err.value.details())
    assert got and int(got.group(1)) > GRPC_MAX and int(got.group(2)) == GRPC_MAX
    time.sleep(1)
    assert jaeger.trace(spans[0].trace_id_hex) is None


class _Recording(OTLPSpanExporter):
    """The gRPC exporter, noting the encoded size of each request."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sizes: list[int] = []

    def export(self, spans):
        self.sizes.append(encode_spans(spans).ByteSize())
        return super().export(spans)


def test_our_otlp_export_cuts_the_same_spans_under_the_limit(jaeger):
    """The same 25 spans through otel-bridge's OTLP sink: it sends them in
    requests of at most MAX_REQUEST_BYTES (3,000,000, under the 4 MiB Jaeger's
    and Tempo's receivers take), and every span arrives."""
    assert MAX_REQUEST_BYTES < GRPC_MAX
    spans = long_spans()
    exporter = _Recording(endpoint=jaeger.otlp_grpc_endpoint, insecure=True, timeout=10)
    sink = OtlpSink(exporter, Resource({"service.name": service()}))
    try:
        sink.export(spans)
    finally:
        sink.close()
    assert sink.spans_written == len(spans)
    assert len(exporter.sizes) > 1 and sum(exporter.sizes) >= request_size(spans)
    assert max(exporter.sizes) <= MAX_REQUEST_BYTES
    for span in spans:
        got = backends.jaeger_tags(jaeger_span(jaeger, span)["tags"])
        assert len(got["otel.status_description"]) == LONG


# ---------------------------------------------------------------- arrays


def test_array_attributes(jaeger):
    """prefect.tags is a string array: Jaeger's /api/traces gives it as a JSON
    string, its /api/v3 as an array again."""
    spans = real_spans("task_tags.jsonl")
    tagged = [s for s in spans if s.attributes.get("prefect.tags")]
    assert tagged
    span = tagged[0]
    tags = list(span.attributes["prefect.tags"])
    assert len(tags) >= 2
    send(jaeger.otlp_grpc_endpoint, spans, service())
    got = backends.jaeger_tags(jaeger_span(jaeger, span, len([s for s in spans if s.trace_id == span.trace_id]))["tags"])
    assert got["prefect.tags"] == json.dumps(tags, separators=(",", ":"))
    (v3,) = [s for s in backends.otlp_json_spans(jaeger.trace_otlp(span.trace_id_hex))
             if s["spanId"] == span.span_id_hex]
    assert backends.otlp_attrs(v3["attributes"])["prefect.tags"] == tags


# ---------------------------------------------------------------- links


def test_links_to_prefects_own_span(jaeger):
    """With __OTEL_TRACEPARENT the task span links to Prefect's span. Jaeger's
    /api/traces shows it as a FOLLOWS_FROM reference without the link's
    attributes; Jaeger's /api/v3 keeps them: prefect.traceparent, the
    traceparent as Prefect wrote it. The link's trace flags are in nothing
    else: the OTLP encoder sends a link's flags without them (only its
    is-remote bits), and Jaeger gives back what it got."""
    spans = real_spans("task_completes.with-traceparent.jsonl")
    (span,) = [s for s in spans if s.links]
    (link,) = span.links
    traceparent = f"00-{link.trace_id:032x}-{link.span_id:016x}-{link.trace_flags:02x}"
    assert link.trace_flags & 1 and dict(link.attributes) == {"prefect.traceparent": traceparent}
    n = len([s for s in spans if s.trace_id == span.trace_id])
    send(jaeger.otlp_grpc_endpoint, spans, service())

    got = jaeger_span(jaeger, span, n)
    assert {"refType": "FOLLOWS_FROM", "traceID": format(link.trace_id, "032x"),
            "spanID": format(link.span_id, "016x")} in got["references"]
    assert all(set(r) == {"refType", "traceID", "spanID"} for r in got["references"])
    (v3,) = [s for s in backends.otlp_json_spans(jaeger.trace_otlp(span.trace_id_hex))
             if s["spanId"] == span.span_id_hex]
    (v3link,) = v3["links"]
    assert backends.otlp_attrs(v3link["attributes"]) == {"prefect.traceparent": traceparent}
    assert int(v3link.get("flags", 0)) & 0xFF == 0


# ---------------------------------------------------------------- span kinds


def test_span_kinds_and_operation_names(jaeger):
    """Jaeger's model has no span kind: it becomes the span.kind tag, "server"
    for a flow run's span and "internal" for a task run's. Its operation
    list (/api/v3/operations) names each (span name, kind) once."""
    spans = real_spans("task_retries.jsonl") + real_spans("task_completes.jsonl")
    svc = service()
    send(jaeger.otlp_grpc_endpoint, spans, svc)
    for span in spans:
        kind = backends.jaeger_tags(jaeger_span(jaeger, span, len(
            [s for s in spans if s.trace_id == span.trace_id]))["tags"])["span.kind"]
        assert kind == ("server" if is_flow_run(span) else "internal"), span.name
    operations = jaeger.operations(svc)
    assert sorted((o["name"], o["spanKind"]) for o in operations) == sorted(
        {(s.name, "server" if is_flow_run(s) else "internal") for s in spans})
    assert {o["name"] for o in operations} >= {"RUN f-task-retries", "flaky_immediate"}


# ---------------------------------------------------------------- event names


def test_span_event_attribute_named_event(jaeger):
    """Jaeger turns a span event into a log whose "event" field is the event's
    name, and an attribute named "event" overwrites it. otel-bridge's events
    never have one (the id is prefect.state.id), so their names survive; a
    span event that had one would lose its name in Jaeger."""
    spans = real_spans("task_retries.jsonl")
    assert not [e for s in spans for e in s.events if "event" in e.attributes]
    flow = [s for s in spans if is_flow_run(s)][0]
    clash = dataclasses.replace(flow, events=[SpanEvent(
        flow.events[0].name, flow.events[0].time_unix_nano,
        {**flow.events[0].attributes, "event": "an-attribute-value"})])
    send(jaeger.otlp_grpc_endpoint, [clash], service())
    (log,) = jaeger_span(jaeger, clash)["logs"]
    assert fields(log)["event"] == "an-attribute-value"
    assert flow.events[0].name not in fields(log).values()

    # Ours, unchanged: every state event's name is the log's "event".
    spans = real_spans("task_retries.jsonl")
    n = len(spans)
    send(jaeger.otlp_grpc_endpoint, spans, service())
    trace = jaeger.wait_for_trace(spans[0].trace_id_hex, min_spans=n)
    for span in spans:
        (got,) = [s for s in trace["spans"] if s["spanID"] == span.span_id_hex]
        assert [fields(log)["event"] for log in got["logs"]] == [e.name for e in span.events]
        assert [fields(log)["prefect.state.id"] for log in got["logs"]] == [
            e.attributes["prefect.state.id"] for e in span.events]


# ---------------------------------------------------------------- clock skew


def test_real_task_spans_lie_within_their_flow_span():
    """In the real captures every task span starts after and ends before its
    parent (the flow starts Running before its tasks, and ends after them)."""
    outside = []
    for path in sorted(SAMPLES.glob("*.jsonl")):
        spans = convert(load_jsonl(path))
        by_id = {s.span_id: s for s in spans}
        for s in spans:
            parent = by_id.get(s.parent_span_id)
            if parent and not (parent.start_time_unix_nano <= s.start_time_unix_nano
                               and s.end_time_unix_nano <= parent.end_time_unix_nano):
                outside.append((path.name, s.name))
    assert outside == []


def test_jaeger_does_not_adjust_clock_skew(jaeger):
    """A child starting 5 ms before its parent and ending 5 ms after (same
    host): Jaeger v2 computes a skew delta but its adjustment is disabled by
    default; it warns and keeps the times."""
    flow, task = flow_and_task()
    shifted = dataclasses.replace(task, start_time_unix_nano=flow.start_time_unix_nano - 5_000_000,
                                  end_time_unix_nano=flow.end_time_unix_nano + 5_000_000)
    send(jaeger.otlp_grpc_endpoint, [flow, shifted], service())
    got = jaeger_span(jaeger, shifted, 2)
    assert got["startTime"] == shifted.start_time_unix_nano // 1000
    assert got["duration"] == (shifted.end_time_unix_nano - shifted.start_time_unix_nano) // 1000
    assert got.get("warnings") == ["clock skew adjustment disabled; not applying calculated delta of 5ms"]
    assert jaeger_span(jaeger, flow, 2).get("warnings") in (None, [])


# ---------------------------------------------------------------- duplicates


def test_identical_duplicates_are_dropped(jaeger):
    """The same spans sent twice (two replicas, a retried export): Jaeger
    shows each span once."""
    flow, task = flow_and_task()
    svc = service()
    send(jaeger.otlp_grpc_endpoint, [flow, task], svc)
    send(jaeger.otlp_grpc_endpoint, [flow, task], svc)
    time.sleep(2)
    trace = jaeger.wait_for_trace(task.trace_id_hex, min_spans=2)
    assert sorted(s["spanID"] for s in trace["spans"]) == sorted([flow.span_id_hex, task.span_id_hex])
    assert not [w for s in trace["spans"] for w in s.get("warnings") or []]


def test_different_duplicates(jaeger):
    """The same span id with different content: Jaeger shows both copies.
    Hence otel-bridge emits each span once, final."""
    _, task = flow_and_task()
    first = dataclasses.replace(task, parent_span_id=None,
                                attributes={**task.attributes, "copy": "first"})
    second = dataclasses.replace(first, attributes={**task.attributes, "copy": "second"})
    svc = service()
    send(jaeger.otlp_grpc_endpoint, [first], svc)
    send(jaeger.otlp_grpc_endpoint, [second], svc)
    trace = jaeger.wait_for_trace(task.trace_id_hex, min_spans=2)
    assert sorted(backends.jaeger_tags(s["tags"])["copy"] for s in trace["spans"]) == ["first", "second"]
    assert {s["spanID"] for s in trace["spans"]} == {task.span_id_hex}
