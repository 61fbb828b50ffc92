"""Plain spans and log records -> OTLP protobuf bytes, written directly.

The official route (`ReadableSpan` -> `encode_spans` -> `SerializeToString`)
builds a protobuf object per span, attribute and value, and a sink that cuts
requests by size had to encode every span twice. Here each span is encoded
once, to the bytes of its `Span` message, and a request is those bytes put
together (`TraceRequest`): its size is known before it is sent.

The bytes are what the SDK's encoder gives for the same span through
`otel_bridge.sinks.sdk.to_readable_span` (tests/sinks/test_otlp.py
holds the two equal, parsed, for arbitrary spans): fields in field-number
order, proto3 defaults left out, the SDK's span flags. What protobuf cannot
carry raises `Unencodable` for that span alone. Log records likewise
(`encode_log_record`, `LogsRequest`): what the SDK's `encode_logs` gives for
the records `sinks.otlp_logs.SdkLogRecords` makes (tests/sinks/test_otlp_logs.py).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping

from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.model.logs import LogRecord
from otel_bridge.model.spans import Span, SpanEvent, SpanLink

__all__ = ["LogsRequest", "TraceRequest", "Unencodable", "encode_log_record", "encode_span",
           "length_delimited"]


class Unencodable(ValueError):
    """A span OTLP cannot carry: a time before 1970 or past 2554, an integer
    outside 64 bits, text that is not Unicode (a lone surrogate)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(n) for n in range(1 << 14)]


def length_delimited(tag: bytes, content: bytes) -> bytes:
    """A length-delimited field: its tag, the length as a varint, the content."""
    n = len(content)
    return tag + (_SMALL[n] if n < 16384 else _varint(n)) + content


# Tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 bytes, 5 fixed32).
# KeyValue: key 1, value 2. AnyValue: string 1, bool 2, int 3, double 4, array 5.
_KEY, _VALUE = b"\x0a", b"\x12"
_STRING, _BOOL, _INT, _DOUBLE, _ARRAY = b"\x0a", b"\x10", b"\x18", b"\x21", b"\x2a"
_ARRAY_VALUES = b"\x0a"  # ArrayValue.values 1
# Span: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7,
# end 8, attributes 9, events 11, links 13, status 15, flags 16 (fixed32).
_S_TRACE_ID, _S_SPAN_ID, _S_PARENT, _S_NAME = b"\x0a", b"\x12", b"\x22", b"\x2a"
_S_KIND, _S_START, _S_END, _S_ATTRIBUTE = b"\x30", b"\x39", b"\x41", b"\x4a"
_S_EVENT, _S_LINK, _S_STATUS, _S_FLAGS = b"\x5a", b"\x6a", b"\x7a", b"\x85\x01"
# Span.Event: time 1 (fixed64), name 2, attributes 3.
_E_TIME, _E_NAME, _E_ATTRIBUTE = b"\x09", b"\x12", b"\x1a"
# Span.Link: trace_id 1, span_id 2, attributes 4, flags 6 (fixed32).
_L_TRACE_ID, _L_SPAN_ID, _L_ATTRIBUTE, _L_FLAGS = b"\x0a", b"\x12", b"\x22", b"\x35"
# Status: message 2, code 3.
_ST_MESSAGE, _ST_CODE = b"\x12", b"\x18"
# SpanFlags: the context's is-remote bit is known (0x100), and set (0x200).
# A span's own context is local; a link's is remote.
_SPAN_FLAGS = _S_FLAGS + struct.pack("<I", 0x100)
_LINK_FLAGS = _L_FLAGS + struct.pack("<I", 0x300)
# protobuf's SPAN_KIND_INTERNAL (1) .. CONSUMER (5) are the API's 0..4.
_KINDS = {kind: _S_KIND + bytes([kind.value + 1]) for kind in SpanKind}

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_U64 = 1 << 64


def _text(value: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise Unencodable("text that is not Unicode (a lone surrogate)") from None


def _time(tag: bytes, nanos: int) -> bytes:
    if nanos == 0:
        return b""  # proto3 leaves a zero out
    if not 0 <= nanos < _U64:
        raise Unencodable(f"a time of {nanos} ns since 1970 does not fit OTLP's unsigned 64 bits")
    return tag + _fixed64(nanos)


def _any_value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        return length_delimited(_STRING, _text(value))
    if kind is bool:
        return _BOOL + (b"\x01" if value else b"\x00")
    if kind is int:
        if not -(1 << 63) <= value < (1 << 63):
            raise Unencodable(f"the integer {value} is outside 64 bits")
        return _INT + _varint(value % _U64)  # two's complement, as int64 is written
    if kind is float:
        return _DOUBLE + _double(value)
    if isinstance(value, str):  # subclasses, as isinstance reads them
        return _any_value(str(value))
    if isinstance(value, bool):
        return _any_value(bool(value))
    if isinstance(value, int):
        return _any_value(int(value))
    if isinstance(value, float):
        return _any_value(float(value))
    if isinstance(value, (list, tuple)):
        return length_delimited(_ARRAY, b"".join(
            length_delimited(_ARRAY_VALUES, _any_value(item)) for item in value))
    raise Unencodable(f"an attribute value of type {type(value).__name__}")


# Keys repeat from span to span: their encoding is kept.
_keys: dict[str, bytes] = {}


def _key(key: str) -> bytes:
    encoded = _keys.get(key)
    if encoded is None:
        encoded = length_delimited(_KEY, _text(key)) if key else b""
        if len(_keys) < 65536:
            _keys[key] = encoded
    return encoded


def _attributes(tag: bytes, attributes: Mapping[str, Any]) -> list[bytes]:
    out = []
    for key, value in attributes.items():
        if type(value) is str:  # the common case, inline
            text = _text(value)
            n = len(text)
            value_bytes = _STRING + (_SMALL[n] if n < 16384 else _varint(n)) + text
        else:
            value_bytes = _any_value(value)
        out.append(length_delimited(tag, _key(key) + length_delimited(_VALUE, value_bytes)))
    return out


def _event(event: SpanEvent) -> bytes:
    parts = [_time(_E_TIME, event.time_unix_nano)]
    if event.name:
        parts.append(length_delimited(_E_NAME, _text(event.name)))
    parts.extend(_attributes(_E_ATTRIBUTE, event.attributes))
    return length_delimited(_S_EVENT, b"".join(parts))


def _link(link: SpanLink) -> bytes:
    parts = [_L_TRACE_ID, b"\x10", _id(link.trace_id, 16),
             _L_SPAN_ID, b"\x08", _id(link.span_id, 8)]
    parts.extend(_attributes(_L_ATTRIBUTE, link.attributes))
    parts.append(_LINK_FLAGS)
    return length_delimited(_S_LINK, b"".join(parts))


def _id(value: int, size: int) -> bytes:
    try:
        return value.to_bytes(size, "big")
    except OverflowError:
        raise Unencodable(f"an id of more than {size} bytes") from None


def encode_span(span: Span) -> bytes:
    """The bytes of the span's `Span` message. Raises `Unencodable`."""
    parts = [_S_TRACE_ID, b"\x10", _id(span.trace_id, 16), _S_SPAN_ID, b"\x08",
             _id(span.span_id, 8)]
    if span.parent_span_id:
        parts += (_S_PARENT, b"\x08", _id(span.parent_span_id, 8))
    if span.name:
        parts.append(length_delimited(_S_NAME, _text(span.name)))
    parts.append(_KINDS[span.kind])
    parts.append(_time(_S_START, span.start_time_unix_nano))
    parts.append(_time(_S_END, span.end_time_unix_nano))
    parts.extend(_attributes(_S_ATTRIBUTE, span.attributes))
    parts.extend(map(_event, span.events))
    parts.extend(map(_link, span.links))
    status = b""
    if span.status_code is StatusCode.ERROR:
        # The SDK's `Status` keeps a description for an error only.
        if span.status_message:
            status = length_delimited(_ST_MESSAGE, _text(span.status_message))
        status += _ST_CODE + b"\x02"
    elif span.status_code.value:
        status = _ST_CODE + bytes([span.status_code.value])
    parts.append(length_delimited(_S_STATUS, status))
    parts.append(_SPAN_FLAGS)
    return b"".join(parts)


# ExportTraceServiceRequest: resource_spans 1. ResourceSpans: resource 1,
# scope_spans 2. ScopeSpans: scope 1, spans 2.
_RESOURCE_SPANS, _RESOURCE, _SCOPE_SPANS, _SCOPE, _SPAN = (
    b"\x0a", b"\x0a", b"\x12", b"\x0a", b"\x12")


class TraceRequest:
    """`ExportTraceServiceRequest`s of one resource and scope, put together
    from encoded spans; `size` says what a request of given spans weighs
    before it is made, so requests are cut by size without encoding twice."""

    def __init__(self, resource: bytes, scope: bytes):
        # The encoded `Resource` and `InstrumentationScope` messages, as fields.
        self._resource = length_delimited(_RESOURCE, resource)
        self._scope = length_delimited(_SCOPE, scope)

    @staticmethod
    def span_field(span: bytes) -> bytes:
        """An encoded span as a field of its `ScopeSpans`."""
        return length_delimited(_SPAN, span)

    def size(self, span_fields_size: int) -> int:
        """Bytes of a request whose spans' fields (`span_field`) take
        `span_fields_size` bytes together."""
        scope_spans = len(self._scope) + span_fields_size
        resource_spans = len(self._resource) + _field_size(scope_spans)
        return _field_size(resource_spans)

    def encode(self, span_fields: Iterable[bytes]) -> bytes:
        scope_spans = self._scope + b"".join(span_fields)
        resource_spans = self._resource + length_delimited(_SCOPE_SPANS, scope_spans)
        return length_delimited(_RESOURCE_SPANS, resource_spans)


def _field_size(size: int) -> int:
    return 1 + len(_SMALL[size] if size < 16384 else _varint(size)) + size



# LogRecord: time 1 (fixed64), severity_number 2, severity_text 3, body 5,
# attributes 6, flags 8 (fixed32), trace_id 9, span_id 10, observed time 11.
_R_TIME, _R_SEVERITY, _R_SEVERITY_TEXT, _R_BODY, _R_ATTRIBUTE = (
    b"\x09", b"\x10", b"\x1a", b"\x2a", b"\x32")
_R_TRACE_ID, _R_SPAN_ID, _R_OBSERVED = b"\x4a", b"\x52", b"\x59"
# The trace flags of the run's span context, which the SDK copies: sampled.
_R_SAMPLED = b"\x45" + struct.pack("<I", 1)


def encode_log_record(record: LogRecord) -> bytes:
    """The bytes of the record's `LogRecord` message. Raises `Unencodable`."""
    parts = [_time(_R_TIME, record.time_unix_nano)]
    if record.severity_number:
        parts.append(_R_SEVERITY + _varint(record.severity_number))
    if record.severity_text:
        parts.append(length_delimited(_R_SEVERITY_TEXT, _text(record.severity_text)))
    parts.append(length_delimited(_R_BODY, _any_value(record.body)))
    parts.extend(_attributes(_R_ATTRIBUTE, record.attributes))
    if record.trace_id and record.span_id:
        parts += (_R_SAMPLED, _R_TRACE_ID, b"\x10", _id(record.trace_id, 16),
                  _R_SPAN_ID, b"\x08", _id(record.span_id, 8))
    parts.append(_time(_R_OBSERVED, record.observed_time_unix_nano))
    return b"".join(parts)


# ExportLogsServiceRequest: resource_logs 1. ResourceLogs: resource 1,
# scope_logs 2. ScopeLogs: scope 1, log_records 2. InstrumentationScope: name 1.
_RESOURCE_LOGS, _SCOPE_LOGS, _LOG_RECORD, _SCOPE_NAME = b"\x0a", b"\x12", b"\x12", b"\x0a"


class LogsRequest:
    """`ExportLogsServiceRequest`s of one resource, put together from encoded
    log records, each under the scope its logger names (in the order the
    scopes first come, as the SDK's encoder groups them)."""

    def __init__(self, resource: bytes):
        self._resource = length_delimited(_RESOURCE, resource)
        self._scopes: dict[str, bytes] = {}

    def _scope(self, name: str) -> bytes:
        scope = self._scopes.get(name)
        if scope is None:
            scope = length_delimited(_SCOPE, length_delimited(_SCOPE_NAME, _text(name))
                                     if name else b"")
            if len(self._scopes) < 4096:
                self._scopes[name] = scope
        return scope

    def encode(self, records: Iterable[tuple[str, bytes]]) -> bytes:
        """(logger name, encoded record) pairs -> the request's bytes."""
        by_scope: dict[str, list[bytes]] = {}
        for name, record in records:
            by_scope.setdefault(name, []).append(length_delimited(_LOG_RECORD, record))
        scope_logs = [length_delimited(_SCOPE_LOGS, self._scope(name) + b"".join(fields))
                      for name, fields in by_scope.items()]
        return length_delimited(_RESOURCE_LOGS, self._resource + b"".join(scope_logs))
