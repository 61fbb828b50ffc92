"""The whole forward path on real parts, nothing simulated:

real Prefect 3.9.1 server running real flows (success, failure, retries,
nested tasks, a crash) -> their events read back from the server's REST API
-> ``python -m otel_bridge convert ... --to otlp`` as a real process, over
OTLP/gRPC and over OTLP/HTTP -> the real Collector running
collector-config/sidecar.yaml -> real Jaeger, read back through Jaeger's
query API, and, over sidecar.yaml's Tempo exporter, a second real Collector
writing what it receives to a file, read back from that file. (Grafana Tempo
itself is not run: it is AGPL-3.0, and the project runs no AGPL software, not
even in tests.)

What the spans are checked against is the server's own record of each run
(``/task_runs/filter``, ``/flow_runs/filter``), not otel-bridge's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from helpers import ROOT, convert, convert_to_otlp
from support import backends

from otel_bridge.demo.run import settled_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.translate.ids import span_id_for, trace_id_for

# A cold cache builds Jaeger and the Collector from source first.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.prefect_server]

SCENARIOS = ["success", "failure", "retries-immediate", "nested-tasks", "crash-baseexception"]
SIDECAR = ROOT / "collector-config" / "sidecar.yaml"
RESULT = {"COMPLETED": "success", "FAILED": "failure", "CRASHED": "error",
          "CANCELLED": "cancellation"}
ERROR_TYPES = {"FAILED", "CRASHED"}


def hex_span(resource_id: str) -> str:
    return format(span_id_for(resource_id), "016x")


def hex_trace(resource_id: str) -> str:
    return format(trace_id_for(resource_id), "032x")


@pytest.fixture(scope="module")
def prefect_runs(tmp_path_factory):
    """Runs every scenario once on a real server; returns the events file,
    the events, and the server's records of the flow runs and task runs."""
    raw: list[dict] = []
    with LocalPrefectServer() as server:
        for name in SCENARIOS:
            since = datetime.now(timezone.utc) - timedelta(seconds=1)
            # A failing or crashing flow exits non-zero, as it would for a user.
            subprocess.run([sys.executable, "-m", "tests.prefect_flows.scenarios", name],
                           cwd=ROOT, env=server.env(), capture_output=True, timeout=300)
            raw.extend(settled_events(server.api_url, since))
        flow_run_ids = sorted({e["resource"]["prefect.resource.id"].split(".", 2)[2]
                               for e in raw
                               if e["resource"]["prefect.resource.id"].startswith("prefect.flow-run.")})
        with httpx.Client(base_url=server.api_url, timeout=30) as client:
            flows = client.post("/flow_runs/filter", json={
                "flow_runs": {"id": {"any_": flow_run_ids}}}).raise_for_status().json()
            tasks = client.post("/task_runs/filter", json={
                "flow_runs": {"id": {"any_": flow_run_ids}}}).raise_for_status().json()
    # Each event once (settled_events windows may overlap).
    unique = list({e["id"]: e for e in raw}.values())
    path = tmp_path_factory.mktemp("e2e") / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in unique))
    assert len(flows) == len(SCENARIOS), [f["name"] for f in flows]
    return path, unique, flows, tasks


@pytest.fixture(params=["grpc", "http/protobuf"])
def pipeline(request, tmp_path):
    """Fresh Jaeger, Tempo leg (a file-writing Collector) and sidecar
    Collector per protocol, so each one's backends hold exactly what that
    protocol's run sent."""
    tempo_leg = tmp_path / "tempo-leg.jsonl"
    with backends.jaeger() as jaeger, backends.file_collector(tempo_leg) as receiver:
        env = {
            "OTELCOL_BIND_ADDRESS": backends.LOOPBACK,
            "JAEGER_OTLP_ENDPOINT": jaeger.otlp_grpc_endpoint,
            "JAEGER_OTLP_INSECURE": "true",
            "TEMPO_OTLP_ENDPOINT": receiver.otlp_grpc_endpoint,
            "TEMPO_OTLP_INSECURE": "true",
            "OTELCOL_BATCH_TIMEOUT": "200ms",
        }
        with backends.collector(SIDECAR, env) as collector:
            yield request.param, collector, jaeger, tempo_leg


def state_events(raw: list[dict], resource_id: str) -> list[dict]:
    """The run's state-change events (not its heartbeats)."""
    return [e for e in raw if e["resource"]["prefect.resource.id"] == resource_id
            and "prefect.state-type" in e["resource"]]


def test_real_flows_reach_jaeger_and_the_tempo_leg_through_the_sidecar(prefect_runs, pipeline):
    events_path, raw, flows, tasks = prefect_runs
    protocol, collector, jaeger, tempo_leg = pipeline
    service = f"prefect-e2e-{uuid.uuid4().hex[:8]}"
    convert_to_otlp([events_path], collector, protocol, service)

    # The reference for the order of state events: the same conversion in process.
    reference = {s.attributes["prefect.resource.id"]: s for s in convert(raw)}

    # Every flow run is a trace, found by service in Jaeger's search.
    trace_ids = {hex_trace(f"prefect.flow-run.{f['id']}") for f in flows}
    found = backends.wait_until(
        lambda: (ts := jaeger.traces_by_service(service)) and len(ts) >= len(trace_ids) and ts,
        30, what="every flow run's trace in Jaeger's search")
    assert {t["traceID"] for t in found} == trace_ids

    runs = [("flow", f, f"prefect.flow-run.{f['id']}") for f in flows] + \
           [("task", t, f"prefect.task-run.{t['id']}") for t in tasks]
    expected_spans: dict[str, int] = {}
    for kind, run, _ in runs:
        flow_run_id = run["id"] if kind == "flow" else run["flow_run_id"]
        key = hex_trace(f"prefect.flow-run.{flow_run_id}")
        expected_spans[key] = expected_spans.get(key, 0) + 1

    jaeger_traces = {tid: jaeger.wait_for_trace(tid, min_spans=n) for tid, n in expected_spans.items()}
    tempo_traces = {tid: backends.wait_for_file_trace(tempo_leg, tid, min_spans=n, timeout=60)
                    for tid, n in expected_spans.items()}
    for tid, n in expected_spans.items():
        # Exactly the runs' spans: nothing lost, nothing twice.
        assert len(jaeger_traces[tid]["spans"]) == n
        assert len(tempo_traces[tid]) == n
    # And nothing else reached the Tempo leg.
    assert len(backends.file_spans(tempo_leg)) == sum(expected_spans.values())

    skew_checked = 0
    for kind, run, resource_id in runs:
        flow_run_id = run["id"] if kind == "flow" else run["flow_run_id"]
        tid = hex_trace(f"prefect.flow-run.{flow_run_id}")
        if kind == "flow":
            parent = None
        else:
            parents = run["task_inputs"].get("__parents__", [])
            parent = hex_span(f"prefect.task-run.{parents[0]['id']}" if parents
                              else f"prefect.flow-run.{flow_run_id}")
        state_type = run["state_type"]
        message = (run.get("state") or {}).get("message") or ""
        result_key = "cicd.pipeline.result" if kind == "flow" else "cicd.pipeline.task.run.result"
        run_id_key = "cicd.pipeline.run.id" if kind == "flow" else "cicd.pipeline.task.run.id"
        ref = reference[resource_id]
        expected_events = [e.name for e in ref.events]
        assert sorted(expected_events) == sorted(
            e["resource"]["prefect.state-name"] for e in state_events(raw, resource_id))

        # ---- Jaeger
        trace = jaeger_traces[tid]
        mine = [s for s in trace["spans"]
                if backends.jaeger_tags(s["tags"]).get("prefect.resource.id") == resource_id]
        assert len(mine) == 1, (resource_id, len(mine))
        (span,) = mine
        tags = backends.jaeger_tags(span["tags"])
        assert span["spanID"] == hex_span(resource_id)
        assert tags[run_id_key] == run["id"]
        assert tags["prefect.run.name"] == run["name"]
        assert trace["processes"][span["processID"]]["serviceName"] == service
        assert [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"] == (
            [parent] if parent else [])
        if parent:
            assert parent in {s["spanID"] for s in trace["spans"]}
        assert [backends.jaeger_tags(log["fields"])["event"] for log in span["logs"]] == expected_events
        assert tags["prefect.state-name"] == run["state_name"]
        assert tags[result_key] == RESULT[state_type]
        if state_type in ERROR_TYPES:
            assert tags["error"] is True
            assert tags["otel.status_description"] == message
            assert message
        else:
            assert "error" not in tags
        # Jaeger v2 does not move spans (clock-skew adjustment is off):
        # every span is where otel-bridge put it.
        assert span["startTime"] == ref.start_time_unix_nano // 1000
        assert not [w for w in span.get("warnings") or [] if "skew" in w]
        skew_checked += 1

        # ---- the Tempo leg: the span Jaeger got
        (tspan,) = [s for s in tempo_traces[tid]
                    if backends.otlp_attrs(s["attributes"]).get("prefect.resource.id") == resource_id]
        attrs = backends.otlp_attrs(tspan["attributes"])
        assert backends.otlp_id_hex(tspan["spanId"], 8) == hex_span(resource_id)
        assert tspan["name"] == span["operationName"]
        assert backends.otlp_span_kind(tspan) == tags["span.kind"]
        assert tspan["resource"]["service.name"] == service
        assert attrs[run_id_key] == run["id"]
        got_parent = tspan.get("parentSpanId")
        assert (backends.otlp_id_hex(got_parent, 8) if got_parent else None) == parent
        assert [e["name"] for e in tspan["events"]] == expected_events
        assert attrs["prefect.state-name"] == run["state_name"]
        assert attrs[result_key] == RESULT[state_type]
        status = tspan.get("status") or {}
        if state_type in ERROR_TYPES:
            assert status.get("code") in (2, "STATUS_CODE_ERROR")
            assert status.get("message") == message
        else:
            assert status.get("code") in (None, 0, "STATUS_CODE_UNSET")

    assert skew_checked == len(runs) and len(tasks) >= 10

    # The scenarios' shapes made it: retries as Retrying events, nested
    # tasks under a task, a crash as an error.
    def spans_named(name: str) -> list[dict]:
        return [s for t in jaeger_traces.values() for s in t["spans"] if s["operationName"] == name]

    (flaky,) = spans_named("flaky_then_ok")
    assert [backends.jaeger_tags(l["fields"])["event"] for l in flaky["logs"]] == [
        "Pending", "Running", "Retrying", "Retrying", "Completed"]
    assert "error" not in backends.jaeger_tags(flaky["tags"])
    (parent_task,) = spans_named("parent_task")
    leaves = spans_named("leaf")
    assert len(leaves) == 2 and all(
        [r["spanID"] for r in s["references"]] == [parent_task["spanID"]] for s in leaves)
    crashed = [f for f in flows if f["state_type"] == "CRASHED"]
    assert len(crashed) == 1
