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
from typing import BinaryIO, Callable, Iterable, Iterator

import ijson
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
_SPANS = "resourceSpans.item.scopeSpans.item.spans.item"
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
            line = _LineStream(stream, limit, line.kept, document=True)
            spans, error = _parse(line)
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
        for obj in ijson.items(line, _SPANS, use_float=True, multiple_values=line.document):
            spans.append(_span(obj))
    except _TooLarge:
        error: "EventRejected | None" = EventRejected(
            "too_large", f"a request of over {line.size} bytes is over the limit")
    except ijson.JSONError as exc:
        text = str(exc).splitlines()[0] if str(exc) else "not JSON"
        error = _PREMATURE_END if "premature EOF" in text else EventRejected(
            "malformed_json", text)
    except ValueError as exc:
        error = EventRejected("invalid_otlp", str(exc))
    else:
        error = None
    line.drain()
    return ([], error) if error is not None else (spans, None)


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
