"""Open runs keep their events packed (zstd, trained dictionary); each comes
back as exactly the `Event` it was."""

from __future__ import annotations

import json

import pytest
from support.factories import task_run_events
from support.helpers import FIXTURES, SAMPLES
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_bridge.model.events import parse_wire_event
from otel_bridge.translate.packed_events import EventPacker

CAPTURES = sorted([*FIXTURES.glob("*.jsonl"), *SAMPLES.glob("*.jsonl"),
                   *(FIXTURES.parent / "prefect-3.9.1-telemetry").glob("*[!s].jsonl")])


def _same(a, b) -> bool:
    """Equal, of the same type, and serialised alike (1 and 1.0 are == but
    not the same event)."""
    return type(a) is type(b) and a == b and a.model_dump_json() == b.model_dump_json()


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_captured_event_comes_back_as_it_was_raw_or_serialised(path):
    packer = EventPacker()
    lines = [line.encode() for line in path.read_text().splitlines() if line.strip()]
    events = [parse_wire_event(line) for line in lines]
    lines, events = zip(*[(l, e) for l, e in zip(lines, events) if e is not None])
    from_raw, serialised = (), ()
    for line, event in zip(lines, events):
        from_raw = packer.append(from_raw, event, line)
        serialised = packer.append(serialised, event)
    for back in (packer.unpack(from_raw), packer.unpack(serialised)):
        assert len(back) == len(events) and all(map(_same, back, events))


def test_a_long_run_goes_in_several_frames_in_order():
    packer = EventPacker()
    events = [parse_wire_event(e) for e in task_run_events(
        ["Pending", "Running"] + ["AwaitingRetry", "Retrying"] * 40 + ["Completed"])]
    frames = ()
    for event in events:
        frames = packer.append(frames, event)
    assert len(frames) > 2
    assert packer.unpack(frames) == events


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(st.text(), _json, max_size=4), raw=st.booleans())
def test_any_payload_comes_back_exactly(payload, raw):
    """Big integers, floats, lone surrogates (JSON's escapes allow them),
    any text: what was read is what comes back."""
    obj = dict(task_run_events(["Running"])[0], payload=payload)
    text = json.dumps(obj).encode()
    event = parse_wire_event(text)
    packer = EventPacker()
    (back,) = packer.unpack(packer.append((), event, text if raw else None))
    assert _same(back, event)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "serialised"])
def test_a_lone_surrogate_comes_back(raw):
    obj = task_run_events(["Failed"], messages={"Failed": "bad \ud800 text"})[0]
    text = json.dumps(obj).encode()  # the escape, as JSON allows it
    event = parse_wire_event(text)
    assert "\ud800" in event.resource["prefect.state-message"]
    packer = EventPacker()
    (back,) = packer.unpack(packer.append((), event, text if raw else None))
    assert back == event
