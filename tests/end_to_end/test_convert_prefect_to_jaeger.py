"""The whole forward path on real parts, nothing simulated:

real Prefect 3.9.1 server running real flows (success, failure, retries,
nested tasks, a crash, a mapped task) -> their events read back from the
server's REST API -> ``python -m otel_bridge convert ... --to otlp`` as a
real process, over OTLP/gRPC and over OTLP/HTTP, told the Prefect UI's
address (from PREFECT_API_URL over gRPC, PREFECT_UI_URL over HTTP) -> the
real Collector running collector-config/sidecar.yaml -> real Jaeger, read
back through Jaeger's query API, and, over sidecar.yaml's Tempo exporter, a
second real Collector writing what it receives to a file, read back from
that file. (Grafana Tempo itself is not run: it is AGPL-3.0, and the project
runs no AGPL software, not even in tests.)

What the spans are checked against is the server's own record of each run
(``/task_runs/filter``, ``/flow_runs/filter``, ``/flows/filter``) and the
events it stored, not otel-bridge's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from support.helpers import ROOT, convert, convert_to_otlp
from support import backends

from otel_bridge.demo.run import settled_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.translate.ids import span_id_for, trace_id_for

# A cold cache builds Jaeger and the Collector from source first.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.prefect_server, pytest.mark.backend,
              pytest.mark.integration]

SCENARIOS = ["success", "failure", "retries-immediate", "nested-tasks", "crash-baseexception",
             "mapped"]
# The task functions those scenarios' flows call (tests/support/prefect_flows/scenarios.py).
TASK_FUNCTIONS = {"add", "boom", "flaky_then_ok", "always_flaky", "parent_task", "leaf",
                  "interrupted", "square", "inc"}
# The UI address the bridge is given over each protocol (see ui_env).
UI_URL = "http://prefect-ui.e2e.test:4200/prefect"
SIDECAR = ROOT / "collector-config" / "sidecar.yaml"
RESULT = {"COMPLETED": "success", "FAILED": "failure", "CRASHED": "error",
          "CANCELLED": "cancellation"}
ERROR_TYPES = {"FAILED", "CRASHED"}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def hex_span(resource_id: str) -> str:
    return format(span_id_for(resource_id), "016x")


def hex_trace(resource_id: str) -> str:
    return format(trace_id_for(resource_id), "032x")


@dataclass
class PrefectRuns:
    events_path: Path
    raw: list[dict]  # each stored event once
    flows: list[dict]  # the server's records of the flow runs
    tasks: list[dict]  # ... and of their task runs
    flow_names: dict[str, str]  # flow id -> flow name
    api_url: str


@pytest.fixture(scope="module")
def prefect_runs(tmp_path_factory) -> PrefectRuns:
    """Runs every scenario once on a real server; returns the events (and
    their file) and the server's records of the runs and flows."""
    raw: list[dict] = []
    with LocalPrefectServer() as server:
        for name in SCENARIOS:
            since = datetime.now(timezone.utc) - timedelta(seconds=1)
            # A failing or crashing flow exits non-zero, as it would for a user.
            subprocess.run([sys.executable, "-m", "tests.support.prefect_flows.scenarios", name],
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
            named = client.post("/flows/filter", json={"flows": {"id": {
                "any_": sorted({f["flow_id"] for f in flows})}}}).raise_for_status().json()
        api_url = server.api_url
    # Each event once (settled_events windows may overlap).
    unique = list({e["id"]: e for e in raw}.values())
    path = tmp_path_factory.mktemp("e2e") / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in unique))
    assert len(flows) == len(SCENARIOS), [f["name"] for f in flows]
    return PrefectRuns(path, unique, flows, tasks, {f["id"]: f["name"] for f in named}, api_url)


def ui_env(protocol: str, api_url: str) -> tuple[dict[str, str], str]:
    """The environment that tells the bridge where the Prefect UI is, and
    the UI address that gives: derived from the server's PREFECT_API_URL
    (its /api dropped) over gRPC; PREFECT_UI_URL, which wins, over HTTP."""
    if protocol == "grpc":
        return {"PREFECT_API_URL": api_url}, api_url.removesuffix("/api")
    return {"PREFECT_API_URL": api_url, "PREFECT_UI_URL": UI_URL}, UI_URL


@dataclass
class Delivered:
    protocol: str
    service: str
    ui: str  # the Prefect UI's address the bridge was given
    jaeger: backends.Jaeger
    tempo_leg: Path


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def delivered(request, prefect_runs, tmp_path_factory) -> Delivered:
    """The runs' events converted by the bridge as a real process, sent over
    one protocol through a fresh sidecar Collector to a fresh Jaeger and Tempo
    leg (a file-writing Collector), so each one's backends hold exactly what
    that protocol's run sent."""
    protocol = request.param
    tempo_leg = tmp_path_factory.mktemp("tempo-leg") / "tempo-leg.jsonl"
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
            service = f"prefect-e2e-{uuid.uuid4().hex[:8]}"
            bridge_env, ui = ui_env(protocol, prefect_runs.api_url)
            with pytest.MonkeyPatch.context() as patch:  # the bridge process's environment
                for name in ("PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_CLOUD_API_URL"):
                    patch.delenv(name, raising=False)
                for name, value in bridge_env.items():
                    patch.setenv(name, value)
                convert_to_otlp([prefect_runs.events_path], collector, protocol, service)
            yield Delivered(protocol, service, ui, jaeger, tempo_leg)


def state_events(raw: list[dict], resource_id: str) -> list[dict]:
    """The run's state-change events (not its heartbeats)."""
    return [e for e in raw if e["resource"]["prefect.resource.id"] == resource_id
            and "prefect.state-type" in e["resource"]]


def runs_of(prefect_runs: PrefectRuns) -> list[tuple[str, dict, str, str]]:
    """(kind, the server's record, resource id, trace id) of every run."""
    return [(kind, run, f"prefect.{kind}-run.{run['id']}",
             hex_trace(f"prefect.flow-run.{run['id'] if kind == 'flow' else run['flow_run_id']}"))
            for kind, records in (("flow", prefect_runs.flows), ("task", prefect_runs.tasks))
            for run in records]


def spans_per_trace(prefect_runs: PrefectRuns) -> Counter:
    return Counter(tid for _, _, _, tid in runs_of(prefect_runs))


def jaeger_traces(prefect_runs: PrefectRuns, jaeger) -> dict[str, dict]:
    """Every flow run's trace from Jaeger, once it has all its runs' spans."""
    return {tid: jaeger.wait_for_trace(tid, min_spans=n)
            for tid, n in spans_per_trace(prefect_runs).items()}


def microseconds(occurred: str) -> int:
    return (datetime.fromisoformat(occurred) - EPOCH) // timedelta(microseconds=1)


def test_real_flows_reach_jaeger_and_the_tempo_leg_through_the_sidecar(prefect_runs, delivered):
    raw, flows, tasks = prefect_runs.raw, prefect_runs.flows, prefect_runs.tasks
    jaeger, tempo_leg, service = delivered.jaeger, delivered.tempo_leg, delivered.service

    # The reference for the order of state events: the same conversion in process.
    reference = {s.attributes["prefect.resource.id"]: s for s in convert(raw)}

    # Every flow run is a trace, found by service in Jaeger's search.
    trace_ids = {hex_trace(f"prefect.flow-run.{f['id']}") for f in flows}
    found = backends.wait_until(
        lambda: (ts := jaeger.traces_by_service(service)) and len(ts) >= len(trace_ids) and ts,
        30, what="every flow run's trace in Jaeger's search")
    assert {t["traceID"] for t in found} == trace_ids

    runs = runs_of(prefect_runs)
    expected_spans = spans_per_trace(prefect_runs)
    traces = jaeger_traces(prefect_runs, jaeger)
    tempo_traces = {tid: backends.wait_for_file_trace(tempo_leg, tid, min_spans=n, timeout=60)
                    for tid, n in expected_spans.items()}
    for tid, n in expected_spans.items():
        # Exactly the runs' spans: nothing lost, nothing twice.
        assert len(traces[tid]["spans"]) == n
        assert len(tempo_traces[tid]) == n
    # And nothing else reached the Tempo leg.
    assert len(backends.file_spans(tempo_leg)) == sum(expected_spans.values())

    skew_checked = 0
    for kind, run, resource_id, tid in runs:
        if kind == "flow":
            parent = None
        else:
            parents = run["task_inputs"].get("__parents__", [])
            parent = hex_span(f"prefect.task-run.{parents[0]['id']}" if parents
                              else f"prefect.flow-run.{run['flow_run_id']}")
        state_type = run["state_type"]
        message = (run.get("state") or {}).get("message") or ""
        result_key = "cicd.pipeline.result" if kind == "flow" else "cicd.pipeline.task.run.result"
        run_id_key = "cicd.pipeline.run.id" if kind == "flow" else "cicd.pipeline.task.run.id"
        ref = reference[resource_id]
        expected_events = [e.name for e in ref.events]

        # ---- Jaeger
        trace = traces[tid]
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
        return [s for t in traces.values() for s in t["spans"] if s["operationName"] == name]

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


# What a state's span event may carry besides its name (Jaeger's "event"
# field): its id, and its type, message, details, data and patch where needed.
STATE_EVENT_FIELDS = {"event", "prefect.state.id", "prefect.state.type", "prefect.state.message",
                      "prefect.state.details", "prefect.state.data", "otel_bridge.event.patch"}


def test_jaeger_shows_task_spans_named_after_their_tasks_each_state_as_an_event_and_the_run_page(
        prefect_runs, delivered):
    """The compact span as a Jaeger user sees it: a task run's span named
    after its task's function, a flow run's `RUN <flow>` of kind server,
    each state event of the run a span event (a Jaeger log) named after the
    state with the event's id, and a link to the run's page in the Prefect
    UI whose address the bridge was given. A flow that ran one task function
    50 times shows one operation for it in Jaeger's operation list."""
    jaeger, ui = delivered.jaeger, delivered.ui
    traces = jaeger_traces(prefect_runs, jaeger)
    spans = {s["spanID"]: s for t in traces.values() for s in t["spans"]}

    for kind, run, resource_id, _ in runs_of(prefect_runs):
        span = spans[hex_span(resource_id)]
        tags = backends.jaeger_tags(span["tags"])
        if kind == "task":
            # Prefect names a task run "<task name>-<3 characters of its key>"
            # and a task after its function.
            assert span["operationName"] == run["name"].rsplit("-", 1)[0], run["name"]
            assert tags["span.kind"] == "internal"
            assert tags["cicd.pipeline.task.run.url.full"] == f"{ui}/runs/task-run/{run['id']}"
        else:
            flow_name = prefect_runs.flow_names[run["flow_id"]]
            assert span["operationName"] == f"RUN {flow_name}"
            assert tags["span.kind"] == "server"
            assert tags["cicd.pipeline.run.url.full"] == f"{ui}/runs/flow-run/{run['id']}"

        # One log per state event of the run: its state, its id, its time.
        logs = [(backends.jaeger_tags(log["fields"]), log["timestamp"]) for log in span["logs"]]
        assert sorted((f["prefect.state.id"], f["event"], at) for f, at in logs) == sorted(
            (e["id"], e["resource"]["prefect.state-name"], microseconds(e["occurred"]))
            for e in state_events(prefect_runs.raw, resource_id)), resource_id
        assert not [f for f, _ in logs if set(f) - STATE_EVENT_FIELDS]

    named = {spans[hex_span(f"prefect.task-run.{t['id']}")]["operationName"]
             for t in prefect_runs.tasks}
    assert named == TASK_FUNCTIONS
    flow_names = {prefect_runs.flow_names[f["flow_id"]] for f in prefect_runs.flows}
    assert flow_names == {f"s-{name}" for name in SCENARIOS}

    # The operation list for the service: each task function once (however
    # many runs it had), each flow once.
    squares = [s for s in spans.values() if s["operationName"] == "square"]
    assert len(squares) == 50
    operations = jaeger.operations(delivered.service)
    assert sorted((o["name"], o["spanKind"]) for o in operations) == sorted(
        [(name, "internal") for name in TASK_FUNCTIONS]
        + [(f"RUN {name}", "server") for name in flow_names])
