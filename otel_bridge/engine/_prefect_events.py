"""The events Prefect's events worker sent, read for the span of their task
run, as the sidecar would make it from the same events.

Two ways, one answer. `task_run_span` goes straight from Prefect's `Event`
objects to the span: it takes the run's events in the order they were sent
and does each thing once (the related resources, which repeat from state to
state, are checked and serialised once; each id is written once). Where its
shortcuts do not hold it says so (None), and `span_of` does it the general
way: each event read as otel-bridge's `Event` (`read_prefect`, exactly what
parsing its JSON gives), then the forward bridge's `run_span`. Tests hold
the two equal, and both equal to the sidecar's span of the same events.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional, Sequence
from uuid import UUID
from zoneinfo import ZoneInfo

from pydantic_core import to_json

from otel_bridge.model.events import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_SIZE_BYTES,
    MAX_LABELS_PER_RESOURCE,
    PREFECT_TRACEPARENT_LABEL,
    Event,
    _checked_event,
    validate_event,
)
from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.translate.forward import (
    _STATE_TYPES,
    ATTR_EVENT_FOLLOWS,
    ATTR_EVENT_ID,
    ATTR_EVENT_PAYLOAD,
    ATTR_RELATED,
    TASK_RUN,
    RunKey,
    _outcome,
    _prefect_traceparent,
    _run_attributes,
    placement,
    prefect_links,
    run_span,
    span_bounds,
)
from otel_bridge.translate.task_run_events import _related_ok

from ._span import ordered_run_span

TASK_RUN_PREFIX = f"prefect.{TASK_RUN}."


def is_task_run_state(name: Any, resource: dict) -> bool:
    """Whether an event of a task run resource with this name and these
    labels is one of its state events, known without reading it (`run_key`
    gives `RunKey(TASK_RUN, its resource id)`): named for a task run, of a
    known state type. False: ask `run_key`."""
    return (type(name) is str and name.startswith(TASK_RUN_PREFIX)
            and resource.get("prefect.state-type") in _STATE_TYPES)


class _Sent:
    """What the forward bridge's helpers read of one sent event (the same
    fields of `Event`), taken from Prefect's as they are."""

    __slots__ = ("resource", "related", "payload", "time_unix_nano")

    def __init__(self, resource: dict, related: list, payload: dict, time_unix_nano: int):
        self.resource = resource
        self.related = related
        self.payload = payload
        self.time_unix_nano = time_unix_nano

    related_in_role = Event.related_in_role


def task_run_span(sent: Sequence[Any], key: RunKey, span_id: int,
                  own_traceparent: Optional[str] = None) -> Optional[Span]:
    """`span_of(key, [read_prefect(e) for e in sent], span_id)`, straight
    from Prefect's events: None unless every event passes the checks as it
    is (see `read_prefect`), they are in `order_events`' order as sent (times
    never go back, events at the same time follow each other, no id repeats),
    and each time is known exactly in UTC.

    `own_traceparent`: the `__OTEL_TRACEPARENT` label the bridge gave the
    run (naming its own span, so no link), when it wrote it itself."""
    reads: list[_Sent] = []
    span_events: list[SpanEvent] = []
    seen_ids: set[UUID] = set()
    related = related_json = related_text = related_items = None
    previous_time, previous_id, previous_text = -1, None, ""
    for event in sent:
        name, resource, payload = event.event, event.resource.root, event.payload
        event_id, follows = event.id, event.follows
        given = [r.root for r in event.related]
        # the same labels in the same order as the event before's (so the
        # same JSON), as a task run's states mostly name them
        if related is None or [list(r.items()) for r in given] != related_items:
            if not _related_ok(given):
                return None
            related, related_json = given, to_json(given)
            related_text, related_items = related_json.decode(), [list(r.items()) for r in given]
        payload_json = to_json(payload)
        time_unix_nano = _unix_nano(event.occurred)
        if (time_unix_nano is None or time_unix_nano < previous_time
                or (time_unix_nano == previous_time and follows != previous_id)
                or event_id in seen_ids
                or not _passes(name, resource, payload, event_id, follows)
                or _size_bound(name, resource, payload_json, related_json)
                > MAX_EVENT_SIZE_BYTES):
            return None
        seen_ids.add(event_id)
        text = str(event_id)
        attributes = {ATTR_EVENT_ID: text}
        if follows is not None:
            attributes[ATTR_EVENT_FOLLOWS] = (previous_text if follows == previous_id
                                              else str(follows))
        attributes.update(resource)
        attributes[ATTR_RELATED] = related_text
        attributes[ATTR_EVENT_PAYLOAD] = payload_json.decode()
        span_events.append(SpanEvent(name, time_unix_nano, attributes))
        reads.append(_Sent(resource, related, payload, time_unix_nano))
        previous_time, previous_id, previous_text = time_unix_nano, event_id, text
    if not reads:
        return None

    start, end, last, synthetic = span_bounds(reads)
    trace_id, parent_span_id = placement(key, reads)
    prefect_context = (None if _names_itself(reads[-1], own_traceparent, span_id)
                       else _prefect_traceparent(reads))
    links = prefect_links(prefect_context, span_id)
    status_code, status_message, result, error_type = _outcome(end)
    attributes = _run_attributes(key, last, reads, result, error_type)
    attributes.update(synthetic)
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_span_id,
        name=last.resource.get("prefect.resource.name") or key.resource_id,
        start_time_unix_nano=start.time_unix_nano,
        end_time_unix_nano=max(start.time_unix_nano, last.time_unix_nano),
        attributes=attributes,
        events=tuple(span_events),
        links=links,
        status_code=status_code,
        status_message=status_message,
    )


def _names_itself(latest: _Sent, own_traceparent: Optional[str], span_id: int) -> bool:
    """Whether the run's latest event carries the bridge's own traceparent
    for this span (what `_prefect_traceparent` would find first, naming this
    span: neither link nor parent)."""
    if own_traceparent is None:
        return False
    task_run = latest.payload.get("task_run")
    labels = task_run.get("labels") if type(task_run) is dict else None
    return (type(labels) is dict and labels.get(PREFECT_TRACEPARENT_LABEL) == own_traceparent
            and _OWN_TRACEPARENT.match(own_traceparent) is not None
            and int(own_traceparent[36:52], 16) == span_id
            and int(own_traceparent[3:35], 16) != 0)


_OWN_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def span_of(key: RunKey, seen: Sequence[Read], span_id: int) -> Span:
    """`run_span` of the run's events as `read_prefect` gives them; cheaper
    when they came in order, as Prefect's events worker sends them."""
    events = [read[0] for read in seen]
    trace_id, parent_span_id = placement(key, events)
    return ordered_run_span(events, [read[1] for read in seen], [read[2] for read in seen], key,
                            trace_id, parent_span_id, span_id
                            ) or run_span(events)


# (event, its payload as JSON, its related resources as JSON)
Read = tuple[Event, bytes, bytes]


def read_prefect(prefect_event: Any) -> Read:
    """Prefect's `Event` as otel-bridge's, with its payload and related
    resources as JSON: exactly what `parse_wire_event(prefect_event.model_dump(
    mode="json"))` gives (tested), without the round trip through JSON (the
    JSON the span events get is the same either way: both serialise with
    pydantic).

    The event is checked as `validate_event` checks it, by hand: every value
    of the type it must be, the labels and related resources within Prefect's
    limits, an upper bound of the event's JSON within its size limit; the
    event is then made as validation would make it (`_checked_event`).
    Anything else goes to `validate_event`, which rejects it or says exactly
    how large it is."""
    occurred = prefect_event.occurred
    zone = occurred.tzinfo
    if zone is None:  # as `Event` takes a naive time: UTC
        occurred = occurred.replace(tzinfo=timezone.utc)
    elif not _is_utc(zone):
        occurred = occurred.astimezone(timezone.utc)  # (slow for Prefect's DateTime)
    if type(occurred) is not datetime:  # Prefect's DateTime subclass: as parsed from JSON
        occurred = datetime(occurred.year, occurred.month, occurred.day, occurred.hour,
                            occurred.minute, occurred.second, occurred.microsecond,
                            tzinfo=timezone.utc)
    resource = dict(prefect_event.resource.root)
    related = [dict(r.root) for r in prefect_event.related]
    related_json = to_json(related)
    payload = prefect_event.payload
    name = prefect_event.event
    payload_json = to_json(payload)
    fields = {"occurred": occurred, "event": name, "resource": resource, "related": related,
              "payload": payload, "id": prefect_event.id, "follows": prefect_event.follows}
    if not (_passes(name, resource, payload, fields["id"], fields["follows"])
            and _related_ok(related)):
        return validate_event(fields), payload_json, related_json
    bound = _size_bound(name, resource, payload_json, related_json)
    if bound > MAX_EVENT_SIZE_BYTES:
        return validate_event(fields, bound), payload_json, related_json
    fields["payload"] = dict(payload)
    return _checked_event(fields), payload_json, related_json


def _passes(name: Any, resource: Any, payload: Any, event_id: Any, follows: Any) -> bool:
    """Whether these fields of an event pass `Event`'s checks as they are
    (its related resources and size aside)."""
    return (type(name) is str and 0 < len(name) <= MAX_EVENT_NAME_LENGTH
            and type(payload) is dict and type(event_id) is UUID
            and (follows is None or type(follows) is UUID)
            and type(resource) is dict and _labels_ok(resource)
            and {*map(type, payload)} <= _STR)


def _size_bound(name: str, resource: dict, payload_json: bytes, related_json: bytes) -> int:
    """An upper bound of the event's JSON size: JSON escapes a character in at
    most 6, and the rest of the event takes well under 2 kB."""
    return (len(payload_json) + len(related_json) + 2048
            + 6 * (len(name) + sum(map(len, resource)) + sum(map(len, resource.values()))
                   + len(resource)))


def _labels_ok(labels: dict) -> bool:
    """Whether a resource passes `Event`'s checks as it is."""
    return (len(labels) <= MAX_LABELS_PER_RESOURCE and bool(labels.get("prefect.resource.id"))
            and {*map(type, labels), *map(type, labels.values())} == _STR)


_STR = {str}


def _is_utc(zone: Any) -> bool:
    return zone is timezone.utc or (isinstance(zone, ZoneInfo) and zone.key in _UTC_KEYS)


_UTC_KEYS = frozenset({"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"})
_EPOCH_DAY = datetime(1970, 1, 1).toordinal()


def _unix_nano(moment: Any) -> Optional[int]:
    """`to_unix_nano` of the time as `Event` takes it (naive: UTC), read from
    its fields when it is in UTC (Prefect's own DateTime included, whose
    arithmetic is slow); None for any other zone."""
    if not isinstance(moment, datetime) or not (moment.tzinfo is None or _is_utc(moment.tzinfo)):
        return None
    return (((datetime.toordinal(moment) - _EPOCH_DAY) * 86_400 + moment.hour * 3_600
             + moment.minute * 60 + moment.second) * 1_000_000_000 + moment.microsecond * 1_000)
