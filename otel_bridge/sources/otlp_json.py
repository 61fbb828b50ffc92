"""OTLP/JSON from files or stdin: the Collector file exporter's format (one
`ExportTraceServiceRequest` per line), or one JSON document per file."""

from __future__ import annotations

import itertools
import json
from typing import Callable, Iterable, Iterator

from otel_bridge.model.events import EventRejected
from otel_bridge.model.otlp import request_from_json, spans_from_request
from otel_bridge.model.spans import Span
from otel_bridge.sources.jsonl import Line

Reject = Callable[[Line, EventRejected], None]


# How much of a source is held to try it as one pretty-printed document.
MAX_DOCUMENT_BYTES = 64 << 20


def parse_spans(lines: Iterable[Line], on_reject: Reject) -> Iterator[tuple[Line, Span]]:
    """The spans on these lines, each with the line it came from.

    Each line is an OTLP/JSON request. A source whose first line is not a
    whole JSON value is first tried as one (pretty-printed) document; if it is
    not one either, its lines are read one by one, so a bad first line of a
    JSON-lines file costs that line only."""
    for _, source_lines in itertools.groupby(lines, key=lambda line: line.source):
        first = next(source_lines)
        if first.data is not None and _loads(first) is _MALFORMED:
            held = [first]
            size = first.size
            for line in source_lines:
                held.append(line)
                size += line.size
                if line.data is None or size > MAX_DOCUMENT_BYTES:
                    break
            document = _document(held)
            if document is not _MALFORMED:
                yield from _request(first, document, on_reject)
                yield from _each_line(source_lines, on_reject)
                continue
            source_lines = itertools.chain(held, source_lines)
        else:
            source_lines = itertools.chain([first], source_lines)
        yield from _each_line(source_lines, on_reject)


def _each_line(lines: Iterable[Line], on_reject: Reject) -> Iterator[tuple[Line, Span]]:
    for line in lines:
        parsed = _loads(line)
        if parsed is _TOO_LARGE:
            on_reject(line, EventRejected("too_large", f"line of {line.size} bytes is over the limit"))
        elif parsed is _MALFORMED:
            on_reject(line, EventRejected("malformed_json", "not a JSON value"))
        else:
            yield from _request(line, parsed, on_reject)


_MALFORMED, _TOO_LARGE = object(), object()


def _loads(line: Line) -> object:
    if line.data is None:
        return _TOO_LARGE
    try:
        return json.loads(line.data)
    except ValueError:
        return _MALFORMED


def _document(lines: list[Line]) -> object:
    if any(line.data is None for line in lines):
        return _MALFORMED
    try:
        return json.loads(b"".join(line.data for line in lines))
    except ValueError:
        return _MALFORMED


def _request(line: Line, obj: object, on_reject: Reject) -> Iterator[tuple[Line, Span]]:
    if not isinstance(obj, dict):
        on_reject(line, EventRejected(
            "not_an_object", f"expected a JSON object, got {type(obj).__name__}"))
        return
    try:
        spans = [span for _, span in spans_from_request(request_from_json(obj))]
    except ValueError as exc:
        on_reject(line, EventRejected("invalid_otlp", str(exc)))
        return
    for span in spans:
        yield line, span
