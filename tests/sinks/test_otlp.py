"""Spans are encoded once, by our own OTLP encoder, held equal to the SDK's;
requests are cut by encoded size (Jaeger and Tempo refuse a request over
4 MiB whole: tests/end_to_end/test_backend_behaviour.py pins that on Jaeger); a span
OTLP cannot carry is set aside alone, counted."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from support.factories import FlowRun, task_run_events
from support.helpers import FIXTURES, convert, load_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.model.otlp_protobuf import TraceRequest, Unencodable, encode_span
from otel_bridge.model.spans import Span, SpanEvent, SpanLink
from otel_bridge.sinks import otlp
from otel_bridge.sinks.otlp import MAX_REQUEST_BYTES, OtlpSink, requests_by_size, trace_request
from otel_bridge.sinks.sdk import resource_from_env, to_readable_span, to_readable_spans

RESOURCE = Resource({"service.name": "prefect", "host.name": "h", "n": 3, "tags": ("a", "b")})


def sdk_span(span: Span, resource: Resource = RESOURCE) -> ProtoSpan:
    return encode_spans([to_readable_span(span, resource)]).resource_spans[0].scope_spans[0].spans[0]


# -- the encoder against the SDK's ---------------------------------------------

_ints = st.integers(-(2**63), 2**63 - 1)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_scalar = st.one_of(_text, st.booleans(), _ints, st.floats(allow_nan=False))
_value = st.one_of(_scalar, st.lists(_text, max_size=4), st.lists(st.booleans(), max_size=3),
                   st.lists(_ints, max_size=3), st.lists(st.floats(allow_nan=False), max_size=3))
_attributes = st.dictionaries(_text, _value, max_size=6)
_nanos = st.integers(0, 2**64 - 1)
_trace_ids = st.integers(0, 2**128 - 1)
_span_ids = st.integers(0, 2**64 - 1)

spans = st.builds(
    Span,
    trace_id=_trace_ids, span_id=_span_ids,
    parent_span_id=st.none() | _span_ids,
    name=_text, start_time_unix_nano=_nanos, end_time_unix_nano=_nanos,
    attributes=_attributes,
    events=st.lists(st.builds(SpanEvent, _text, _nanos, _attributes), max_size=4),
    links=st.lists(st.builds(SpanLink, _trace_ids, _span_ids, _attributes,
                             st.integers(0, 255)), max_size=2),
    kind=st.sampled_from(SpanKind), status_code=st.sampled_from(StatusCode),
    status_message=_text,
)


@settings(max_examples=400, deadline=None)
@given(spans)
def test_a_span_encodes_as_the_sdks_encoder_writes_it(span):
    assert ProtoSpan.FromString(encode_span(span)) == sdk_span(span)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.jsonl")))
def test_real_runs_encode_to_the_sdks_very_bytes(fixture):
    for span in convert(load_jsonl(FIXTURES / fixture)):
        assert encode_span(span) == sdk_span(span).SerializeToString(), span.name


def test_a_request_is_the_sdks_request_and_its_size_is_known_before_it_is_made():
    spans = convert(load_jsonl(FIXTURES / "retries-immediate.jsonl"))
    request = trace_request(RESOURCE)
    fields = [TraceRequest.span_field(encode_span(span)) for span in spans]
    encoded = request.encode(fields)
    assert ExportTraceServiceRequest.FromString(encoded) == encode_spans(
        to_readable_spans(spans, RESOURCE))
    assert request.size(sum(map(len, fields))) == len(encoded)
    assert request.size(0) == len(request.encode([]))


@pytest.mark.parametrize("span, why", [
    (dict(start_time_unix_nano=-2_208_988_800 * 10**9), "1970"),  # a run dated 1900
    (dict(attributes={"x": 2**63}), "64 bits"),
    (dict(attributes={"x": "\ud800"}), "Unicode"),
    (dict(events=(SpanEvent("\udfff", 1),)), "Unicode"),
    (dict(attributes={"x": {"a": 1}}), "type dict"),
    (dict(span_id=2**64), "8 bytes"),
])
def test_what_otlp_cannot_carry_is_refused_with_its_reason(span, why):
    base = Span(1, 2, None, "n", 10, 20)
    with pytest.raises(Unencodable, match=why):
        encode_span(dataclasses.replace(base, **span))


# -- requests ------------------------------------------------------------------


def _big_spans() -> list[Span]:
    flow_run = FlowRun()
    message = "Task run encountered an exception ValueError: " + "x" * 99_000
    raw = []
    for i in range(40):
        raw += task_run_events(["Pending", "Running", "Retrying", "Failed"], name=f"t-{i}",
                               flow_run=flow_run, messages={"Retrying": message, "Failed": message})
    return convert(raw)


def test_requests_stay_under_the_limit_and_keep_every_span_in_order():
    spans = _big_spans()
    request = trace_request(RESOURCE)
    fields = [TraceRequest.span_field(encode_span(span)) for span in spans]
    assert request.size(sum(map(len, fields))) > 3 * MAX_REQUEST_BYTES
    batches = list(requests_by_size(fields, request))
    assert len(batches) > 3
    assert [f for batch in batches for f in batch] == fields
    for batch in batches:
        assert len(request.encode(batch)) <= MAX_REQUEST_BYTES


def test_a_span_over_the_limit_goes_alone():
    span = convert(task_run_events(["Pending", "Running", "Completed"]))[0]
    field = TraceRequest.span_field(encode_span(span))
    batches = list(requests_by_size([field] * 3, trace_request(RESOURCE), limit=10))
    assert batches == [[field]] * 3


# -- the sink ------------------------------------------------------------------


class Recording(SpanExporter):
    """An exporter that keeps the requests it is given, as the public API
    gives them (ReadableSpans) or encoded (`export_encoded`)."""

    def __init__(self, encoded: bool):
        self.requests: list[ExportTraceServiceRequest] = []
        if encoded:
            self.export_encoded = self._export_encoded

    def export(self, spans):
        self.requests.append(encode_spans(spans))
        return SpanExportResult.SUCCESS

    def _export_encoded(self, request: bytes, spans: int):
        parsed = ExportTraceServiceRequest.FromString(request)
        assert sum(len(s.spans) for rs in parsed.resource_spans for s in rs.scope_spans) == spans
        self.requests.append(parsed)
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "public-api"])
def test_an_unencodable_span_is_set_aside_alone_and_counted(encoded):
    spans = convert(load_jsonl(FIXTURES / "retries-immediate.jsonl"))
    bad = dataclasses.replace(spans[1], start_time_unix_nano=-1)
    exporter, refused = Recording(encoded), []
    sink = OtlpSink(exporter, RESOURCE, on_unencodable=lambda span, error: refused.append(span))
    sink.export([spans[0], bad, *spans[2:]])
    assert refused == [bad] and sink.spans_unencodable == 1
    assert sink.spans_written == len(spans) - 1
    sent = [s for r in exporter.requests for rs in r.resource_spans
            for ss in rs.scope_spans for s in ss.spans]
    assert sent == [sdk_span(s) for s in [spans[0], *spans[2:]]]


def test_the_official_exporters_take_encoded_requests_only_at_versions_we_tested(
        monkeypatch, caplog):
    assert hasattr(otlp.exporter_from_env("grpc"), "export_encoded")
    assert hasattr(otlp.exporter_from_env("http/protobuf"), "export_encoded")
    monkeypatch.setattr(otlp, "TESTED_EXPORTER_VERSIONS", ("0.1",))
    with caplog.at_level(logging.WARNING):
        exporter = otlp.exporter_from_env("grpc")
    assert type(exporter) is GrpcExporter and not hasattr(exporter, "export_encoded")
    assert "not a version otel-bridge was tested with" in caplog.text


def test_the_bridges_resource_is_the_sdks():
    resource = resource_from_env()
    spans = convert(load_jsonl(FIXTURES / "retries-immediate.jsonl"))
    request = trace_request(resource)
    encoded = request.encode(TraceRequest.span_field(encode_span(s)) for s in spans)
    assert ExportTraceServiceRequest.FromString(encoded) == encode_spans(
        to_readable_spans(spans, resource))
