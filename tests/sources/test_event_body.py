"""A pushed body: one event, an array, or JSON lines; each item judged
alone, parsed once, its own JSON text handed on."""

from __future__ import annotations

import json

import pytest
from support.factories import task_run_events

from otel_bridge.model.events import parse_wire_event
from otel_bridge.sources.event_body import events_from_body

EVENTS = task_run_events(["Pending", "Running", "Completed"])


def _texts(events):
    return [json.dumps(e).encode() for e in events]


@pytest.mark.parametrize("form", ["lines", "array", "one", "pretty", "frames"])
def test_every_form_gives_each_event_with_its_own_text(form):
    texts = _texts(EVENTS)
    if form == "lines":
        body = b"\n".join(texts) + b"\n"
    elif form == "array":
        body = b"[" + b", ".join(texts) + b"]"
    elif form == "one":
        body, texts = texts[0], texts[:1]
    elif form == "pretty":
        body = json.dumps(EVENTS[0], indent=2).encode()
        texts = [body]
    else:
        texts = [json.dumps({"type": "event", "event": e}).encode() for e in EVENTS]
        body = b"\n".join(texts)
    items, rejected = events_from_body(body)
    assert rejected == []
    assert [item.raw for item in items] == texts
    assert [item.event for item in items] == [parse_wire_event(t) for t in texts]


def test_bad_items_are_refused_alone_with_their_number():
    texts = _texts(EVENTS)
    body = b"\n".join([texts[0], b"{broken", b"[1]", b'"text"', texts[1]])
    items, rejected = events_from_body(body)
    assert [i.number for i in items] == [1, 5]
    assert [(r.item, r.reason) for r in rejected] == [
        (2, "malformed_json"), (3, "not_an_object"), (4, "not_an_object")]
    array = b"[" + b",".join([texts[0], b'"text"', b"7", texts[1]]) + b"]"
    items, rejected = events_from_body(array)
    assert [i.number for i in items] == [1, 4]
    assert [(r.item, r.reason) for r in rejected] == [(2, "not_an_object"), (3, "not_an_object")]


def test_an_array_msgspec_refuses_is_still_read_by_json():
    event = dict(EVENTS[0], payload={"x": float("nan")})
    items, rejected = events_from_body(b"[" + json.dumps(event).encode() + b"]")
    assert rejected == [] and len(items) == 1 and items[0].raw is None


def test_a_broken_array_is_one_refusal():
    assert [(r.item, r.reason) for r in events_from_body(b"[{")[1]] == [(1, "malformed_json")]
