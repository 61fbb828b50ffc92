"""OTLP/JSON from files or stdin: the Collector file exporter's format (one
`ExportTraceServiceRequest` per line), or one JSON document per file.

A request is read as a stream (ijson, over the line it is on) and never held
whole: only the spans it holds are kept, one at a time as they are parsed, so
a request of any size the Collector or `convert --to otlp-json` writes is read
with the memory of its spans alone. Each line is judged alone: a line that is
not a whole OTLP/JSON request is set aside, with none of its spans taken.
"""

from __future__ import annotations

import base64
import sys
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

import ijson
import msgspec
from ijson.common import ObjectBuilder
from google.protobuf import json_format
from opentelemetry.proto.trace.v1 import trace_pb2

from otel_bridge.model.events import EventRejected
from otel_bridge.model.otlp import span_from_proto
from otel_bridge.model.spans import Span
from otel_bridge.sources.jsonl import Line

__all__ = ["MAX_REQUEST_BYTES", "read_spans"]

Reject = Callable[[Line, EventRejected], None]

# A bound on one request (or one pretty-printed document), against a source
# that never ends a line; far beyond what a batch of real traces takes.
MAX_REQUEST_BYTES = 1 << 30
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class _TooLarge(Exception):
    pass


class _LineStream:
    """The bytes of one line of `stream` (its newline included), as a file
    for the parser to read; as a `document`, the rest of the stream too.
    With `keep`, the first MiB read is kept (`kept`), to read it again."""

    def __init__(self, stream: BinaryIO, limit: int, head: bytes = b"", *,
                 document: bool = False, keep: bool = False):
        self._stream = stream
        self._limit = limit
        self._head = head
        self.size = len(head)
        self.document = document
        self.ended = False  # read to the end of the line (of the stream, as a document)
        self.kept: "bytes | None" = head if keep else None

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # the parser's probe of what kind of file this is
            return b""
        if self._head:
            data, self._head = self._head, b""
            return data
        if self.ended:
            return b""
        data = self._next(1 << 16 if n is None or n < 0 else n)
        self.size += len(data)
        if self.kept is not None:
            self.kept = self.kept + data if len(self.kept) < 1 << 20 else None
        if self.size > self._limit:
            raise _TooLarge()
        return data

    def push_back(self, data: bytes) -> None:
        """Bytes read already, to be read again first."""
        self._head = data + self._head

    def drain(self) -> None:
        """Read past the rest of the line (after an error)."""
        self._head = b""
        while not self.ended:
            self.size += len(self._next(1 << 16))

    def _next(self, n: int) -> bytes:
        data = self._stream.read(n) if self.document else self._stream.readline(n)
        if not data or (not self.document and data.endswith(b"\n")):
            self.ended = True
        return data


def read_spans(sources: Iterable[str], on_reject: Reject,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> Iterator[tuple[Line, Span]]:
    """The spans of each source in turn ("-" is stdin), each with the line
    its request started on. A source whose first line is not a whole JSON
    value is read as one (pretty-printed) document."""
    for source in sources:
        if source == "-":
            yield from _source_spans(sys.stdin.buffer, "-", on_reject, max_request_bytes)
        else:
            with open(source, "rb") as stream:
                yield from _source_spans(stream, source, on_reject, max_request_bytes)


def _source_spans(stream: BinaryIO, source: str, on_reject: Reject,
                  limit: int) -> Iterator[tuple[Line, Span]]:
    number = 1  # the line the next byte is on
    while True:
        head = stream.readline(1)
        if not head:
            return
        if head.isspace():  # a blank line, or white space before a value
            number += head == b"\n"
            continue
        line = _LineStream(stream, limit, head, keep=number == 1)
        if head != b"{":
            line.drain()
            spans, error = [], EventRejected(
                "not_an_object", "expected a JSON object (an OTLP/JSON request)")
        else:
            spans, error = _parse(line)
        if error == _PREMATURE_END and number == 1 and line.kept is not None:
            # Not a whole value on its first line: a pretty-printed document,
            # read again from its start (as one stream, several values allowed).
            resume = stream.tell() if stream.seekable() else None
            document = _LineStream(stream, limit, line.kept, document=True)
            spans, document_error = _parse(document)
            if document_error is not None and resume is not None:
                # Nor a document: a first line cut short, and lines after it
                # that are judged alone, as any line is.
                stream.seek(resume)
            else:
                line, error = document, document_error
        where = Line(source, number, None, line.size)
        if error is not None:
            on_reject(where, error)
        elif not spans:
            on_reject(where, EventRejected(
                "no_spans", "not an OTLP/JSON trace request with spans (resourceSpans)"))
        yield from ((where, span) for span in spans)
        if line.document:
            return
        number += 1


_PREMATURE_END = EventRejected("malformed_json", "the JSON ends before its value does")


def _parse(line: _LineStream) -> "tuple[list[Span], EventRejected | None]":
    """The spans on the line (or in the document), or why it is set aside."""
    spans: list[Span] = []
    try:
        for obj in _span_objects(line):
            spans.append(_span(obj))
    except _TooLarge:
        error: "EventRejected | None" = EventRejected(
            "too_large", f"a request of over {line.size} bytes is over the limit")
    except (ijson.JSONError, msgspec.DecodeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else "not JSON"
        error = _PREMATURE_END if "premature EOF" in text or "truncated" in text else \
            EventRejected("malformed_json", text)
    except _TooDeep as exc:
        error = EventRejected("malformed_json", str(exc))
    except ValueError as exc:
        error = EventRejected("invalid_otlp", str(exc))
    else:
        error = None
    line.drain()
    return ([], error) if error is not None else (spans, None)


# A line up to this size is read whole and decoded in one C pass; a longer
# one (or a pretty-printed document) is parsed as a stream.
_WHOLE_LINE_BYTES = 64 << 20
# OTLP/JSON spans nest about ten deep; attribute values a few more.
_MAX_DEPTH = 256


class _TooDeep(Exception):
    pass


def _span_objects(line: _LineStream) -> Iterator[object]:
    """The JSON objects at resourceSpans[].scopeSpans[].spans[]."""
    if not line.document:
        data = b""
        while len(data) <= _WHOLE_LINE_BYTES and (chunk := line.read(
                _WHOLE_LINE_BYTES + 1 - len(data))):
            data += chunk
        if len(data) <= _WHOLE_LINE_BYTES:
            try:
                request = msgspec.json.decode(data)
            except RecursionError:
                raise _TooDeep("JSON nested too deeply") from None
            yield from _spans_of(request)
            return
        line.push_back(data)
    yield from _streamed_span_objects(line)


def _spans_of(request: object) -> Iterator[object]:
    """The spans of a decoded request, as JSON; ValueError where its shape
    is not a request's."""
    if not isinstance(request, dict):
        raise ValueError(f"a request is a JSON object, not {type(request).__name__}")
    for resource_spans in _list(request.get("resourceSpans", [])):
        for scope_spans in _list(_dict(resource_spans).get("scopeSpans", [])):
            yield from _list(_dict(scope_spans).get("spans", []))


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON array, got {type(value).__name__}")
    return value


def _dict(value: object) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _streamed_span_objects(line: _LineStream) -> Iterator[object]:
    """As `_span_objects`, from ijson's events, with nesting bounded (ijson's
    own path strings grow with depth: a line of 100,000 `[` took minutes)."""
    path: list[object] = []  # a key for each open object, None for each open array
    builder: Optional[ObjectBuilder] = None
    built_at = 0
    for event, value in ijson.basic_parse(line, use_float=True, multiple_values=line.document):
        if event == "start_map" or event == "start_array":
            if len(path) >= _MAX_DEPTH:
                raise _TooDeep(f"JSON nested past {_MAX_DEPTH} levels")
            if builder is None:
                if _at_span(path):
                    builder, built_at = ObjectBuilder(), len(path)
                else:
                    _check_shape(path, event)
            if builder is not None:
                builder.event(event, value)
            path.append("" if event == "start_map" else None)
        elif event == "end_map" or event == "end_array":
            path.pop()
            if builder is not None:
                builder.event(event, value)
                if len(path) == built_at:
                    yield builder.value
                    builder = None
        elif builder is not None:
            builder.event(event, value)
        elif event == "map_key":
            path[-1] = value
        elif _at_span(path):
            yield value  # a span that is not an object: `_span` says so
        else:
            _check_shape(path, event)


_SPAN_PATH = ["resourceSpans", None, "scopeSpans", None, "spans", None]


def _check_shape(path: list[object], event: str) -> None:
    """A value on the way to the spans must be what `_spans_of` takes."""
    if 0 < len(path) < len(_SPAN_PATH) and path == _SPAN_PATH[:len(path)]:
        wanted = "start_array" if path[-1] is not None else "start_map"
        if event != wanted:
            raise ValueError(f"expected a JSON {'array' if wanted == 'start_array' else 'object'}, "
                             f"got {_JSON_KINDS.get(event, event)}")


_JSON_KINDS = {"start_map": "dict", "start_array": "list", "string": "str", "number": "int",
               "integer": "int", "double": "float", "boolean": "bool", "null": "NoneType"}


def _at_span(path: list[object]) -> bool:
    """Whether a value starting here is a span (an object's place in `path`
    holds the key of the value that comes next)."""
    return path == _SPAN_PATH


def _span(obj: object) -> Span:
    """One OTLP/JSON span (hex ids), as a plain span. Raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"a span is a JSON object, not {type(obj).__name__}")
    for key in _ID_FIELDS:
        value = obj.get(key)
        if value:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except (TypeError, ValueError):
                raise ValueError(f"{key} {value!r:.40} is not hex") from None
    try:
        # OTLP: "receivers MUST ignore unknown fields" in JSON, for newer senders.
        message = json_format.ParseDict(obj, trace_pb2.Span(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    return span_from_proto(message)
