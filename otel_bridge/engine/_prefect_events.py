"""The events Prefect's events worker sent, read for the span of their task
run: each as otel-bridge's `Event` (`read_prefect`: what parsing its JSON
gives, checked by hand where it can be), and the span from those
(`span_of`), as the sidecar would make it from the same events.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID
from zoneinfo import ZoneInfo

from pydantic_core import to_json

from otel_bridge.model.events import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_SIZE_BYTES,
    MAX_LABELS_PER_RESOURCE,
    Event,
    _checked_event,
    validate_event,
)
from otel_bridge.model.spans import Span
from otel_bridge.translate.forward import (
    _STATE_TYPES,
    TASK_RUN,
    RunKey,
    placement,
    run_span,
)
from otel_bridge.translate.task_run_events import _related_ok

from ._span import ordered_run_span

TASK_RUN_PREFIX = f"prefect.{TASK_RUN}."


def span_of(key: RunKey, seen: list[Read], span_id: int) -> Span:
    """`run_span` of the run's events; cheaper when they came in order, as
    Prefect's events worker sends them."""
    events = [read[0] for read in seen]
    trace_id, parent_span_id = placement(key, events)
    return ordered_run_span(events, [read[1] for read in seen], [read[2] for read in seen], key,
                            trace_id, parent_span_id, span_id
                            ) or run_span(events)


# (event, its payload as JSON, its related resources as JSON, and those
# related resources as checked when they passed the checks as given, else None)
Read = tuple[Event, bytes, bytes, Optional[list]]


def from_prefect(prefect_event: Any) -> tuple[Event, bytes, bytes]:
    """Prefect's `Event` as otel-bridge's, with its payload and related
    resources as JSON: exactly what `parse_wire_event(prefect_event.model_dump(
    mode="json"))` gives (tested), without the round trip through JSON.
    Prefect's engine builds the payload of a task run's state event in JSON
    form already, and the JSON the span events get is the same either way
    (both serialise with pydantic)."""
    return read_prefect(prefect_event)[:3]


def read_prefect(prefect_event: Any, known: Optional[tuple[list, bytes]] = None) -> Read:
    """`_from_prefect`, and the event's related resources when they passed
    the checks as given.

    The event is checked as `validate_event` checks it, by hand: every value
    of the type it must be, the labels and related resources within Prefect's
    limits, an upper bound of the event's JSON within its size limit; the
    event is then made as validation would make it (`_checked_event`).
    Anything else goes to `validate_event`, which rejects it or says exactly
    how large it is.

    `known`: (related resources that passed the checks, their JSON), from the
    run's previous event; when this event's are the same, label for label in
    the same order, they are not checked or serialised again (fresh copies of
    the known ones: equal values, so the same JSON)."""
    occurred = prefect_event.occurred
    zone = occurred.tzinfo
    if zone is None:  # as `Event` takes a naive time: UTC
        occurred = occurred.replace(tzinfo=timezone.utc)
    elif zone is not timezone.utc and not (isinstance(zone, ZoneInfo)
                                           and zone.key in _UTC_KEYS):
        occurred = occurred.astimezone(timezone.utc)  # (slow for Prefect's DateTime)
    if type(occurred) is not datetime:  # Prefect's DateTime subclass: as parsed from JSON
        occurred = datetime(occurred.year, occurred.month, occurred.day, occurred.hour,
                            occurred.minute, occurred.second, occurred.microsecond,
                            tzinfo=timezone.utc)
    resource = dict(prefect_event.resource.root)
    given = [r.root for r in prefect_event.related]
    if known is not None and _same_labels(given, known[0]):
        related, related_json, related_ok = [dict(r) for r in known[0]], known[1], True
    else:
        related = [dict(r) for r in given]
        related_json, related_ok = to_json(related), None
    payload = prefect_event.payload
    name = prefect_event.event
    payload_json = to_json(payload)
    # JSON escapes a character in at most 6
    bound = (len(payload_json) + len(related_json) + 2048
             + 6 * (len(name) + sum(map(len, resource)) + sum(map(len, resource.values()))
                    + len(resource)))
    fields = {"occurred": occurred, "event": name, "resource": resource, "related": related,
              "payload": payload, "id": prefect_event.id, "follows": prefect_event.follows}
    if (bound <= MAX_EVENT_SIZE_BYTES and type(name) is str
            and 0 < len(name) <= MAX_EVENT_NAME_LENGTH and type(payload) is dict
            and type(fields["id"]) is UUID
            and (fields["follows"] is None or type(fields["follows"]) is UUID)
            and _labels_ok(resource) and (related_ok or _related_ok(related))
            and all(type(k) is str for k in payload)):
        fields["payload"] = dict(payload)
        return _checked_event(fields), payload_json, related_json, related
    return validate_event(fields, bound), payload_json, related_json, None


def is_state_event(event: Event) -> bool:
    """Whether `run_key(event)` is `RunKey(TASK_RUN, event.resource_id)`,
    known without making it: the event of a task run resource (as `sent`
    keeps only those) is named for a task run and has a known state type.
    False: ask `run_key`."""
    return (event.event.startswith(TASK_RUN_PREFIX)
            and event.resource.get("prefect.state-type") in _STATE_TYPES)


def _same_labels(given: list, known: list) -> bool:
    """Whether `given` label sets are `known`'s: equal, with their labels in
    the same order (so the same JSON)."""
    return given == known and [list(r) for r in given] == [list(r) for r in known]


_UTC_KEYS = frozenset({"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"})


def _labels_ok(labels: dict) -> bool:
    """Whether a resource passes `Event`'s checks as it is."""
    if len(labels) > MAX_LABELS_PER_RESOURCE or not labels.get("prefect.resource.id"):
        return False
    for key, value in labels.items():
        if type(key) is not str or type(value) is not str:
            return False
    return True
