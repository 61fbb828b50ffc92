"""The plain OTLP/JSON encoder writes exactly what the official protobuf
encoder gives through protobuf's JSON mapping (ids in hex)."""

from __future__ import annotations

import pytest
from support.helpers import FIXTURES, SAMPLES, convert, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_bridge.model.otlp import request_json, request_to_json
from otel_bridge.sinks.sdk import SCOPE, resource_from_env, to_readable_spans

FILES = sorted(SAMPLES.glob("*.jsonl")) + sorted(
    p for p in FIXTURES.glob("*.jsonl") if not p.name.endswith(".ws.jsonl"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_plain_encoder_matches_the_official_one(path):
    spans = convert(load_jsonl(path))
    resource = resource_from_env()
    official = request_to_json(encode_spans(to_readable_spans(spans, resource)))
    plain = request_json(spans, dict(resource.attributes), SCOPE.name, SCOPE.version)
    assert plain == official


def test_every_value_type_matches():
    from otel_bridge.model.spans import Span, SpanEvent, SpanLink
    from opentelemetry.trace import StatusCode

    span = Span(1, 2, 3, "n", 10, 20,
                attributes={"s": "", "b": True, "i": 2**62, "f": 0.0, "l": ["a", "b"],
                            "e": [], "bl": [True], "il": [1, 2], "fl": [1.5]},
                events=(SpanEvent("e", 15),), links=(SpanLink(4, 5),),
                status_code=StatusCode.ERROR, status_message="m")
    resource = resource_from_env()
    official = request_to_json(encode_spans(to_readable_spans([span], resource)))
    assert request_json([span], dict(resource.attributes), SCOPE.name, SCOPE.version) == official
