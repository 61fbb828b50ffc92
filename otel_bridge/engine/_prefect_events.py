"""The events Prefect's events worker sent, read as otel-bridge's `Event`s,
for the forward bridge's `run_span` to make their task run's span from: the
very span the sidecar makes from the same events.

`read_prefect` gives what parsing the event's JSON would give
(`parse_wire_event(prefect_event.model_dump(mode="json"))`, tested), without
the round trip through JSON, and rejects (`EventRejected`) what Prefect's
server would refuse, so the span is made from the events the server keeps.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from pydantic_core import to_json

from otel_bridge.model.events import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_SIZE_BYTES,
    MAX_LABELS_PER_RESOURCE,
    Event,
    checked_event,
    related_valid,
    validate_event,
)
from otel_bridge.model.states import STATE_TYPES_BY_VALUE
from otel_bridge.translate.forward import TASK_RUN

TASK_RUN_PREFIX = f"prefect.{TASK_RUN}."


def is_task_run_state(name: Any, resource: dict) -> bool:
    """Whether an event of a task run resource with this name and these
    labels is one of its state events, known without reading it (`run_key`
    gives `RunKey(TASK_RUN, its resource id)`): named for a task run, of a
    known state type. False: ask `run_key`."""
    return (type(name) is str and name.startswith(TASK_RUN_PREFIX)
            and resource.get("prefect.state-type") in STATE_TYPES_BY_VALUE)


def read_prefect(prefect_event: Any) -> Event:
    """Prefect's `Event` as otel-bridge's: exactly what
    `parse_wire_event(prefect_event.model_dump(mode="json"))` gives (tested).
    Raises `EventRejected` for an event Prefect's server would refuse.

    The event is checked as `validate_event` checks it, by hand: every value
    of the type it must be, the labels and related resources within Prefect's
    limits, an upper bound of the event's JSON within its size limit; the
    event is then made as validation would make it (`checked_event`).
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
    payload = prefect_event.payload
    name = prefect_event.event
    fields = {"occurred": occurred, "event": name, "resource": resource, "related": related,
              "payload": payload, "id": prefect_event.id, "follows": prefect_event.follows}
    if not (_passes(name, resource, payload, fields["id"], fields["follows"])
            and related_valid(related)):
        return validate_event(fields)
    bound = _size_bound(name, resource, payload, related)
    if bound > MAX_EVENT_SIZE_BYTES:
        return validate_event(fields, bound)
    fields["payload"] = dict(payload)
    return checked_event(fields)


def _passes(name: Any, resource: Any, payload: Any, event_id: Any, follows: Any) -> bool:
    """Whether these fields of an event pass `Event`'s checks as they are
    (its related resources and size aside)."""
    return (type(name) is str and 0 < len(name) <= MAX_EVENT_NAME_LENGTH
            and type(payload) is dict and type(event_id) is UUID
            and (follows is None or type(follows) is UUID)
            and type(resource) is dict and _labels_ok(resource)
            and {*map(type, payload)} <= _STR)


def _size_bound(name: str, resource: dict, payload: dict, related: list) -> int:
    """An upper bound of the event's JSON size: its payload's and related
    resources' compact JSON, JSON escapes a character of the rest in at most
    6, and the rest of the event takes well under 2 kB."""
    return (len(to_json(payload)) + len(to_json(related)) + 2048
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
