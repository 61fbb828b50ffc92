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
"""

from __future__ import annotations

import json
from typing import IO, Optional

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from otel_bridge.sinks.otlp import protocol_from_env
from otel_bridge.sinks.sdk import SCOPE
from otel_bridge.translate.run_metrics import (
    DURATION_BUCKETS,
    INSTRUMENTS,
    CountedRuns,
    RunMeasurements,
)

__all__ = ["RunMetricsRecorder", "metric_exporter_from_env",
           "open_run_metrics", "request_json"]

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
                 stream: Optional[IO[str]] = None) -> None:
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
        self.runs_recorded = 0

    def record(self, found: Optional[RunMeasurements]) -> bool:
        """Record a run's measurements unless it was counted before; whether it was new."""
        if found is None or not self.counted.first_time(found.span_id):
            return False
        for m in found.measurements:
            instrument = self._instruments[m.instrument.name]
            attributes = dict(m.attributes)
            if m.instrument.kind == "histogram":
                instrument.record(m.value, attributes)
            else:
                instrument.add(m.value, attributes)
        self.runs_recorded += 1
        return True

    def close(self) -> None:
        """Export what was recorded (to the endpoint, or the file as one
        request line) and let go of the provider."""
        if self._stream is not None:
            data = self._reader.get_metrics_data()
            if data is not None and data.resource_metrics:
                self._stream.write(json.dumps(request_json(data), separators=(",", ":")) + "\n")
            self._stream.flush()
        self._provider.shutdown()


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
        return RunMetricsRecorder(PeriodicExportingMetricReader(metric_exporter_from_env()),
                                  resource)
    if stream is None:
        raise ValueError("OTLP/JSON metrics need a stream to write")
    return RunMetricsRecorder(InMemoryMetricReader(), resource, stream=stream)
