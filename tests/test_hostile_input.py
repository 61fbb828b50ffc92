"""Hostile lines, items and spans among good ones: the good output is
unchanged, whatever the bad input and wherever it sits (property-based)."""

from __future__ import annotations

import json

from factories import FlowRun, task_run_events
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_bridge.model.otlp_protobuf import encode_span
from otel_bridge.sources.event_body import events_from_body
from otel_bridge.sources.jsonl import Line, parse_events
from otel_bridge.translate.assembler import Assembler

GOOD = [e for i in range(3) for e in task_run_events(
    ["Pending", "Running", "Completed"], name=f"good-{i}", flow_run=FlowRun())]
GOOD_LINES = [json.dumps(e).encode() for e in GOOD]


def _hostile_event(draw) -> dict:
    """A task-run event with one field made wrong, or a run of its own with
    text or times OTLP cannot carry."""
    event = json.loads(json.dumps(GOOD[0]))
    event["id"] = f"01a22348-0000-7000-8000-{draw(st.integers(0, 10**12)):012d}"
    event["resource"]["prefect.resource.id"] = (
        f"prefect.task-run.01a22348-0000-7000-8000-{draw(st.integers(0, 10**12)):012d}")
    field = draw(st.sampled_from(["occurred", "resource", "related", "id", "event", "payload",
                                  "message", "state"]))
    if field == "occurred":
        event["occurred"] = draw(st.sampled_from([
            "9999-12-31T23:59:59.999999-05:00", "0001-01-01T00:00:00+05:00", "1900-01-01T00:00:00Z",
            "not a time", 12, None]))
    elif field == "resource":
        event["resource"] = draw(st.sampled_from([{}, {"prefect.resource.id": ""}, [], "x",
                                                  {"prefect.resource.id": 5}]))
    elif field == "related":
        event["related"] = draw(st.sampled_from([[{}], "x", [{"prefect.resource.id": "a"}],
                                                 [[]] * 3]))
    elif field == "id":
        event["id"] = draw(st.sampled_from(["nope", None, 7, ""]))
    elif field == "event":
        event["event"] = draw(st.sampled_from(["", "x" * 2000, None, "prefect.task-run.Bogus"]))
    elif field == "payload":
        event["payload"] = draw(st.sampled_from(["x", [1], {"task_run": "x"}, {"a": 2**80}]))
    elif field == "message":
        event["resource"]["prefect.state-message"] = "\ud800 lone" * draw(st.integers(1, 3))
    else:
        event["resource"]["prefect.state-type"] = draw(st.sampled_from(["WEIRD", "", "running"]))
    return event


@st.composite
def hostile_lines(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["event", "text", "deep", "frame"]))
    if kind == "event":
        return [json.dumps(_hostile_event(draw)).encode()]
    if kind == "deep":
        return [b"[" * draw(st.integers(1000, 200_000))]
    if kind == "frame":
        return [json.dumps({"type": draw(st.sampled_from(["event", "auth", 5])),
                            "event": draw(st.sampled_from([None, "x", {}]))}).encode()]
    return [draw(st.binary(max_size=60)).replace(b"\n", b" ") or b"{"]


def _good_spans(lines: list[bytes]) -> dict:
    """The encoded spans of the good runs, by name, as convert makes them."""
    assembler = Assembler()
    rejected = []
    numbered = [Line("in", n, line, len(line)) for n, line in enumerate(lines, 1)]
    spans = []
    for line, event in parse_events(numbered, lambda line, error: rejected.append(line)):
        try:
            spans.extend(assembler.add(event, line.data))
        except ValueError:  # EventRejected
            rejected.append(line)
    spans.extend(assembler.flush())
    good = {e["resource"]["prefect.resource.id"] for e in GOOD}
    out = {}
    for span in spans:
        if span.attributes.get("prefect.resource.id") in good:
            out[span.attributes["prefect.resource.id"]] = encode_span(span)
    return out


CLEAN = _good_spans(GOOD_LINES)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_hostile_lines_among_good_ones_leave_the_good_spans_as_they_were(data):
    lines = list(GOOD_LINES)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(lines)))
        lines[at:at] = data.draw(hostile_lines())
    assert _good_spans(lines) == CLEAN


@settings(max_examples=80, deadline=None)
@given(data=st.data(), form=st.sampled_from(["lines", "array"]))
def test_hostile_items_in_a_pushed_body_leave_the_good_events_as_they_were(data, form):
    items = [json.loads(line) for line in GOOD_LINES]
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(items)))
        items.insert(at, data.draw(st.sampled_from([
            _hostile_event(data.draw), 42, "text", None, [], {"type": "event"}])))
    if form == "lines":
        body = b"\n".join(json.dumps(i).encode() for i in items)
    else:
        body = json.dumps(items).encode()
    good_runs = {e["resource"]["prefect.resource.id"] for e in GOOD}
    taken = [item.event for item in events_from_body(body)[0]
             if item.event.resource["prefect.resource.id"] in good_runs]
    assert taken == [item.event for item in events_from_body(b"\n".join(GOOD_LINES))[0]]
