"""What the event model accepts and rejects (as Prefect's own model does)."""

from __future__ import annotations

import json

import pytest
from factories import task_run_events
from helpers import SAMPLES, load_jsonl

from otel_bridge.model.events import (
    MAX_EVENT_SIZE_BYTES,
    Event,
    EventRejected,
    ReceivedEvent,
    parse_wire_event,
)


def a_event() -> dict:
    return task_run_events(["Pending"])[0]


def test_three_wire_forms():
    raw = load_jsonl(SAMPLES / "task_completes.jsonl")[4]
    received = parse_wire_event(json.dumps(raw))
    assert isinstance(received, ReceivedEvent)
    bare = dict(raw)
    del bare["received"]
    event = parse_wire_event(bare)
    assert type(event) is Event
    framed = parse_wire_event(json.dumps({"type": "event", "event": raw}))
    assert framed == received
    assert event.id == received.id and event.resource == received.resource


def test_control_frames_carry_no_event():
    assert parse_wire_event('{"type": "auth_success"}') is None


@pytest.mark.parametrize(
    "raw, reason, detail",
    [
        ("{not json", "malformed_json", ""),
        ("[1, 2]", "not_an_object", "list"),
        ('"text"', "not_an_object", "str"),
        ('{"type": "event", "event": 3}', "invalid_event", "without an event"),
    ],
)
def test_malformed_input(raw, reason, detail):
    with pytest.raises(EventRejected) as caught:
        parse_wire_event(raw)
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def mutate(change) -> dict:
    event = a_event()
    change(event)
    return event


@pytest.mark.parametrize(
    "event, detail",
    [
        (mutate(lambda e: e["resource"].pop("prefect.resource.id")), "prefect.resource.id"),
        (mutate(lambda e: e["resource"].update({"prefect.resource.id": ""})),
         "prefect.resource.id"),
        (mutate(lambda e: e["related"].append({"prefect.resource.id": "x"})),
         "prefect.resource.role"),
        (mutate(lambda e: e["resource"].update({f"l{i}": "v" for i in range(500)})),
         "maximum number of labels"),
        (mutate(lambda e: e.update(related=[{"prefect.resource.id": f"r{i}",
                                             "prefect.resource.role": "tag"}
                                            for i in range(101)])),
         "maximum number of related"),
        (mutate(lambda e: e["resource"].update({"prefect.run-count": 1})), "prefect.run-count"),
        (mutate(lambda e: e.update(id="not-a-uuid")), "id"),
        (mutate(lambda e: e.pop("occurred")), "occurred"),
        (mutate(lambda e: e.update(occurred="yesterday")), "occurred"),
        (mutate(lambda e: e.update(event="")), "event"),
        (mutate(lambda e: e.update(event="x" * 1025)), "event"),
        (mutate(lambda e: e.update(payload=[1])), "payload"),
        (mutate(lambda e: e.update(follows="nope")), "follows"),
    ],
)
def test_invalid_events_are_rejected_with_what_was_wrong(event, detail):
    with pytest.raises(EventRejected) as caught:
        parse_wire_event(json.dumps(event))
    assert caught.value.reason == "invalid_event"
    assert detail in caught.value.detail


def test_events_over_prefects_size_limit_are_rejected():
    event = a_event()
    event["payload"]["blob"] = "x" * MAX_EVENT_SIZE_BYTES
    with pytest.raises(EventRejected) as caught:
        parse_wire_event(json.dumps(event))
    assert caught.value.reason == "too_large"
    event["payload"]["blob"] = "x" * (MAX_EVENT_SIZE_BYTES - 10_000)
    assert parse_wire_event(json.dumps(event)) is not None


def test_unknown_fields_are_ignored_and_naive_times_are_utc():
    event = a_event()
    event["extra"] = {"anything": 1}
    event["occurred"] = "2026-11-28T17:50:55.248180"
    parsed = parse_wire_event(event)
    assert parsed.occurred.utcoffset().total_seconds() == 0


def test_matches_prefects_own_model_on_every_sample():
    """Every sample validates both here and with Prefect's own `ReceivedEvent`,
    to the same field values."""
    from prefect.events.schemas.events import ReceivedEvent as PrefectReceivedEvent

    for path in sorted(SAMPLES.glob("*.jsonl")):
        for raw in load_jsonl(path):
            ours = parse_wire_event(raw)
            theirs = PrefectReceivedEvent.model_validate(raw)
            assert ours.id == theirs.id
            assert ours.occurred == theirs.occurred
            assert ours.resource == dict(theirs.resource.root)
            assert ours.related == [dict(r.root) for r in theirs.related]
            assert ours.payload == theirs.payload
            assert ours.follows == theirs.follows
