"""Where a tracker's events go: anything with `export(events)` (a
`PrefectEventSink`, an `EventsJsonlWriter`), any callable taking one `Event`,
or a JSON-lines file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

from otel_bridge.model.events import Event


@runtime_checkable
class BatchEventSink(Protocol):
    def export(self, events: Sequence[Event]) -> Any: ...


EventSink = Union[BatchEventSink, Callable[[Event], Any]]


def as_callable(sink: Optional[EventSink]) -> Optional[Callable[[Event], Any]]:
    if sink is None:
        return None
    export = getattr(sink, "export", None)  # isinstance(sink, BatchEventSink), 30x faster
    if export is not None:
        return lambda event: export((event,))
    if callable(sink):
        return sink
    raise TypeError(f"an event sink must be callable or have export(events), not {sink!r}")


class JsonlEventSink:
    """Appends each event as one JSON line, as Prefect serialises it; safe to
    share between threads and trackers."""

    def __init__(self, path: Union[str, Path]):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.events_written = 0

    def __call__(self, event: Event) -> None:
        line = event.model_dump_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.events_written += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> "JsonlEventSink":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class EventList(list):
    """Collects the events in memory (tests, custom batching)."""

    def __call__(self, event: Event) -> None:
        self.append(event)
