"""What the event model accepts and rejects (as Prefect's own model does)."""

from __future__ import annotations

import json

import pytest
from support.factories import task_run_events
from support.helpers import SAMPLES, load_jsonl

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


# -- the fast path: events as Prefect writes them, decoded by msgspec ---------
#
# `parse_wire_event` reads text in the form Prefect writes it without the
# general path (json.loads, then validation). These hold the two equal: on
# any text, the same event (type, fields, fields given) or the same
# rejection, reason and detail.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from otel_bridge.model import events as events_module  # noqa: E402
from support.helpers import FIXTURES  # noqa: E402

REAL_LINES = [line for path in sorted(FIXTURES.glob("*.jsonl")) if ".ws." not in path.name
              for line in path.read_text().splitlines()[:6] if line.strip()]


def general_path(text):
    """`parse_wire_event` with the fast path switched off."""
    fast = events_module._event_as_written
    events_module._event_as_written = lambda raw: None
    try:
        return outcome(text)
    finally:
        events_module._event_as_written = fast


def outcome(text):
    try:
        event = parse_wire_event(text)
    except EventRejected as rejected:
        return ("rejected", rejected.reason, rejected.detail)
    if event is None:
        return None
    return (type(event).__name__, event.model_dump_json(), sorted(event.model_fields_set),
            event == event.model_validate(event.__dict__))


TIMES = st.sampled_from([
    "2026-11-28T17:50:55.248180Z", "2026-11-28T17:50:55Z", "2026-11-28T17:50:55.2481Z",
    "2026-11-28T17:50:55.248180+00:00", "2026-11-28T17:50:55.248180+05:30",
    "2026-11-28T17:50:55.248180", "2026-02-30T17:50:55.248180Z", "9999-12-31T23:59:59.999999-05:00",
    "2026-11-28 17:50:55.248180Z", "2026-11-28T17:50:55.248180z", "1700000000", "",
    "２026-11-28T17:50:55.248180Z", "2026-11-28T25:50:55.248180Z"]) | st.integers() | st.none()
IDS = st.sampled_from([
    "01a22597-0ca1-7cf7-be01-aefc3819ea79", "01A22597-0CA1-7CF7-BE01-AEFC3819EA79",
    "01a225970ca17cf7be01aefc3819ea79", "{01a22597-0ca1-7cf7-be01-aefc3819ea79}",
    "urn:uuid:01a22597-0ca1-7cf7-be01-aefc3819ea79", "not-a-uuid", ""]) | st.integers() | st.none()
VALUES = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(
    st.text(max_size=3), max_size=2) | st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                      max_size=2)
FIELDS = ["occurred", "event", "resource", "related", "payload", "id", "follows", "received"]


@st.composite
def wire_texts(draw):
    event = json.loads(draw(st.sampled_from(REAL_LINES)))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(FIELDS))
        change = draw(st.sampled_from(["drop", "time", "id", "value", "label", "labels"]))
        if change == "drop":
            event.pop(field, None)
        elif change == "time":
            event[field] = draw(TIMES)
        elif change == "id":
            event[field] = draw(IDS)
        elif change == "value":
            event[field] = draw(VALUES)
        elif change == "label" and isinstance(event.get("resource"), dict):
            event["resource"][draw(st.sampled_from(["prefect.resource.id", "x"]))] = draw(VALUES)
        elif change == "labels" and isinstance(event.get("related"), list) and event["related"]:
            event["related"][0] = draw(st.dictionaries(
                st.sampled_from(["prefect.resource.id", "prefect.resource.role", "y"]),
                VALUES, max_size=3))
    text = json.dumps(event)
    if draw(st.booleans()):
        text = json.dumps({"type": "event", "event": event})
    return text


@settings(max_examples=400, deadline=None)
@given(text=wire_texts())
def test_the_fast_path_reads_what_validation_reads(text):
    assert outcome(text) == general_path(text)
    assert outcome(text.encode()) == general_path(text.encode())


def test_the_fast_path_takes_prefects_own_events():
    """Every real event goes the fast way (else it would save nothing)."""
    lines = [line.encode() for line in REAL_LINES]
    assert all(events_module._event_as_written(line) is not None for line in lines)
    assert [outcome(line) for line in lines] == [general_path(line) for line in lines]


def test_a_time_past_year_9999_in_utc_is_rejected_not_a_crash():
    event = a_event()
    event["occurred"] = "9999-12-31T23:59:59.999999-05:00"
    with pytest.raises(EventRejected) as caught:
        parse_wire_event(json.dumps(event))
    assert caught.value.reason == "invalid_event"
    assert "out of range" in caught.value.detail


def test_deeply_nested_json_is_rejected_not_a_crash():
    with pytest.raises(EventRejected) as caught:
        parse_wire_event("[" * 100_000)
    assert caught.value.reason == "malformed_json"
