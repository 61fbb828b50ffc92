"""Task-run state events built the way Prefect's task engine builds them
(`prefect.utilities.engine.emit_task_run_state_change_event`, 3.9): the same
labels, related resources, payload and `follows` chain, from a run and the
states it went through. Used where the events must be made from something
that is not Prefect: spans (reverse direction) and engines (dual emission).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence
from uuid import UUID

from otel_bridge.model.events import PREFECT_TRACEPARENT_LABEL, Event, Labels, validate_event
from otel_bridge.model.states import StateType

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
    # The run's context, which Prefect's events worker appends after the tags:
    # flow-run, flow, deployment, ..., the enclosing task-run.
    context: Sequence[Labels] = ()

    @property
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
    chains each event to the one before (`follows`)."""

    def __init__(self, run: TaskRunRecord):
        self.run = run
        self.events: list[Event] = []
        self._run_count = 0
        self._start_time: Optional[datetime] = None
        self._end_time: Optional[datetime] = None
        self._total_run_time = 0.0
        self._previous: Optional[StateRecord] = None

    def add(self, state: StateRecord) -> Event:
        previous = self._previous
        if previous is not None and previous.type is StateType.RUNNING:
            self._total_run_time += (state.timestamp - previous.timestamp).total_seconds()
        if state.type is StateType.RUNNING:
            self._run_count += 1
            self._start_time = self._start_time or state.timestamp
        if state.type.is_terminal:
            self._end_time = state.timestamp
        task_run = _task_run_payload(
            self.run, self._run_count, self._start_time, self._end_time, self._total_run_time
        )
        event = _event(self.run, previous, state, self._run_count, task_run,
                       self.events[-1].id if self.events else None)
        self.events.append(event)
        self._previous = state
        return event


def task_run_state_events(run: TaskRunRecord, states: Sequence[StateRecord]) -> list[Event]:
    """The events of `run` passing through `states`, in order."""
    builder = TaskRunEventBuilder(run)
    return [builder.add(state) for state in states]


def _task_run_payload(run, run_count, start_time, end_time, total_run_time) -> dict[str, Any]:
    # Field order and omitted Nones as `TaskRun.model_dump(mode="json", exclude_none=True)`.
    # Until the run first starts, the engine has not yet set its flow run's
    # run count nor the trace context label.
    started = run_count > 0
    payload: dict[str, Any] = {
        "name": run.name,
        "task_key": run.task_key,
        "dynamic_key": run.dynamic_key,
        "empirical_policy": dict(run.empirical_policy),
        "tags": list(run.tags),
        "labels": {k: v for k, v in run.labels.items()
                   if started or k != PREFECT_TRACEPARENT_LABEL},
        "task_inputs": dict(run.task_inputs),
        "run_count": run_count,
        "flow_run_run_count": run.flow_run_run_count if started else 0,
    }
    if run.expected_start_time is not None:
        payload["expected_start_time"] = _json_time(run.expected_start_time)
    if start_time is not None:
        payload["start_time"] = _json_time(start_time)
    if end_time is not None:
        payload["end_time"] = _json_time(end_time)
    payload["total_run_time"] = round(total_run_time, 6)
    return payload


def _state_json(state: StateRecord, *, with_data: bool) -> dict[str, Any]:
    out = {
        "type": state.type.value,
        "name": state.name,
        "message": truncated(state.message),
        "state_details": dict(state.state_details),
    }
    if with_data:
        out["data"] = state.data
    return out


def _event(run, previous, state, run_count, task_run, follows) -> Event:
    related = [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(run.tags)
    ] + [dict(labels) for labels in run.context]
    return validate_event({
        "occurred": state.timestamp,
        "event": f"prefect.task-run.{state.name}",
        "resource": {
            "prefect.resource.id": run.resource_id,
            "prefect.resource.name": run.name,
            "prefect.run-count": str(run_count),
            "prefect.state-message": truncated(state.message),
            "prefect.state-name": state.name,
            "prefect.state-timestamp": state.timestamp.isoformat(),
            "prefect.state-type": state.type.value,
            "prefect.orchestration": "client",
        },
        "related": related,
        "payload": {
            "intended": {"from": previous.type.value if previous else None,
                         "to": state.type.value},
            "initial_state": _state_json(previous, with_data=False) if previous else None,
            "validated_state": _state_json(state, with_data=True),
            "task_run": task_run,
        },
        "id": state.id,
        "follows": follows,
    })


def _json_time(moment: datetime) -> str:
    # Prefect's JSON form of its DateTime: UTC with a Z.
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
