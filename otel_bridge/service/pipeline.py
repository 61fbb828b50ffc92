"""Intake for both directions, between the sources and the outbox.

Forward: events -> `Assembler` -> finished spans -> outbox ("span").
Reverse: spans -> `events_from_span` -> events -> outbox ("event").

The assembler's journal is the `Store`, so every event kept and every span
emitted is on disk in the same transaction as the intake that caused it. A
method returns once its input is committed: a caller may then acknowledge it
(HTTP 200, OTLP success), and a crash after that loses nothing.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional, Sequence
from uuid import UUID

import pydantic_core
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.model.events import Event, EventRejected
from otel_bridge.model.otlp import span_from_proto
from otel_bridge.model.otlp_protobuf import Unencodable, encode_span
from otel_bridge.model.spans import Span, SpanEvent, SpanLink
from otel_bridge.service.metrics import Metrics, event_label
from otel_bridge.service.store import Store
from otel_bridge.translate.assembler import Assembler, AssemblerOptions
from otel_bridge.translate.reverse import events_from_span

__all__ = ["EVENT", "SPAN", "Intake", "Pipeline", "decode", "encoded_span"]

logger = logging.getLogger(__name__)

SPAN, EVENT = "span", "event"


def decode(kind: str, body: bytes) -> Span | Event:
    """An outbox item as its sink takes it. A span is kept as its OTLP
    `Span` message (`model.otlp_protobuf`): the OTLP sink sends those bytes
    as they are, and a span OTLP cannot carry is found when the run closes,
    not at each delivery attempt. Stores written before that keep compact
    JSON of the span's fields, which starts with `[`, as no `Span` message
    does (its first field is tag 0x0a)."""
    if kind == EVENT:
        return Event.model_validate_json(body)
    if body[:1] != b"[":
        return span_from_proto(ProtoSpan.FromString(body))
    (trace_id, span_id, parent, name, start, end, attributes, events, links, span_kind, status,
     message) = pydantic_core.from_json(body)
    return Span(
        int(trace_id, 16), int(span_id, 16), None if parent is None else int(parent, 16), name,
        start, end, attributes,
        tuple(SpanEvent(*e) for e in events),
        tuple(SpanLink(int(t, 16), int(s, 16), a, f) for t, s, a, f in links),
        SpanKind(span_kind), StatusCode(status), message,
    )


def encoded_span(body: bytes) -> bytes:
    """An outbox span as its OTLP `Span` message (`decode` says why)."""
    if body[:1] != b"[":
        return body
    span = decode(SPAN, body)
    assert isinstance(span, Span)
    return encode_span(span)


@dataclass
class Intake:
    """What became of a batch of input."""

    accepted: int = 0
    rejected: list[tuple[int, EventRejected]] = field(default_factory=list)  # (index, why)


class Pipeline:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        options: AssemblerOptions = AssemblerOptions(),
        outbox_max_bytes: int = 1024**3,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.metrics = metrics
        self.outbox_max_bytes = outbox_max_bytes
        self._options, self._clock = options, clock
        self.assembler = self._assembler_from_store()
        self.on_output: Callable[[str], None] = lambda kind: None  # wakes a delivery

    def _assembler_from_store(self) -> Assembler:
        assembler = Assembler(self._options, self._clock, on_set_aside=self._set_aside,
                              journal=self)
        assembler.restore(self.store.open_events(), self.store.finished_runs())
        return assembler

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The store's transaction, with the assembler held to it: if the
        transaction rolls back, the assembler is made again from the store,
        so memory never holds an event or a closed run the disk does not (a
        run kept in memory only would be lost at a restart, or its later
        events taken for late ones)."""
        try:
            with self.store.transaction():
                yield
        except BaseException:
            counts = self.assembler.counts
            self.assembler = self._assembler_from_store()
            self.assembler.counts = counts
            raise

    # -- forward --------------------------------------------------------------------

    def take_events(self, events: Sequence[Event], source: str,
                    raws: Optional[Sequence[Optional[bytes]]] = None) -> Intake:
        """`raws`: the JSON each event was parsed from, when the source has
        it; kept as it is (nothing serialised again)."""
        intake = Intake()
        now = datetime.now(timezone.utc)
        with self._transaction():
            for index, event in enumerate(events):
                self.metrics.events_in.labels(source, event_label(event.event)).inc()
                self.metrics.event_lag.observe(max(0.0, (now - event.occurred).total_seconds()))
                duplicates = self.assembler.counts["events_duplicate"]
                try:
                    self.assembler.add(event, raws[index] if raws is not None else None)
                except EventRejected as exc:
                    self.reject(source, exc.reason)
                    intake.rejected.append((index, exc))
                    continue
                if self.assembler.counts["events_duplicate"] > duplicates:
                    self.metrics.events_duplicate.inc()
                intake.accepted += 1
        return intake

    def tick(self, watermark: Optional[datetime] = None) -> None:
        """Emit what is due: runs that lingered long enough (and are behind
        the source's watermark), runs timed out."""
        with self._transaction():
            self.assembler.expire(watermark)

    def flush_finished(self, watermark: Optional[datetime] = None) -> None:
        with self._transaction():
            self.assembler.flush_finished(watermark)

    # -- reverse ---------------------------------------------------------------------

    def take_spans(self, spans: Sequence[Span], transport: str) -> Intake:
        intake = Intake()
        # A Prefect task span finds its flow run through its parent span.
        by_id = {span.span_id: span for span in spans}
        with self.store.transaction():
            for index, span in enumerate(spans):
                self.metrics.spans_in.labels(transport).inc()
                try:
                    events = events_from_span(span, by_id)
                except EventRejected as exc:
                    self.reject(f"otlp-{transport}", exc.reason)
                    intake.rejected.append((index, exc))
                    continue
                for event in events:
                    self._put(EVENT, event.model_dump_json(exclude={"received"}).encode(),
                              event.occurred.timestamp(),
                              {"event_id": str(event.id), "event": event.event,
                               "resource_id": event.resource_id})
                intake.accepted += 1
        return intake

    # -- both --------------------------------------------------------------------------

    def reject(self, endpoint: str, reason: str, count: int = 1) -> None:
        self.metrics.inputs_rejected.labels(endpoint, reason).inc(count)

    # Journal (see Assembler): the store follows every change of the assembler.
    def kept(self, resource_id: str, event: Event, raw: bytes) -> None:
        self.store.keep_event(resource_id, event, raw)

    def emitted(self, resource_id: str, event_ids: frozenset[UUID], span: Span) -> None:
        self.store.close_run(resource_id, event_ids)
        self.metrics.spans_built.labels(span.attributes.get("otel_bridge.synthetic.end", "final")).inc()
        what = {"trace_id": span.trace_id_hex, "span_id": span.span_id_hex, "span_name": span.name,
                "resource_id": resource_id}
        try:
            body = encode_span(span)
        except Unencodable as exc:  # this span alone: the runs due with it still go
            self.metrics.dropped.labels(SPAN, "unencodable").inc()
            logger.error("a span OTLP cannot carry is set aside", extra={**what, "error": str(exc)})
            return
        self._put(SPAN, body, span.end_time_unix_nano / 1e9, what)

    def _put(self, kind: str, body: bytes, stamp: float, what: dict) -> None:
        """`what` names the item in the log line if it has to be dropped."""
        if self.store.outbox_bytes(kind) + len(body) > self.outbox_max_bytes:
            self.metrics.dropped.labels(kind, "outbox_full").inc()
            logger.error("outbox full: %s dropped", kind,
                         extra={"kind": kind, **what, "outbox_bytes": self.store.outbox_bytes(kind),
                                "outbox_max_bytes": self.outbox_max_bytes})
            return
        self.store.put(kind, body, stamp)
        self.on_output(kind)

    def _set_aside(self, event: Event, reason: str) -> None:
        self.metrics.events_set_aside.labels(reason).inc()
        logger.warning("event set aside (%s)", reason,
                       extra={"event_id": str(event.id), "event": event.event,
                              "resource_id": event.resource_id, "reason": reason})
