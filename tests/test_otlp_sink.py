"""Requests are cut by encoded size: Jaeger and Tempo refuse a request over
4 MiB whole (tests/test_backend_behaviour.py pins that on Jaeger)."""

from __future__ import annotations

from factories import FlowRun, task_run_events
from helpers import convert
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_bridge.sinks.otlp import MAX_REQUEST_BYTES, batches_by_size
from otel_bridge.sinks.sdk import resource_from_env, to_readable_spans


def test_batches_stay_under_the_limit_and_keep_every_span_in_order():
    flow_run = FlowRun()
    message = "Task run encountered an exception ValueError: " + "x" * 99_000
    raw = []
    for i in range(40):
        raw += task_run_events(["Pending", "Running", "Retrying", "Failed"], name=f"t-{i}",
                               flow_run=flow_run, messages={"Retrying": message, "Failed": message})
    spans = to_readable_spans(convert(raw), resource_from_env())
    total = encode_spans(spans).ByteSize()
    assert total > 3 * MAX_REQUEST_BYTES
    batches = list(batches_by_size(spans))
    assert len(batches) > 3
    assert [s for batch in batches for s in batch] == spans
    for batch in batches:
        assert encode_spans(batch).ByteSize() <= MAX_REQUEST_BYTES


def test_a_span_over_the_limit_goes_alone():
    spans = to_readable_spans(convert(task_run_events(["Pending", "Running", "Completed"])),
                              resource_from_env())
    assert list(batches_by_size(spans * 3, limit=10)) == [[spans[0]]] * 3
