"""events -> spans -> OTLP/JSON -> spans -> events gives back the same events,
byte for byte: each event's JSON (as Prefect's client serialises it, without
`received`) is compared as text, so key order and JSON types count."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import replace

import pytest
from support.factories import FlowRun, flow_run_events, task_run_events
from support.helpers import FIXTURES, SAMPLES, convert, events, load_jsonl
from hypothesis import given, settings
from prefect.utilities.text import truncated_to
from test_properties import odd_runs, workloads

from otel_bridge.model.events import Event, EventRejected
from otel_bridge.model.otlp import request_from_json, spans_from_request
from otel_bridge.sinks.otlp_json import encode_request
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.translate.reverse import events_from_bridge_span
from otel_bridge.translate.span_layout import ATTR_EVENT_PATCH


def client_view(event: Event) -> str:
    """What the round trip must keep: the client-side event, as JSON text."""
    return event.model_dump_json(exclude={"received"})


def through_otlp_json(dicts: list[dict]) -> list:
    """The spans of these events, as they come back from an OTLP/JSON line."""
    line = json.dumps(encode_request(convert(dicts), resource_from_env()))
    return [span for _, span in spans_from_request(request_from_json(json.loads(line)))]


def round_trip(dicts: list[dict]) -> list[str]:
    return [client_view(e) for span in through_otlp_json(dicts)
            for e in events_from_bridge_span(span)]


def state_events(dicts: list[dict]) -> list[str]:
    return [client_view(e) for e in events(dicts) if "prefect.state-type" in e.resource]


def by_id(views: list[str]) -> dict[str, str]:
    out = {json.loads(v)["id"]: v for v in views}
    assert len(out) == len(views), "an event came back twice"
    return out


def assert_exact(dicts: list[dict]) -> None:
    got, expected = by_id(round_trip(dicts)), by_id(state_events(dicts))
    assert got.keys() == expected.keys()
    for event_id, text in expected.items():
        assert got[event_id] == text, event_id


CAPTURES = sorted(SAMPLES.glob("*.jsonl")) + sorted(FIXTURES.glob("*.jsonl"))


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_captured_event_comes_back_byte_for_byte(path):
    assert_exact(load_jsonl(path))


def test_the_comparison_sees_key_order_and_json_types():
    """What `assert_exact` compares tells apart what a dict comparison
    would not."""
    (event,) = events(task_run_events(["Pending"]))
    reordered = event.model_copy(update={"payload": dict(reversed(event.payload.items()))})
    assert reordered.model_dump() == event.model_dump()
    assert client_view(reordered) != client_view(event)
    retyped = event.model_copy(update={"payload": {**event.payload, "intended": 1.0}})
    assert client_view(retyped) != client_view(
        event.model_copy(update={"payload": {**event.payload, "intended": 1}}))


@settings(max_examples=100, deadline=None)
@given(workload=workloads())
def test_generated_sequences_come_back_exactly(workload):
    assert_exact(workload)


@settings(max_examples=300, deadline=None)
@given(run=odd_runs())
def test_odd_events_come_back_exactly_and_carry_a_patch_only_where_needed(run):
    """Extra payload keys, other key orders, unknown state names and types,
    odd related resources, follows pointing elsewhere: what the builders
    cannot rebuild travels as a patch, and only that."""
    assert_exact(run)
    (span,) = through_otlp_json(run)
    for index, span_event in enumerate(span.events):
        if ATTR_EVENT_PATCH not in span_event.attributes:
            continue
        # Without its patch, that event does not come back as it went in.
        attributes = {k: v for k, v in span_event.attributes.items() if k != ATTR_EVENT_PATCH}
        events_ = list(span.events)
        events_[index] = replace(span_event, attributes=attributes)
        expected = by_id(state_events(run))
        try:
            rebuilt = events_from_bridge_span(replace(span, events=tuple(events_)))
        except EventRejected:
            continue  # the builders cannot make it at all
        event_id = span_event.attributes["prefect.state.id"]
        assert client_view(rebuilt[index]) != expected[event_id], span_event.name


def replicated(raw: list[dict], resource_id: str, copies: int) -> list[dict]:
    """`copies` runs made of one real run's events: new run, event and
    dynamic-key ids and run names, everything else as Prefect wrote it."""
    run = [e for e in raw if e["resource"]["prefect.resource.id"] == resource_id]
    run_id = resource_id.removeprefix("prefect.task-run.")
    first = run[0]["payload"]["task_run"]
    old = [run_id, first["dynamic_key"], *(e["id"] for e in run)]
    text = "\n".join(json.dumps(e) for e in run)
    out = []
    for i in range(copies):
        copy = text.replace(f'"{first["name"]}"', f'"{first["name"][:-3]}{i:03x}"')
        for value in old:
            copy = copy.replace(value, str(uuid.uuid5(uuid.NAMESPACE_URL, f"{value}/{i}")))
        out += [json.loads(line) for line in copy.splitlines()]
    return out


def test_a_500_task_flow_comes_back_byte_for_byte():
    """A real mapped flow's task run, replicated to 500 runs of its flow run."""
    raw = load_jsonl(FIXTURES / "mapped.jsonl")
    square = next(e for e in raw if e["resource"].get("prefect.resource.name", "").startswith(
        "square-") and e["event"].startswith("prefect.task-run."))
    flow = [e for e in raw if e["event"].startswith("prefect.flow-run.")]
    big = flow + replicated(raw, square["resource"]["prefect.resource.id"], 500)
    spans = through_otlp_json(big)
    assert Counter(s.name for s in spans) == {"square": 500, "RUN s-mapped": 1}
    assert not any(ATTR_EVENT_PATCH in e.attributes for s in spans for e in s.events)
    assert_exact(big)


def test_a_synthetic_500_task_flow_comes_back_byte_for_byte():
    """Retries, failures, nesting and tags among 500 task runs."""
    flow_run = FlowRun()
    paths = [["Pending", "Running", "Completed"],
             ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"],
             ["Pending", "Running", "Failed"], ["Pending", "NotReady"]]
    raw, parent = [], None
    for i in range(500):
        run = task_run_events(paths[i % len(paths)], name=f"work-{i:03x}", flow_run=flow_run,
                              tags=["etl"] if i % 3 else [],
                              parent_task_id=parent if i % 7 == 0 else None,
                              messages={"Failed": f"Task run encountered an exception "
                                                  f"ValueError: {i}"})
        parent = run[0]["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")
        raw += run
    raw += flow_run_events(["Pending", "Running", "Failed"], flow_run,
                           messages={"Failed": "Flow run encountered an exception: ValueError"})
    assert_exact(raw)


HUGE = 250_000


def huge_failure(message: str) -> list[dict]:
    return task_run_events(["Pending", "Running", "Failed"], flow_run=FlowRun(),
                           messages={"Failed": message})


def test_a_250000_character_failure_message_cut_as_prefect_cuts_it_comes_back_exactly():
    text = "Task run encountered an exception ValueError: " + "".join(
        f"line {i}: {'x' * (i % 50)}\n" for i in range(HUGE))[:HUGE - 46]
    assert len(text) == HUGE
    sent = truncated_to(100_000, text)  # what Prefect's engine sends
    assert sent.startswith(text[:50_000]) and sent.endswith(text[-50_000:])
    assert f"...{HUGE - 100_000} additional characters..." in sent
    raw = huge_failure(sent)
    (span,) = through_otlp_json(raw)
    failed = span.events[-1]
    assert failed.attributes["prefect.state.message"] == sent
    assert ATTR_EVENT_PATCH not in failed.attributes
    assert span.status_message == sent
    assert len(span.attributes["prefect.state-message"]) == 1024
    assert span.attributes["otel_bridge.truncated.prefect.state-message"] == len(sent)
    assert_exact(raw)


def test_a_250000_character_message_prefect_did_not_cut_comes_back_uncut():
    """Not what Prefect sends, but what went in comes out: the builders cut
    it as Prefect would, and the patch says it was not."""
    text = "Task run encountered an exception ValueError: " + "y" * (HUGE - 46)
    raw = huge_failure(text)
    got = json.loads(round_trip(raw)[-1])
    assert got["resource"]["prefect.state-message"] == text
    assert got["payload"]["validated_state"]["message"] == text
    assert_exact(raw)


# -- what broke the round trip once ------------------------------------------


@pytest.mark.parametrize("label, value", [
    ("prefect.task-run.inputs", "{not json"), ("prefect.task-run.labels", "[1]"),
    ("prefect.task-run.policy", "{"), ("prefect.related", "{}")])
def test_a_label_named_like_a_layout_attribute_comes_back(label, value):
    raw = task_run_events(["Pending", "Running", "Completed"], flow_run=FlowRun())
    for event in raw:
        event["resource"][label] = value
        event["payload"]["task_run"]["task_inputs"] = {}
    assert_exact(raw)


def test_a_flow_run_run_count_beyond_int64_comes_back():
    raw = task_run_events(["Pending", "Running", "Completed"], flow_run=FlowRun())
    for event in raw:
        event["payload"]["task_run"]["flow_run_run_count"] = 2**63
    assert_exact(raw)
