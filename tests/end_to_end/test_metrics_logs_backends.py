"""Run metrics into a real Prometheus and log records into a real
VictoriaLogs, each sent directly and through the real Collector running the
shipped collector-config/prometheus.yaml + victorialogs.yaml (merged, as
the README shows). Real parts only: `otel-bridge convert` as a process,
Prometheus 3 with its OTLP receiver, VictoriaLogs with its OTLP endpoint,
all built from source by scripts/build-backends.sh.

Ground truth is the pure core: `run_measurements` for the metrics (what a
PromQL query reads back must be its counts, sums and buckets), `log_record`
for the logs (every record read back by LogsQL carries the trace id, span
id, severity and body it derived).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.factories import prefect_log, runs_of_span
from support.helpers import FIXTURES, ROOT, convert, load_jsonl, measured_runs

from otel_bridge.translate.logs import log_record
from otel_bridge.translate.run_metrics import DURATION_BUCKETS
from support import backends

# A cold cache builds the backends from source first.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.backend, pytest.mark.integration]

CONFIG_DIR = ROOT / "collector-config"
METRICS_AND_LOGS = [CONFIG_DIR / "prometheus.yaml", CONFIG_DIR / "victorialogs.yaml"]
# Real captures with successes, failures, a crash, a timeout, a cancellation,
# retries, NotReady and nested tasks: every metric and most attribute sets.
CAPTURES = [FIXTURES / f"{name}.jsonl" for name in (
    "success", "failure", "crash-sigterm", "timeout", "cancelled", "retries-immediate",
    "not-ready", "nested-tasks", "mapped")]

# The names Prometheus 3 gives our metrics with its default OTLP translation
# (UnderscoreEscapingWithSuffixes): dots to underscores, the unit `s` as
# `_seconds`, a unit in braces (`{error}`) dropped, `_total` on a counter; a
# histogram is the series `<name>_bucket{le=...}`, `_count` and `_sum`.
PROMETHEUS_NAMES = {
    "cicd.pipeline.run.duration": "cicd_pipeline_run_duration_seconds",
    "prefect.task.run.duration": "prefect_task_run_duration_seconds",
    "cicd.pipeline.run.errors": "cicd_pipeline_run_errors_total",
    "prefect.task.run.errors": "prefect_task_run_errors_total",
}
# Labels Prometheus adds of its own: `job` is the resource's service.name.
NOT_ATTRIBUTES = {"__name__", "job", "instance", "le"}


def run_bridge(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "otel_bridge", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def prometheus():
    with backends.prometheus() as prom:
        yield prom


@pytest.fixture(scope="module")
def victorialogs():
    with backends.victorialogs() as vl:
        yield vl


@pytest.fixture(scope="module")
def collector(prometheus, victorialogs):
    """The shipped prometheus.yaml and victorialogs.yaml, merged, on loopback."""
    env = {"OTELCOL_BIND_ADDRESS": backends.LOOPBACK,
           "PROMETHEUS_OTLP_ENDPOINT": prometheus.otlp_http_endpoint,
           "VICTORIALOGS_OTLP_ENDPOINT": victorialogs.otlp_http_endpoint,
           "OTELCOL_BATCH_TIMEOUT": "200ms"}
    with backends.collector(METRICS_AND_LOGS, env) as col:
        yield col


# ---------------------------------------------------------------- metrics


def expected_measurements() -> dict[tuple[str, tuple], list[float]]:
    """(metric, attributes as Prometheus labels) -> every value recorded, as
    the pure core measures the captures' runs (each run once)."""
    out = defaultdict(list)
    for found in measured_runs(CAPTURES):
        for m in found.measurements:
            labels = tuple(sorted((k.replace(".", "_"), v) for k, v in m.attributes))
            out[(m.instrument.name, labels)].append(m.value)
    return dict(out)


def series(prometheus, name: str, job: str) -> dict[tuple, float]:
    """{labels other than Prometheus's own (le kept apart): value} of a series name."""
    out = {}
    for sample in prometheus.query(f'{name}{{job="{job}"}}'):
        metric = sample["metric"]
        assert metric["job"] == job
        labels = tuple(sorted((k, v) for k, v in metric.items() if k not in NOT_ATTRIBUTES))
        key = (labels, float(metric["le"])) if "le" in metric else labels
        assert key not in out, f"two series {name}{dict(labels)}"
        out[key] = sample["value"]
    return out


def send_metrics(endpoint_env: dict[str, str], service: str, tmp_path: Path) -> None:
    done = run_bridge(["convert", *map(str, CAPTURES), "-o", str(tmp_path / "spans.jsonl"),
                       "--metrics", "otlp"],
                      {**endpoint_env, "OTEL_SERVICE_NAME": service})
    assert "finished runs counted in the metrics" in done.stderr


def assert_prometheus_has(prometheus, service: str) -> None:
    expected = expected_measurements()
    assert {name for name, _ in expected} == set(PROMETHEUS_NAMES)
    # Everything is in once the last metric's series are.
    for name in PROMETHEUS_NAMES.values():
        suffix = "" if name.endswith("_total") else "_count"
        n = len({labels for (metric, labels) in expected if PROMETHEUS_NAMES[metric] == name})
        prometheus.wait_for(f'{name}{suffix}{{job="{service}"}}', min_series=n)

    for metric, name in PROMETHEUS_NAMES.items():
        mine = {labels: values for (m, labels), values in expected.items() if m == metric}
        if name.endswith("_total"):
            assert series(prometheus, name, service) == {k: float(sum(v)) for k, v in mine.items()}
            continue
        assert series(prometheus, f"{name}_count", service) == {
            k: float(len(v)) for k, v in mine.items()}
        sums = series(prometheus, f"{name}_sum", service)
        assert set(sums) == set(mine)
        for labels, values in mine.items():
            assert math.isclose(sums[labels], math.fsum(values), rel_tol=1e-9, abs_tol=1e-9), (
                name, labels)
        # Cumulative buckets: how many values are <= each bound, +Inf all.
        want = {}
        for labels, values in mine.items():
            ordered = sorted(values)
            for bound in [*DURATION_BUCKETS, math.inf]:
                want[(labels, float(bound))] = float(bisect.bisect_right(ordered, bound))
        assert series(prometheus, f"{name}_bucket", service) == want


def test_run_metrics_reach_prometheus_directly(prometheus, tmp_path):
    """`convert --metrics otlp` with the SDK's OTLP/HTTP exporter straight to
    Prometheus's receiver: its cumulative histograms and counters read back
    by PromQL are the pure core's counts, sums and buckets."""
    service = f"prefect-direct-{uuid.uuid4().hex[:8]}"
    send_metrics({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": prometheus.otlp_http_metrics_url,
                  "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}, service, tmp_path)
    assert_prometheus_has(prometheus, service)
    # The other resource attributes go to target_info, not on every series.
    (info,) = prometheus.query(f'target_info{{job="{service}"}}')
    assert info["metric"]["telemetry_sdk_name"] == "opentelemetry"
    # The PromQL examples in docs/metrics.md are queries Prometheus takes.
    for query in docs_promql():
        prometheus.query(query.replace('job="prefect"', f'job="{service}"'))


def docs_promql() -> list[str]:
    """The queries of docs/metrics.md's promql block (a comment before each)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    block = text.split("```promql\n", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in re.split(r"^#.*$", block, flags=re.M) if q.strip()]
    assert len(queries) == 2, queries
    return queries


def test_run_metrics_reach_prometheus_through_the_collector(prometheus, collector, tmp_path):
    """The same over OTLP/gRPC to the Collector, which sends them on over
    OTLP/HTTP with prometheus.yaml's exporter."""
    service = f"prefect-collector-{uuid.uuid4().hex[:8]}"
    send_metrics({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.otlp_grpc_endpoint}",
                  "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, service, tmp_path)
    assert_prometheus_has(prometheus, service)
    log = collector.process.log()
    assert "deprecated" not in log.lower() and "\terror\t" not in log.lower(), log


def test_prometheus_refuses_delta_temporality(prometheus, tmp_path):
    """Why the bridge must export cumulative (the SDK's default): told to
    prefer delta, its sums and histograms are refused whole by Prometheus's
    OTLP receiver as it runs by default (HTTP 500, "invalid temporality and
    type combination" in its log) and nothing of them is stored."""
    service = f"prefect-delta-{uuid.uuid4().hex[:8]}"
    refused = subprocess.run(
        [sys.executable, "-m", "otel_bridge", "convert", str(CAPTURES[1]),
         "-o", str(tmp_path / "spans.jsonl"), "--metrics", "otlp"], cwd=ROOT,
        env={**os.environ, "OTEL_SERVICE_NAME": service,
             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": prometheus.otlp_http_metrics_url,
             "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
             "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"},
        capture_output=True, text=True, timeout=180)
    # convert says so, rather than reporting success.
    assert refused.returncode == 1, refused.stderr
    assert "the metrics' endpoint refused them" in refused.stderr
    backends.wait_until(
        lambda: 'invalid temporality and type combination for metric \\"cicd.pipeline.run.duration'
        in prometheus.process.log(), 10, what="Prometheus to refuse the delta points")
    # A cumulative export after it is stored, so the query below can see data.
    send_metrics({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": prometheus.otlp_http_metrics_url,
                  "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}, service + "-c",
                 tmp_path)
    prometheus.wait_for(f'cicd_pipeline_run_duration_seconds_count{{job="{service}-c"}}')
    assert prometheus.query(f'{{job="{service}"}}') == []


# ---------------------------------------------------------------- logs

LEVELS = (10, 20, 25, 30, 40, 50)


def log_lines(base: datetime) -> list[dict]:
    """Log lines on the runs of real captures: for every span, one line per
    level, each with its own id and message, a second apart from `base`."""
    lines, when = [], base
    for capture in ("nested-tasks", "failure", "retries-immediate", "subflow"):
        for span in convert(load_jsonl(FIXTURES / f"{capture}.jsonl")):
            flow_run, task_run = runs_of_span(span)
            for level in LEVELS:
                when += timedelta(seconds=1)
                stamp = when.isoformat().replace("+00:00", "Z")
                lines.append(prefect_log(
                    id=str(uuid.uuid4()), flow_run_id=flow_run, task_run_id=task_run,
                    level=level, timestamp=stamp, created=stamp,
                    name="prefect.task_runs" if task_run else "prefect.flow_runs",
                    message=f"{capture} {span.name} level {level} {uuid.uuid4().hex[:6]}"))
    return lines


def send_logs(lines: list[dict], endpoint_env: dict[str, str], service: str,
              tmp_path: Path) -> None:
    source = tmp_path / "logs.json"
    # Pages of 50, as POST /api/logs/filter answers.
    source.write_text("".join(json.dumps(lines[i:i + 50]) + "\n" for i in range(0, len(lines), 50)))
    done = run_bridge(["convert", "--logs", str(source), "--to", "otlp"],
                      {**endpoint_env, "OTEL_SERVICE_NAME": service})
    assert f"{len(lines)} log lines -> {len(lines)} log records" in done.stderr


def assert_victorialogs_has(victorialogs, lines: list[dict], service: str) -> list[dict]:
    got = victorialogs.wait_for(f"service.name:={backends.logsql_quote(service)}",
                                min_records=len(lines))
    by_uid = {r["log.record.uid"]: r for r in got}
    assert len(by_uid) == len(got) == len(lines), "a record is missing or came twice"
    for line in lines:
        want, record = log_record(line), by_uid[line["id"]]
        assert record["trace_id"] == format(want.trace_id, "032x")
        assert record["span_id"] == format(want.span_id, "016x")
        assert record["severity_number"] == str(want.severity_number)
        assert record["severity_text"] == want.severity_text
        assert record["_msg"] == want.body
        assert record["scope.name"] == want.logger_name
        assert record["cicd.pipeline.run.id"] == line["flow_run_id"]
        assert record.get("cicd.pipeline.task.run.id") == line["task_run_id"]
        assert datetime.fromisoformat(record["_time"]) == datetime.fromisoformat(line["timestamp"])
    return got


# The captures' own times (2026), so VictoriaLogs must keep old records:
# backends.victorialogs() runs it with a 100-year retention.
CAPTURE_TIME = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)


def test_log_records_reach_victorialogs_directly(victorialogs, tmp_path):
    """`convert --logs --to otlp` with the SDK's OTLP/HTTP log exporter
    straight to VictoriaLogs: every record, once, on the trace and span the
    pure core derived, with its severity and body; and the LogsQL queries
    docs/logs.md shows find what they say."""
    service = f"prefect-direct-{uuid.uuid4().hex[:8]}"
    lines = log_lines(CAPTURE_TIME)
    send_logs(lines, {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": victorialogs.otlp_http_logs_url,
                      "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"}, service, tmp_path)
    assert_victorialogs_has(victorialogs, lines, service)

    # docs/logs.md's queries: a span's log lines in order, a trace's errors
    # and worse, a service's last hour (none: the captures' times are older).
    first = log_record(lines[0])
    trace, span = format(first.trace_id, "032x"), format(first.span_id, "016x")
    on_span, errors, last_hour = (
        victorialogs.query(q.replace(DOCS_TRACE_ID, trace).replace(DOCS_SPAN_ID, span)
                           .replace('"prefect"', backends.logsql_quote(service)))
        for q in docs_logsql())
    assert [r["_msg"] for r in on_span] == [
        l["message"] for l in lines if (log_record(l).trace_id, log_record(l).span_id)
        == (first.trace_id, first.span_id)]
    assert errors and sorted(r["log.record.uid"] for r in errors) == sorted(
        l["id"] for l in lines if log_record(l).trace_id == first.trace_id and l["level"] >= 40)
    assert last_hour == []


DOCS_TRACE_ID, DOCS_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def docs_logsql() -> list[str]:
    """The queries of docs/logs.md's logsql block, one a line."""
    text = (ROOT / "docs" / "logs.md").read_text()
    block = text.split("```logsql\n", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.splitlines() if q.strip()]
    assert len(queries) == 3 and DOCS_TRACE_ID in queries[0], queries
    return queries


def test_log_records_reach_victorialogs_through_the_collector(victorialogs, collector, tmp_path):
    """The same over OTLP/gRPC to the Collector, which sends them on over
    OTLP/HTTP with victorialogs.yaml's exporter."""
    service = f"prefect-collector-{uuid.uuid4().hex[:8]}"
    lines = log_lines(CAPTURE_TIME)
    send_logs(lines, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.otlp_grpc_endpoint}",
                      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, service, tmp_path)
    assert_victorialogs_has(victorialogs, lines, service)


def test_victorialogs_drops_records_older_than_its_retention(tmp_path):
    """With its default -retentionPeriod (7d) VictoriaLogs answers 200 to
    records older than that and drops them (a warning in its own log only):
    `convert --logs` of old lines reports success and nothing is stored."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = log_lines(now - timedelta(days=30))[:6]
    recent = log_lines(now - timedelta(hours=1))[:6]
    with backends.victorialogs(retention="7d") as vl:
        service = f"prefect-retention-{uuid.uuid4().hex[:8]}"
        send_logs(old + recent, {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": vl.otlp_http_logs_url,
                                 "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"},
                  service, tmp_path)
        got = vl.wait_for(f"service.name:={backends.logsql_quote(service)}",
                          min_records=len(recent))
        assert sorted(r["log.record.uid"] for r in got) == sorted(l["id"] for l in recent)
        assert "too small timestamp" in vl.process.log()
