"""Prefect run-state events -> one OpenTelemetry span per run (pure).

`run_span` takes every event seen for one task run or flow run, in any order,
with repeats, and returns the span for that run. It depends on nothing but its
arguments, so the same events give the same span in any process.
docs/mapping.md is the user-facing description of these rules; keep the two
in step.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence
from uuid import UUID

from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.model.events import PREFECT_TRACEPARENT_LABEL, Event, EventRejected
from otel_bridge.model.spans import AttributeValue, Span, SpanEvent, SpanLink
from otel_bridge.model.states import STATE_TYPES_BY_VALUE, StateType
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.span_layout import (
    ATTR_EVENT_PATCH,
    FLOW_RUN,
    RUN_KIND_PREFIXES,
    TASK_RUN,
    TRACEPARENT_OF_LINK,
    TRACEPARENT_OF_SELF,
    event_patch,
    is_layout_attribute,
    rebuild_events,
    run_attributes,
    state_attributes,
    state_name,
    traceparent_of,
)
from otel_bridge.translate.times import to_unix_nano


# Span attributes longer than this are cut (the state message: its whole text
# stays in the status description and on the span event), and
# `otel_bridge.truncated.<key>` says how long the value was. Grafana Tempo
# cuts attribute values at 2,048 bytes by default, silently.
MAX_SPAN_ATTRIBUTE_CHARS = 1024
ATTR_SYNTHETIC_START = "otel_bridge.synthetic.start"
ATTR_SYNTHETIC_END = "otel_bridge.synthetic.end"
# On the link to the span Prefect's own telemetry made of the same run: that
# span's W3C traceparent as Prefect wrote it (`__OTEL_TRACEPARENT`), which
# says where the link comes from and keeps its trace flags (OTLP's encoders
# drop a link's flags).
ATTR_LINK_TRACEPARENT = "prefect.traceparent"

PrefectTraceContext = Literal["link", "adopt", "ignore"]


class SyntheticEnd(str, enum.Enum):
    """Why a span was ended without its run reaching a final state."""

    END_OF_INPUT = "end_of_input"  # the input ran out (batch conversion)
    TIMEOUT = "timeout"  # no event for the configured run timeout
    EVICTED = "evicted"  # pushed out by the cap on open runs
    SHUTDOWN = "shutdown"  # the service stopped


@dataclass(frozen=True)
class ForwardOptions:
    # What to do with the trace context Prefect itself puts on task runs when
    # an OpenTelemetry SDK is installed in the flow process: link to Prefect's
    # span (default), adopt Prefect's trace (our span becomes a child of
    # Prefect's), or ignore it.
    prefect_trace_context: PrefectTraceContext = "link"
    # The Prefect UI's address (`PREFECT_UI_URL`, or derived from
    # `PREFECT_API_URL` as Prefect derives it): each span then links to its
    # run's page.
    ui_url: Optional[str] = None


@dataclass(frozen=True, slots=True)
class RunKey:
    kind: str  # TASK_RUN or FLOW_RUN
    resource_id: str


def run_key(event: Event) -> Optional[RunKey]:
    """The run a state-change event belongs to, or None for any other event
    (heartbeats, deployments, ...), which the bridge passes over.

    Raises `EventRejected` for a run-state event that cannot be mapped."""
    resource_id = event.resource_id
    for prefix, kind in RUN_KIND_PREFIXES.items():
        if resource_id.startswith(prefix) and event.event.startswith(prefix):
            break
    else:
        return None
    state_type = event.resource.get("prefect.state-type")
    if state_type is None:
        return None  # e.g. prefect.flow-run.heartbeat
    try:
        if state_type not in STATE_TYPES_BY_VALUE:
            StateType(state_type)
    except (ValueError, TypeError):
        raise EventRejected(
            "unknown_state_type", f"{event.event} has state type {state_type!r}"
        ) from None
    return RunKey(kind, resource_id)




def state_type(event: Event) -> StateType:
    value = event.resource["prefect.state-type"]
    found = STATE_TYPES_BY_VALUE.get(value)
    return found if found is not None else StateType(value)  # raises as the enum does


def is_final(event: Event) -> bool:
    """Whether this state ends the run: a terminal type, or NotReady (an
    upstream failed, so the run will never start)."""
    return is_final_state(event.resource)


def is_final_state(resource: Mapping[str, str]) -> bool:
    """`is_final` of the event with these resource labels."""
    value = resource["prefect.state-type"]
    if value in _FINAL_TYPES:
        return True
    if value not in STATE_TYPES_BY_VALUE:
        StateType(value)  # raises as the enum does
    return value == "PENDING" and resource.get("prefect.state-name") == "NotReady"


_FINAL_TYPES = frozenset(kind.value for kind in StateType if kind.is_terminal)


def _is_not_ready(event: Event) -> bool:
    return (
        state_type(event) is StateType.PENDING
        and event.resource.get("prefect.state-name") == "NotReady"
    )


def order_events(events: Iterable[Event]) -> list[Event]:
    """Distinct events (by id) in the order they happened.

    Sorted by `occurred`; events at the same instant by their place in the
    `follows` chain, then by id, so the order never depends on arrival."""
    events = list(events)
    if _in_order(events):
        return events
    by_id: dict[UUID, Event] = {}
    for event in events:
        kept = by_id.get(event.id)
        # The same id twice with different content (a hostile or broken sender)
        # must still give one answer whatever the arrival order.
        if kept is None or _canonical(event) < _canonical(kept):
            by_id[event.id] = event
    depth: dict[UUID, int] = {}
    for event in by_id.values():
        # Walk back along `follows` to an event of known depth, the start of
        # the chain, or a cycle (which only a broken sender can make).
        chain: dict[UUID, None] = {}  # ordered, with O(1) membership
        current: Optional[Event] = event
        while current is not None and current.id not in depth and current.id not in chain:
            chain[current.id] = None
            current = by_id.get(current.follows) if current.follows else None
        base = depth[current.id] + 1 if current is not None and current.id in depth else 0
        for offset, member in enumerate(reversed(chain)):
            depth[member] = base + offset
    return sorted(by_id.values(), key=lambda e: (e.occurred, depth[e.id], str(e.id)))


def _in_order(events: list[Event]) -> bool:
    """Whether distinct events are in the order `order_events` sorts them
    into already (as one sender sends a run's events): each later than the
    one before, or at the same instant and following it."""
    ids = {event.id for event in events}
    if len(ids) != len(events):
        return False
    return all(b.occurred > a.occurred or (b.occurred == a.occurred and b.follows == a.id)
               for a, b in zip(events, events[1:]))


def _canonical(event: Event) -> str:
    return event.model_dump_json(exclude={"received"})


def run_span(
    events: Iterable[Event],
    options: ForwardOptions = ForwardOptions(),
    synthetic_end: Optional[SyntheticEnd] = None,
) -> Span:
    """The span of one run, from all the state events seen for it.

    `synthetic_end` says why the span is being ended if the run has not reached
    a final state; it is recorded on the span only in that case."""
    ordered = order_events(events)
    if not ordered:
        raise ValueError("run_span needs at least one event")
    key = run_key(ordered[0])
    assert key is not None, "run_span takes run-state events only"

    start, end, last, synthetic = span_bounds(ordered, synthetic_end)
    start_ns = to_unix_nano(start.occurred)
    end_ns = max(start_ns, to_unix_nano(last.occurred))

    span_id = span_id_for(key.resource_id)
    trace_id, parent_span_id = placement(key, ordered)
    links: tuple[SpanLink, ...] = ()
    prefect_context = _prefect_traceparent(ordered)
    if prefect_context and prefect_context[1] == span_id:
        # The label names this very span (an engine that dual-emits set it,
        # as Prefect does with its own): neither a link nor a parent.
        prefect_context = None
    if prefect_context and options.prefect_trace_context == "adopt":
        trace_id, parent_span_id = prefect_context[0], prefect_context[1]
    elif options.prefect_trace_context == "link":
        links = prefect_links(prefect_context, span_id)
    traceparents = span_traceparents(trace_id, span_id, links)

    status_code, status_message, result, error_type = _outcome(end)
    attributes = _run_attributes(key, last, result, error_type, options.ui_url)
    attributes.update(run_attributes(key.kind, ordered, last, traceparents))
    attributes.update(synthetic)

    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_span_id,
        name=_span_name(key, attributes),
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
        attributes=attributes,
        events=_state_span_events(key.kind, ordered, attributes, traceparents),
        links=links,
        kind=SpanKind.SERVER if key.kind == FLOW_RUN else SpanKind.INTERNAL,
        status_code=status_code,
        status_message=status_message,
    )


def span_traceparents(trace_id: int, span_id: int,
                      links: Sequence[SpanLink]) -> dict[str, str]:
    """The traceparents a span gives by itself, which a task run's label
    and its states' details name where Prefect's telemetry is on: its own
    (as sampled), and its link's to Prefect's span."""
    out = {TRACEPARENT_OF_SELF: traceparent_of(trace_id, span_id, 1)}
    for link in links:
        traceparent = link.attributes.get(ATTR_LINK_TRACEPARENT)
        if isinstance(traceparent, str):
            out[TRACEPARENT_OF_LINK] = traceparent
    return out


def _state_span_events(kind: str, ordered: Sequence[Event], attributes: Mapping[str, Any],
                       traceparents: Mapping[str, str]) -> tuple[SpanEvent, ...]:
    """A span event per state, and, on each, the patch from what the
    builders make of the span to the real event (`span_layout`)."""
    span_events = []
    for event in ordered:
        name = state_name(kind, event)
        span_events.append(SpanEvent(name, to_unix_nano(event.occurred),
                                     state_attributes(kind, event, name, traceparents)))
    try:
        rebuilt = rebuild_events(kind, attributes, span_events, traceparents, checked=False)
    except Exception:  # what the builders cannot take: each event whole, in its patch
        rebuilt = [None] * len(span_events)
    for span_event, event, base in zip(span_events, ordered, rebuilt):
        patch = event_patch(base, event)
        if patch is not None:
            span_event.attributes[ATTR_EVENT_PATCH] = patch
    return tuple(span_events)


def _span_name(key: RunKey, attributes: Mapping[str, Any]) -> str:
    """Low-cardinality, as the CI/CD conventions ask: a task run's span is
    named after its task, a flow run's `RUN <flow>`."""
    if key.kind == FLOW_RUN:
        flow = attributes.get("cicd.pipeline.name")
        return f"RUN {flow}" if flow else "RUN"
    name = attributes.get("cicd.pipeline.task.name") or attributes.get("prefect.resource.name")
    return str(name) if name else key.resource_id


def span_bounds(
    ordered: Sequence[Event], synthetic_end: Optional[SyntheticEnd] = None
) -> tuple[Event, Optional[Event], Event, dict[str, AttributeValue]]:
    """(start, final state or None, last, synthetic marks) of a run's span,
    from its events in `order_events` order: it starts at the first RUNNING
    state (else the first event, marked) and ends at the final state after
    the last RUNNING one (else the last event, marked)."""
    running = []
    for i, event in enumerate(ordered):
        kind = event.resource["prefect.state-type"]
        if kind == "RUNNING":
            running.append(i)
        elif kind not in STATE_TYPES_BY_VALUE:
            StateType(kind)  # raises as the enum does
    synthetic: dict[str, AttributeValue] = {}
    if running:
        start = ordered[running[0]]
        after = ordered[running[-1]:]
    else:
        start = ordered[0]
        after = ordered
        synthetic[ATTR_SYNTHETIC_START] = "no_running_state"
    end = next((e for e in after if is_final(e)), None)
    if end is None:
        synthetic[ATTR_SYNTHETIC_END] = (synthetic_end or SyntheticEnd.END_OF_INPUT).value
    # The span describes the run as of its final state; states after it
    # (RolledBack) are kept as events only, so the span's attributes do not
    # depend on whether they arrived before the span was exported.
    return start, end, end or ordered[-1], synthetic


def placement(key: RunKey, events: Sequence[Event]) -> tuple[int, Optional[int]]:
    """Trace id and parent span id: a task sits under its parent task if it is
    nested, else under its flow run; the trace is the flow run's."""
    own = key.resource_id
    if key.kind == FLOW_RUN:
        # A subflow's events name its parent only through a placeholder task
        # run that never emits events, so a subflow is the root of its own trace.
        return trace_id_for(own), None
    flow_run = parent_task = None
    for event in events:  # the first of each that any event names
        if flow_run is None:
            flow_run = event.related_in_role(FLOW_RUN) or None
        if parent_task is None:
            parent_task = _parent_task_run(event)
        if flow_run is not None and parent_task is not None:
            break
    if flow_run is not None:
        root = flow_run["prefect.resource.id"]
    else:
        root = parent_task or own
    parent = parent_task or (flow_run["prefect.resource.id"] if flow_run else None)
    return trace_id_for(root), span_id_for(parent) if parent else None




def _parent_task_run(event: Event) -> Optional[str]:
    """The task run this one was called in, from `task_inputs.__parents__`.

    Not from the related resource with role `task-run`: the events worker
    names there whatever task run was current when the event was sent, and a
    RolledBack state is sent from inside the task whose failure rolled the
    transaction back (seen in real captures)."""
    task_run = event.payload.get("task_run")
    inputs = task_run.get("task_inputs") if isinstance(task_run, dict) else None
    parents = inputs.get("__parents__") if isinstance(inputs, dict) else None
    for parent in parents if isinstance(parents, list) else ():
        if isinstance(parent, dict) and parent.get("input_type") == "task_run" and parent.get("id"):
            return f"prefect.{TASK_RUN}.{parent['id']}"
    return None


def prefect_links(prefect_context: Optional[tuple[int, int, int]],
                  span_id: int) -> tuple[SpanLink, ...]:
    """The link (default `ForwardOptions`) to the span Prefect's own trace
    context names (`_prefect_traceparent`), unless there is none or it names
    this very span."""
    if not prefect_context or prefect_context[1] == span_id:
        return ()
    return (SpanLink(trace_id=prefect_context[0], span_id=prefect_context[1],
                     trace_flags=prefect_context[2],
                     attributes={ATTR_LINK_TRACEPARENT: traceparent_of(*prefect_context)}),)


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _prefect_traceparent(events: Sequence[Event]) -> Optional[tuple[int, int, int]]:
    for event in reversed(events):
        task_run = event.payload.get("task_run")
        labels = task_run.get("labels") if isinstance(task_run, dict) else None
        value = labels.get(PREFECT_TRACEPARENT_LABEL) if isinstance(labels, dict) else None
        match = _TRACEPARENT.match(value) if isinstance(value, str) else None
        if match:
            trace_id, span_id, flags = (int(g, 16) for g in match.groups())
            if trace_id and span_id:
                return trace_id, span_id, flags
    return None


# The message Prefect's engines write for an exception:
# "Task run encountered an exception ValueError: ..." (tasks),
# "Flow run encountered an exception: ValueError: ..." (flows).
_EXCEPTION_TYPE = re.compile(r"encountered an exception:? ([A-Za-z_][\w.]*)(?::|$)")


def _outcome(end: Optional[Event]) -> tuple[StatusCode, str, Optional[str], Optional[str]]:
    """Status code, description, CICD result and error.type for a final state."""
    if end is None:
        return StatusCode.UNSET, "", None, None
    kind = state_type(end)
    name = end.resource.get("prefect.state-name", "")
    message = end.resource.get("prefect.state-message", "")
    if kind is StateType.COMPLETED:
        return StatusCode.UNSET, "", "success", None
    if kind is StateType.CANCELLED:
        return StatusCode.UNSET, "", "cancellation", None
    if _is_not_ready(end):
        return StatusCode.UNSET, "", "skip", None
    match = _EXCEPTION_TYPE.search(message)
    error_type = match.group(1) if match else name or kind.value
    if kind is StateType.CRASHED:
        return StatusCode.ERROR, message, "error", error_type
    result = "timeout" if name == "TimedOut" else "failure"
    return StatusCode.ERROR, message, result, error_type


def _run_attributes(
    key: RunKey,
    last: Event,
    result: Optional[str],
    error_type: Optional[str],
    ui_url: Optional[str],
) -> dict[str, AttributeValue]:
    """What a user searches on: the labels of the run's final state, its
    name, and the CI/CD conventions' attributes."""
    resource = last.resource
    if max(map(len, resource.values()), default=0) <= MAX_SPAN_ATTRIBUTE_CHARS and not any(
            map(is_layout_attribute, resource)):
        attributes: dict[str, AttributeValue] = dict(resource)  # nothing to cut or leave out
    else:
        attributes = {}
        for label, value in resource.items():
            if is_layout_attribute(label):
                continue  # a name the builders read: the event's patch keeps the label
            if len(value) > MAX_SPAN_ATTRIBUTE_CHARS:
                attributes[f"otel_bridge.truncated.{label}"] = len(value)
                value = value[: MAX_SPAN_ATTRIBUTE_CHARS - 3] + "..."
            attributes[label] = value
    run_id = key.resource_id.removeprefix(f"prefect.{key.kind}.")
    if "prefect.resource.name" in resource:
        attributes["prefect.run.name"] = resource["prefect.resource.name"]
    name = pipeline_name(key.kind, last)
    if key.kind == TASK_RUN:
        if name is not None:
            attributes["cicd.pipeline.task.name"] = name
        attributes["cicd.pipeline.task.run.id"] = run_id
        if result:
            attributes["cicd.pipeline.task.run.result"] = result
        if ui_url:
            attributes["cicd.pipeline.task.run.url.full"] = f"{ui_url}/runs/task-run/{run_id}"
    else:
        if name is not None:
            attributes["cicd.pipeline.name"] = name
        attributes["cicd.pipeline.run.id"] = run_id
        if result:
            attributes["cicd.pipeline.result"] = result
        if ui_url:
            attributes["cicd.pipeline.run.url.full"] = f"{ui_url}/runs/flow-run/{run_id}"
    if error_type:
        attributes["error.type"] = error_type
    return attributes


def pipeline_name(kind: str, event: Event) -> Optional[str]:
    """A task run's task name, a flow run's flow name, as an event of the
    run tells it (None if it does not): `cicd.pipeline.task.name` and
    `cicd.pipeline.name` on the run's span and its metrics."""
    if kind == TASK_RUN:
        task_key = _task_key(event)
        # task_key is "<function name>-<hash of its source>".
        return _TASK_KEY_HASH.sub("", task_key) if task_key is not None else None
    flow = event.related_in_role("flow")
    name = flow.get("prefect.resource.name") if flow else None
    return name or None


_TASK_KEY_HASH = re.compile(r"-[0-9a-f]{8}$")


def _task_key(event: Event) -> Optional[str]:
    task_run = event.payload.get("task_run")
    task_key = task_run.get("task_key") if type(task_run) is dict else None
    return task_key if isinstance(task_key, str) else None
