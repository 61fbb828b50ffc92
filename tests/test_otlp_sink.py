"""Requests are cut by encoded size: Jaeger and Tempo refuse a request over
4 MiB whole (tests/test_backend_behaviour.py pins that on Jaeger)."""

from __future__ import annotations

import pytest
from factories import FlowRun, task_run_events
from helpers import FIXTURES, convert, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_bridge.sinks._otlp_size import span_size_bound
from otel_bridge.sinks.otlp import MAX_REQUEST_BYTES, batches_by_size, request_overhead
from otel_bridge.sinks.sdk import resource_from_env, to_readable_spans


def test_batches_stay_under_the_limit_and_keep_every_span_in_order():
    flow_run = FlowRun()
    message = "Task run encountered an exception ValueError: " + "x" * 99_000
    raw = []
    for i in range(40):
        raw += task_run_events(["Pending", "Running", "Retrying", "Failed"], name=f"t-{i}",
                               flow_run=flow_run, messages={"Retrying": message, "Failed": message})
    resource = resource_from_env()
    spans = convert(raw)
    total = encode_spans(to_readable_spans(spans, resource)).ByteSize()
    assert total > 3 * MAX_REQUEST_BYTES
    batches = list(batches_by_size(spans, overhead=request_overhead(resource)))
    assert len(batches) > 3
    assert [s for batch in batches for s in batch] == spans
    for batch in batches:
        assert encode_spans(to_readable_spans(batch, resource)).ByteSize() <= MAX_REQUEST_BYTES


def test_a_span_over_the_limit_goes_alone():
    spans = convert(task_run_events(["Pending", "Running", "Completed"]))
    assert list(batches_by_size(spans * 3, limit=10)) == [[spans[0]]] * 3


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.jsonl")))
def test_a_spans_size_is_worked_out_to_a_few_bytes_above_its_encoding(fixture):
    """Requests are cut by a size worked out from the plain span (each span
    is encoded once, to be sent): never below what the SDK's encoder
    writes, so no request goes over, and at most 32 bytes above it."""
    resource = resource_from_env()
    for span in convert(load_jsonl(FIXTURES / fixture)):
        request = encode_spans(to_readable_spans([span], resource))
        encoded = request.ByteSize() - request_overhead(resource)
        assert encoded <= span_size_bound(span) <= encoded + 32, span.name
