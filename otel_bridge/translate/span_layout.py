"""What a run's span carries so that its events can be rebuilt, exactly.

The events of one run repeat almost everything: the run's name, key, tags,
inputs, policy and context come again in every event, and a state's payload
follows from the states before it. So a span carries each fact once:

- the run's facts, once, as span attributes (`run_attributes`), which are
  also what a user searches on;
- each state, as a span event named after it (`state_attributes`): its event
  id, its type where the name does not say it, its message, details and
  data where it has them;
- per event, whatever the event builders (`task_run_events`,
  `flow_run_events`) do not rebuild from those exactly, as a patch against
  the rebuilt event (`json_patch`): empty for the events Prefect 3.9 makes.

The forward bridge and the reverse bridge both go through `rebuild_events`,
and the forward bridge works out each patch against what `rebuild_events`
gives from the very attributes it puts on the span, so the round trip is
exact for any input: a patch costs bytes only where the input is unusual.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence
from uuid import UUID

import msgspec
import orjson
import pydantic_core

from otel_bridge.model.events import (
    PREFECT_TRACEPARENT_LABEL,
    Event,
    EventRejected,
    Labels,
    validate_event,
)
from otel_bridge.model.spans import AttributeValue, SpanEvent
from otel_bridge.model.states import KNOWN_STATE_NAMES, StateType
from otel_bridge.translate.flow_run_events import FlowRunEventBuilder, FlowRunRecord
from otel_bridge.translate.json_patch import PatchError, apply_patch, diff
from otel_bridge.translate.task_run_events import (
    DEFAULT_POLICY,
    StateRecord,
    TaskRunEventBuilder,
    TaskRunRecord,
)
from otel_bridge.translate.times import from_unix_nano, prefect_json_time

TASK_RUN = "task-run"
FLOW_RUN = "flow-run"
# A run's resource id starts with its kind's prefix.
RUN_KIND_PREFIXES = {f"prefect.{TASK_RUN}.": TASK_RUN, f"prefect.{FLOW_RUN}.": FLOW_RUN}

# -- span event attributes: one state each (Prefect's own spans name these
# `prefect.state.*` too) ----------------------------------------------------
ATTR_STATE_ID = "prefect.state.id"  # the event's id (Prefect: the state's id)
ATTR_STATE_TYPE = "prefect.state.type"  # only where the name does not say it
ATTR_STATE_MESSAGE = "prefect.state.message"  # only when there is one
ATTR_STATE_DETAILS = "prefect.state.details"  # JSON, only when not empty
ATTR_STATE_DATA = "prefect.state.data"  # JSON, only when not null
# What the builders got wrong about this event: a `json_patch` patch, JSON.
ATTR_EVENT_PATCH = "otel_bridge.event.patch"

# -- span attributes the builders read (besides the resource's labels) -------
ATTR_TAGS = "prefect.tags"
ATTR_TASK_KEY = "prefect.task.key"
ATTR_DYNAMIC_KEY = "prefect.task-run.dynamic-key"
ATTR_TASK_INPUTS = "prefect.task-run.inputs"  # JSON, only when not empty
ATTR_TASK_LABELS = "prefect.task-run.labels"  # JSON, only when not what the default gives
ATTR_POLICY = "prefect.task-run.policy"  # JSON, only when not Prefect's default
ATTR_EXPECTED_START = "prefect.task-run.expected-start-time"  # only when not the first state's
ATTR_NEXT_SCHEDULED_START = "prefect.task-run.next-scheduled-start-time"  # deferred tasks
ATTR_FLOW_RUN_RUN_COUNT = "prefect.task-run.flow-run-run-count"  # only when not the default
# The related resources as JSON, only when the `prefect.related.<role>.*`
# attributes cannot say them (an unknown role or order, a role twice, ...).
ATTR_RELATED = "prefect.related"
RELATED_PREFIX = "prefect.related."

# Span attributes the builders read, which a resource label of the same name
# must not stand in for (`is_layout_attribute`).
_LAYOUT_ATTRIBUTES = frozenset({
    ATTR_TAGS, ATTR_TASK_KEY, ATTR_DYNAMIC_KEY, ATTR_TASK_INPUTS, ATTR_TASK_LABELS, ATTR_POLICY,
    ATTR_EXPECTED_START, ATTR_NEXT_SCHEDULED_START, ATTR_FLOW_RUN_RUN_COUNT, ATTR_RELATED,
})
_INT64 = range(-2**63, 2**63)


def is_layout_attribute(key: str) -> bool:
    """Whether the builders read a span attribute of this name: a resource
    label so named is not copied to the span (its event's patch keeps it)."""
    return key in _LAYOUT_ATTRIBUTES or key.startswith(RELATED_PREFIX)


# The order in which Prefect lists a run's context: the events worker for a
# task run (after the task's own tags), the server for a flow run (tags
# after these, the creator last).
_CONTEXT_ROLES = {
    TASK_RUN: ("flow-run", "task-run", "flow", "deployment", "work-queue", "work-pool"),
    FLOW_RUN: ("flow", "deployment", "work-queue", "work-pool", "task-run"),
}
_CREATOR = "creator"
# In the labels: the traceparent is given by the link to Prefect's span, or
# names this very span (dual emission).
TRACEPARENT_OF_LINK = "link"
TRACEPARENT_OF_SELF = "self"


def to_json(value: Any) -> str:
    # Compact, UTF-8, key order kept: what json.dumps(separators=(",", ":"),
    # ensure_ascii=False) writes, several times faster.
    try:
        return pydantic_core.to_json(value).decode()
    except pydantic_core.PydanticSerializationError:
        # Text UTF-8 cannot carry (a lone surrogate, which JSON's escapes
        # allow): written as it is, and the span is set aside when encoded.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


_decode = msgspec.json.Decoder().decode


def from_json(text: Any, what: str) -> Any:
    if not isinstance(text, str):
        raise EventRejected("invalid_span", f"{what} is not a JSON string")
    try:
        return _decode(text)  # the values json.loads gives, in C
    except msgspec.DecodeError:
        pass
    except RecursionError:
        raise EventRejected("invalid_span", f"{what} is nested too deeply") from None
    try:
        return json.loads(text)  # what msgspec refuses that json takes (NaN, ...)
    except (ValueError, RecursionError) as exc:
        # A span changed on its way: cut by a backend's attribute limit, say.
        raise EventRejected("invalid_span", f"{what} is not JSON ({exc})") from None


# -- states <-> span events ---------------------------------------------------


def state_name(kind: str, event: Event) -> str:
    """The state an event is about, as its span event is named."""
    name = event.resource.get("prefect.state-name")
    return name if name else event.event.removeprefix(f"prefect.{kind}.")


def state_attributes(kind: str, event: Event, name: str,
                     traceparents: Mapping[str, str]) -> dict[str, AttributeValue]:
    """The span event attributes of a state event named `name`; a
    traceparent in its details that the span gives by itself (see
    `run_attributes`) is named by its token."""
    resource = event.resource
    attributes: dict[str, AttributeValue] = {ATTR_STATE_ID: str(event.id)}
    state_type = resource["prefect.state-type"]
    known = KNOWN_STATE_NAMES.get(name)
    if known is None or known.value != state_type:
        attributes[ATTR_STATE_TYPE] = state_type
    message = resource.get("prefect.state-message")
    if message:
        attributes[ATTR_STATE_MESSAGE] = message
    if kind == TASK_RUN:
        validated = event.payload.get("validated_state")
        if type(validated) is dict:
            details = validated.get("state_details")
            if type(details) is dict and details:
                attributes[ATTR_STATE_DETAILS] = to_json(_tokens_for(details, traceparents))
            if validated.get("data") is not None:
                attributes[ATTR_STATE_DATA] = to_json(validated["data"])
    return attributes


def _tokens_for(details: dict, traceparents: Mapping[str, str]) -> dict:
    given = details.get("traceparent")
    for token, value in traceparents.items():
        if given == value:
            return {**details, "traceparent": token}
    return details


def state_record(span_event: SpanEvent, traceparents: Mapping[str, str]) -> StateRecord:
    """The state a span event stands for. Raises `EventRejected`."""
    attributes = span_event.attributes
    name = span_event.name
    given = attributes.get(ATTR_STATE_TYPE)
    try:
        state_type = StateType(given) if given is not None else KNOWN_STATE_NAMES[name]
        event_id = UUID(str(attributes[ATTR_STATE_ID]))
    except (KeyError, ValueError):
        raise EventRejected(
            "invalid_span", f"span event {name!r:.80} has no valid state id and type"
        ) from None
    details = attributes.get(ATTR_STATE_DETAILS)
    details = from_json(details, ATTR_STATE_DETAILS) if details is not None else {}
    if type(details) is dict and details.get("traceparent") in traceparents:
        details["traceparent"] = traceparents[details["traceparent"]]
    data = attributes.get(ATTR_STATE_DATA)
    message = attributes.get(ATTR_STATE_MESSAGE, "")
    return StateRecord(
        type=state_type,
        name=name,
        timestamp=from_unix_nano(span_event.time_unix_nano),
        id=event_id,
        message=message if isinstance(message, str) else str(message),
        state_details=details,
        data=from_json(data, ATTR_STATE_DATA) if data is not None else None,
    )


# -- a run's facts <-> span attributes ----------------------------------------


def run_attributes(kind: str, events: Sequence[Event], basis: Event,
                   traceparents: Mapping[str, str]) -> dict[str, AttributeValue]:
    """The span attributes the builders read, from a run's events in order
    and the one whose facts stand for the run (its final state): its
    context, and for a task run its payload's `task_run`, each where it
    differs from what the builders assume. The builders also read the run's resource id and name from the
    span's `prefect.resource.*` attributes. `traceparents` maps the
    traceparents the span itself gives (`TRACEPARENT_OF_LINK`,
    `TRACEPARENT_OF_SELF`) to their values."""
    attributes: dict[str, AttributeValue] = {}
    related = basis.related
    if kind == TASK_RUN:
        task_run = basis.payload.get("task_run")
        if type(task_run) is not dict:
            task_run = _latest_task_run(events)
        tags = task_run.get("tags")
        tags = list(tags) if type(tags) is list and all(type(t) is str for t in tags) else []
        own = [_tag(tag) for tag in sorted(tags)]
        context = related[len(own):] if related[:len(own)] == own else related
        _related_attributes(kind, context, attributes)
        if tags:
            attributes[ATTR_TAGS] = tags
        for key, attribute in (("task_key", ATTR_TASK_KEY), ("dynamic_key", ATTR_DYNAMIC_KEY)):
            if type(task_run.get(key)) is str:
                attributes[attribute] = task_run[key]
        inputs = task_run.get("task_inputs")
        if type(inputs) is dict and inputs:
            attributes[ATTR_TASK_INPUTS] = to_json(inputs)
        labels = task_run.get("labels")
        if type(labels) is dict and labels:
            labels = dict(labels)
            given = labels.get(PREFECT_TRACEPARENT_LABEL)
            for short, value in traceparents.items():
                if given == value:
                    labels[PREFECT_TRACEPARENT_LABEL] = short
                    break
            if labels != {PREFECT_TRACEPARENT_LABEL: TRACEPARENT_OF_LINK}:
                attributes[ATTR_TASK_LABELS] = to_json(labels)
        policy = task_run.get("empirical_policy")
        if type(policy) is dict and policy != DEFAULT_POLICY:
            attributes[ATTR_POLICY] = to_json(policy)
        expected = task_run.get("expected_start_time")
        if expected != prefect_json_time(events[0].occurred):
            attributes[ATTR_EXPECTED_START] = expected if type(expected) is str else ""
        scheduled = task_run.get("next_scheduled_start_time")
        if type(scheduled) is str:
            attributes[ATTR_NEXT_SCHEDULED_START] = scheduled
        count = task_run.get("flow_run_run_count")
        if (count != _default_flow_run_run_count(context) and type(count) is int
                and count in _INT64):  # (OTLP's integers are 64-bit: the patch has others)
            attributes[ATTR_FLOW_RUN_RUN_COUNT] = count
    else:
        tags = [r["prefect.resource.id"].removeprefix("prefect.tag.")
                for r in related if _is_tag(r)]
        if related != _flow_related([r for r in related if not _is_tag(r)], tags):
            attributes[ATTR_RELATED] = to_json(related)
        _related_attributes(kind, [r for r in related if not _is_tag(r)], attributes,
                            carried=ATTR_RELATED not in attributes)
        if tags:
            attributes[ATTR_TAGS] = tags
    return attributes


def _latest_task_run(events: Sequence[Event]) -> dict:
    for event in reversed(events):
        task_run = event.payload.get("task_run")
        if type(task_run) is dict:
            return task_run
    return {}


def _related_attributes(kind: str, context: Sequence[Labels],
                        attributes: dict[str, AttributeValue], carried: bool = True) -> None:
    """`prefect.related.<role>.id` and `.name` (and a work pool's type) of
    each resource in `context`, and, when `carried` and they cannot say it
    exactly, the whole context as JSON."""
    for labels in context:
        role = labels["prefect.resource.role"]
        if f"{RELATED_PREFIX}{role}.id" in attributes:
            continue  # the first of each role, as `Event.related_in_role`
        for label, value in labels.items():
            if label == "prefect.resource.role":
                continue
            if label == "prefect.resource.id":
                # The id alone where the resource is of its role's kind (a
                # flow run's id, as `cicd.pipeline.run.id` gives it).
                value = value.removeprefix(f"prefect.{role}.")
            attributes[_related_attribute(role, label)] = value
    if carried and _context_from_attributes(kind, attributes) != list(context):
        attributes[ATTR_RELATED] = to_json(list(context))


def _related_attribute(role: str, label: str) -> str:
    # prefect.resource.id -> .id; prefect.work-pool.type -> .type
    suffix = label.removeprefix("prefect.resource.").removeprefix(f"prefect.{role}.")
    return f"{RELATED_PREFIX}{role}.{suffix}"


def _context_from_attributes(kind: str, attributes: Mapping[str, Any]) -> list[Labels]:
    context = []
    for role in (*_CONTEXT_ROLES[kind], _CREATOR):
        resource_id = attributes.get(f"{RELATED_PREFIX}{role}.id")
        if not isinstance(resource_id, str):
            continue
        if not resource_id.startswith("prefect."):
            resource_id = f"prefect.{role}.{resource_id}"
        labels = {"prefect.resource.id": resource_id, "prefect.resource.role": role}
        name = attributes.get(f"{RELATED_PREFIX}{role}.name")
        if isinstance(name, str):
            labels["prefect.resource.name"] = name
        pool_type = attributes.get(f"{RELATED_PREFIX}{role}.type")
        if role == "work-pool" and isinstance(pool_type, str):
            labels["prefect.work-pool.type"] = pool_type
        context.append(labels)
    return context


def _flow_related(context: list[Labels], tags: Sequence[str]) -> list[Labels]:
    """A flow run's related resources as the server lists them."""
    creator = [labels for labels in context if labels.get("prefect.resource.role") == _CREATOR]
    rest = [labels for labels in context if labels.get("prefect.resource.role") != _CREATOR]
    return rest + [_tag(tag) for tag in tags] + creator


def _tag(tag: str) -> Labels:
    return {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}


def _is_tag(labels: Labels) -> bool:
    return (labels.get("prefect.resource.role") == "tag" and len(labels) == 2
            and labels["prefect.resource.id"].startswith("prefect.tag."))


def _default_flow_run_run_count(context: Sequence[Labels]) -> int:
    # A task run in a flow run's first run; 0 for a task with no flow run.
    return 1 if any(labels.get("prefect.resource.role") == FLOW_RUN for labels in context) else 0


def _context(kind: str, attributes: Mapping[str, Any]) -> list[Labels]:
    carried = attributes.get(ATTR_RELATED)
    if carried is not None:
        context = from_json(carried, ATTR_RELATED)
        if type(context) is not list or not all(type(r) is dict for r in context):
            raise EventRejected("invalid_span", f"{ATTR_RELATED} is not a list of objects")
        return context
    return _context_from_attributes(kind, attributes)


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def task_run_record(attributes: Mapping[str, Any], first_state: Optional[datetime],
                    traceparents: Mapping[str, str]) -> TaskRunRecord:
    """The task run a span's attributes describe, as the builder takes it."""
    context = _context(TASK_RUN, attributes)
    labels: dict[str, Any] = {}
    given = attributes.get(ATTR_TASK_LABELS)
    if given is not None:
        labels = from_json(given, ATTR_TASK_LABELS)
        if type(labels) is not dict:
            raise EventRejected("invalid_span", f"{ATTR_TASK_LABELS} is not an object")
    elif TRACEPARENT_OF_LINK in traceparents:
        labels = {PREFECT_TRACEPARENT_LABEL: TRACEPARENT_OF_LINK}
    short = labels.get(PREFECT_TRACEPARENT_LABEL)
    if short in traceparents:
        labels[PREFECT_TRACEPARENT_LABEL] = traceparents[short]
    inputs = attributes.get(ATTR_TASK_INPUTS)
    policy = attributes.get(ATTR_POLICY)
    expected: Any = attributes.get(ATTR_EXPECTED_START)
    expected = first_state if expected is None else _time_or_none(expected)
    count = attributes.get(ATTR_FLOW_RUN_RUN_COUNT)
    resource_id = str(attributes.get("prefect.resource.id", ""))
    return TaskRunRecord(
        id=resource_id.removeprefix(f"prefect.{TASK_RUN}."),
        name=str(attributes.get("prefect.resource.name", "")),
        task_key=str(attributes.get(ATTR_TASK_KEY, "")),
        dynamic_key=str(attributes.get(ATTR_DYNAMIC_KEY, "")),
        tags=_strings(attributes.get(ATTR_TAGS)),
        labels=labels,
        task_inputs=from_json(inputs, ATTR_TASK_INPUTS) if inputs is not None else {},
        empirical_policy=(from_json(policy, ATTR_POLICY) if policy is not None
                          else dict(DEFAULT_POLICY)),
        flow_run_run_count=(count if type(count) is int
                            else _default_flow_run_run_count(context)),
        expected_start_time=expected,
        next_scheduled_start_time=_time_or_none(attributes.get(ATTR_NEXT_SCHEDULED_START)),
        context=context,
    )


def _time_or_none(value: Any) -> Optional[datetime]:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None  # the patch has what it was
    return moment if moment.tzinfo is not None else None


def flow_run_record(attributes: Mapping[str, Any]) -> FlowRunRecord:
    """The flow run a span's attributes describe, as the builder takes it."""
    carried = attributes.get(ATTR_RELATED)
    if carried is not None:
        related = _context(FLOW_RUN, attributes)
    else:
        related = _flow_related(_context_from_attributes(FLOW_RUN, attributes),
                                _strings(attributes.get(ATTR_TAGS)))
    return FlowRunRecord(
        resource_id=str(attributes.get("prefect.resource.id", "")),
        name=str(attributes.get("prefect.resource.name", "")),
        related=related,
    )


# -- rebuilding ---------------------------------------------------------------


def rebuild_events(kind: str, attributes: Mapping[str, Any], span_events: Sequence[SpanEvent],
                   traceparents: Mapping[str, str], *, checked: bool = True) -> list[Any]:
    """Each state span event's event as the builders make it from the span
    (`checked`: as an `Event`, checked as Prefect checks events; else its
    fields, as `Event` holds them); None where they cannot make it (the
    patch then holds the whole event). Raises `EventRejected` for attributes
    that are not what the forward bridge writes."""
    return list(iter_rebuilt_events(kind, attributes, span_events, traceparents, checked=checked))


def iter_rebuilt_events(kind: str, attributes: Mapping[str, Any], span_events: Sequence[SpanEvent],
                        traceparents: Mapping[str, str], *, checked: bool = True) -> Iterator[Any]:
    """`rebuild_events` one event at a time, for a caller that shares its
    thread with others between two (a span can hold a thousand states).
    Raises `EventRejected` before the first, as `rebuild_events` does."""
    states = [state_record(e, traceparents) for e in span_events]
    if kind == TASK_RUN:
        builder: Any = TaskRunEventBuilder(task_run_record(
            attributes, states[0].timestamp if states else None, traceparents))
    else:
        builder = FlowRunEventBuilder(flow_run_record(attributes))
    return _built(builder, states, checked)


def _built(builder: Any, states: Sequence[StateRecord], checked: bool) -> Iterator[Any]:
    for index, state in enumerate(states):
        try:
            fields = builder.next_fields(state)
        except (TypeError, ValueError, OverflowError):  # the builder cannot go on
            yield from [None] * (len(states) - index)
            return
        if checked:
            try:
                fields = builder.check(fields, state)
            except EventRejected:  # this one event only: the builder goes on
                fields = None
        yield fields


def event_json(event: Event) -> dict[str, Any]:
    """The event as Prefect's client serialises it, as a JSON object."""
    return event.model_dump(mode="json", exclude={"received"})


def event_patch(rebuilt: Optional[dict[str, Any]], original: Event) -> Optional[str]:
    """The patch (JSON) that makes `original` of the fields the builders
    made (`rebuild_events(checked=False)`); None if none is needed."""
    if rebuilt is not None and _same_fields(rebuilt, original):
        return None
    target = event_json(original)
    patch = [[[], target]] if rebuilt is None else diff(_fields_json(rebuilt), target)
    return to_json(patch) if patch else None


def _same_fields(fields: dict[str, Any], event: Event) -> bool:
    """Whether an event's fields serialise to the same JSON as `event`, byte
    for byte. Equal values (`==`, which takes 1, 1.0 and true for one
    another and ignores key order) that orjson writes alike (it keeps types
    and key order) are the same; a tenth of the cost of serialising both
    with pydantic. (Fields equal to a checked event's are checked too: the
    reverse, which checks them, gets the same event.)"""
    given = [fields[name] for name in _EVENT_FIELDS]
    real = [event.__dict__[name] for name in _EVENT_FIELDS]
    if given != real:
        return False
    try:
        return orjson.dumps(given) == orjson.dumps(real)
    except (TypeError, orjson.JSONEncodeError):  # what orjson does not write (huge ints)
        return to_json(given) == to_json(real)


def _fields_json(fields: dict[str, Any]) -> Any:
    """Fields as `event_json` gives an event's (a patch is worked out on these)."""
    try:
        return event_json(validate_event(fields))
    except EventRejected:  # not an event as they stand (the reverse's check
        return None        # refuses them too): the patch replaces them


_EVENT_FIELDS = ("occurred", "event", "resource", "related", "payload", "id", "follows")


def patched_event(rebuilt: Optional[Event], patch: Any) -> Event:
    """The event a span event carries: the rebuilt one, patched and checked
    as Prefect checks events. Raises `EventRejected`."""
    if patch is None:
        if rebuilt is None:
            raise EventRejected("invalid_span", "a state the builders cannot make, and no patch")
        return rebuilt
    try:
        value = apply_patch(None if rebuilt is None else event_json(rebuilt),
                            from_json(patch, ATTR_EVENT_PATCH))
    except PatchError as exc:
        raise EventRejected("invalid_span", f"{ATTR_EVENT_PATCH}: {exc}") from None
    if type(value) is not dict:
        raise EventRejected("invalid_span", f"{ATTR_EVENT_PATCH} does not give an event")
    return validate_event(value)


# -- helpers ------------------------------------------------------------------


def traceparent_of(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def carried_state_events(span_events: Iterable[SpanEvent]) -> list[SpanEvent]:
    """The span events that stand for states: all but those a user or a
    backend added (an `exception`, say). One named after a state, or with a
    state's or a patch's attributes, is a state, so one that lost its id is
    refused (`state_record`), not passed over."""
    return [e for e in span_events if e.name in KNOWN_STATE_NAMES or any(
        key.startswith(_STATE_PREFIX) or key == ATTR_EVENT_PATCH for key in e.attributes)]


_STATE_PREFIX = "prefect.state."
