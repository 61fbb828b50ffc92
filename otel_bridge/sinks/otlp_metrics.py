"""Run metrics out through the official OpenTelemetry SDK: a `MeterProvider`
whose instruments are the run metrics' (`translate.run_metrics`), read by
the OTLP metric exporter, or written as OTLP/JSON.

To the endpoint: the official exporter for the protocol of
`OTEL_EXPORTER_OTLP_METRICS_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`
(`grpc` or `http/protobuf`, the specification's default), itself configured
by `OTEL_EXPORTER_OTLP_*` / `OTEL_EXPORTER_OTLP_METRICS_*` (endpoint,
headers, temporality preference, ...), exported every
`OTEL_METRIC_EXPORT_INTERVAL` ms by the SDK's periodic reader and once more
at `close`. To a file: one `ExportMetricsServiceRequest` per line, as the
Collector's file exporter writes it, encoded by the SDK's own OTLP encoder
at `close`.

Each run is recorded once, by its span id (`CountedRuns`). Data points carry
the export's time, not the runs': the measurements are totals as of then.

`serve` adds two things: the open runs, observed at each export (active and
stuck runs), and `BaselineExporter`, which adds totals the SDK did not
record to each cumulative point: `serve`'s store keeps the run totals
(`service.run_metrics`), so a restart continues the series instead of
starting them again from zero, and those totals are the points it exports.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import IO, Callable, Mapping, Optional, Sequence

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import (
    OTLPMetricExporterMixin,
)
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_bridge.sinks.otlp import protocol_from_env
from otel_bridge.sinks.sdk import SCOPE
from otel_bridge.translate.metric_totals import SeriesKey, SeriesTotal
from otel_bridge.translate.open_run_metrics import OPEN_RUN_INSTRUMENTS
from otel_bridge.translate.run_metrics import (
    DURATION_BUCKETS,
    INSTRUMENTS,
    CountedRuns,
    Measurement,
    RunMeasurements,
)

__all__ = ["BaselineExporter", "BaselineReader", "CheckedExporter", "OtlpJsonMetricExporter", "RunMetricsRecorder",
           "metric_exporter_from_env", "open_run_metrics", "request_json", "with_baseline"]

OTLP = "otlp"  # `open_run_metrics`'s destination for the OTLP endpoint


def metric_exporter_from_env(protocol: Optional[str] = None) -> MetricExporter:
    """The official OTLP metric exporter for the protocol, configured by the
    environment."""
    if (protocol or protocol_from_env("metrics")) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter()


class RunMetricsRecorder:
    """The run metrics' instruments on a `MeterProvider` of their own, read
    by `reader`. `record` counts a finished run once, whatever repeats."""

    def __init__(self, reader: MetricReader, resource: Resource,
                 counted: Optional[CountedRuns] = None,
                 stream: Optional[IO[str]] = None,
                 open_runs: Optional[Callable[[], Sequence[Measurement]]] = None) -> None:
        """`open_runs`: the open runs' measurements (`open_run_metrics`) as
        of now, called on the reader's thread at each export."""
        self._reader, self._stream = reader, stream
        self.counted = counted if counted is not None else CountedRuns()
        # Exemplars would put trace and span ids on the points: no run's identity.
        self._provider = MeterProvider([reader], resource=resource,
                                       exemplar_filter=AlwaysOffExemplarFilter(),
                                       shutdown_on_exit=False)
        meter = self._provider.get_meter(SCOPE.name, SCOPE.version)
        self._instruments = {}
        for spec in INSTRUMENTS:
            if spec.kind == "histogram":
                made = meter.create_histogram(
                    spec.name, spec.unit, spec.description,
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
            else:
                made = meter.create_counter(spec.name, spec.unit, spec.description)
            self._instruments[spec.name] = made
        self._open_runs = open_runs
        self.exports: Optional[CheckedExporter] = None  # the outcomes, when sent to an endpoint
        if open_runs is not None:
            for spec in OPEN_RUN_INSTRUMENTS:
                make = (meter.create_observable_up_down_counter if spec.kind == "updowncounter"
                        else meter.create_observable_gauge)
                make(spec.name, [self._observer(spec.name)], spec.unit, spec.description)
        self.runs_recorded = 0

    def _observer(self, name: str):
        # A series seen once then reports 0 rather than vanishing: "none
        # active, none stuck" is a value an alert can read.
        seen: set = set()

        def observe(options: CallbackOptions) -> list[Observation]:
            now = {m.attributes: m.value for m in self._open_runs() if m.instrument.name == name}
            seen.update(now)
            return [Observation(now.get(attributes, 0), dict(attributes)) for attributes in sorted(seen)]

        return observe

    def record_measurements(self, measurements: Sequence[Measurement]) -> None:
        """Record a run's measurements, with no check of whether the run was
        counted before: for a caller that keeps that itself (`serve`)."""
        for m in measurements:
            instrument = self._instruments[m.instrument.name]
            if m.instrument.kind == "histogram":
                instrument.record(m.value, dict(m.attributes))
            else:
                instrument.add(m.value, dict(m.attributes))
        self.runs_recorded += 1

    def record(self, found: Optional[RunMeasurements]) -> bool:
        """Record a run's measurements unless it was counted before; whether it was new."""
        if found is None or not self.counted.first_time(found.span_id):
            return False
        self.record_measurements(found.measurements)
        return True

    def close(self, timeout_seconds: float = 30.0) -> None:
        """Export what was recorded (to the endpoint, or the file as one
        request line) and let go of the provider, within the time given."""
        if self._stream is not None:
            data = self._reader.get_metrics_data()
            if data is not None and data.resource_metrics:
                self._stream.write(json.dumps(request_json(data), separators=(",", ":")) + "\n")
            self._stream.flush()
        self._provider.shutdown(timeout_millis=timeout_seconds * 1000)


def request_json(data) -> dict:
    """The SDK's `MetricsData` as one OTLP/JSON `ExportMetricsServiceRequest`:
    the official encoder, put through protobuf's JSON mapping with enums as
    integers, as OTLP/JSON requires (there are no ids to turn to hex:
    exemplars are off)."""
    return MessageToDict(encode_metrics(data), use_integers_for_enums=True)


def open_run_metrics(destination: str, resource: Resource,
                     stream: Optional[IO[str]] = None) -> RunMetricsRecorder:
    """A recorder that sends to the OTLP endpoint (`destination` "otlp") or
    writes OTLP/JSON to `stream` at close."""
    if destination == OTLP:
        exporter = CheckedExporter(metric_exporter_from_env())
        recorder = RunMetricsRecorder(PeriodicExportingMetricReader(exporter), resource)
        recorder.exports = exporter
        return recorder
    if stream is None:
        raise ValueError("OTLP/JSON metrics need a stream to write")
    return RunMetricsRecorder(InMemoryMetricReader(), resource, stream=stream)


class CheckedExporter(MetricExporter):
    """Another exporter, with its outcomes counted and its failures told
    (`on_failure`): the SDK's reader logs a failed export and goes on, and
    a batch that reported success when its metrics were refused would lose
    them silently. (A cumulative export that fails loses nothing for good:
    the next one carries the same totals, and more.)"""

    def __init__(self, exporter: MetricExporter,
                 on_failure: Optional[Callable[[], None]] = None) -> None:
        super().__init__(preferred_temporality=exporter._preferred_temporality,
                         preferred_aggregation=exporter._preferred_aggregation)
        self._exporter, self._on_failure = exporter, on_failure
        self.succeeded = self.failed = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs) -> MetricExportResult:
        try:
            result = self._exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self.succeeded += 1
        else:
            self.failed += 1
            if self._on_failure is not None:
                self._on_failure()
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


class OtlpJsonMetricExporter(MetricExporter, OTLPMetricExporterMixin):
    """Each export as one OTLP/JSON `ExportMetricsServiceRequest` line, as
    the Collector's file exporter writes it (`serve` with forward_to: file).
    Its temporality and aggregation as the SDK's OTLP exporters take them
    from the environment (`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`),
    with their own code."""

    def __init__(self, stream: IO[str]) -> None:
        self._common_configuration()
        self._stream, self._lock = stream, threading.Lock()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs) -> MetricExportResult:
        if metrics_data.resource_metrics:
            with self._lock:
                self._stream.write(json.dumps(request_json(metrics_data), separators=(",", ":")) + "\n")
                self._stream.flush()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        with self._lock:
            self._stream.close()


class BaselineExporter(MetricExporter):
    """Another exporter, with totals the SDK did not record added to each
    cumulative point (`with_baseline`): those earlier processes counted (the
    SDK aggregates only what its own process records, and a series that
    started again from zero at each restart would read as a reset, or a
    drop in a sum), or all of them, where the caller aggregates itself.
    `baseline` is called at each export, on the reader's thread."""

    def __init__(self, exporter: MetricExporter,
                 baseline: Callable[[], Mapping[SeriesKey, SeriesTotal]],
                 start_unix_nano: int, resource: Resource) -> None:
        super().__init__(preferred_temporality=exporter._preferred_temporality,
                         preferred_aggregation=exporter._preferred_aggregation)
        self._exporter, self._baseline, self._start = exporter, baseline, start_unix_nano
        self._resource = resource

    def cumulative(self) -> bool:
        """Whether the exporter wants histograms and counters cumulative (the
        default; Prometheus takes nothing else)."""
        return self._cumulative("histogram") and self._cumulative("counter")

    def _cumulative(self, kind: str) -> bool:
        instrument = SdkHistogram if kind == "histogram" else SdkCounter
        wanted = (self._preferred_temporality or {}).get(instrument)
        return wanted in (None, AggregationTemporality.CUMULATIVE)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs) -> MetricExportResult:
        data = with_baseline(metrics_data, self._baseline(), self._start, self._resource,
                             self._cumulative)
        if not data.resource_metrics:
            return MetricExportResult.SUCCESS
        return self._exporter.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


_SPECS = {spec.name: spec for spec in INSTRUMENTS}


class BaselineReader(PeriodicExportingMetricReader):
    """The SDK's periodic reader, except that it exports when this process
    has recorded nothing yet: the SDK's collection is then None, and the
    series of earlier processes (`BaselineExporter`) would vanish until a
    run ends."""

    def collect(self, timeout_millis: float = 10_000) -> None:
        if self._collect is None:
            return super().collect(timeout_millis)
        metrics = self._collect(self, timeout_millis=timeout_millis)
        self._receive_metrics(metrics if metrics is not None else MetricsData([]),
                              timeout_millis=timeout_millis)


def with_baseline(data: Optional[MetricsData], baseline: Mapping[SeriesKey, SeriesTotal],
                  start_unix_nano: int, resource: Optional[Resource] = None,
                  cumulative: Callable[[str], bool] = lambda kind: True) -> MetricsData:
    """`data` with the baseline added to the run metrics' cumulative points
    (and a point for each baseline series this process has not recorded),
    each such point starting at `start_unix_nano`, when the store first
    counted. Delta points are left as they are: earlier processes' counts
    were exported as deltas already. `resource`: the provider's, for when
    `data` has none (None, or empty: nothing recorded yet). `cumulative`:
    whether the exporter wants an instrument kind's points cumulative."""
    data = data if data is not None else MetricsData([])
    left = {key: total for key, total in baseline.items()
            if key[0] in _SPECS and cumulative(_SPECS[key[0]].kind)}
    if not left:
        return data
    now, resource_metrics = start_unix_nano, []
    for rm in data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            metrics = []
            for metric in sm.metrics:
                points = getattr(metric.data, "data_points", ())
                now = max([now, *(p.time_unix_nano for p in points)])
                if (sm.scope.name == SCOPE.name and metric.name in _SPECS
                        and getattr(metric.data, "aggregation_temporality", None)
                        is AggregationTemporality.CUMULATIVE):
                    metric = _merged(metric, left, start_unix_nano)
                metrics.append(metric)
            scopes.append(replace(sm, metrics=metrics))
        resource_metrics.append(replace(rm, scope_metrics=scopes))
    if left:  # series no point of this export carries: this process has not recorded them
        extra = [_merged(Metric(name, spec.description, spec.unit, _empty(spec.kind)),
                         left, start_unix_nano, now)
                 for name, spec in _SPECS.items() if any(key[0] == name for key in left)]
        if resource_metrics:
            first = resource_metrics[0]
            scopes = list(first.scope_metrics)
            ours = next((i for i, sm in enumerate(scopes) if sm.scope.name == SCOPE.name), None)
            if ours is None:
                scopes.append(ScopeMetrics(_SCOPE, extra, ""))
            else:
                scopes[ours] = replace(scopes[ours], metrics=[*scopes[ours].metrics, *extra])
            resource_metrics[0] = replace(first, scope_metrics=scopes)
        else:
            resource_metrics.append(ResourceMetrics(resource or Resource.create(),
                                                    [ScopeMetrics(_SCOPE, extra, "")], ""))
    return MetricsData(resource_metrics)


_SCOPE = InstrumentationScope(SCOPE.name, SCOPE.version)


def _empty(kind: str):
    if kind == "histogram":
        return Histogram([], AggregationTemporality.CUMULATIVE)
    return Sum([], AggregationTemporality.CUMULATIVE, is_monotonic=True)


def _merged(metric: Metric, left: dict[SeriesKey, SeriesTotal], start: int,
            now: Optional[int] = None) -> Metric:
    """The metric's points plus their baseline (taken out of `left`), and a
    point for each baseline series of the metric left over."""
    points = []
    for point in metric.data.data_points:
        base = left.pop((metric.name, tuple(sorted(point.attributes.items()))), None)
        points.append(point if base is None else _add(point, base, start))
        now = point.time_unix_nano
    for key in [key for key in left if key[0] == metric.name]:
        base = left.pop(key)
        attributes = dict(key[1])
        if isinstance(metric.data, Histogram):
            zero = HistogramDataPoint(attributes, start, now or start, 0, 0.0,
                                      [0] * (len(DURATION_BUCKETS) + 1), DURATION_BUCKETS,
                                      float("inf"), float("-inf"))
        else:
            zero = NumberDataPoint(attributes, start, now or start, 0)
        points.append(_add(zero, base, start))
    return replace(metric, data=replace(metric.data, data_points=points))


def _add(point, base: SeriesTotal, start: int):
    start = min(start, point.start_time_unix_nano)
    if isinstance(point, HistogramDataPoint):
        counts = base.bucket_counts or [0] * len(point.bucket_counts)
        return replace(point, start_time_unix_nano=start, count=point.count + base.count,
                       sum=point.sum + base.sum,
                       bucket_counts=[a + b for a, b in zip(point.bucket_counts, counts)],
                       min=min(point.min, base.min), max=max(point.max, base.max))
    return replace(point, start_time_unix_nano=start, value=point.value + base.sum)
