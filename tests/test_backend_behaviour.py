"""What the real backends (Jaeger v2.13, Grafana Tempo v1.5) do to
otel-bridge's data, pinned: each test asserts what really happens today, so
a change in a backend shows up here.

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
from helpers import SAMPLES, convert, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from support import backends

from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.sinks.sdk import to_readable_spans

# A cold cache builds Jaeger and Tempo from source first.
pytestmark = pytest.mark.timeout(1800)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LONG = 100_000  # the longest prefect.state-message our spans carry
TEMPO_MAX_SEARCH_BYTES = 5000  # Tempo 1.5's default max_search_bytes_per_trace
GRPC_MAX = 4 * 1024 * 1024


@pytest.fixture(params=["jaeger", "tempo"])
def backend(request):
    return request.param, request.getfixturevalue(request.param)


def real_spans(sample: str) -> list[Span]:
    """otel-bridge's spans of a real capture, with fresh UUIDs for the runs."""
    mapping: dict[str, str] = {}
    text = (SAMPLES / sample).read_text()
    text = UUID.sub(lambda m: mapping.setdefault(m.group(0), str(uuid.uuid4())), text)
    return convert([json.loads(line) for line in text.splitlines() if line.strip()])


def flow_and_task(sample: str = "task_fails.jsonl") -> tuple[Span, Span]:
    spans = real_spans(sample)
    (flow,) = [s for s in spans if s.attributes["prefect.run.type"] == "flow"]
    task = [s for s in spans if s.attributes["prefect.run.type"] == "task"][0]
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


def tempo_span(t, span: Span, n: int = 1) -> dict:
    doc = t.wait_for_trace(span.trace_id_hex, min_spans=n)
    (got,) = [s for s in backends.otlp_json_spans(doc)
              if backends.otlp_id_hex(s["spanId"], 8) == span.span_id_hex]
    return got


def fields(log: dict) -> dict:
    return backends.jaeger_tags(log["fields"])


# ---------------------------------------------------------------- value length


def with_long_message(task: Span) -> Span:
    message = "ValueError: " + "x" * (LONG - 12)
    events = [dataclasses.replace(e, attributes={
        **e.attributes, "prefect.state-message": message,
        "prefect.event.payload": json.dumps({"validated_state": {"message": message}})})
        if e.name.endswith(".Failed") else e for e in task.events]
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
    (failed,) = [fields(log) for log in got["logs"] if fields(log)["event"].endswith(".Failed")]
    assert len(failed["prefect.state-message"]) == LONG
    assert json.loads(failed["prefect.event.payload"])["validated_state"]["message"] == \
        task.status_message


def test_tempo_1_5_keeps_long_values_whole(tempo):
    """Tempo v1.5 has no max_attribute_bytes (v2 truncates at 2,048 bytes by
    default): the 100,000 characters come back whole."""
    flow, task = flow_and_task()
    task = with_long_message(task)
    send(tempo.otlp_grpc_endpoint, [flow, task], service())
    got = tempo_span(tempo, task, 2)
    attrs = backends.otlp_attrs(got["attributes"])
    assert len(attrs["prefect.state-message"]) == LONG
    assert len(got["status"]["message"]) == LONG
    (failed,) = [backends.otlp_attrs(e["attributes"]) for e in got["events"]
                 if e["name"].endswith(".Failed")]
    assert len(failed["prefect.state-message"]) == LONG
    assert len(failed["prefect.event.payload"]) > LONG


def test_tempo_1_5_search_index_and_long_values(tempo):
    """Tempo v1.5 indexes a trace's tags for search (tags=) up to 5,000 bytes
    (max_search_bytes_per_trace); a push whose tags would go past that adds
    none of them. A value is cut to 1,024 bytes only when its key is already
    in the push (the first occurrence is kept whole). So: a real trace of
    ordinary size is found, also when its task span carries a long message
    after the flow span; the same trace with the failed task span first (as
    otel-bridge emits it: a task run ends before its flow run) is not found
    by any tag, not even service.name. By trace id both are found."""
    svc = service()
    flow, task = flow_and_task()
    flow_first = [flow, with_long_message(task)]
    flow2, task2 = flow_and_task()
    task_first = [with_long_message(task2), flow2]
    send(tempo.otlp_grpc_endpoint, flow_first, svc)
    send(tempo.otlp_grpc_endpoint, task_first, svc)
    tempo.wait_for_trace(task2.trace_id_hex, min_spans=2)
    tempo.wait_for_trace(task.trace_id_hex, min_spans=2)

    def found(tags):
        return {t["traceID"].rjust(32, "0") for t in tempo.search(tags=tags, limit=100).get("traces", [])}

    backends.wait_until(lambda: task.trace_id_hex in found({"service.name": svc}), 30,
                        what="the flow-first trace in Tempo's tag search")
    time.sleep(2)
    assert found({"service.name": svc}) == {task.trace_id_hex}
    assert found({"prefect.resource.id": task.attributes["prefect.resource.id"]}) == {task.trace_id_hex}
    assert found({"prefect.resource.id": task2.attributes["prefect.resource.id"]}) == set()
    assert re.search(r'msg="size of search data exceeded max search bytes limit" '
                     rf'maxSearchBytes={TEMPO_MAX_SEARCH_BYTES} discardedBytes=1\d{{5}}\b',
                     tempo.process.log())


# ---------------------------------------------------------------- request size


def test_a_request_over_4_mib_is_refused_whole(backend):
    """Both receivers keep gRPC's default 4 MiB limit: a request of 25 spans
    with 100,000-character messages (about 7 MB) is refused with
    RESOURCE_EXHAUSTED and none of its spans is stored."""
    name, b = backend
    spans = []
    for _ in range(25):
        flow, task = flow_and_task()
        spans.append(with_long_message(task))
    size = request_size(spans)
    assert size > GRPC_MAX
    with pytest.raises(grpc.RpcError) as err:
        send(b.otlp_grpc_endpoint, spans, service())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    got = re.search(r"received message larger than max \((\d+) vs\. (\d+)\)", err.value.details())
    assert got and int(got.group(1)) > GRPC_MAX and int(got.group(2)) == GRPC_MAX
    time.sleep(1)
    assert b.trace(spans[0].trace_id_hex) is None


def test_tempo_rate_limit_refuses_without_retry_info(tempo):
    """Tempo's default ingestion rate limit (15,000,000 bytes/s, burst
    20,000,000) refuses further requests with RESOURCE_EXHAUSTED
    "RATE_LIMITED"; the Collector's OTLP exporter takes that as permanent
    (no RetryInfo) and drops the spans."""
    svc = service()
    refused = []
    sent = 0
    for _ in range(16):
        spans = []
        for _ in range(7):
            _, task = flow_and_task()
            spans.append(with_long_message(task))
        assert request_size(spans) < GRPC_MAX
        try:
            send(tempo.otlp_grpc_endpoint, spans, svc)
            sent += request_size(spans)
        except grpc.RpcError as exc:
            refused.append(exc)
    assert refused, f"{sent} bytes accepted in a burst"
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert "RATE_LIMITED: ingestion rate limit (15000000 bytes) exceeded" in refused[0].details()
    # What got through depends on how fast the requests went (the bucket
    # refills at 15 MB/s while they are sent); at least the burst did.
    assert sent >= 15_000_000
    # Let the limiter refill for the other tests.
    time.sleep(2)


# ---------------------------------------------------------------- arrays


def test_array_attributes(jaeger, tempo):
    """prefect.tags is a string array: Tempo keeps it; Jaeger's /api/traces
    gives it as a JSON string, its /api/v3 as an array again."""
    spans = real_spans("task_tags.jsonl")
    tagged = [s for s in spans if s.attributes.get("prefect.tags")]
    assert tagged
    span = tagged[0]
    tags = list(span.attributes["prefect.tags"])
    assert len(tags) >= 2
    for b in (jaeger, tempo):
        send(b.otlp_grpc_endpoint, spans, service())
    got = backends.jaeger_tags(jaeger_span(jaeger, span, len([s for s in spans if s.trace_id == span.trace_id]))["tags"])
    assert got["prefect.tags"] == json.dumps(tags, separators=(",", ":"))
    (v3,) = [s for s in backends.otlp_json_spans(jaeger.trace_otlp(span.trace_id_hex))
             if s["spanId"] == span.span_id_hex]
    assert backends.otlp_attrs(v3["attributes"])["prefect.tags"] == tags
    assert backends.otlp_attrs(tempo_span(tempo, span)["attributes"])["prefect.tags"] == tags


# ---------------------------------------------------------------- links


def test_links_to_prefects_own_span(jaeger, tempo):
    """With __OTEL_TRACEPARENT the task span links to Prefect's span. Jaeger's
    /api/traces shows it as a FOLLOWS_FROM reference without the link's
    attributes; Jaeger's /api/v3 and Tempo keep them."""
    spans = real_spans("task_completes.with-traceparent.jsonl")
    (span,) = [s for s in spans if s.links]
    (link,) = span.links
    n = len([s for s in spans if s.trace_id == span.trace_id])
    for b in (jaeger, tempo):
        send(b.otlp_grpc_endpoint, spans, service())

    got = jaeger_span(jaeger, span, n)
    assert {"refType": "FOLLOWS_FROM", "traceID": format(link.trace_id, "032x"),
            "spanID": format(link.span_id, "016x")} in got["references"]
    assert all(set(r) == {"refType", "traceID", "spanID"} for r in got["references"])
    (v3,) = [s for s in backends.otlp_json_spans(jaeger.trace_otlp(span.trace_id_hex))
             if s["spanId"] == span.span_id_hex]
    (v3link,) = v3["links"]
    assert backends.otlp_attrs(v3link["attributes"]) == dict(link.attributes)

    (tlink,) = tempo_span(tempo, span, n)["links"]
    assert backends.otlp_id_hex(tlink["traceId"], 16) == format(link.trace_id, "032x")
    assert backends.otlp_id_hex(tlink["spanId"], 8) == format(link.span_id, "016x")
    assert backends.otlp_attrs(tlink["attributes"]) == dict(link.attributes)


# ---------------------------------------------------------------- event names


def test_span_event_attribute_named_event(jaeger, tempo):
    """Jaeger turns a span event into a log whose "event" field is the event's
    name, and an attribute named "event" overwrites it. otel-bridge's events
    never have one (the id is prefect.event.id), so their names survive; a
    span event that had one would lose its name in Jaeger, not in Tempo."""
    spans = real_spans("task_retries.jsonl")
    assert not [e for s in spans for e in s.events if "event" in e.attributes]
    flow = [s for s in spans if s.attributes["prefect.run.type"] == "flow"][0]
    clash = dataclasses.replace(flow, events=[SpanEvent(
        flow.events[0].name, flow.events[0].time_unix_nano,
        {**flow.events[0].attributes, "event": "an-attribute-value"})])
    for b in (jaeger, tempo):
        send(b.otlp_grpc_endpoint, [clash], service())
    (log,) = jaeger_span(jaeger, clash)["logs"]
    assert fields(log)["event"] == "an-attribute-value"
    assert flow.events[0].name not in fields(log).values()
    (event,) = tempo_span(tempo, clash)["events"]
    assert event["name"] == flow.events[0].name
    assert backends.otlp_attrs(event["attributes"])["event"] == "an-attribute-value"

    # Ours, unchanged: every state event's name is the log's "event".
    spans = real_spans("task_retries.jsonl")
    n = len(spans)
    send(jaeger.otlp_grpc_endpoint, spans, service())
    trace = jaeger.wait_for_trace(spans[0].trace_id_hex, min_spans=n)
    for span in spans:
        (got,) = [s for s in trace["spans"] if s["spanID"] == span.span_id_hex]
        assert [fields(log)["event"] for log in got["logs"]] == [e.name for e in span.events]
        assert [fields(log)["prefect.event.id"] for log in got["logs"]] == [
            e.attributes["prefect.event.id"] for e in span.events]


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


def test_jaeger_does_not_adjust_clock_skew(jaeger, tempo):
    """A child starting 5 ms before its parent and ending 5 ms after (same
    host): Jaeger v2 computes a skew delta but its adjustment is disabled by
    default; it warns and keeps the times. Tempo keeps them without a word."""
    flow, task = flow_and_task()
    shifted = dataclasses.replace(task, start_time_unix_nano=flow.start_time_unix_nano - 5_000_000,
                                  end_time_unix_nano=flow.end_time_unix_nano + 5_000_000)
    for b in (jaeger, tempo):
        send(b.otlp_grpc_endpoint, [flow, shifted], service())
    got = jaeger_span(jaeger, shifted, 2)
    assert got["startTime"] == shifted.start_time_unix_nano // 1000
    assert got["duration"] == (shifted.end_time_unix_nano - shifted.start_time_unix_nano) // 1000
    assert got.get("warnings") == ["clock skew adjustment disabled; not applying calculated delta of 5ms"]
    assert jaeger_span(jaeger, flow, 2).get("warnings") in (None, [])
    t = tempo_span(tempo, shifted, 2)
    assert int(t["startTimeUnixNano"]) == shifted.start_time_unix_nano
    assert int(t["endTimeUnixNano"]) == shifted.end_time_unix_nano


# ---------------------------------------------------------------- duplicates


def test_identical_duplicates_are_dropped(jaeger, tempo):
    """The same spans sent twice (two replicas, a retried export): each
    backend shows each span once."""
    flow, task = flow_and_task()
    for b in (jaeger, tempo):
        svc = service()
        send(b.otlp_grpc_endpoint, [flow, task], svc)
        send(b.otlp_grpc_endpoint, [flow, task], svc)
    time.sleep(2)
    trace = jaeger.wait_for_trace(task.trace_id_hex, min_spans=2)
    assert sorted(s["spanID"] for s in trace["spans"]) == sorted([flow.span_id_hex, task.span_id_hex])
    assert not [w for s in trace["spans"] for w in s.get("warnings") or []]
    doc = tempo.wait_for_trace(task.trace_id_hex, min_spans=2)
    assert sorted(backends.otlp_id_hex(s["spanId"], 8) for s in backends.otlp_json_spans(doc)) == \
        sorted([flow.span_id_hex, task.span_id_hex])


def test_different_duplicates(jaeger, tempo):
    """The same span id with different content: Jaeger shows both copies,
    Tempo keeps the first it got. Hence otel-bridge emits each span once,
    final."""
    _, task = flow_and_task()
    first = dataclasses.replace(task, parent_span_id=None,
                                attributes={**task.attributes, "copy": "first"})
    second = dataclasses.replace(first, attributes={**task.attributes, "copy": "second"})
    for b in (jaeger, tempo):
        svc = service()
        send(b.otlp_grpc_endpoint, [first], svc)
        send(b.otlp_grpc_endpoint, [second], svc)
    trace = jaeger.wait_for_trace(task.trace_id_hex, min_spans=2)
    assert sorted(backends.jaeger_tags(s["tags"])["copy"] for s in trace["spans"]) == ["first", "second"]
    assert {s["spanID"] for s in trace["spans"]} == {task.span_id_hex}
    time.sleep(2)
    doc = tempo.wait_for_trace(task.trace_id_hex)
    assert [backends.otlp_attrs(s["attributes"])["copy"] for s in backends.otlp_json_spans(doc)] == ["first"]
