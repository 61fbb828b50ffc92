"""JSON lines from files or stdin, with where each line came from.

A line longer than `max_line_bytes` is never held in memory whole: it is read
through in chunks and reported as oversized, and the lines after it are read
as usual.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

from otel_bridge.model.events import (
    MAX_EVENT_SIZE_BYTES,
    Event,
    EventRejected,
    parse_wire_event,
)

# Room for a maximal event plus what a ReceivedEvent or a websocket frame adds.
DEFAULT_MAX_LINE_BYTES = MAX_EVENT_SIZE_BYTES + 64 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Line:
    source: str  # file name, or "-" for stdin
    number: int  # 1-based
    data: Optional[bytes]  # None when the line was over the limit
    size: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.number}"


def read_lines(
    sources: Iterable[str], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[Line]:
    """Non-blank lines of each source in turn ("-" is stdin)."""
    for source in sources:
        if source == "-":
            yield from _lines(sys.stdin.buffer, "-", max_line_bytes)
        else:
            with open(source, "rb") as stream:
                yield from _lines(stream, source, max_line_bytes)


def _lines(stream: BinaryIO, source: str, limit: int) -> Iterator[Line]:
    number = 0
    while True:
        data = stream.readline(limit + 1)
        if not data:
            return
        number += 1
        if len(data) > limit and not data.endswith(b"\n"):
            size = len(data)
            while not data.endswith(b"\n"):
                data = stream.readline(_CHUNK)
                if not data:
                    break
                size += len(data)
            yield Line(source, number, None, size)
            continue
        if data.strip():
            yield Line(source, number, data, len(data))


Reject = Callable[[Line, EventRejected], None]


def parse_events(lines: Iterable[Line], on_reject: Reject) -> Iterator[tuple[Line, Event]]:
    """The events on these lines, each with its line; every line that is not
    an event goes to `on_reject` (websocket control frames are passed over)."""
    for line in lines:
        if line.data is None:
            on_reject(
                line,
                EventRejected("too_large", f"line of {line.size} bytes is over the limit"),
            )
            continue
        try:
            event = parse_wire_event(line.data)
        except EventRejected as rejected:
            on_reject(line, rejected)
            continue
        if event is not None:
            yield line, event
