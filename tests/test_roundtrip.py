"""events -> spans -> OTLP/JSON -> spans -> events gives back the same events."""

from __future__ import annotations

import json

from helpers import SAMPLES, convert, events, load_jsonl
from hypothesis import given, settings
from test_properties import workloads

from otel_bridge.model.events import Event
from otel_bridge.model.otlp import request_from_json, spans_from_request
from otel_bridge.sinks.otlp_json import encode_request
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.translate.reverse import events_from_bridge_span


def client_view(event: Event) -> dict:
    """What the round trip must keep: the client-side event, as JSON."""
    return json.loads(event.model_dump_json(exclude={"received"}))


def round_trip(dicts: list[dict]) -> list[dict]:
    spans = convert(dicts)
    line = json.dumps(encode_request(spans, resource_from_env()))
    decoded = [span for _, span in spans_from_request(request_from_json(json.loads(line)))]
    return [client_view(e) for span in decoded for e in events_from_bridge_span(span)]


def state_events(dicts: list[dict]) -> list[dict]:
    return [client_view(e) for e in events(dicts) if "prefect.state-type" in e.resource]


def by_id(views: list[dict]) -> dict[str, dict]:
    return {v["id"]: v for v in views}


def test_every_sample_event_comes_back_exactly():
    for path in sorted(SAMPLES.glob("*.jsonl")):
        raw = load_jsonl(path)
        expected = by_id(state_events(raw))
        got = round_trip(raw)
        assert len(got) == len(expected), path.name
        assert by_id(got) == expected, path.name


@settings(max_examples=100, deadline=None)
@given(workload=workloads())
def test_generated_sequences_come_back_exactly(workload):
    assert by_id(round_trip(workload)) == by_id(state_events(workload))
