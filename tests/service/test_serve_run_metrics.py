"""`serve --metrics`: a real sidecar process counts each finished run once,
whatever it is sent again and however it is stopped."""

from __future__ import annotations

import json
import time

from support.helpers import FIXTURES, convert, measured_runs
from test_serve_endpoints import TOKEN, fixture, lines, serving, spans_in, wait_for

from otel_bridge.translate.metric_totals import add_measurements

CAPTURES = ["failure", "crash-sigterm", "timeout", "cancelled", "retries-immediate", "not-ready",
            "nested-tasks"]


def _last_export(path) -> dict:
    """(metric, attributes) -> (count, sum, buckets) or value, of the file's last request."""
    request = json.loads(path.read_text().splitlines()[-1])
    out = {}
    for rm in request["resourceMetrics"]:
        for scope in rm["scopeMetrics"]:
            for metric in scope["metrics"]:
                kind = next(k for k in ("histogram", "sum", "gauge") if k in metric)
                for p in metric[kind]["dataPoints"]:
                    attributes = tuple(sorted((a["key"], a["value"]["stringValue"])
                                              for a in p.get("attributes", [])))
                    key = (metric["name"], attributes)
                    if kind == "histogram":
                        out[key] = (int(p["count"]), round(p["sum"], 6),
                                    tuple(int(b) for b in p["bucketCounts"]))
                    else:
                        out[key] = int(p.get("asInt", p.get("asDouble", 0)))
    return out


def _expected(names) -> dict:
    totals: dict = {}
    for found in measured_runs(FIXTURES / f"{name}.jsonl" for name in names):
        add_measurements(totals, found.measurements)
    return {key: ((t.count, round(t.sum, 6), tuple(t.bucket_counts))
                  if t.bucket_counts is not None else int(t.sum))
            for key, t in totals.items()}


def _finished(got: dict) -> dict:
    return {k: v for k, v in got.items() if not k[0].endswith((".active", ".stuck"))}


def test_a_kill_9_and_a_restart_mid_stream_change_no_count(tmp_path):
    spans, metrics = tmp_path / "spans.jsonl", tmp_path / "metrics.jsonl"
    flags = ("--push-token", TOKEN, "--forward-to", "file", "--forward-file", str(spans),
             "--metrics", "--metrics-file", str(metrics), "--linger-seconds", "0.5",
             "--run-timeout-seconds", "3")
    env = {"OTEL_METRIC_EXPORT_INTERVAL": "300"}
    everything = [d for name in CAPTURES for d in fixture(name)]
    half = [d for name in CAPTURES[:4] for d in fixture(name)]
    with serving(tmp_path, *flags, env=env, stop=False) as svc:
        svc.push_ok(lines(half))
        wait_for(lambda: svc.metric("otel_bridge_runs_counted_total") > 0, 30, "runs counted")
        counted_before = svc.metric("otel_bridge_runs_counted_total")
        time.sleep(0.6)  # an export or two of the first process
        svc.kill9()
    assert metrics.read_text(), "the first process exported nothing"
    with serving(tmp_path, *flags, env=env) as svc:
        svc.push_ok(lines(everything))  # the first half again, and the rest
        want = _expected(CAPTURES)
        wait_for(lambda: len(spans_in(spans)) >= len(convert(everything)), 30, "the spans")
        wait_for(lambda: _finished(_last_export(metrics)) == want, 30, "the totals exported")
        counted_after = svc.metric("otel_bridge_runs_counted_total")
    # After SIGTERM's last export too: every run once, across both processes.
    assert _finished(_last_export(metrics)) == want
    runs = sum(v[0] for k, v in want.items() if k[0] == "cicd.pipeline.run.duration"
               and dict(k[1]).get("cicd.pipeline.result"))
    assert runs > 0 and counted_before > 0 and counted_after > 0
    assert ("cicd.pipeline.run.errors", (("cicd.pipeline.name", "s-crash-sigterm"),
                                         ("error.type", "Crashed"))) in want


def test_with_metrics_off_nothing_is_measured(tmp_path):
    spans = tmp_path / "spans.jsonl"
    with serving(tmp_path, "--push-token", TOKEN, "--forward-to", "file", "--forward-file",
                 str(spans), "--linger-seconds", "0.5") as svc:
        svc.push_ok(lines(fixture("failure")))
        wait_for(lambda: spans_in(spans), 30, "the spans")
        assert ("otel_bridge_runs_counted_total", frozenset()) not in svc.metrics()
    assert not any(line.get("message") == "run metrics on" for line in svc.logs())


def test_with_delta_temporality_the_exports_add_up_to_the_totals(tmp_path):
    spans, metrics = tmp_path / "spans.jsonl", tmp_path / "metrics.jsonl"
    env = {"OTEL_METRIC_EXPORT_INTERVAL": "300",
           "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"}
    with serving(tmp_path, "--push-token", TOKEN, "--forward-to", "file", "--forward-file",
                 str(spans), "--metrics", "--metrics-file", str(metrics), "--linger-seconds",
                 "0.5", "--run-timeout-seconds", "3", env=env) as svc:
        for name in CAPTURES:  # a push at a time: runs end up in several exports
            svc.push_ok(lines(fixture(name)))
            time.sleep(0.4)
        wait_for(lambda: len(spans_in(spans)) >= len(convert(
            [d for name in CAPTURES for d in fixture(name)])), 30, "the spans")
    summed: dict = {}
    for line in metrics.read_text().splitlines():
        request = json.loads(line)
        for rm in request["resourceMetrics"]:
            for scope in rm["scopeMetrics"]:
                for metric in scope["metrics"]:
                    kind = next(k for k in ("histogram", "sum", "gauge") if k in metric)
                    if kind == "gauge" or metric["name"].endswith(".active"):
                        continue
                    assert metric[kind]["aggregationTemporality"] == 1  # delta
                    for p in metric[kind]["dataPoints"]:
                        key = (metric["name"], tuple(sorted(
                            (a["key"], a["value"]["stringValue"]) for a in p["attributes"])))
                        if kind == "histogram":
                            n, total, buckets = summed.get(key, (0, 0.0, None))
                            counts = [int(b) for b in p["bucketCounts"]]
                            summed[key] = (n + int(p["count"]), total + p["sum"],
                                           counts if buckets is None
                                           else [a + b for a, b in zip(buckets, counts)])
                        else:
                            summed[key] = summed.get(key, 0) + int(p["asInt"])
    got = {k: (v[0], round(v[1], 6), tuple(v[2])) if isinstance(v, tuple) else v
           for k, v in summed.items()}
    assert got == _expected(CAPTURES)
    assert len(metrics.read_text().splitlines()) > 1
