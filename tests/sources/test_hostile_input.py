"""Hostile lines, items and spans among good ones: the good output is
unchanged, whatever the bad input and wherever it sits (property-based)."""

from __future__ import annotations

import json
from pathlib import Path

from support.factories import FlowRun, task_run_events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_bridge.cli import main
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


# -- the reverse direction: OTLP/JSON lines among good ones -------------------


def _good_request_lines(tmp: Path) -> list[bytes]:
    events = tmp / "good-events.jsonl"
    events.write_bytes(b"\n".join(GOOD_LINES) + b"\n")
    spans = tmp / "good-spans.jsonl"
    assert main(["convert", str(events), "-o", str(spans), "--jobs", "1"]) == 0
    return spans.read_bytes().splitlines()


def _prefect_like_span(draw) -> dict:
    """A span that says it is Prefect's task span, with one field wrong."""
    span = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "name": "task", "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": "prefect.run.type", "value": {"stringValue": "task"}},
                           {"key": "prefect.run.id", "value": {
                               "stringValue": "01a22348-0000-7000-8000-000000000001"}}],
            "events": [{"name": "Running", "timeUnixNano": "1700000000000000000",
                        "attributes": [{"key": "prefect.state.id", "value": {
                            "stringValue": "5b8efff7-9803-4103-9269-b633813fc60c"}}]}]}
    wrong = draw(st.sampled_from(["run_id", "state_id", "state_type", "time", "tags"]))
    if wrong == "run_id":
        span["attributes"][1]["value"] = draw(st.sampled_from([
            {"stringValue": "not-a-uuid"}, {"intValue": "5"}, {"stringValue": ""}]))
    elif wrong == "state_id":
        span["events"][0]["attributes"][0]["value"] = draw(st.sampled_from([
            {"stringValue": "x"}, {"intValue": "5"}, {"boolValue": True}]))
    elif wrong == "state_type":
        span["events"][0]["attributes"].append(
            {"key": "prefect.state.type", "value": {"stringValue": "WEIRD"}})
    elif wrong == "time":
        span["events"][0]["timeUnixNano"] = draw(st.sampled_from(
            ["18446744073709551615", "-5", "soon"]))
    else:
        span["attributes"].append({"key": "prefect.tags", "value": {"intValue": "7"}})
    return span


@st.composite
def hostile_request_lines(draw, good: list[bytes]) -> list[bytes]:
    kind = draw(st.sampled_from(["shape", "prefect", "damaged", "deep", "text"]))
    if kind == "shape":
        return [json.dumps({"resourceSpans": draw(st.sampled_from([
            5, "x", None, [5], [{"scopeSpans": "x"}], [{"scopeSpans": [{"spans": 5}]}],
            [{"scopeSpans": [{"spans": [5, "x", None]}]}]]))}).encode()]
    if kind == "prefect":
        return [json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
            _prefect_like_span(draw)]}]}]}).encode()]
    if kind == "damaged":  # one of our own spans with a field made wrong
        request = json.loads(draw(st.sampled_from(good)))
        span = request["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        span["traceId"] = "00" * 16  # not the good run's any more
        target = draw(st.sampled_from(["attribute", "event", "times"]))
        if target == "attribute":
            span["attributes"] = [{"key": a["key"], "value": {"intValue": "5"}}
                                  for a in span["attributes"]]
        elif target == "event":
            for event in span["events"]:
                event["attributes"] = [{"key": a["key"], "value": {"stringValue": "\u0000"}}
                                       for a in event["attributes"]]
        else:
            span["startTimeUnixNano"] = span["endTimeUnixNano"] = "-1"
        request["resourceSpans"][0]["scopeSpans"][0]["spans"] = [span]
        return [json.dumps(request).encode()]
    if kind == "deep":
        return [b'{"resourceSpans": ' + b"[" * draw(st.integers(1000, 100_000))]
    return [draw(st.binary(max_size=60)).replace(b"\n", b" ") or b"{"]


def _reversed(tmp: Path, lines: list[bytes]) -> list[dict]:
    spans = tmp / "spans.jsonl"
    spans.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp / "events.jsonl"
    main(["convert", str(spans), "--to", "events", "-o", str(out)])
    good = {e["resource"]["prefect.resource.id"] for e in GOOD}
    return [e for e in map(json.loads, out.read_bytes().splitlines())
            if e["resource"].get("prefect.resource.id") in good]


@pytest.fixture(scope="module")
def good_requests(tmp_path_factory) -> tuple[list[bytes], list[dict]]:
    """The good runs as OTLP/JSON lines, and the events they give back."""
    tmp = tmp_path_factory.mktemp("good")
    lines = _good_request_lines(tmp)
    events = _reversed(tmp, lines)
    assert len(events) == len(GOOD)
    return lines, events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_span_lines_among_good_ones_leave_the_good_events_as_they_were(
        data, good_requests, tmp_path):
    """convert --to events: a line of the wrong shape, a span with a field no
    rule foresaw, deep nesting or junk is refused alone (the first line
    too); the good lines' events come back exactly as they do without it."""
    good, clean = good_requests
    lines = list(good)
    for _ in range(data.draw(st.integers(1, 5))):
        at = data.draw(st.integers(0, len(lines)))
        lines[at:at] = data.draw(hostile_request_lines(good))
    assert _reversed(tmp_path, lines) == clean
