"""`TaskRunTracker`: one task run, its Prefect events and its live span."""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_bridge.model.events import Event, Labels
from otel_bridge.model.spans import Span
from otel_bridge.model.states import StateType
from otel_bridge.translate.forward import TASK_RUN, RunKey, placement, run_span, to_unix_nano
from otel_bridge.translate.ids import span_id_for
from otel_bridge.translate.task_run_events import (
    DEFAULT_POLICY,
    StateRecord,
    TaskRunEventBuilder,
    TaskRunRecord,
)

from ._sinks import EventSink, as_callable
from ._tracing import bridge_tracer, finish_live_span, start_span

log = logging.getLogger("otel_bridge.engine")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_current: contextvars.ContextVar[Optional["TaskRunTracker"]] = contextvars.ContextVar(
    "otel_bridge_current_task_run", default=None
)


_RANDOM_BITS = ~((0xF << 76) | (0x3 << 62)) & ((1 << 80) - 1)
_VERSION_7 = (0x7 << 76) | (0x2 << 62)
_uuid_new = UUID.__new__
_set = object.__setattr__
_SafeUUID = __import__("uuid").SafeUUID.unknown


def uuid7() -> UUID:
    """A time-ordered UUIDv7 (RFC 9562), the kind Prefect uses for its ids:
    48 bits of Unix milliseconds, version 7, 74 random bits (os.urandom),
    the RFC variant."""
    value = ((time.time_ns() // 1_000_000) << 80) | (
        int.from_bytes(os.urandom(10), "big") & _RANDOM_BITS) | _VERSION_7
    # UUID(int=value) with its range check done above (48 + 80 bits)
    uuid = _uuid_new(UUID)
    _set(uuid, "int", value)
    _set(uuid, "is_safe", _SafeUUID)
    return uuid


@dataclass(frozen=True)
class FlowRunRef:
    """The flow run a task run belongs to, as its events name it."""

    id: UUID
    name: str
    flow_name: Optional[str] = None
    flow_id: Optional[UUID] = None
    run_count: int = 1

    @property
    def resource_id(self) -> str:
        return f"prefect.flow-run.{self.id}"

    def related(self) -> list[Labels]:
        """The related resources Prefect's events worker adds for it."""
        return [dict(labels) for labels in self._related]

    @functools.cached_property
    def _related(self) -> tuple[Labels, ...]:
        out = [{"prefect.resource.id": self.resource_id,
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": self.name}]
        if self.flow_id is not None:
            flow: Labels = {"prefect.resource.id": f"prefect.flow.{self.flow_id}",
                            "prefect.resource.role": "flow"}
            if self.flow_name:
                flow["prefect.resource.name"] = self.flow_name
            out.append(flow)
        return tuple(out)


StateTypeLike = Union[StateType, str]


@functools.lru_cache(maxsize=1024)
def _task_key(task_name: str) -> str:
    """Prefect's task key shape: the name and 8 hex digits of a hash."""
    return f"{task_name}-{hashlib.sha256(task_name.encode()).hexdigest()[:8]}"


class TaskRunTracker:
    """One task run: each `set_state` builds the Prefect event exactly as
    Prefect's task engine would, hands it to the sink, and drives the run's
    OpenTelemetry span, which gets exactly the ids, parent, name, times,
    attributes, events and status the forward bridge (`run_span`) makes from
    the same events.

    As a context manager (sync or async) it sets Running on entry, makes the
    span current for the body, and sets Completed on a normal exit, Failed
    (with Prefect's message for the exception) when the body raises an
    `Exception`, Crashed for any other `BaseException`. The span starts at the
    first RUNNING-type state and ends at the final state; a run that never
    runs gets its span at the final state, as the bridge would make it.

    Spans need the OpenTelemetry SDK's `TracerProvider` (`tracer_provider`, or
    the global one); with none installed only events are emitted.

    `parent` is the enclosing task run (a tracker or a task run id); by
    default (`inherit`) the tracker whose `with` block is current. A nested
    run takes its parent's flow run, sink and tracer unless given its own.
    """

    def __init__(
        self,
        task_name: str,
        *,
        sink: Optional[EventSink] = None,
        flow_run: Optional[FlowRunRef] = None,
        parent: Union["TaskRunTracker", UUID, None] = None,
        inherit: bool = True,
        tags: Sequence[str] = (),
        labels: Optional[Mapping[str, Any]] = None,
        task_inputs: Optional[Mapping[str, Any]] = None,
        retries: int = 0,
        retry_delay_seconds: float = 0.0,
        id: Optional[UUID] = None,
        run_name: Optional[str] = None,
        task_key: Optional[str] = None,
        dynamic_key: Optional[str] = None,
        tracer_provider: Optional[trace.TracerProvider] = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        id_factory: Callable[[], UUID] = uuid7,
    ):
        if parent is None and inherit:
            parent = _current.get()
        inherited: Optional[TaskRunTracker] = None
        if isinstance(parent, TaskRunTracker):
            # a nested run shares its parent's flow run, sink and tracer
            inherited = parent
            flow_run = flow_run or parent.flow_run
            parent_id: Optional[UUID] = parent.id
        else:
            parent_id = parent
        self.flow_run = flow_run
        self.parent_id = parent_id
        self.id = id or id_factory()
        self._clock = clock
        self._new_id = id_factory
        inputs = dict(task_inputs or {})
        if parent_id is not None:
            inputs["__parents__"] = [{"input_type": "task_run", "id": str(parent_id)}]
        policy = dict(DEFAULT_POLICY)
        if retries or retry_delay_seconds:
            policy.update(max_retries=retries, retries=retries,
                          retry_delay_seconds=float(retry_delay_seconds),
                          retry_delay=retry_delay_seconds)
        self.record = TaskRunRecord(
            id=self.id,
            name=run_name or f"{task_name}-{self.id.hex[-3:]}",
            task_key=task_key or _task_key(task_name),
            dynamic_key=dynamic_key or str(self.id),
            tags=tuple(tags),
            labels=dict(labels or {}),
            task_inputs=inputs,
            empirical_policy=policy,
            flow_run_run_count=flow_run.run_count if flow_run else 0,
            expected_start_time=clock(),
            context=flow_run._related if flow_run else (),
        )
        self._builder = TaskRunEventBuilder(self.record)
        self._emit = as_callable(sink) if sink is not None or inherited is None else inherited._emit
        self._tracer = (inherited._tracer if tracer_provider is None and inherited is not None
                        else bridge_tracer(tracer_provider))
        self._lock = threading.RLock()
        self._span: Optional[trace.Span] = None
        self._final: Optional[Event] = None
        self._result_span: Optional[Span] = None
        self._place: Optional[tuple[int, Optional[int], int]] = None
        self.sink_errors = 0
        self._tokens: list = []

    # -- identity ----------------------------------------------------------

    @property
    def resource_id(self) -> str:
        return self.record.resource_id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def events(self) -> list[Event]:
        return list(self._builder.events)

    @property
    def span(self) -> Optional[trace.Span]:
        """The live span (None before the run starts or without an SDK)."""
        return self._span

    @property
    def is_final(self) -> bool:
        return self._final is not None

    def span_context(self) -> SpanContext:
        """The run's span context: valid before its span starts and with no
        SDK installed, since the ids are derived from the run."""
        trace_id, _, span_id = self._placement()
        return SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)

    def _placement(self) -> tuple[int, Optional[int], int]:
        """Trace id, parent span id and span id. The bridge's own rule, from
        the run's first event (the flow run and the parents are the same in
        every event of a run)."""
        if self._place is None:
            first = self._builder.events[:1] or [self._probe_event()]
            trace_id, parent_span_id = placement(RunKey(TASK_RUN, self.resource_id), first)
            self._place = (trace_id, parent_span_id, span_id_for(self.resource_id))
        return self._place

    def _probe_event(self) -> Event:
        probe = TaskRunEventBuilder(self.record)
        return probe.add(StateRecord(StateType.PENDING, "Pending", self.record.expected_start_time,
                                     self.id))

    # -- states ------------------------------------------------------------

    def set_state(
        self,
        type: StateTypeLike,
        name: Optional[str] = None,
        message: str = "",
        timestamp: Optional[datetime] = None,
        *,
        state_details: Optional[Mapping[str, Any]] = None,
        data: Any = None,
        id: Optional[UUID] = None,
    ) -> Event:
        """Move the run to a state: emit its event, update the span. `type`
        is a `StateType` or its value ("RUNNING"); `name` defaults to the
        type's ("Running"). Returns the event."""
        kind = type if type.__class__ is StateType else StateType(
            type.upper() if isinstance(type, str) else type)
        with self._lock:
            events = self._builder.events
            when = timestamp or self._clock()
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            if timestamp is None and events and when < events[-1].occurred:
                when = events[-1].occurred  # a clock that stepped back
            state = StateRecord(kind, name or kind.value.title(), when, id or self._new_id(),
                                message or "", dict(state_details or {}), data)
            event = self._builder.add(state)
            if self._final is None:
                if kind is StateType.RUNNING and self._span is None:
                    self._start_span(to_unix_nano(event.occurred))
                if kind.is_terminal or (kind is StateType.PENDING and state.name == "NotReady"):
                    self._final = event
                    self._finish_span()
        if self._emit is not None:
            try:
                self._emit(event)
            except Exception:  # telemetry must not break the run
                self.sink_errors += 1
                log.exception("otel-bridge: the event sink failed for %s", event.event)
        return event

    def _start_span(self, start_ns: int) -> None:
        if self._tracer is None:
            return
        # under the run's parent (a root if none), whatever is current
        trace_id, parent_span_id, span_id = self._placement()
        self._span = start_span(self._tracer, self.name, trace_id, parent_span_id, span_id,
                                start_ns)

    @property
    def result_span(self) -> Optional[Span]:
        """The span the forward bridge makes of the events so far, once the
        run is final (the live span's content); None before."""
        if self._result_span is None and self._final is not None:
            self._result_span = run_span(self._builder.events)
        return self._result_span

    def _finish_span(self) -> None:
        if self._tracer is None:
            return  # no span to drive: `result_span` is computed on demand
        final = self.result_span
        if self._span is None:  # never ran: the bridge starts it at the first event
            self._start_span(final.start_time_unix_nano)
        span = self._span
        if span is None or not span.is_recording():
            return
        finish_live_span(span, final)

    # -- context manager ---------------------------------------------------

    def _enter(self) -> "TaskRunTracker":
        events = self._builder.events
        if not events:  # Prefect's engine creates every run Pending
            self.set_state(StateType.PENDING, "Pending")
        if self._final is None and (
            events[-1].resource["prefect.state-type"] != StateType.RUNNING.value
        ):
            self.set_state(StateType.RUNNING, "Running")
        ctx = otel_context.get_current()
        if self._span is not None:
            ctx = trace.set_span_in_context(self._span, ctx)
        else:  # no SDK: still make the run's context current, for propagation
            ctx = trace.set_span_in_context(NonRecordingSpan(self.span_context()), ctx)
        self._tokens.append((otel_context.attach(ctx), _current.set(self)))
        return self

    def _exit(self, exc: Optional[BaseException]) -> None:
        try:
            if self._final is None:
                if exc is None:
                    self.set_state(StateType.COMPLETED, "Completed")
                elif isinstance(exc, Exception):
                    self.set_state(StateType.FAILED, "Failed",
                                   f"Task run encountered an exception {failure_text(exc)}")
                else:
                    self.set_state(StateType.CRASHED, "Crashed", crash_message(exc))
        finally:
            otel_token, tracker_token = self._tokens.pop()
            _current.reset(tracker_token)
            otel_context.detach(otel_token)

    def __enter__(self) -> "TaskRunTracker":
        return self._enter()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._exit(exc)

    async def __aenter__(self) -> "TaskRunTracker":
        return self._enter()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._exit(exc)

    def __repr__(self) -> str:
        return f"<TaskRunTracker {self.name} {self.resource_id}>"


def failure_text(exc: BaseException) -> str:
    """`ValueError: message`, as Prefect writes an exception in a state
    message (`prefect.states.format_exception`)."""
    return f"{type(exc).__name__}: {exc}"


def crash_message(exc: BaseException) -> str:
    """Prefect's message for a run crashed by a non-`Exception`
    (`prefect.states.exception_to_crashed_state`)."""
    import asyncio

    if isinstance(exc, asyncio.CancelledError):
        return "Execution was cancelled by the runtime environment."
    if isinstance(exc, KeyboardInterrupt):
        return "Execution was aborted by an interrupt signal."
    if isinstance(exc, SystemExit):
        return "Execution was aborted by Python system exit call."
    return f"Execution was interrupted by an unexpected exception: {failure_text(exc)}"


def current_task_run() -> Optional[TaskRunTracker]:
    """The tracker whose `with` block is running here, if any."""
    return _current.get()
