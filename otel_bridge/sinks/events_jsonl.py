"""Prefect events as JSON lines, as Prefect serialises them."""

from __future__ import annotations

from typing import IO, Sequence

from otel_bridge.model.events import Event
from otel_bridge.sinks import Sink

__all__ = ["EventsJsonlWriter"]


class EventsJsonlWriter(Sink[Event]):
    def __init__(self, stream: IO[str]):
        self._stream = stream
        self.events_written = 0

    def export(self, events: Sequence[Event]) -> None:
        for event in events:
            self._stream.write(event.model_dump_json(exclude={"received"}) + "\n")
            self.events_written += 1
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()
