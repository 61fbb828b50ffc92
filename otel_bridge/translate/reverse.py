"""OpenTelemetry spans -> Prefect task-run state events (pure).

Three kinds of span, told apart by what they carry (docs/mapping.md: "Reverse"):

- made by otel-bridge: the run's facts and each state rebuild the events
  exactly as they went in (`span_layout`; flow-run events too). Spans of
  otel-bridge 0.1, whose span events carried each whole event, are read too;
- made by Prefect itself (`RunTelemetry`: `prefect.run.id`, `prefect.run.type`,
  span events named after states with `prefect.state.*`): a task span becomes
  that task run's events, with Prefect's own state ids as event ids, so they
  join the events Prefect emitted; flow spans give nothing, since flow-run
  states belong to Prefect's server;
- any other span: a task run that is Running at the span's start, passes
  through the states its span events name, and ends Completed, or Failed with
  the status message when the status is ERROR. Its ids derive from the trace
  and span ids, so the same span always gives the same events.
"""

from __future__ import annotations

import json
import re
from typing import Iterator, Mapping, Optional, Sequence
from uuid import UUID

from opentelemetry.trace import StatusCode

from otel_bridge.model.events import (
    PREFECT_TRACEPARENT_LABEL,
    Event,
    EventRejected,
    Labels,
    validate_event,
)
from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.model.states import KNOWN_STATE_NAMES, StateType
from otel_bridge.translate.forward import span_traceparents
from otel_bridge.translate.ids import uuid_for
from otel_bridge.translate.span_layout import (
    ATTR_EVENT_PATCH,
    ATTR_STATE_ID,
    RUN_KIND_PREFIXES,
    carried_state_events,
    iter_rebuilt_events,
    patched_event,
)
from otel_bridge.translate.task_run_events import (
    StateRecord,
    TaskRunRecord,
    task_run_state_events,
)
from otel_bridge.translate.times import from_unix_nano

# The span event attributes of otel-bridge 0.1's spans (each event whole).
_V1_EVENT_ID = "prefect.event.id"
_V1_EVENT_FOLLOWS = "prefect.event.follows"
_V1_EVENT_PAYLOAD = "prefect.event.payload"
_V1_RELATED = "prefect.related"
_V1_EVENT_FIELDS = frozenset({_V1_EVENT_ID, _V1_EVENT_FOLLOWS, _V1_EVENT_PAYLOAD, _V1_RELATED})


def events_from_spans(spans: Sequence[Span]) -> list[Event]:
    """The Prefect events for these spans, span by span in the order given.

    Spans of one trace may be passed together: a Prefect task span then finds
    its flow run through its parent span. Raises `EventRejected` for a span
    that claims to carry events but does not hold valid ones."""
    by_id = {span.span_id: span for span in spans}
    return [event for span in spans for event in events_from_span(span, by_id)]


def events_from_span(span: Span, by_id: Mapping[int, Span] = {}) -> list[Event]:
    """The Prefect events for one span; `by_id` holds the other spans of its
    trace that are at hand, by span id. Raises `EventRejected`."""
    return list(iter_events_from_span(span, by_id))


def iter_events_from_span(span: Span, by_id: Mapping[int, Span] = {}) -> Iterator[Event]:
    """`events_from_span` one event at a time (a span can hold a thousand
    states), for a caller that shares its thread with others. Raises
    `EventRejected` while it is iterated: take all or none."""
    if is_bridge_span(span):
        return _iter_bridge_events(span)
    run_type = _prefect_run_type(span)
    try:
        if run_type == "task":
            return iter(_events_from_prefect_span(span, by_id))
        if run_type is None:
            return iter(_events_from_foreign_span(span))
    except EventRejected:
        raise
    # A sender's span can hold anything: a run id that is no UUID, a time
    # past what Prefect dates, a number where text belongs.
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise EventRejected("invalid_span", f"{type(exc).__name__}: {exc}") from None
    return iter(())  # Prefect's flow spans: flow-run states are the server's own


# -- spans made by otel-bridge ------------------------------------------------


def is_bridge_span(span: Span) -> bool:
    """Whether otel-bridge made this span."""
    return _bridge_run_kind(span) is not None or any(
        _V1_EVENT_ID in e.attributes for e in span.events)


def _bridge_run_kind(span: Span) -> Optional[str]:
    resource_id = span.attributes.get("prefect.resource.id")
    if not isinstance(resource_id, str):
        return None
    for prefix, kind in RUN_KIND_PREFIXES.items():
        if resource_id.startswith(prefix):
            return kind if any(ATTR_STATE_ID in e.attributes for e in span.events) else None
    return None


def events_from_bridge_span(span: Span) -> list[Event]:
    """The events a span made by the forward bridge came from, exactly."""
    return list(_iter_bridge_events(span))


def _iter_bridge_events(span: Span) -> Iterator[Event]:
    kind = _bridge_run_kind(span)
    if kind is None:
        return (_v1_event(e) for e in span.events if _V1_EVENT_ID in e.attributes)
    span_events = carried_state_events(span.events)
    try:
        rebuilt: Iterator[Optional[Event]] = iter_rebuilt_events(
            kind, span.attributes, span_events,
            span_traceparents(span.trace_id, span.span_id, span.links))
    except EventRejected:
        # As the forward bridge does when the builders cannot take a span:
        # each event then comes whole in its patch, or the span is refused.
        rebuilt = iter([None] * len(span_events))
    return (patched_event(base, span_event.attributes.get(ATTR_EVENT_PATCH))
            for base, span_event in zip(rebuilt, span_events))


def _v1_event(span_event: SpanEvent) -> Event:
    """An event as otel-bridge 0.1 carried it: whole, on its span event."""
    attrs = span_event.attributes
    related = attrs.get(_V1_RELATED)
    try:
        payload = json.loads(attrs.get(_V1_EVENT_PAYLOAD, "{}"))
        related = json.loads(related) if isinstance(related, str) else []
    except ValueError as exc:
        raise EventRejected(
            "invalid_event", f"span event {span_event.name}: payload or related is not JSON ({exc})"
        ) from None
    return validate_event({
        "occurred": from_unix_nano(span_event.time_unix_nano),
        "event": span_event.name,
        "resource": {k: v for k, v in attrs.items() if k not in _V1_EVENT_FIELDS},
        "related": related,
        "payload": payload,
        "id": attrs[_V1_EVENT_ID],
        "follows": attrs.get(_V1_EVENT_FOLLOWS),
    })


# -- spans made by Prefect's RunTelemetry -------------------------------------


def _prefect_run_type(span: Span) -> Optional[str]:
    run_type = span.attributes.get("prefect.run.type")
    if run_type in ("task", "flow") and isinstance(span.attributes.get("prefect.run.id"), str):
        return run_type
    return None


def _events_from_prefect_span(span: Span, by_id: Mapping[int, Span]) -> list[Event]:
    run_id = UUID(span.attributes["prefect.run.id"])
    name = str(span.attributes.get("prefect.run.name") or span.name)
    context, parents = _prefect_context(span, by_id)
    tags = span.attributes.get("prefect.tags") or ()
    states = [
        StateRecord(
            type=_state_type(e.attributes.get("prefect.state.type"), e.name),
            name=str(e.attributes.get("prefect.state.name") or e.name),
            timestamp=from_unix_nano(e.time_unix_nano),
            id=UUID(str(e.attributes["prefect.state.id"])),
            message=str(e.attributes.get("prefect.state.message") or ""),
        )
        for e in sorted(span.events, key=lambda e: e.time_unix_nano)
        if "prefect.state.id" in e.attributes
    ]
    run = TaskRunRecord(
        id=run_id,
        name=name,
        # Prefect's spans do not carry the task key; the run name without its
        # 3-character suffix is the task's name.
        task_key=re.sub(r"-[0-9a-f]{3}$", "", name),
        dynamic_key=str(run_id),
        tags=[str(t) for t in tags] if isinstance(tags, (list, tuple)) else (),
        labels={PREFECT_TRACEPARENT_LABEL: _traceparent(span)},
        task_inputs={"__parents__": parents} if parents else {},
        context=context,
    )
    return task_run_state_events(run, states)


def _prefect_context(span: Span, by_id: Mapping[int, Span]) -> tuple[list[Labels], list[dict]]:
    """Related flow run and enclosing task run, from the parent spans present."""
    context: list[Labels] = []
    parents: list[dict] = []
    parent = by_id.get(span.parent_span_id) if span.parent_span_id else None
    if parent is not None and _prefect_run_type(parent) == "task":
        parents.append({"input_type": "task_run", "id": parent.attributes["prefect.run.id"]})
    while parent is not None and _prefect_run_type(parent) == "task":
        parent = by_id.get(parent.parent_span_id) if parent.parent_span_id else None
    if parent is not None and _prefect_run_type(parent) == "flow":
        context.append({
            "prefect.resource.id": f"prefect.flow-run.{parent.attributes['prefect.run.id']}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": str(parent.attributes.get("prefect.run.name") or parent.name),
        })
    if parents:
        context.append({"prefect.resource.id": f"prefect.task-run.{parents[0]['id']}",
                        "prefect.resource.role": "task-run"})
    return context, parents


# -- any other span -----------------------------------------------------------


def _events_from_foreign_span(span: Span) -> list[Event]:
    ids = (format(span.trace_id, "032x"), format(span.span_id, "016x"))
    run_id = uuid_for("task-run", *ids)
    start = from_unix_nano(span.start_time_unix_nano)
    end = max(start, from_unix_nano(span.end_time_unix_nano))
    states = [StateRecord(StateType.RUNNING, "Running", start, uuid_for("event", *ids, "0"))]
    for span_event in sorted(span.events, key=lambda e: e.time_unix_nano):
        named = _named_state(span_event)
        if named is not None and not states[-1].type.is_terminal:
            state_type, name = named
            states.append(StateRecord(
                state_type, name, max(start, from_unix_nano(span_event.time_unix_nano)),
                uuid_for("event", *ids, str(len(states))),
                message=str(span_event.attributes.get("prefect.state.message") or ""),
            ))
    if not states[-1].type.is_terminal:
        failed = span.status_code is StatusCode.ERROR
        states.append(StateRecord(
            StateType.FAILED if failed else StateType.COMPLETED,
            "Failed" if failed else "Completed",
            max(end, states[-1].timestamp),
            uuid_for("event", *ids, str(len(states))),
            message=(span.status_message or _exception_message(span)) if failed else "",
        ))
    parents = []
    context: list[Labels] = []
    if span.parent_span_id:
        parent_id = uuid_for("task-run", ids[0], format(span.parent_span_id, "016x"))
        parents.append({"input_type": "task_run", "id": str(parent_id)})
        context.append({"prefect.resource.id": f"prefect.task-run.{parent_id}",
                        "prefect.resource.role": "task-run"})
    tags = span.attributes.get("tags")
    run = TaskRunRecord(
        id=run_id,
        name=span.name or "span",
        task_key=span.name or "span",
        dynamic_key=str(run_id),
        tags=[str(t) for t in tags] if isinstance(tags, (list, tuple)) else (),
        labels={PREFECT_TRACEPARENT_LABEL: _traceparent(span)},
        task_inputs={"__parents__": parents} if parents else {},
        expected_start_time=start,
        context=context,
    )
    return task_run_state_events(run, states)


def _named_state(span_event: SpanEvent) -> Optional[tuple[StateType, str]]:
    """The state a span event names: by `prefect.state.name`/`.type`
    attributes, or by being called after a known state ("Retrying")."""
    name = span_event.attributes.get("prefect.state.name") or span_event.name
    if not isinstance(name, str):
        return None
    if "prefect.state.type" in span_event.attributes:
        return _state_type(span_event.attributes["prefect.state.type"], name), name
    if name in KNOWN_STATE_NAMES:
        return KNOWN_STATE_NAMES[name], name
    return None


def _exception_message(span: Span) -> str:
    for event in span.events:
        if event.name == "exception":
            kind = event.attributes.get("exception.type", "")
            message = event.attributes.get("exception.message", "")
            return f"{kind}: {message}" if kind else str(message)
    return ""


def _state_type(value: object, name: str) -> StateType:
    text = str(value or "").removeprefix("StateType.")
    try:
        return StateType(text)
    except ValueError:
        if name in KNOWN_STATE_NAMES:
            return KNOWN_STATE_NAMES[name]
        raise EventRejected("unknown_state_type", f"state {name!r} has type {value!r}") from None


def _traceparent(span: Span) -> str:
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-01"
