"""The OTLP/JSON reader (`sources.otlp_json.read_spans`): a line read whole
and a line read as a stream give the same spans; hostile lines cost only
themselves, and quickly, in either way of reading."""

from __future__ import annotations

import json
import time

import pytest
from support.factories import FlowRun, task_run_events
from support.helpers import convert

from otel_bridge.model.otlp_protobuf import encode_span
from otel_bridge.sinks.otlp_json import encode_request
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.sources import otlp_json
from otel_bridge.sources.otlp_json import read_spans

FLOW = FlowRun()
RUNS = [e for i in range(40) for e in task_run_events(
    ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"], name=f"t-{i}", flow_run=FLOW)]


def _request_line(dicts: list[dict]) -> bytes:
    return json.dumps(encode_request(convert(dicts), resource_from_env())).encode()


def _read(path, lines: list[bytes]) -> tuple[list[bytes], list[tuple[int, str]]]:
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejected = []
    spans = [encode_span(span) for _, span in read_spans(
        [str(path)], lambda line, error: rejected.append((line.number, error.reason)))]
    return spans, rejected


@pytest.fixture(params=["whole", "streamed"])
def reading(request, monkeypatch):
    if request.param == "streamed":  # no line read whole
        monkeypatch.setattr(otlp_json, "_WHOLE_LINE_BYTES", 4)
    return request.param


def test_a_line_read_whole_or_as_a_stream_gives_the_same_spans(tmp_path, monkeypatch):
    lines = [_request_line(RUNS[:60]), _request_line(RUNS[60:])]
    whole, rejected = _read(tmp_path / "a.jsonl", lines)
    assert rejected == [] and len(whole) == 40
    monkeypatch.setattr(otlp_json, "_WHOLE_LINE_BYTES", 4)
    assert _read(tmp_path / "b.jsonl", lines) == (whole, [])


@pytest.mark.parametrize("first", [True, False])
def test_deep_nesting_is_refused_quickly_and_alone(tmp_path, reading, first):
    """ijson's path strings grow with depth: 100,000 `[` took minutes, and
    as the first line (read again as a pretty-printed document) cost the
    whole file."""
    good = _request_line(RUNS)
    deep = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": ' + b"[" * 200_000
    lines = [deep, good] if first else [good, deep, good]
    started = time.perf_counter()
    spans, rejected = _read(tmp_path / "deep.jsonl", lines)
    assert time.perf_counter() - started < 10
    assert len(spans) == 40 * (1 if first else 2)
    assert [reason for _, reason in rejected] == ["malformed_json"]


@pytest.mark.parametrize("request_json, reason", [
    ({"resourceSpans": 5}, "invalid_otlp"),
    ({"resourceSpans": [{"scopeSpans": "x"}]}, "invalid_otlp"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": 5}]}]}, "invalid_otlp"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [5]}]}]}, "invalid_otlp"),
    ({"resourceSpans": []}, "no_spans"),
    ({"other": 1}, "no_spans"),
])
def test_a_request_of_the_wrong_shape_is_refused_with_its_reason(tmp_path, reading, request_json,
                                                                  reason):
    good = _request_line(RUNS)
    spans, rejected = _read(tmp_path / "shape.jsonl", [good, json.dumps(request_json).encode(),
                                                       good])
    assert len(spans) == 80
    assert rejected == [(2, reason)]
