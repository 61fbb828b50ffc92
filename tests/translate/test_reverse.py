"""Spans -> Prefect events: the event builder against Prefect's own events,
and the rules for spans otel-bridge did not make (docs/mapping.md: "Reverse")."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from uuid import UUID

import pytest
from support.helpers import FIXTURES, SAMPLES, load_jsonl
from opentelemetry.trace import StatusCode

from otel_bridge.model.events import parse_wire_event
from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.model.states import StateType
from otel_bridge.translate.ids import uuid_for
from otel_bridge.translate.reverse import events_from_spans
from otel_bridge.translate.task_run_events import (
    StateRecord,
    TaskRunRecord,
    task_run_state_events,
)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def real_task_runs():
    files = sorted(SAMPLES.glob("*.jsonl")) + sorted(
        p for p in FIXTURES.glob("*.jsonl") if not p.name.endswith(".ws.jsonl"))
    for path in files:
        runs = defaultdict(list)
        for raw in load_jsonl(path):
            if raw["event"].startswith("prefect.task-run.") and "task_run" in raw["payload"]:
                runs[raw["resource"]["prefect.resource.id"]].append(raw)
        for resource_id, events in runs.items():
            # One emitter per run (the engine's follows chain is unbroken) in
            # one context (RolledBack is sent from inside another task, which
            # the events worker then names as related).
            if all(b["follows"] == a["id"] and b["related"] == a["related"]
                   for a, b in zip(events, events[1:])):
                yield path.name, resource_id, events


def test_builder_makes_exactly_the_events_prefects_engine_makes():
    checked = 0
    for source, resource_id, raw in real_task_runs():
        first, last = raw[0]["payload"]["task_run"], raw[-1]["payload"]["task_run"]
        run = TaskRunRecord(
            id=UUID(resource_id.removeprefix("prefect.task-run.")),
            name=first["name"], task_key=first["task_key"], dynamic_key=first["dynamic_key"],
            tags=first["tags"], labels=last["labels"], task_inputs=first["task_inputs"],
            empirical_policy=first["empirical_policy"],
            flow_run_run_count=last["flow_run_run_count"],
            expected_start_time=when(first["expected_start_time"]),
            context=raw[0]["related"][len(first["tags"]):],
        )
        states = [
            StateRecord(StateType(e["resource"]["prefect.state-type"]),
                        e["resource"]["prefect.state-name"], when(e["occurred"]), UUID(e["id"]),
                        e["payload"]["validated_state"]["message"],
                        e["payload"]["validated_state"]["state_details"],
                        e["payload"]["validated_state"].get("data"))
            for e in raw
        ]
        built = task_run_state_events(run, states)
        for ours, theirs in zip(built, raw, strict=True):
            expected = parse_wire_event({k: v for k, v in theirs.items() if k != "received"})
            assert ours.to_json_dict() == expected.to_json_dict(), (source, theirs["event"])
        checked += 1
    assert checked >= 10


TRACE, SPAN, CHILD = 0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174, 0x1122334455667788


def foreign_span(**overrides) -> Span:
    fields = dict(trace_id=TRACE, span_id=SPAN, parent_span_id=None, name="load-orders",
                  start_time_unix_nano=1_795_888_255_000_000_000,
                  end_time_unix_nano=1_795_888_256_500_000_000,
                  attributes={"db.system": "postgresql"})
    fields.update(overrides)
    return Span(**fields)


def prefect_model_check(events):
    """Prefect's own model accepts every event (prefect is a test dependency)."""
    from prefect.events.schemas.events import Event as PrefectEvent

    for event in events:
        PrefectEvent.model_validate(event.to_json_dict())


def test_foreign_span_becomes_running_then_completed():
    events = events_from_spans([foreign_span()])
    prefect_model_check(events)
    assert [e.event for e in events] == ["prefect.task-run.Running", "prefect.task-run.Completed"]
    run_id = uuid_for("task-run", f"{TRACE:032x}", f"{SPAN:016x}")
    assert {e.resource["prefect.resource.id"] for e in events} == {f"prefect.task-run.{run_id}"}
    running, completed = events
    assert completed.follows == running.id and running.follows is None
    assert running.occurred == when("2026-11-28T17:50:55Z")
    assert completed.occurred == when("2026-11-28T17:50:56.5Z")
    assert [e.resource["prefect.run-count"] for e in events] == ["1", "1"]
    assert completed.payload["intended"] == {"from": "RUNNING", "to": "COMPLETED"}
    assert completed.payload["task_run"]["total_run_time"] == 1.5
    assert completed.payload["task_run"]["labels"]["__OTEL_TRACEPARENT"] == (
        f"00-{TRACE:032x}-{SPAN:016x}-01")
    assert all(e.resource["prefect.orchestration"] == "client" for e in events)


def test_error_span_fails_with_its_message_and_states_its_events_name():
    span = foreign_span(
        status_code=StatusCode.ERROR, status_message="connection reset",
        events=(SpanEvent("Retrying", 1_795_888_255_500_000_000),
                SpanEvent("cache miss", 1_795_888_255_600_000_000)),
    )
    events = events_from_spans([span])
    prefect_model_check(events)
    assert [e.event.rsplit(".", 1)[1] for e in events] == ["Running", "Retrying", "Failed"]
    assert [e.resource["prefect.run-count"] for e in events] == ["1", "2", "2"]
    assert events[-1].resource["prefect.state-message"] == "connection reset"
    assert events[-1].resource["prefect.state-type"] == "FAILED"


def test_child_span_names_its_parent_span_as_enclosing_task_run():
    (running, _) = events_from_spans([foreign_span(span_id=CHILD, parent_span_id=SPAN)])
    parent = uuid_for("task-run", f"{TRACE:032x}", f"{SPAN:016x}")
    assert running.payload["task_run"]["task_inputs"] == {
        "__parents__": [{"input_type": "task_run", "id": str(parent)}]}
    assert running.related_in_role("task-run")["prefect.resource.id"] == f"prefect.task-run.{parent}"


def test_same_span_twice_gives_the_same_events():
    span = foreign_span(status_code=StatusCode.ERROR, status_message="x")
    assert events_from_spans([span]) == events_from_spans([span])


def prefect_spans():
    """Spans as Prefect's RunTelemetry makes them (telemetry/run_telemetry.py)."""
    flow_run_id, task_run_id = "6d9981ef-0bf5-4478-9c22-b432e72694bb", "01a22348-1153-7a70-9d6e-1e43e7e7cefb"
    flow = Span(TRACE, SPAN, None, "chivalrous-skunk", 1_000_000_000, 9_000_000_000,
                attributes={"prefect.run.name": "chivalrous-skunk", "prefect.run.type": "flow",
                            "prefect.run.id": flow_run_id, "prefect.tags": []})
    states = [("Running", "RUNNING", "01a22348-5029-7dae-8807-aa1c4f57739e", ""),
              ("Failed", "FAILED", "01a22348-580b-7f22-8155-705befc390d1", "boom")]
    task = Span(TRACE, CHILD, SPAN, "boom-b44", 2_000_000_000, 3_000_000_000,
                attributes={"prefect.run.name": "boom-b44", "prefect.run.type": "task",
                            "prefect.run.id": task_run_id, "prefect.tags": ["etl"]},
                events=tuple(SpanEvent(name, 2_000_000_000 + i * 500_000_000,
                                       {"prefect.state.message": message,
                                        "prefect.state.type": kind, "prefect.state.name": name,
                                        "prefect.state.id": state_id})
                             for i, (name, kind, state_id, message) in enumerate(states)),
                status_code=StatusCode.ERROR, status_message="boom")
    return flow, task, states, flow_run_id, task_run_id


def test_prefects_own_task_span_gives_its_states_with_prefects_ids():
    flow, task, states, flow_run_id, task_run_id = prefect_spans()
    events = events_from_spans([flow, task])
    prefect_model_check(events)
    assert [str(e.id) for e in events] == [s[2] for s in states]
    assert [e.event for e in events] == ["prefect.task-run.Running", "prefect.task-run.Failed"]
    assert {e.resource_id for e in events} == {f"prefect.task-run.{task_run_id}"}
    assert events[0].related_in_role("flow-run")["prefect.resource.id"] == (
        f"prefect.flow-run.{flow_run_id}")
    assert events[0].related_in_role("tag")["prefect.resource.id"] == "prefect.tag.etl"
    assert events[1].resource["prefect.state-message"] == "boom"


def test_unknown_state_type_on_a_span_event_is_rejected():
    from otel_bridge.model.events import EventRejected

    span = foreign_span(events=(SpanEvent("Odd", 1_795_888_255_500_000_000,
                                          {"prefect.state.type": "WOBBLY"}),))
    with pytest.raises(EventRejected) as caught:
        events_from_spans([span])
    assert caught.value.reason == "unknown_state_type"


# -- damaged compact spans: rejected cleanly ----------------------------------


def bridge_span():
    from support.factories import FlowRun, task_run_events
    from support.helpers import convert

    (span,) = convert(task_run_events(["Pending", "Running", "Completed"], flow_run=FlowRun()))
    return span


def with_state_attributes(span, index, **changes):
    """`span` with the attributes of its `index`th span event changed (None
    removes one)."""
    from dataclasses import replace

    attributes = dict(span.events[index].attributes)
    for key, value in changes.items():
        attributes.pop(key, None)
        if value is not None:
            attributes[key] = value
    events = list(span.events)
    events[index] = replace(events[index], attributes=attributes)
    return replace(span, events=tuple(events))


def with_span_attributes(span, **changes):
    from dataclasses import replace

    return replace(span, attributes={**span.attributes, **changes})


PATCH = "otel_bridge.event.patch"


@pytest.mark.parametrize("damage", [
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: "[[["}), id="patch-not-json"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: '{"a": 1}'}),
                 id="patch-not-a-list"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: 5}), id="patch-not-a-string"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: '[[["payload", "nope", "x"], 1]]'}),
                 id="patch-path-not-there"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: '[[["nope"]]]'}),
                 id="patch-deletes-a-missing-key"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: '[[["related", 99], {}]]'}),
                 id="patch-index-out-of-range"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: "[[[]]]"}),
                 id="patch-deletes-the-event"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: "[[[], [1]]]"}),
                 id="patch-makes-no-event"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{PATCH: '[[["id"], "zz"]]'}),
                 id="patch-makes-an-invalid-event"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.task-run.inputs": '{"x": ['}),
                 id="inputs-not-json"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.task-run.inputs": "[" * 100_000}),
                 id="inputs-nested-too-deeply"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.task-run.inputs": "[1]"}),
                 id="inputs-not-an-object"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.task-run.inputs": 3}),
                 id="inputs-not-a-string"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.related": "[{"}),
                 id="related-not-json"),
    pytest.param(lambda s: with_span_attributes(s, **{"prefect.task-run.policy": "{"}),
                 id="policy-not-json"),
    pytest.param(lambda s: with_state_attributes(s, 2, **{"prefect.state.details": "{"}),
                 id="details-not-json"),
    pytest.param(lambda s: with_state_attributes(s, 2, **{"prefect.state.data": "{"}),
                 id="data-not-json"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{"prefect.state.id": "not-a-uuid"}),
                 id="state-id-not-a-uuid"),
    pytest.param(lambda s: with_state_attributes(s, 1, **{"prefect.state.type": "WOBBLY"}),
                 id="state-type-unknown"),
])
def test_a_damaged_compact_span_is_rejected_cleanly(damage):
    """A span changed on its way (cut by a backend's limit, edited by a
    processor) gives no events and a reason, never a traceback nor events
    that are not what went in."""
    from otel_bridge.model.events import EventRejected
    from otel_bridge.translate.reverse import events_from_bridge_span

    span = bridge_span()
    assert len(events_from_bridge_span(span)) == 3  # undamaged, it is fine
    damaged = damage(span)
    with pytest.raises(EventRejected) as caught:
        events_from_bridge_span(damaged)
    assert caught.value.reason in ("invalid_span", "invalid_event")
    with pytest.raises(EventRejected):
        events_from_spans([damaged])


def test_a_state_span_event_without_a_name_that_says_its_type_is_rejected():
    from dataclasses import replace

    from otel_bridge.model.events import EventRejected
    from otel_bridge.translate.reverse import events_from_bridge_span

    span = bridge_span()
    events = list(span.events)
    events[1] = replace(events[1], name="Odd")  # not a known state, and no type given
    with pytest.raises(EventRejected) as caught:
        events_from_bridge_span(replace(span, events=tuple(events)))
    assert caught.value.reason == "invalid_span"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_state_span_event_without_its_id_is_rejected(index):
    from otel_bridge.model.events import EventRejected
    from otel_bridge.translate.reverse import events_from_bridge_span

    damaged = with_state_attributes(bridge_span(), index, **{"prefect.state.id": None})
    with pytest.raises(EventRejected):
        events_from_bridge_span(damaged)


def test_span_events_a_user_added_are_not_states():
    """What is not a state (an exception a processor recorded, say) is left
    out, and the states still come back exactly."""
    from dataclasses import replace

    from otel_bridge.translate.reverse import events_from_bridge_span

    span = bridge_span()
    before = [e.model_dump_json() for e in events_from_bridge_span(span)]
    extra = SpanEvent("exception", span.events[1].time_unix_nano,
                      {"exception.type": "ValueError", "exception.message": "boom"})
    noisy = replace(span, events=(span.events[0], extra, *span.events[1:]))
    assert [e.model_dump_json() for e in events_from_bridge_span(noisy)] == before


def v01_span(raw_events):
    """A span as otel-bridge 0.1 made it: each state's whole event on its
    span event (`prefect.event.*`, the resource labels, `prefect.related`)."""
    from support.helpers import events
    from pydantic_core import to_json

    from otel_bridge.translate.times import to_unix_nano

    ordered = events(raw_events)
    span_events = []
    for event in ordered:
        attributes = {"prefect.event.id": str(event.id)}
        if event.follows is not None:
            attributes["prefect.event.follows"] = str(event.follows)
        attributes.update(event.resource)
        attributes["prefect.related"] = to_json(event.related).decode()
        attributes["prefect.event.payload"] = to_json(event.payload).decode()
        span_events.append(SpanEvent(event.event, to_unix_nano(event.occurred), attributes))
    last = ordered[-1]
    return Span(TRACE, SPAN, None, last.resource["prefect.resource.name"],
                span_events[0].time_unix_nano, span_events[-1].time_unix_nano,
                attributes={**last.resource, "prefect.run.type": "task",
                            "prefect.run.id": last.resource_id.rsplit(".", 1)[1]},
                events=tuple(span_events))


def test_spans_of_otel_bridge_0_1_are_still_read_exactly():
    from support.factories import FlowRun, task_run_events
    from support.helpers import events

    from otel_bridge.translate.reverse import events_from_bridge_span, is_bridge_span

    raw = task_run_events(["Pending", "Running", "Failed"], flow_run=FlowRun(), tags=["etl"],
                          messages={"Failed": "Task run encountered an exception ValueError: x"})
    span = v01_span(raw)
    assert is_bridge_span(span)
    expected = [e.model_dump_json(exclude={"received"}) for e in events(raw)]
    assert [e.model_dump_json(exclude={"received"})
            for e in events_from_bridge_span(span)] == expected
    assert [e.model_dump_json(exclude={"received"}) for e in events_from_spans([span])] == expected
