"""Dual emission inside real Prefect (3.9.x): one line makes an unchanged
flow's task runs produce otel-bridge's spans in process.

    import otel_bridge.engine.prefect
    otel_bridge.engine.prefect.enable()   # before the flow runs

    @flow
    def etl(): ...

What it does, per task run:

* While the task runs, the span Prefect's own `RunTelemetry` makes current
  (it wraps the task body in `trace.use_span`) is a span context with
  otel-bridge's deterministic ids: trace id of the flow run, span id of the
  task run (`otel_bridge.translate.ids`). So a span the user opens inside the
  task is a child of the task run's span, and the `__OTEL_TRACEPARENT` label
  Prefect puts on the task run (and so on its events) names that same span,
  which the forward bridge recognises as itself (no link, no reparenting).
* Prefect's events worker hands every event it sends to otel-bridge as well.
  When a task run's final state event has been sent, the run's span is
  recorded through the OpenTelemetry SDK with exactly the content the sidecar
  would give it: `run_span` of the very events Prefect sent (name,
  start/end, attributes, span events, status). A run that is also seen by a
  sidecar gives one span, not two.

Spans need an OpenTelemetry SDK `TracerProvider`: the one passed to
`enable`, else the global one, else (with `from_env=True`, the default) one
set up from the standard `OTEL_*` variables and installed globally. Flow runs
keep Prefect's own flow span, if Prefect makes one.

Prefect 3.9.1 offers no public hook for either half: `EventsWorker`'s client
override cannot be used to observe events (`emit_event` only emits when the
worker's client type is one of Prefect's own classes, by identity) and
`RunTelemetry` always takes its tracer from the global provider. So `enable`
wraps two methods, in `_install` below and nowhere else:
`prefect.telemetry.run_telemetry.RunTelemetry._start_span` (task runs only)
and `prefect.events.worker.EventsWorker._handle` (after the event is sent).
`disable` restores them.

Private methods change without notice, so `enable` wraps them only in the
Prefect versions the tests ran with (`TESTED_PREFECT_VERSIONS`). In any
other, it logs one warning and leaves Prefect as it is: Prefect's own
telemetry, if any, goes on unchanged, and a sidecar still makes otel-bridge's
spans from the run's events. A half-working wrap would be worse: a span
context Prefect no longer makes current, or spans that no longer match the
sidecar's, would break the traces silently.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import threading
from typing import Any, Optional
from uuid import UUID

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_bridge.prefect_client import ui_url
from otel_bridge.model.events import EventRejected
from otel_bridge.model.spans import Span
from otel_bridge.translate.forward import (
    TASK_RUN,
    ForwardOptions,
    RunKey,
    is_final,
    is_final_state,
    run_key,
    run_span,
)
from otel_bridge.translate.ids import span_id_for, trace_id_for

from ._prefect_events import TASK_RUN_PREFIX, is_task_run_state, read_prefect
from ._tracing import bridge_tracer, record_span, tracer_provider_from_env

__all__ = ["TESTED_PREFECT_VERSIONS", "TaskRunSpan", "aflush", "disable", "enable", "flush",
           "is_enabled", "prefect_version_supported"]

log = logging.getLogger("otel_bridge.engine.prefect")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class TaskRunSpan(NonRecordingSpan):
    """What Prefect's task engine holds and makes current while a task runs:
    the task run's span context, with otel-bridge's ids. Prefect's own calls
    on it (state events, status, end) are ignored: the recorded span is made
    from the run's events once its final state has been sent."""

    def __init__(self, context: SpanContext, task_run_id: UUID, parent_span_id: Optional[int]):
        super().__init__(context)
        self.task_run_id = task_run_id
        self.parent_span_id = parent_span_id

    def __repr__(self) -> str:
        return f"TaskRunSpan({self.task_run_id})"


class _Bridge:
    """The state of one `enable`: the provider, and the events of the task
    runs whose span is open."""

    def __init__(self, provider: Optional[trace.TracerProvider],
                 options: ForwardOptions = ForwardOptions()):
        self.provider = provider
        self.options = options
        self._lock = threading.Lock()
        self._open: dict[str, TaskRunSpan] = {}  # resource id -> span context
        # resource id -> the events sent so far (Prefect's `Event` objects)
        self._events: dict[str, list[Any]] = {}
        self.spans_recorded = 0
        self.errors = 0

    # -- in the task's context (Prefect's RunTelemetry._start_span) ---------

    def start(self, run: Any) -> Optional[TaskRunSpan]:
        """The span context of a task run that is starting (None: no SDK)."""
        if bridge_tracer(self.provider) is None:
            return None
        resource_id = f"prefect.{TASK_RUN}.{run.id}"
        trace_id, parent_span_id = _placement(run, resource_id)
        span = TaskRunSpan(
            SpanContext(trace_id, span_id_for(resource_id), is_remote=False,
                        trace_flags=_SAMPLED),
            run.id, parent_span_id)
        with self._lock:
            self._open[resource_id] = span
            self._events.setdefault(resource_id, [])
        return span

    # -- in the events worker's thread (EventsWorker._handle) ---------------

    def sent(self, prefect_event: Any) -> None:
        """A Prefect event has been sent: keep it if it is a task run's state
        event, and record the run's span at its final state."""
        resource = prefect_event.resource.root
        resource_id = resource.get("prefect.resource.id", "")
        if not resource_id.startswith(TASK_RUN_PREFIX):
            return
        # Kept as Prefect made it, read once the run is over (`_finish`); an
        # event not known to be a state event is read now, to ask run_key.
        if (not is_task_run_state(prefect_event.event, resource)
                and run_key(read_prefect(prefect_event)) is None):
            return
        with self._lock:
            seen = self._events.setdefault(resource_id, [])
            seen.append(prefect_event)
            if not is_final_state(resource):
                return
            span = self._open.pop(resource_id, None)
            self._events.pop(resource_id, None)
        if span is not None:  # else: a run that never started here
            self._finish(span, RunKey(TASK_RUN, resource_id), seen)

    def _finish(self, span: TaskRunSpan, key: RunKey, sent: list[Any]) -> None:
        """Record the span of a run whose final state has been sent: the
        forward bridge's span of the events Prefect's server accepts (an
        event it would refuse is set aside and counted; if that is the final
        state, the run stays open for the next one)."""
        events, kept = [], []
        for prefect_event in sent:
            try:
                events.append(read_prefect(prefect_event))
                kept.append(prefect_event)
            except EventRejected as exc:
                self.errors += 1
                log.warning("otel-bridge: event %s of %s set aside: %s", prefect_event.id,
                            key.resource_id, exc)
        if not events or not is_final(events[-1]):  # the final state was set aside
            with self._lock:
                self._open[key.resource_id] = span
                self._events.setdefault(key.resource_id, [])[:0] = kept
            return
        self._record(span, run_span(events, self.options))

    def _record(self, started: TaskRunSpan, final: Span) -> None:
        found = bridge_tracer(self.provider)
        if found is None:
            return
        context = started.get_span_context()
        if (final.trace_id, final.span_id, final.parent_span_id) != (
            context.trace_id, context.span_id, started.parent_span_id
        ):
            log.warning("otel-bridge: task run %s was placed at %032x/%s while it ran, "
                        "its events place it at %032x/%s", started.task_run_id,
                        context.trace_id, started.parent_span_id, final.trace_id,
                        final.parent_span_id)
        if record_span(found, final):
            self.spans_recorded += 1

    def open_runs(self) -> list[UUID]:
        with self._lock:
            return [span.task_run_id for span in self._open.values()]


def _placement(run: Any, own: str) -> tuple[int, Optional[int]]:
    """`forward.placement` from the task run itself, `own` its resource id
    (its events name the same flow run and parents): under the parent task
    run if nested, else under the flow run; the trace is the flow run's."""
    flow_run = f"prefect.flow-run.{run.flow_run_id}" if run.flow_run_id else None
    parent_task = None
    for parent in (run.task_inputs or {}).get("__parents__", ()):
        input_type = getattr(parent, "input_type", None) or (
            parent.get("input_type") if isinstance(parent, dict) else None)
        parent_id = getattr(parent, "id", None) or (
            parent.get("id") if isinstance(parent, dict) else None)
        if input_type == "task_run" and parent_id:
            parent_task = f"prefect.{TASK_RUN}.{parent_id}"
            break
    root = flow_run or parent_task or own
    parent = parent_task or flow_run
    return trace_id_for(root), span_id_for(parent) if parent else None


_bridge: Optional[_Bridge] = None
_originals: dict[str, Any] = {}
_install_lock = threading.Lock()


def _install() -> None:
    """The only place otel-bridge changes Prefect: two methods wrapped, both
    calling Prefect's own code. See the module docstring for why."""
    from prefect.events.worker import EventsWorker
    from prefect.telemetry.run_telemetry import RunTelemetry

    original_start_span = RunTelemetry._start_span
    original_handle = EventsWorker._handle

    @functools.wraps(original_start_span)
    def _start_span(self, run, parameters=None):
        # Task runs get otel-bridge's span context (made current by the task
        # engine for the task body); flow runs keep Prefect's own span.
        bridge = _bridge
        if bridge is not None and self._run_type(run) == "task":
            try:
                span = bridge.start(run)
            except Exception:  # telemetry must not break the run
                bridge.errors += 1
                log.exception("otel-bridge: could not start the span of task run %s", run.id)
                span = None
            if span is not None:
                self.span = span
                traceparent = self.traceparent_from_span(span)
                if traceparent:
                    run.labels["__OTEL_TRACEPARENT"] = traceparent
                return traceparent, span
        return original_start_span(self, run, parameters)

    @functools.wraps(original_handle)
    async def _handle(self, event):
        await original_handle(self, event)
        bridge = _bridge
        if bridge is not None:
            try:
                bridge.sent(event)
            except Exception:
                bridge.errors += 1
                log.exception("otel-bridge: could not record the span for event %s", event.id)

    _originals.update(start_span=original_start_span, handle=original_handle)
    RunTelemetry._start_span = _start_span
    EventsWorker._handle = _handle


def enable(
    tracer_provider: Optional[trace.TracerProvider] = None, *, from_env: bool = True
) -> bool:
    """Switch dual emission on for the Prefect task runs of this process;
    True when it is on.

    `tracer_provider`: where the spans go; default the global provider at the
    time each span is made. If there is none (the API's default) and
    `from_env`, one is set up from the `OTEL_*` variables
    (`tracer_provider_from_env`, OTLP when an endpoint is set) and installed
    as the global provider. Calling it again changes the provider.

    The spans are the sidecar's for the same events, the link to each run's
    page included when the UI's address is known as the sidecar knows it
    (`PREFECT_UI_URL`, or derived from `PREFECT_API_URL`).

    With a Prefect version the tests did not run with (see the module's
    docstring) it does nothing, not even set up a provider, and returns
    False, having logged why (once per process)."""
    global _bridge
    if not prefect_version_supported():
        return False
    if (tracer_provider is None and from_env
            and bridge_tracer(trace.get_tracer_provider()) is None):
        tracer_provider_from_env(set_global=True)
    with _install_lock:
        if not _originals:
            _install()
        _bridge = _Bridge(tracer_provider, ForwardOptions(ui_url=ui_url()))
    return True


# The Prefect versions whose private methods `_install` wraps, as the tests
# ran with them: add a version only once they pass with it.
TESTED_PREFECT_VERSIONS = frozenset({"3.9.1"})
_warned_version: Optional[str] = None


def prefect_version_supported() -> bool:
    """Whether the installed Prefect is one `enable` wraps; logs a warning,
    once per process, when it is not."""
    global _warned_version
    try:
        version = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    if version in TESTED_PREFECT_VERSIONS:
        return True
    if _warned_version is None:
        _warned_version = version
        log.warning(
            "otel-bridge: dual emission is off: it wraps private methods of Prefect "
            "(RunTelemetry._start_span, EventsWorker._handle) and was tested with Prefect %s "
            "only, not with Prefect %s. Prefect runs as it would without otel-bridge; a "
            "sidecar (otel-bridge serve) still makes the spans from the events.",
            ", ".join(sorted(TESTED_PREFECT_VERSIONS)), version)
    return False


def disable() -> None:
    """Switch it off and restore Prefect's methods."""
    global _bridge
    with _install_lock:
        _bridge = None
        if _originals:
            from prefect.events.worker import EventsWorker
            from prefect.telemetry.run_telemetry import RunTelemetry

            RunTelemetry._start_span = _originals.pop("start_span")
            EventsWorker._handle = _originals.pop("handle")


def is_enabled() -> bool:
    return _bridge is not None


def flush(timeout: Optional[float] = 30.0) -> list[UUID]:
    """Send Prefect's pending events (so the spans of finished task runs are
    recorded) and flush the span processors. Needed only before shutting a
    TracerProvider down by hand: at interpreter exit Prefect drains its events
    before the SDK's own exit handler runs. Returns the task runs whose span
    is still open (not final yet). From async code, `await aflush()`."""
    from prefect.events.worker import EventsWorker

    waiting = EventsWorker.drain_all(timeout=timeout, at_exit=False)
    if inspect.isawaitable(waiting):  # a running event loop in this thread
        waiting.close()
        raise RuntimeError("otel_bridge.engine.prefect.flush() was called from async "
                           "code: use `await aflush()`")
    return _flush_spans()


async def aflush(timeout: Optional[float] = 30.0) -> list[UUID]:
    """`flush` for async code."""
    from prefect.events.worker import EventsWorker

    await EventsWorker.drain_all(timeout=timeout, at_exit=False)
    return _flush_spans()


def _flush_spans() -> list[UUID]:
    bridge = _bridge
    provider = (bridge.provider if bridge is not None else None) or trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush()
    return bridge.open_runs() if bridge is not None else []
