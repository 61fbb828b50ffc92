"""Fresh events from a real Prefect server running real flows, converted and
checked against the server's own record of each task run (what its task-run
recorder made of the same events)."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from support.helpers import ROOT, convert
from opentelemetry.trace import SpanKind

from otel_bridge.demo.run import settled_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.translate.forward import to_unix_nano
from otel_bridge.translate.ids import span_id_for, trace_id_for

pytestmark = pytest.mark.integration

SCENARIOS = ["success", "failure", "retries-immediate", "nested-tasks"]


@pytest.fixture(scope="module")
def server():
    with LocalPrefectServer() as srv:
        yield srv


def run_scenario(server, name):
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    subprocess.run([sys.executable, "-m", "tests.support.prefect_flows.scenarios", name],
                   cwd=ROOT, env=server.env(), capture_output=True, timeout=300)
    return settled_events(server.api_url, since)


def task_runs(server, flow_run_ids):
    response = httpx.post(f"{server.api_url}/task_runs/filter", json={
        "flow_runs": {"id": {"any_": sorted(flow_run_ids)}}}, timeout=30)
    response.raise_for_status()
    return response.json()


def micros(value: str) -> int:
    return to_unix_nano(datetime.fromisoformat(value.replace("Z", "+00:00")))


@pytest.mark.prefect_server
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_spans_agree_with_the_servers_task_runs(server, scenario):
    raw = run_scenario(server, scenario)
    spans = convert(raw)
    flow_spans = [s for s in spans if s.kind is SpanKind.SERVER]
    task_spans = {s.attributes["cicd.pipeline.task.run.id"]: s
                  for s in spans if s.kind is SpanKind.INTERNAL}
    assert flow_spans, "the flow run has a span"
    assert len(task_spans) + len(flow_spans) == len(spans)
    flow_run_ids = {s.attributes["cicd.pipeline.run.id"] for s in flow_spans}
    for span in flow_spans:
        run = httpx.get(f"{server.api_url}/flow_runs/{span.attributes['cicd.pipeline.run.id']}",
                        timeout=10).json()
        flow = httpx.get(f"{server.api_url}/flows/{run['flow_id']}", timeout=10).json()
        assert span.name == f"RUN {flow['name']}"
        assert span.attributes["prefect.run.name"] == run["name"]
        assert span.attributes["prefect.resource.id"] == f"prefect.flow-run.{run['id']}"
    recorded = task_runs(server, flow_run_ids)
    assert recorded, "the server recorded task runs"
    assert set(task_spans) == {r["id"] for r in recorded}
    for run in recorded:
        span = task_spans[run["id"]]
        flow_run = f"prefect.flow-run.{run['flow_run_id']}"
        assert span.span_id == span_id_for(f"prefect.task-run.{run['id']}")
        assert span.trace_id == trace_id_for(flow_run)
        # Named after its task (the key without its hash), the run by its name.
        assert span.name == re.sub(r"-[0-9a-f]{8}$", "", run["task_key"])
        assert span.attributes["prefect.run.name"] == run["name"]
        assert span.attributes["prefect.task.key"] == run["task_key"]
        assert span.attributes["prefect.related.flow-run.id"] == run["flow_run_id"]
        assert span.attributes["prefect.state-name"] == run["state_name"]
        assert span.attributes["prefect.state-type"] == run["state_type"]
        assert span.attributes["prefect.run-count"] == str(run["run_count"])
        assert span.start_time_unix_nano == micros(run["start_time"])
        assert span.end_time_unix_nano == micros(run["end_time"])
        parents = run["task_inputs"].get("__parents__", [])
        expected_parent = (f"prefect.task-run.{parents[0]['id']}" if parents else flow_run)
        assert span.parent_span_id == span_id_for(expected_parent)
        assert (span.status_code.name == "ERROR") == (run["state_type"] == "FAILED")
    if scenario == "nested-tasks":
        assert any(s.parent_span_id in {t.span_id for t in task_spans.values()}
                   for s in task_spans.values())
