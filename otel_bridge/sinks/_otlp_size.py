"""How many bytes a span takes in an OTLP request, worked out from the plain
span without encoding it: the OTLP sink cuts requests by size, and encoding
each span once to measure it, then again to send it, doubled the cost of
export. An upper bound, within a few bytes of what the SDK's encoder
writes (tests/test_otlp_sink.py holds it to that)."""

from __future__ import annotations

from typing import Any, Mapping

from otel_bridge.model.spans import Span

__all__ = ["field_size", "span_size_bound"]

# Tag and length of a span in its ScopeSpans, its ids, times, kind, flags,
# and an empty status: what every span costs besides its content.
_FIXED = 6 + 18 + 10 + 10 + 9 + 9 + 2 + 6 + 4


def span_size_bound(span: Span) -> int:
    """At most the bytes `span` adds to an `ExportTraceServiceRequest`."""
    size = _FIXED + _string(span.name) + _attributes(span.attributes)
    for event in span.events:
        size += field_size(9 + _string(event.name) + _attributes(event.attributes))
    for link in span.links:
        size += field_size(18 + 10 + 6 + _attributes(link.attributes))
    if span.status_message:
        size += field_size(_string(span.status_message) + 2)
    return size


def _attributes(attributes: Mapping[str, Any]) -> int:
    return sum(field_size(_string(key) + field_size(_value(value)))
               for key, value in attributes.items())


def _value(value: Any) -> int:
    if isinstance(value, bool):
        return 2
    if isinstance(value, int):
        return 11  # a tag and a varint of up to 10 bytes
    if isinstance(value, float):
        return 9
    if isinstance(value, str):
        return _string(value)
    # a sequence: an ArrayValue of AnyValues
    return field_size(sum(field_size(_value(item)) for item in value))


def _string(text: str) -> int:
    return field_size(len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass")))


def field_size(size: int) -> int:
    """Bytes of a length-delimited protobuf field (a tag byte, the length as
    a varint) whose content is `size` bytes."""
    return 1 + _varint_size(size) + size


def _varint_size(n: int) -> int:
    return (n.bit_length() + 6) // 7 or 1
