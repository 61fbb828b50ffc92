"""Where spans and events go: OTLP export, OTLP/JSON files, a tree on the
terminal; Prefect's events API, event JSON lines.

Every sink implements `Sink`, declared here the way the OpenTelemetry SDK
declares its `SpanExporter`; `sinks.factory.open_sink` opens one by name.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol, Sequence, TypeVar, runtime_checkable

__all__ = ["Sink"]

Item = TypeVar("Item", contravariant=True)


@runtime_checkable
class Sink(Protocol[Item]):
    """Takes spans (`Sink[Span]`) or events (`Sink[Event]`) in batches.

    `export` returns once the sink has the items (written, or confirmed by
    the endpoint) and raises when it could not take them all: a caller that
    keeps them (the service's outbox) sends them again. Synchronous: the
    service runs each sink on a thread of its own. `close` flushes and lets
    go of connections and files; the sink takes nothing after it.
    """

    @abstractmethod
    def export(self, items: Sequence[Item]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
