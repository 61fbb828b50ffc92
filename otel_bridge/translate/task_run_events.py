"""Task-run state events built the way Prefect's task engine builds them
(`prefect.utilities.engine.emit_task_run_state_change_event`, 3.9): the same
labels, related resources, payload and `follows` chain, from a run and the
states it went through. Used where the events must be made from something
that is not Prefect: spans (reverse direction) and engines (dual emission).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence
from uuid import UUID

from pydantic_core import to_json

from otel_bridge.model.events import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_SIZE_BYTES,
    PREFECT_TRACEPARENT_LABEL,
    Event,
    Labels,
    checked_event,
    related_valid,
    validate_event,
)
from otel_bridge.model.states import StateType
from otel_bridge.translate.times import prefect_json_time

# Prefect cuts state messages to this many characters (`truncated_to`).
STATE_MESSAGE_LIMIT = 100_000
DEFAULT_POLICY: Mapping[str, Any] = {
    "max_retries": 0, "retry_delay_seconds": 0.0, "retries": 0, "retry_delay": 0,
}


@dataclass(frozen=True)
class StateRecord:
    type: StateType
    name: str
    timestamp: datetime
    id: UUID
    message: str = ""
    state_details: Mapping[str, Any] = field(default_factory=dict)
    data: Any = None


@dataclass(frozen=True)
class TaskRunRecord:
    id: UUID
    name: str
    task_key: str
    dynamic_key: str
    tags: Sequence[str] = ()
    labels: Mapping[str, Any] = field(default_factory=dict)
    task_inputs: Mapping[str, Any] = field(default_factory=dict)
    empirical_policy: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_POLICY))
    flow_run_run_count: int = 0
    expected_start_time: Optional[datetime] = None
    # Set by the server for a deferred task (`.delay()`).
    next_scheduled_start_time: Optional[datetime] = None
    # The run's context, which Prefect's events worker appends after the tags:
    # flow-run, flow, deployment, ..., the enclosing task-run.
    context: Sequence[Labels] = ()

    @functools.cached_property
    def resource_id(self) -> str:
        return f"prefect.task-run.{self.id}"


_CUT = re.compile(r"\.\.\.\d+ additional characters\.\.\.")


def truncated(message: str, limit: int = STATE_MESSAGE_LIMIT) -> str:
    """Prefect's `truncated_to`: the first and last halves around a count.

    A message Prefect already cut (taken from an event) is left as it is."""
    if not message or len(message) <= limit:
        return message or ""
    half = limit // 2
    cut = _CUT.match(message, half)
    if cut and len(message) - cut.end() == half:
        return message
    omitted = len(message) - 2 * half
    proposed = f"{message[:half]}...{omitted} additional characters...{message[-half:]}"
    return proposed if len(proposed) < len(message) else message


class TaskRunEventBuilder:
    """Builds a task run's events one state at a time, as the engine does:
    it keeps the run count, start and end time and total run time, and
    chains each event to the one before (`follows`).

    The run's name, tags and context are read once, when the builder is made;
    its labels, task inputs and policy at each state (Prefect's engine sets
    a label while the run starts). An event is checked as `validate_event`
    checks it, but only where it can be wrong: the parts fixed for the run
    once, and per state the values given for it; anything unusual takes
    `validate_event` itself, so an invalid event is rejected the same way.
    `next_fields` gives the next event's fields without checking them (what
    the forward bridge compares a real event with)."""

    def __init__(self, run: TaskRunRecord):
        self.run = run
        self.events: list[Event] = []
        self._last_id: Optional[UUID] = None
        self._run_count = 0
        self._start_time: Optional[datetime] = None
        self._start_json: Optional[str] = None
        self._end_time: Optional[datetime] = None
        self._total_run_time = 0.0
        self._previous: Optional[StateRecord] = None
        self._past_pending = False
        self._previous_json: Optional[dict[str, Any]] = None
        self._resource_id = run.resource_id
        self._name = run.name
        self._related: list[Labels] = [
            {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
            for tag in sorted(run.tags)
        ] + [dict(labels) for labels in run.context]
        self._expected_json = (None if run.expected_start_time is None
                               else prefect_json_time(run.expected_start_time))
        self._checked = related_valid(self._related) and type(self._name) is str
        self._related_size = len(to_json(self._related)) if self._checked else 0

    def add(self, state: StateRecord) -> Event:
        """The run's next event, in `state`, checked as Prefect checks events.
        Raises `EventRejected`."""
        event = self.check(self.next_fields(state), state)
        self.events.append(event)
        return event

    def next_fields(self, state: StateRecord) -> dict[str, Any]:
        """The fields of the run's next event, in `state`, as `Event` holds
        them, unchecked."""
        previous = self._previous
        if previous is not None and previous.type is StateType.RUNNING:
            self._total_run_time += (state.timestamp - previous.timestamp).total_seconds()
        if state.type is StateType.RUNNING:
            self._run_count += 1
            if self._start_time is None:
                self._start_time = state.timestamp
                self._start_json = prefect_json_time(state.timestamp)
        if state.type.is_terminal and self._start_time is not None and self._end_time is None:
            self._end_time = state.timestamp  # as the engine: once, if it ever started
        run = self.run
        run_count = self._run_count
        started = run_count > 0
        # Field order and omitted Nones as `TaskRun.model_dump(mode="json", exclude_none=True)`.
        # Until the run first starts, the engine has not yet set its flow run's
        # run count nor the trace context label.
        labels = dict(run.labels)
        if not self._past_pending and state.type in _BEFORE_START:
            # Prefect's telemetry sets the label when it starts the run's
            # span, after the run's (first) Pending state.
            labels.pop(PREFECT_TRACEPARENT_LABEL, None)
        task_run: dict[str, Any] = {
            "name": self._name,
            "task_key": run.task_key,
            "dynamic_key": run.dynamic_key,
            "empirical_policy": dict(run.empirical_policy),
            "tags": list(run.tags),
            "labels": labels,
            "task_inputs": dict(run.task_inputs),
            "run_count": run_count,
            "flow_run_run_count": run.flow_run_run_count if started else 0,
        }
        if self._expected_json is not None:
            task_run["expected_start_time"] = self._expected_json
        if run.next_scheduled_start_time is not None:
            task_run["next_scheduled_start_time"] = prefect_json_time(run.next_scheduled_start_time)
        if self._start_json is not None:
            task_run["start_time"] = self._start_json
        if self._end_time is not None:
            task_run["end_time"] = prefect_json_time(self._end_time)
        task_run["total_run_time"] = round(self._total_run_time, 6)

        type_value = state.type.value
        message = state.message
        if not message or type(message) is not str or len(message) > STATE_MESSAGE_LIMIT:
            message = truncated(message)
        validated = {"type": type_value, "name": state.name, "message": message,
                     "state_details": dict(state.state_details), "data": state.data}
        payload = {
            "intended": {"from": previous.type.value if previous else None, "to": type_value},
            "initial_state": self._previous_json,
            "validated_state": validated,
            "task_run": task_run,
        }
        fields = {
            "occurred": state.timestamp,
            "event": f"prefect.task-run.{state.name}",
            "resource": {
                "prefect.resource.id": self._resource_id,
                "prefect.resource.name": self._name,
                "prefect.run-count": str(run_count),
                "prefect.state-message": message,
                "prefect.state-name": state.name,
                "prefect.state-timestamp": state.timestamp.isoformat(),
                "prefect.state-type": type_value,
                "prefect.orchestration": "client",
            },
            "related": [dict(labels) for labels in self._related],
            "payload": payload,
            "id": state.id,
            "follows": self._last_id,
        }
        self._last_id = state.id
        self._past_pending = self._past_pending or state.type is StateType.PENDING
        self._previous = state
        self._previous_json = {"type": type_value, "name": state.name, "message": message,
                               "state_details": dict(state.state_details)}
        return fields

    def check(self, fields: dict[str, Any], state: StateRecord) -> Event:
        """The event of `next_fields(state)`, checked: cheaply when every
        value is of the type it must be and its size is clearly within
        Prefect's limit, else by `validate_event`. Raises `EventRejected`."""
        message = fields["resource"]["prefect.state-message"]
        moment = state.timestamp
        name = state.name
        if (self._checked and type(moment) is datetime and moment.tzinfo is not None
                and type(name) is str and len(fields["event"]) <= MAX_EVENT_NAME_LENGTH
                and type(message) is str and type(state.id) is UUID):
            try:
                payload_json = to_json(fields["payload"])
            except Exception:  # not serialisable: let validation say so
                payload_json = None
            if payload_json is not None and (
                len(payload_json) + self._related_size
                + 6 * (len(message) + 2 * len(name) + len(self._name)) + _EVENT_SIZE_SLACK
                < MAX_EVENT_SIZE_BYTES
            ):
                if moment.tzinfo is not timezone.utc:
                    fields["occurred"] = moment.astimezone(timezone.utc)
                return checked_event(fields)
        return validate_event(fields)


def task_run_state_events(run: TaskRunRecord, states: Sequence[StateRecord]) -> list[Event]:
    """The events of `run` passing through `states`, in order."""
    builder = TaskRunEventBuilder(run)
    return [builder.add(state) for state in states]


_BEFORE_START = frozenset({StateType.SCHEDULED, StateType.PENDING})
# Bytes of an event's JSON besides its payload, related resources, state
# message and names: keys, ids, timestamps, run count, state type (about 600).
_EVENT_SIZE_SLACK = 2048
