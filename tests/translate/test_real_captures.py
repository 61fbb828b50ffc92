"""Every run captured from a real Prefect 3.9.1 server, converted and checked
span by span (fixtures: scripts/capture_prefect_events.py)."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
from support.helpers import FIXTURES, SAMPLES, convert, load_jsonl
from opentelemetry.trace import SpanKind, StatusCode
from test_roundtrip import by_id, round_trip, state_events

from otel_bridge.model.events import parse_wire_event
from otel_bridge.translate.forward import is_final, order_events, to_unix_nano
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.span_layout import ATTR_EVENT_PATCH

# What each scenario must show: (run name prefix, final state, result, error?)
# for the task runs (flow runs: "flow:<flow name>").
EXPECTED = {
    "success": [("add", "Completed", "success", False)],
    "failure": [("boom", "Failed", "failure", True), ("flow:s-failure", "Failed", "failure", True)],
    "retries-immediate": [("flaky_then_ok", "Completed", "success", False),
                          ("always_flaky", "Failed", "failure", True)],
    "retries-delayed": [("flaky_delayed", "Completed", "success", False)],
    "cache-hit": [("expensive", "Cached", "success", False)],
    "tags": [("tagged", "Completed", "success", False)],
    "mapped": [("square", "Completed", "success", False), ("inc", "Completed", "success", False)],
    "nested-tasks": [("leaf", "Completed", "success", False)],
    "subflow": [("flow:s-child-flow", "Completed", "success", False)],
    "timeout": [("too_slow", "TimedOut", "timeout", True)],
    "cancelled": [("flow:s-cancellable", "Cancelled", "cancellation", False)],
    "crash-baseexception": [("", "Crashed", "error", True)],
    "crash-sigterm": [("", "Crashed", "error", True)],
    "not-ready": [("", "NotReady", "skip", False)],
    "rolled-back": [("", "Completed", "success", False)],
    "deferred": [("", "Completed", "success", False)],
    "async-tasks": [("", "Completed", "success", False)],
    "huge-message": [("", "Failed", "failure", True)],
    "otel-traceparent": [("", "Completed", "success", False)],
}


def scenarios():
    return sorted(p.name.removesuffix(".jsonl") for p in FIXTURES.glob("*.jsonl")
                  if not p.name.endswith(".ws.jsonl"))


def runs_of(raw):
    runs = defaultdict(list)
    for obj in raw:
        event = parse_wire_event(obj)
        if "prefect.state-type" in event.resource and (
                event.event.startswith(("prefect.task-run.", "prefect.flow-run."))):
            runs[event.resource_id].append(event)
    return {rid: order_events(events) for rid, events in runs.items()}


def test_every_scenario_was_captured():
    assert set(EXPECTED) <= set(scenarios())


@pytest.mark.parametrize("scenario", scenarios())
def test_every_run_is_one_correct_span(scenario):
    raw = load_jsonl(FIXTURES / f"{scenario}.jsonl")
    runs = runs_of(raw)
    spans = {s.span_id: s for s in convert(raw)}
    assert len(spans) == len(runs)
    for resource_id, events in runs.items():
        span = spans[span_id_for(resource_id)]
        # Every state event, in order, as a span event named after the state,
        # with its id.
        assert [e.attributes["prefect.state.id"] for e in span.events] == [str(e.id) for e in events]
        assert [e.name for e in span.events] == [e.resource["prefect.state-name"] for e in events]
        # From the first Running to the first final state after the last Running.
        running = [i for i, e in enumerate(events) if e.resource["prefect.state-type"] == "RUNNING"]
        if running:
            assert span.start_time_unix_nano == to_unix_nano(events[running[0]].occurred)
            end = next((e for e in events[running[-1]:] if is_final(e)), None)
        else:
            assert span.attributes["otel_bridge.synthetic.start"] == "no_running_state"
            end = next((e for e in events if is_final(e)), None)
        if end is not None:
            assert span.end_time_unix_nano == to_unix_nano(end.occurred)
            assert span.attributes["prefect.state-name"] == end.resource["prefect.state-name"]
        else:
            assert span.attributes["otel_bridge.synthetic.end"] == "end_of_input"
        # The run's name, from the labels the span carries (its final state's).
        assert span.attributes["prefect.run.name"] == (
            (end or events[-1]).resource["prefect.resource.name"])
        # In its flow run's trace, under its parent task or its flow run.
        last = events[-1]
        flow_run = last.related_in_role("flow-run")
        parents = (last.payload.get("task_run") or {}).get("task_inputs", {}).get("__parents__")
        if resource_id.startswith("prefect.flow-run."):
            assert (span.trace_id, span.parent_span_id) == (trace_id_for(resource_id), None)
        elif flow_run:
            assert span.trace_id == trace_id_for(flow_run["prefect.resource.id"])
            parent = (f"prefect.task-run.{parents[0]['id']}" if parents
                      else flow_run["prefect.resource.id"])
            assert span.parent_span_id == span_id_for(parent)
        else:
            assert span.trace_id == trace_id_for(parents and f"prefect.task-run.{parents[0]['id']}"
                                                 or resource_id)


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_scenario_shows_its_behaviour(scenario):
    spans = convert(load_jsonl(FIXTURES / f"{scenario}.jsonl"))
    for prefix, final, result, error in EXPECTED[scenario]:
        if prefix.startswith("flow:"):
            matching = [s for s in spans if s.kind is SpanKind.SERVER
                        and s.attributes.get("cicd.pipeline.name") == prefix[5:]]
            for span in matching:
                assert span.name == f"RUN {prefix[5:]}"
                assert span.attributes["prefect.resource.id"].startswith("prefect.flow-run.")
            result_key = "cicd.pipeline.result"
        else:
            matching = [s for s in spans if s.kind is SpanKind.INTERNAL
                        and s.attributes["prefect.run.name"].startswith(prefix)
                        and s.attributes.get("prefect.state-name") == final]
            for span in matching:
                assert span.attributes["prefect.resource.id"].startswith("prefect.task-run.")
                # Named after its task: the task key without its hash.
                assert span.name == span.attributes["cicd.pipeline.task.name"]
                assert re.fullmatch(re.escape(span.name) + "-[0-9a-f]{8}",
                                    span.attributes["prefect.task.key"])
            result_key = "cicd.pipeline.task.run.result"
        assert matching, f"{scenario}: no {prefix or 'task'} span ending {final}"
        for span in matching:
            assert span.attributes["prefect.state-name"] == final
            assert span.attributes[result_key] == result
            assert (span.status_code is StatusCode.ERROR) == error
            if error:
                final_event = next(e for e in span.events if e.name == final)
                assert span.status_message == final_event.attributes["prefect.state.message"]
                assert span.attributes["error.type"]


@pytest.mark.parametrize("scenario", scenarios())
def test_events_come_back_exactly_from_the_spans(scenario):
    raw = load_jsonl(FIXTURES / f"{scenario}.jsonl")
    assert by_id(round_trip(raw)) == by_id(state_events(raw))


@pytest.mark.parametrize("scenario", scenarios())
def test_live_stream_gives_the_same_spans_for_the_runs_it_delivered_whole(scenario):
    """The websocket frames (as they arrived) and the REST set agree on every
    run the live stream delivered completely."""
    ws_path = FIXTURES / f"{scenario}.ws.jsonl"
    if not ws_path.exists():
        pytest.fail(f"no live capture for {scenario}")
    live_raw, rest_raw = load_jsonl(ws_path), load_jsonl(FIXTURES / f"{scenario}.jsonl")
    live_runs, rest_runs = runs_of(live_raw), runs_of(rest_raw)
    whole = {rid for rid, events in live_runs.items()
             if {e.id for e in events} == {e.id for e in rest_runs.get(rid, [])}}
    assert whole, "the live stream delivered at least one run whole"
    live = {s.span_id: s for s in convert(live_raw)}
    rest = {s.span_id: s for s in convert(rest_raw)}
    for rid in whole:
        assert live[span_id_for(rid)] == rest[span_id_for(rid)]


def expected_patches(scenario, runs):
    """Event id -> its patch, for the events of Prefect 3.9's that the
    builders cannot rebuild: a deferred task's Pending and Running (the task
    worker's and server's emitters break the engine's follows chain: null),
    and a RolledBack event (sent from inside the task whose failure rolled
    back, which the events worker then names as related)."""
    out = {}
    for events in runs.values():
        for event in events:
            state = event.resource["prefect.state-name"]
            if scenario == "deferred" and state in ("Pending", "Running"):
                assert event.follows is None
                out[str(event.id)] = [[["follows"], None]]
            elif scenario == "rolled-back" and state == "RolledBack":
                out[str(event.id)] = [[["related"], json.loads(event.model_dump_json())[
                    "related"]]]
    return out


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.jsonl")) + sorted(
    SAMPLES.glob("*.jsonl")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_patch_only_where_prefect_breaks_what_the_builders_assume(path):
    """Exactly that set: a builder that gets a field of Prefect's wrong puts
    a patch on (nearly) every event, and one that stops rebuilding the
    deferred or rolled-back cases loses theirs."""
    scenario = path.name.split(".")[0]
    raw = load_jsonl(path)
    expected = expected_patches(scenario, runs_of(raw))
    if scenario == "deferred":
        assert len(expected) == 8
    elif scenario == "rolled-back":
        assert len(expected) == 1
    got = {e.attributes["prefect.state.id"]: json.loads(e.attributes[ATTR_EVENT_PATCH])
           for span in convert(raw) for e in span.events if ATTR_EVENT_PATCH in e.attributes}
    assert got == expected
