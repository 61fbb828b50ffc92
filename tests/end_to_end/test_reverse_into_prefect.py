"""Reversed events are accepted by a real Prefect 3.9.1 server: sent with
`otel-bridge convert --to prefect`, read back unchanged from
/api/events/filter, and recorded as task runs with the right final states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from support.helpers import FIXTURES, engine_trace, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.model.otlp import request_to_json
from otel_bridge.sources.prefect_rest import read_events

pytestmark = [pytest.mark.prefect_server, pytest.mark.integration]


@pytest.fixture
def server():
    # A server per test: task-run events whose flow run the server does not
    # know fail the recorder's batch (a foreign key), and that held back the
    # recording of other task runs sent just after them (seen here).
    # The fixtures were captured on some past day: keep the server from
    # vacuuming events older than its default seven-day retention.
    with LocalPrefectServer(extra_env={"PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P3650D"}) as srv:
        yield srv


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "otel_bridge", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def engine_spans(path):
    """OTLP/JSON of spans from an engine that knows nothing of Prefect."""
    path.write_text(json.dumps(request_to_json(encode_spans(engine_trace()))) + "\n")


def occurred(event):
    return datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))


def stored(server, events, timeout=30):
    """The server's stored copies of these events, once all are there."""
    ids = {e["id"] for e in events}
    # Look from the events' own time, not from now: replayed fixtures are old.
    since = min(map(occurred, events)) - timedelta(minutes=1)
    until = max(datetime.now(timezone.utc), max(map(occurred, events))) + timedelta(minutes=1)
    deadline = time.monotonic() + timeout
    while True:
        found = {e["id"]: e for e in read_events(server.api_url, since=since, until=until)
                 if e["id"] in ids}
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def task_run(server, run_id, state, timeout=30):
    """The server's record of a task run once it shows `state`: the recorder
    applies events in batches, so a run can be seen at an earlier state first."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{server.api_url}/task_runs/{run_id}", timeout=10)
        done = response.status_code == 200 and response.json()["state_name"] == state
        if done or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def send_and_check(server, spans_file, tmp_path):
    events_file = tmp_path / "events.jsonl"
    assert cli("convert", str(spans_file), "--to", "events", "-o", str(events_file)).returncode == 0
    events = load_jsonl(events_file)
    env = dict(os.environ, PREFECT_API_URL=server.api_url)
    result = cli("convert", str(spans_file), "--to", "prefect", env=env)
    assert result.returncode == 0, result.stderr
    copies = stored(server, events)
    assert set(copies) == {e["id"] for e in events}
    for event in events:
        copy = copies[event["id"]]
        for field in ("event", "resource", "related", "payload", "follows"):
            assert copy[field] == event[field], field
        assert occurred(copy) == occurred(event)
    return events


def final_states(events):
    finals = {}
    for event in events:
        if event["event"].startswith("prefect.task-run."):
            finals[event["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")] = (
                event["resource"]["prefect.state-name"])
    return finals


def test_an_engines_spans_become_task_runs_in_prefect(server, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    engine_spans(spans_file)
    events = send_and_check(server, spans_file, tmp_path)
    finals = final_states(events)
    assert sorted(finals.values()) == ["Completed", "Completed", "Failed"]
    by_name = {}
    for run_id, state in finals.items():
        response = task_run(server, run_id, state)
        assert response.status_code == 200, run_id
        run = response.json()
        assert run["state_name"] == state
        by_name[run["name"]] = run
    assert by_name["load"]["state"]["message"] == "warehouse gone"
    assert by_name["load"]["run_count"] == 2  # Running, then Retrying
    assert by_name["extract"]["tags"] == ["etl", "nightly"]
    parent = by_name["nightly-etl"]["id"]
    assert by_name["extract"]["task_inputs"]["__parents__"] == [
        {"input_type": "task_run", "id": parent}]


@pytest.mark.parametrize("scenario", ["retries-immediate", "deferred"])
def test_bridged_real_runs_go_back_into_prefect_unchanged(server, tmp_path, scenario):
    source = FIXTURES / f"{scenario}.jsonl"
    spans_file = tmp_path / "spans.jsonl"
    assert cli("convert", str(source), "-o", str(spans_file)).returncode == 0
    events = send_and_check(server, spans_file, tmp_path)
    # What was sent is what Prefect sent, byte for byte.
    originals = {str(e.id): e.model_dump_json(exclude={"received"})
                 for e in map(parse_wire_event, load_jsonl(source))}
    sent = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(sent) == len(events)
    for line in sent:
        assert line == originals[json.loads(line)["id"]]
    if scenario == "deferred":
        # Task runs with no flow run are recorded as sent. (A task run whose
        # flow run this server does not know fails the recorder's foreign
        # key, so runs of flows from another server are stored as events only.)
        for run_id, state in final_states(events).items():
            response = task_run(server, run_id, state)
            assert response.status_code == 200, run_id
            assert response.json()["state_name"] == state
