"""Streams of events -> finished spans.

`Assembler` groups a stream of events by run and decides when each run's span
is final; `forward.run_span` decides what the span says. The assembler does
no I/O and reads time only from the clock it is given, so tests drive it with
a fake clock and the sidecar with `time.monotonic`.

Rules (see docs/mapping.md, "Assembly (streams)"):
- An event id seen before is a duplicate and is ignored.
- A run whose final state has arrived waits `linger_seconds` for late states
  (RolledBack comes after Completed), then its span is emitted, once. Given
  a source's watermark, it also waits until its final state is behind it.
- A run with no event for `run_timeout_seconds` is ended as it stands and
  marked `otel_bridge.synthetic.end = "timeout"`.
- At most `max_open_runs` runs are held; past that the least recently active
  run is ended and marked `"evicted"`. At most `max_events_per_run` events are
  kept per run; the rest are counted on the span (`otel_bridge.events.dropped`).
- Events for a run whose span was already emitted are set aside and counted
  (`late`), since a span id must be exported once, with its final content.

A `Journal`, when given, is told every change of state as it happens (an
event kept, a run emitted as a span), so a service can persist open runs and
`restore` them after a restart; the assembler itself stays free of I/O.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Optional, Protocol
from uuid import UUID

from otel_bridge.model.events import Event
from otel_bridge.model.spans import Span
from otel_bridge.translate.forward import (
    ForwardOptions,
    RunKey,
    SyntheticEnd,
    is_final,
    run_key,
    run_span,
)
from otel_bridge.translate.open_run_metrics import OpenRun, open_run_of
from otel_bridge.translate.packed_events import EventPacker, event_text
from otel_bridge.translate.times import to_unix_nano

ATTR_EVENTS_DROPPED = "otel_bridge.events.dropped"


@dataclass(frozen=True)
class AssemblerOptions:
    linger_seconds: float = 5.0
    run_timeout_seconds: float = 6 * 3600.0
    max_open_runs: int = 10_000
    max_events_per_run: int = 1_000
    # How many emitted runs to remember, to tell a late event from a duplicate.
    remember_finished_runs: int = 100_000
    forward: ForwardOptions = ForwardOptions()
    # Keep each open run's latest state (`Assembler.open_run_states`), for
    # the active and stuck run metrics; off, an event costs nothing more.
    track_states: bool = False


@dataclass(slots=True)
class _OpenRun:
    key: RunKey
    # Its events, packed (`packed_events`), how many, and their ids, 16 bytes each.
    events: tuple[bytes, ...] = ()
    count: int = 0
    event_ids: bytes = b""
    last_seen: float = 0.0
    final_seen: Optional[float] = None
    final_occurred: Optional[datetime] = None
    dropped: int = 0
    state: Optional[OpenRun] = None  # its latest state, with track_states


SetAside = Callable[[Event, str], None]


@dataclass(frozen=True, slots=True)
class ClosedRun:
    """A run the assembler closed, its events still packed: what
    `build_span` makes its span of, in this process or another (an
    `Assembler(defer_spans=True)` hands these out instead of spans)."""

    resource_id: str
    frames: tuple[bytes, ...]
    reason: SyntheticEnd
    dropped: int


def build_span(closed: ClosedRun, options: ForwardOptions,
               packer: EventPacker) -> tuple[Optional[Span], list[Event]]:
    """The span of a closed run (None if it cannot be made: see `_emit`),
    and the run's events."""
    events = packer.unpack(closed.frames)
    try:
        span = run_span(events, options, synthetic_end=closed.reason)
    except Exception:  # what no rule foresaw: this run alone (`_emit`)
        return None, events
    if closed.dropped:
        span = dataclasses.replace(
            span, attributes={**span.attributes, ATTR_EVENTS_DROPPED: closed.dropped})
    return span, events


class Journal(Protocol):
    def kept(self, resource_id: str, event: Event, raw: bytes) -> None:
        """`event` now belongs to the open run `resource_id`; `raw` is JSON
        `parse_wire_event` reads back to it (what it was parsed from, when
        known)."""

    def emitted(self, resource_id: str, event_ids: frozenset[UUID],
                span: Optional[Span]) -> None:
        """The run is closed: `span` is its one export (None: it could not be
        made, and its events were set aside); `event_ids` its events."""


class Assembler:
    def __init__(
        self,
        options: AssemblerOptions = AssemblerOptions(),
        clock: Callable[[], float] = time.monotonic,
        on_set_aside: Optional[SetAside] = None,
        journal: Optional[Journal] = None,
        defer_spans: bool = False,
    ):
        self.options = options
        # Hand out `ClosedRun`s, for the caller to build (`build_span`)
        # elsewhere, in other processes say; not with a journal, which
        # must be told each span in the transaction that closes its run.
        assert not (defer_spans and journal), "a journal needs the spans"
        self._defer_spans = defer_spans
        self._journal = journal
        self.counts: Counter[str] = Counter()
        self._clock = clock
        self._on_set_aside = on_set_aside
        # Ordered by last activity: the first entry is the next to time out or
        # to be evicted.
        self._open: OrderedDict[str, _OpenRun] = OrderedDict()
        # Runs that reached a final state, ordered by when (insertion order).
        self._lingering: OrderedDict[str, float] = OrderedDict()
        # Emitted runs: their event ids, 16 bytes each in one `bytes` (a
        # tenth of a frozenset of UUIDs), to tell a duplicate from a late event.
        self._finished: OrderedDict[str, bytes] = OrderedDict()
        self._packer = EventPacker()

    @property
    def open_runs(self) -> int:
        return len(self._open)

    def open_run_states(self) -> list[tuple[str, OpenRun]]:
        """(resource id, latest state) of each open run (with
        `track_states`), final ones left out: a run lingering after its end
        is no longer active."""
        return [(resource_id, run.state) for resource_id, run in self._open.items()
                if run.state is not None and run.final_seen is None]

    def add(self, event: Event, raw: Optional[bytes] = None) -> list[Span]:
        """Take one event; returns spans it forced out (eviction), if any.
        `raw`: the JSON the event was parsed from, if the caller has it (it
        is kept, packed, instead of serialising the event again).

        Raises `EventRejected` for a run-state event that cannot be mapped."""
        self.counts["events_in"] += 1
        key = run_key(event)
        if key is None:
            self.counts["events_not_run_state"] += 1
            return []
        now = self._clock()
        finished = self._finished.get(key.resource_id)
        if finished is not None:
            if _holds(finished, event.id.bytes):
                self.counts["events_duplicate"] += 1
            else:
                self._set_aside(event, "late")
            return []
        run = self._open.get(key.resource_id)
        if run is None:
            run = self._open[key.resource_id] = _OpenRun(key)
        else:
            self._open.move_to_end(key.resource_id)
        run.last_seen = now
        id_bytes = event.id.bytes
        if _holds(run.event_ids, id_bytes):
            self.counts["events_duplicate"] += 1
            return []
        if run.count >= self.options.max_events_per_run:
            run.dropped += 1
            self._set_aside(event, "run_event_cap")
            return []
        if raw is None:
            raw = event_text(event)  # once, for the journal and the packer
        if self._journal is not None:  # first: if it fails, nothing here has changed
            self._journal.kept(key.resource_id, event, raw)
        run.events = self._packer.append(run.events, event, raw)
        run.count += 1
        run.event_ids += id_bytes
        if self.options.track_states and (
                run.state is None or to_unix_nano(event.occurred) >= run.state.entered_unix_nano):
            run.state = open_run_of(key.kind, event, run.state)
        if run.final_seen is None and is_final(event):
            run.final_seen = now
            run.final_occurred = event.occurred
            self._lingering[key.resource_id] = now
        spans = []
        while len(self._open) > self.options.max_open_runs:
            oldest = next(iter(self._open))
            spans.append(self._emit(oldest, SyntheticEnd.EVICTED))
        return _made(spans)

    def expire(self, watermark: Optional[datetime] = None,
               limit: Optional[int] = None) -> list[Span]:
        """Spans that are due now: lingered long enough, or timed out; at
        most `limit` of them (the rest stay due, for the next call).

        With a `watermark` (a source's promise that every event that occurred
        before it has been delivered), a finished run also waits until its
        final state occurred before the watermark: the earlier states a lossy
        live stream missed are then in, recovered, before the span leaves."""
        now = self._clock()
        due = []
        for resource_id, since in self._lingering.items():
            if now - since < self.options.linger_seconds or len(due) == limit:
                break
            final_occurred = self._open[resource_id].final_occurred
            if watermark is not None and final_occurred is not None and final_occurred > watermark:
                continue
            due.append(resource_id)
        spans = [self._emit(resource_id, SyntheticEnd.TIMEOUT) for resource_id in due]
        while self._open and len(spans) != limit:
            resource_id, run = next(iter(self._open.items()))
            if now - run.last_seen < self.options.run_timeout_seconds:
                break
            spans.append(self._emit(resource_id, SyntheticEnd.TIMEOUT))
        return _made(spans)

    def flush(self, reason: SyntheticEnd = SyntheticEnd.END_OF_INPUT) -> list[Span]:
        """End every open run now (end of input, or shutdown)."""
        return _made([self._emit(resource_id, reason) for resource_id in list(self._open)])

    def flush_finished(self, watermark: Optional[datetime] = None) -> list[Span]:
        """Emit, without waiting out the linger, every run whose final state
        has arrived (and is behind the `watermark`, see `expire`): a service
        stopping. The others stay open."""
        due = [resource_id for resource_id in self._lingering
               if watermark is None or self._open[resource_id].final_occurred <= watermark]
        return _made([self._emit(resource_id, SyntheticEnd.TIMEOUT) for resource_id in due])

    def restore(
        self,
        open_events: Iterable[Event],
        finished: Iterable[tuple[str, Iterable[UUID]]] = (),
    ) -> None:
        """Take back what a `Journal` persisted, without telling it again.
        Restored runs count their linger and timeout from now."""
        for resource_id, event_ids in finished:
            self._finished[resource_id] = _id_blob(event_ids)
        journal, self._journal = self._journal, None
        counts = self.counts.copy()
        try:
            for event in open_events:
                self.add(event)
        finally:
            self._journal = journal
            self.counts = counts

    def _emit(self, resource_id: str, reason: SyntheticEnd) -> Optional[Span]:
        run = self._open.pop(resource_id)
        self._lingering.pop(resource_id, None)
        self._finished[resource_id] = run.event_ids
        while len(self._finished) > self.options.remember_finished_runs:
            self._finished.popitem(last=False)
        closed = ClosedRun(resource_id, run.events, reason, run.dropped)
        self.counts["spans_out"] += 1
        if self._defer_spans:
            return closed  # type: ignore[return-value]  # (see defer_spans)
        span, events = build_span(closed, self.options.forward, self._packer)
        event_ids = frozenset(event.id for event in events)
        if span is None:
            # What no rule foresaw (a bug, or input nothing anticipated) must
            # cost this run alone: raised again at every tick, it would hold
            # back every run due with it. Its events are set aside, counted.
            self.counts["spans_out"] -= 1
            self.counts["runs_unbuildable"] += 1
            for event in events:
                self._set_aside(event, "unbuildable")
            if self._journal is not None:
                self._journal.emitted(resource_id, event_ids, None)
            return None
        if self._journal is not None:
            self._journal.emitted(resource_id, event_ids, span)
        end = span.attributes.get("otel_bridge.synthetic.end")
        if end:
            self.counts[f"spans_synthetic_end_{end}"] += 1
        return span

    def _set_aside(self, event: Event, reason: str) -> None:
        self.counts[f"events_set_aside_{reason}"] += 1
        if self._on_set_aside is not None:
            self._on_set_aside(event, reason)


def _id_blob(ids: Iterable[UUID]) -> bytes:
    return b"".join(i.bytes for i in ids)


def _holds(blob: bytes, id_bytes: bytes) -> bool:
    """Whether `id_bytes` is one of the ids in `blob` (at a multiple of 16)."""
    at = blob.find(id_bytes)
    while at != -1:
        if at % 16 == 0:
            return True
        at = blob.find(id_bytes, at + 1)
    return False


def _made(spans: list[Optional[Span]]) -> list[Span]:
    return [span for span in spans if span is not None]
