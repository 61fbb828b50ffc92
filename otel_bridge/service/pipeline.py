"""Intake for both directions, between the sources and the outbox.

Forward: events -> `Assembler` -> finished spans -> outbox ("span").
Reverse: spans -> `iter_events_from_span` -> events -> outbox ("event").
Logs: Prefect log lines -> checked -> outbox ("log"), made log records by
`translate.logs` on their way out (`decode`).
Run metrics: each finished run counted as its span is emitted
(`service.run_metrics`).

The assembler's journal is the `Store`, so every event kept and every span
emitted is on disk in the same transaction as the intake that caused it. A
method returns once its input is committed: a caller may then acknowledge it
(HTTP 200, OTLP success), and a crash after that loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional, Sequence
from uuid import UUID

import pydantic_core
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.model.events import Event, EventRejected
from otel_bridge.model.logs import LogRecord
from otel_bridge.model.otlp import span_from_proto
from otel_bridge.model.otlp_protobuf import Unencodable, encode_span
from otel_bridge.model.spans import Span, SpanEvent, SpanLink
from otel_bridge.service.metrics import Metrics, event_label
from otel_bridge.service.run_metrics import RunCounter
from otel_bridge.service.store import Store
from otel_bridge.service.time_slices import TimeSlices
from otel_bridge.translate.assembler import Assembler, AssemblerOptions
from otel_bridge.translate.logs import checked_log, record_of_checked
from otel_bridge.translate.reverse import iter_events_from_span

__all__ = ["EVENT", "LOG", "MAX_EVENTS_PER_REQUEST", "MAX_EVENTS_PER_SPAN", "SPAN", "Intake", "Pipeline",
           "ReversedSpans", "decode", "encoded_span", "reverse_spans"]

logger = logging.getLogger(__name__)

SPAN, EVENT, LOG = "span", "event", "log"


def decode(kind: str, body: bytes) -> Span | Event | LogRecord:
    """An outbox item as its sink takes it. A span is kept as its OTLP
    `Span` message (`model.otlp_protobuf`): the OTLP sink sends those bytes
    as they are, and a span OTLP cannot carry is found when the run closes,
    not at each delivery attempt. Stores written before that keep compact
    JSON of the span's fields, which starts with `[`, as no `Span` message
    does (its first field is tag 0x0a)."""
    if kind == EVENT:
        return Event.model_validate_json(body)
    if kind == LOG:
        # Kept as the checked log line, not the record: translation is pure,
        # so a record is the same whenever it is made. Checked on the way in,
        # not again on the way out.
        record = record_of_checked(pydantic_core.from_json(body))
        if record is None:
            raise ValueError("a log line of no run in the outbox")
        return record
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


# What one OTLP request may make: a span carries a run's states, and a run
# keeps at most `AssemblerOptions.max_events_per_run` (1,000) of them; a
# request, what a Collector's largest batches of such spans make (8,192
# spans of a few states each), about 55 MB of events at most. Past these,
# the span (or the rest of the request) is refused: 2 MB of span events once
# made 100,000 events and held the event loop for 7.7 s.
MAX_EVENTS_PER_SPAN = 1_000
MAX_EVENTS_PER_REQUEST = 50_000
# Events put in the outbox per transaction: between two, the event loop
# serves the other requests (a request is answered once all are in).
_EVENTS_PER_TRANSACTION = 500


@dataclass
class ReversedSpans:
    """The events of a request's spans, serialised for the outbox, and the
    spans refused (their index, why). Each event is a flat tuple (body,
    occurred, id, name, resource id): tuples of strings and numbers are left
    out of the cyclic GC's walks, which over 50,000 dicts held the event
    loop for 100 ms at a time."""

    spans: int
    events: list[tuple[bytes, float, str, str, str]] = field(default_factory=list)
    rejected: list[tuple[int, EventRejected]] = field(default_factory=list)


async def reverse_spans(spans: Sequence[Span]) -> ReversedSpans:
    """Each span judged alone (a span nothing can read is refused with its
    reason, never the request), within the bounds above. A big request is
    reversed a slice of time at a time, letting the event loop serve the others
    between two (a thread would contend with it for the GIL at every system
    call it makes, and its SQLite writes make many)."""
    out = ReversedSpans(len(spans))
    # A Prefect task span finds its flow run through its parent span.
    by_id = {span.span_id: span for span in spans}
    slices = TimeSlices()
    for index, span in enumerate(spans):
        try:
            if len(span.events) > MAX_EVENTS_PER_SPAN:
                raise EventRejected("too_many_events", f"{len(span.events)} span events, over "
                                                       f"{MAX_EVENTS_PER_SPAN}")
            made = []
            # A span's thousand states take more than one slice.
            for event in iter_events_from_span(span, by_id):
                if len(out.events) + len(made) >= MAX_EVENTS_PER_REQUEST:
                    raise EventRejected("too_many_events", f"the request makes over "
                                                           f"{MAX_EVENTS_PER_REQUEST} events")
                made.append((_event_body(event), event.occurred.timestamp(), str(event.id),
                             event.event, event.resource_id))
                await slices.turn()
        except EventRejected as exc:
            out.rejected.append((index, exc))
            continue
        except Exception as exc:  # what no rule foresaw: this span alone, and loudly
            logger.exception("a span could not be reversed", extra={
                "trace_id": span.trace_id_hex, "span_id": span.span_id_hex})
            out.rejected.append((index, EventRejected("invalid_span", type(exc).__name__)))
            continue
        out.events.extend(made)
        await slices.turn()
    return out


def _event_body(event: Event) -> bytes:
    """An event as Prefect's client sends it (without `received`)."""
    try:
        return event.model_dump_json(exclude={"received"}).encode()
    except pydantic_core.PydanticSerializationError:  # text UTF-8 cannot carry
        raise EventRejected("invalid_span", "text that is not Unicode (a lone surrogate)") from None


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
        # Counts each finished run in the run metrics, when they are on.
        self.run_counter: Optional[RunCounter] = None

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

    def tick(self, watermark: Optional[datetime] = None, limit: Optional[int] = None) -> int:
        """Emit what is due: runs that lingered long enough (and are behind
        the source's watermark), runs timed out; at most `limit` of them.
        Returns how many."""
        with self._transaction():
            return len(self.assembler.expire(watermark, limit))

    def flush_finished(self, watermark: Optional[datetime] = None) -> None:
        with self._transaction():
            self.assembler.flush_finished(watermark)

    # -- Prefect's log lines ---------------------------------------------------------

    def take_logs(self, logs: Sequence[Any], source: str) -> tuple[Intake, int]:
        """Put log lines in the outbox ("log"), within the caller's
        transaction; a line that is not one is refused and counted, a line of
        no run passed over. Returns what became of them and how many were of
        no run."""
        intake, no_run = Intake(), 0
        room = self.outbox_max_bytes - self.store.outbox_bytes(LOG)
        fits = []
        for index, log in enumerate(logs):
            try:
                checked = checked_log(log)
            except EventRejected as exc:
                self.reject(source, exc.reason)
                intake.rejected.append((index, exc))
                continue
            if not (checked.get("flow_run_id") or checked.get("task_run_id")):  # (log_placement's None)
                no_run += 1
                continue
            body = pydantic_core.to_json(checked)
            stamp = datetime.fromisoformat(checked["timestamp"]).timestamp()
            intake.accepted += 1
            if len(body) > room:  # dropped, counted and logged
                self._put(LOG, body, stamp, {"log_id": checked.get("id")})
                continue
            room -= len(body)
            fits.append((body, stamp))
        if fits:  # one statement for the page, not one per line
            self.store.put_many(LOG, fits)
            self.on_output(LOG)
        return intake, no_run

    # -- reverse ---------------------------------------------------------------------

    async def take_spans(self, spans: Sequence[Span], transport: str) -> Intake:
        """Reverse the spans and put their events in the outbox."""
        return await self.store_reversed(await reverse_spans(spans), transport)

    async def store_reversed(self, reversed_spans: "ReversedSpans", transport: str) -> Intake:
        """Put the events of `reverse_spans` in the outbox, a few thousand a
        transaction, letting the event loop go between two. (A crash part way
        leaves the request unanswered; the sender sends it again, and the
        events already in go out twice with the same ids, which Prefect
        takes once.)"""
        intake = Intake()
        self.metrics.spans_in.labels(transport).inc(reversed_spans.spans)
        for index, exc in reversed_spans.rejected:
            self.reject(f"otlp-{transport}", exc.reason)
            intake.rejected.append((index, exc))
        events = reversed_spans.events
        for start in range(0, len(events), _EVENTS_PER_TRANSACTION):
            if start:
                await asyncio.sleep(0)
            with self._transaction():
                room = self.outbox_max_bytes - self.store.outbox_bytes(EVENT)
                fits = []
                for body, occurred, event_id, name, resource_id in events[
                        start:start + _EVENTS_PER_TRANSACTION]:
                    if len(body) > room:  # the rest, one by one, counted and logged
                        self._put(EVENT, body, occurred, {
                            "event_id": event_id, "event": name, "resource_id": resource_id})
                        continue
                    room -= len(body)
                    fits.append((body, occurred))
                self.store.put_many(EVENT, fits)
            if fits:
                self.on_output(EVENT)
        intake.accepted = reversed_spans.spans - len(reversed_spans.rejected)
        return intake

    # -- both --------------------------------------------------------------------------

    def reject(self, endpoint: str, reason: str, count: int = 1) -> None:
        self.metrics.inputs_rejected.labels(endpoint, reason).inc(count)

    # Journal (see Assembler): the store follows every change of the assembler.
    def kept(self, resource_id: str, event: Event, raw: bytes) -> None:
        self.store.keep_event(resource_id, event, raw)

    def emitted(self, resource_id: str, event_ids: frozenset[UUID],
                span: Optional[Span]) -> None:
        self.store.close_run(resource_id, event_ids)
        if span is None:  # its events were set aside, each counted and logged
            self.metrics.dropped.labels(SPAN, "unbuildable").inc()
            logger.error("a run's span could not be made: its events are set aside",
                         extra={"resource_id": resource_id})
            return
        self.metrics.spans_built.labels(span.attributes.get("otel_bridge.synthetic.end", "final")).inc()
        if self.run_counter is not None:  # the run happened, whether OTLP can carry its span or not
            self.run_counter.span_emitted(span)
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
