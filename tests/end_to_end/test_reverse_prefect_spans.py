"""Prefect's own OpenTelemetry spans, made by a real flow run, turned back
into events: they must be the task runs' events as the server stored them
(same ids, names, runs, flow run), so sent back they join Prefect's own
instead of duplicating them."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from support.helpers import ROOT

from otel_bridge.demo.run import settled_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.sinks.prefect_events import PrefectEventSink
from otel_bridge.sources.otlp_json import read_spans
from otel_bridge.sources.prefect_rest import read_all_events
from otel_bridge.translate.reverse import events_from_spans

pytestmark = pytest.mark.integration


@pytest.mark.prefect_server
def test_prefects_own_spans_give_the_events_the_server_has(tmp_path):
    spans_path = tmp_path / "spans.jsonl"
    with LocalPrefectServer() as server:
        since = datetime.now(timezone.utc) - timedelta(seconds=1)
        run = subprocess.run([sys.executable, "-m", "tests.support.prefect_flows.telemetry",
                              str(spans_path)], cwd=ROOT, env=server.env(),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        stored = [parse_wire_event(e) for e in settled_events(server.api_url, since)]
        rejected = []
        spans = [span for _, span in read_spans([str(spans_path)],
                                                lambda line, err: rejected.append(err))]
        assert not rejected
        assert {s.attributes.get("prefect.run.type") for s in spans} == {"flow", "task"}
        reversed_events = events_from_spans(spans)

        # Sent to the server, they join Prefect's own: the same ids, so no
        # event is stored twice, and the task runs stay as recorded.
        with PrefectEventSink(server.api_url) as sink:
            sink.export(reversed_events)
        time.sleep(7)  # the server persists events every 5 s
        after = read_all_events(server.api_url, since=since)
        assert len(after) == len({e["id"] for e in after}) == len(stored)
        finals = {e.resource_id.removeprefix("prefect.task-run."): e.resource["prefect.state-name"]
                  for e in reversed_events}
        for run_id, state in finals.items():
            run = httpx.get(f"{server.api_url}/task_runs/{run_id}", timeout=10).json()
            assert run["state_name"] == state

    server_task_events = {e.id: e for e in stored if e.event.startswith("prefect.task-run.")}
    # Prefect's spans record every state but Pending (the span starts at Running).
    expected = {i: e for i, e in server_task_events.items()
                if e.resource["prefect.state-name"] != "Pending"}
    got = {e.id: e for e in reversed_events}
    assert set(got) == set(expected)
    for event_id, ours in got.items():
        theirs = expected[event_id]
        assert ours.event == theirs.event
        assert ours.resource_id == theirs.resource_id
        assert ours.resource["prefect.resource.name"] == theirs.resource["prefect.resource.name"]
        assert ours.resource["prefect.state-type"] == theirs.resource["prefect.state-type"]
        assert ours.resource["prefect.state-message"] == theirs.resource["prefect.state-message"]
        assert ours.related_in_role("flow-run") == theirs.related_in_role("flow-run")
        assert [r for r in ours.related if r["prefect.resource.role"] == "tag"] == [
            r for r in theirs.related if r["prefect.resource.role"] == "tag"]
        # Prefect stamps its span events when it records them, a little after
        # the state's own timestamp.
        assert timedelta(0) <= ours.occurred - theirs.occurred < timedelta(seconds=1)
        parents = theirs.payload["task_run"]["task_inputs"].get("__parents__")
        assert ours.payload["task_run"]["task_inputs"].get("__parents__") == parents
