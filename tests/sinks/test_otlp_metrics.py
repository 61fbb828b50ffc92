"""Run metrics through the SDK: the totals a store keeps aggregate exactly as
the SDK does, and a later process that adds them as its baseline exports
what one process that had recorded everything would have."""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
)
from opentelemetry.sdk.metrics import Counter as CounterInstrument
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.resources import Resource

from support.helpers import metric_points

from otel_bridge.sinks.otlp_metrics import (
    OtlpJsonMetricExporter,
    RunMetricsRecorder,
    request_json,
    with_baseline,
)
from otel_bridge.translate.metric_totals import SeriesTotal, add_measurements
from otel_bridge.translate.open_run_metrics import FLOW_RUN_STUCK
from otel_bridge.translate.run_metrics import (
    DURATION_BUCKETS,
    FLOW_RUN_DURATION,
    FLOW_RUN_ERRORS,
    TASK_RUN_DURATION,
    Measurement,
)

RESOURCE = Resource.create({"service.name": "test"})
# Values on the boundaries, between them, past the last, and zero.
VALUES = st.one_of(st.sampled_from([0.0, *DURATION_BUCKETS, 86400.5]),
                   st.floats(min_value=0, max_value=200_000, allow_nan=False))
NAMES = st.sampled_from(["a", "b"])


def _measurements(draw_values, names):
    out = []
    for value, name in zip(draw_values, names):
        out.append(Measurement(FLOW_RUN_DURATION, value, (("cicd.pipeline.name", name),)))
        out.append(Measurement(TASK_RUN_DURATION, value / 2, (("cicd.pipeline.task.name", name),)))
        out.append(Measurement(FLOW_RUN_ERRORS, 1, (("error.type", name),)))
    return out


def _recorded(measurements, temporality=None, baseline=None, start=0):
    reader = InMemoryMetricReader(preferred_temporality=temporality or {})
    recorder = RunMetricsRecorder(reader, RESOURCE)
    recorder.record_measurements(measurements)
    data = reader.get_metrics_data()
    if baseline is not None:
        wanted = temporality or {}
        data = with_baseline(data, baseline, start, RESOURCE, cumulative=lambda kind: wanted.get(
            HistogramInstrument if kind == "histogram" else CounterInstrument,
            AggregationTemporality.CUMULATIVE) is AggregationTemporality.CUMULATIVE)
    return data


@settings(max_examples=60, deadline=None)
@given(st.lists(VALUES, min_size=1, max_size=30), st.lists(NAMES, min_size=30, max_size=30),
       st.integers(min_value=0, max_value=30))
def test_a_baseline_of_earlier_totals_exports_what_one_process_would(values, names, split):
    measurements = _measurements(values, names)
    cut = 3 * min(split, len(values))
    earlier, later = measurements[:cut], measurements[cut:]
    totals: dict = {}
    add_measurements(totals, earlier)
    # The totals go through the store's text form.
    stored = {key: SeriesTotal.from_json(total.to_json()) for key, total in totals.items()}
    assert metric_points(_recorded(later, baseline=stored, start=1)) == metric_points(_recorded(measurements))


def test_baseline_points_start_when_the_store_first_counted_and_delta_is_left_alone():
    earlier = _measurements([3.0], ["a"])
    totals: dict = {}
    add_measurements(totals, earlier)
    data = _recorded(_measurements([7.0], ["a"]), baseline=totals, start=123)
    starts = {p.start_time_unix_nano for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics for p in m.data.data_points}
    assert starts == {123}
    delta = {HistogramInstrument: AggregationTemporality.DELTA,
             CounterInstrument: AggregationTemporality.DELTA}
    plain = _recorded(_measurements([7.0], ["a"]), temporality=delta)
    with_base = _recorded(_measurements([7.0], ["a"]), temporality=delta, baseline=totals, start=123)
    assert metric_points(with_base) == metric_points(plain)


def test_series_of_earlier_processes_only_are_exported_too():
    totals: dict = {}
    add_measurements(totals, _measurements([2.0, 40.0], ["a", "b"]))
    data = _recorded([], baseline=totals, start=5)  # this process counted nothing yet
    assert metric_points(data) == metric_points(_recorded(_measurements([2.0, 40.0], ["a", "b"])))


def test_open_runs_are_observed_at_each_export_and_a_series_seen_once_reports_zero():
    now = [Measurement(FLOW_RUN_STUCK, 2, (("cicd.pipeline.name", "f"), ("prefect.state.name", "Late")))]
    reader = InMemoryMetricReader()
    RunMetricsRecorder(reader, RESOURCE, open_runs=lambda: now)
    first = metric_points(reader.get_metrics_data())
    assert first[("prefect.flow.run.stuck", (("cicd.pipeline.name", "f"), ("prefect.state.name", "Late")))] == 2
    now = []
    second = metric_points(reader.get_metrics_data())
    assert second[("prefect.flow.run.stuck", (("cicd.pipeline.name", "f"), ("prefect.state.name", "Late")))] == 0


def test_the_file_exporter_writes_one_request_per_export():
    stream = io.StringIO()
    stream.close = lambda: None  # read it after shutdown
    data = _recorded(_measurements([1.0], ["a"]))
    exporter = OtlpJsonMetricExporter(stream)
    exporter.export(data)
    exporter.export(data)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [request_json(data)] * 2

