"""Prefect-shaped events for tests, built the way Prefect 3.9's engines build
them (`emit_task_run_state_change_event` for task runs, the server's
orchestration for flow runs): the same labels, related resources, payload and
`follows` chain. Real captures live in tests/fixtures; these cover what a
capture cannot choose (exact timestamps, ids, rare orders)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

from otel_bridge.model.states import KNOWN_STATE_NAMES

T0 = datetime(2026, 11, 28, 17, 50, 55, 248180, tzinfo=timezone.utc)


def iso_z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FlowRun:
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = "whimsical-loris"
    flow_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    flow_name: str = "my-flow"

    @property
    def resource_id(self) -> str:
        return f"prefect.flow-run.{self.id}"

    def related(self) -> list[dict]:
        return [
            {"prefect.resource.id": self.resource_id, "prefect.resource.role": "flow-run",
             "prefect.resource.name": self.name},
            {"prefect.resource.id": f"prefect.flow.{self.flow_id}",
             "prefect.resource.role": "flow", "prefect.resource.name": self.flow_name},
        ]


def _state_type(name: str) -> str:
    return KNOWN_STATE_NAMES[name].value


def task_run_events(
    states: Sequence[str],
    *,
    run_id: Optional[str] = None,
    name: str = "add-50d",
    flow_run: Optional[FlowRun] = None,
    tags: Sequence[str] = (),
    parent_task_id: Optional[str] = None,
    start: datetime = T0,
    step: timedelta = timedelta(milliseconds=3),
    messages: Optional[dict[str, str]] = None,
    traceparent: Optional[str] = None,
) -> list[dict]:
    """The events of one task run passing through `states` (state names)."""
    run_id = run_id or str(uuid.uuid4())
    messages = messages or {}
    events: list[dict] = []
    run_count = 0
    previous: Optional[dict] = None
    for i, state_name in enumerate(states):
        state_type = _state_type(state_name)
        if state_type == "RUNNING":
            run_count += 1
        occurred = start + step * i
        message = messages.get(state_name, "")
        validated = {"type": state_type, "name": state_name, "message": message,
                     "state_details": {}, "data": None}
        task_inputs: dict = {"x": [], "y": []}
        if parent_task_id:
            task_inputs["__parents__"] = [{"input_type": "task_run", "id": parent_task_id}]
        labels = {"__OTEL_TRACEPARENT": traceparent} if traceparent and run_count else {}
        related = [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"}
                   for t in sorted(tags)]
        if flow_run:
            related += flow_run.related()
        event = {
            "occurred": iso_z(occurred),
            "event": f"prefect.task-run.{state_name}",
            "resource": {
                "prefect.resource.id": f"prefect.task-run.{run_id}",
                "prefect.resource.name": name,
                "prefect.run-count": str(run_count),
                "prefect.state-message": message,
                "prefect.state-name": state_name,
                "prefect.state-timestamp": occurred.isoformat(),
                "prefect.state-type": state_type,
                "prefect.orchestration": "client",
            },
            "related": related,
            "payload": {
                "intended": {"from": previous["payload"]["validated_state"]["type"] if previous else None,
                             "to": state_type},
                "initial_state": (
                    {k: previous["payload"]["validated_state"][k]
                     for k in ("type", "name", "message", "state_details")}
                    if previous else None
                ),
                "validated_state": validated,
                "task_run": {
                    "name": name,
                    "task_key": "add-971ebf84",
                    "dynamic_key": "525696d2-52ae-403a-8fb1-05ecda42d76a",
                    "empirical_policy": {"max_retries": 0, "retry_delay_seconds": 0.0,
                                         "retries": 0, "retry_delay": 0},
                    "tags": sorted(tags),
                    "labels": labels,
                    "task_inputs": task_inputs,
                    "run_count": run_count,
                    "flow_run_run_count": 1 if flow_run else 0,
                    "expected_start_time": iso_z(start),
                    "total_run_time": 0.0,
                },
            },
            "id": str(uuid.uuid4()),
            "follows": previous["id"] if previous else None,
        }
        events.append(event)
        previous = event
    return events


def flow_run_events(
    states: Sequence[str],
    flow_run: FlowRun,
    *,
    start: datetime = T0,
    step: timedelta = timedelta(milliseconds=50),
    messages: Optional[dict[str, str]] = None,
    parent_task_id: Optional[str] = None,
) -> list[dict]:
    """The server-side events of one flow run passing through `states`."""
    messages = messages or {}
    events: list[dict] = []
    run_count = 0
    previous: Optional[dict] = None
    related = [flow_run.related()[1]]
    if parent_task_id:
        related.append({"prefect.resource.id": f"prefect.task-run.{parent_task_id}",
                        "prefect.resource.role": "task-run", "prefect.resource.name": "sub-abc"})
    for i, state_name in enumerate(states):
        state_type = _state_type(state_name)
        if state_type == "RUNNING":
            run_count += 1
        occurred = start + step * i
        event = {
            "occurred": iso_z(occurred),
            "event": f"prefect.flow-run.{state_name}",
            "resource": {
                "prefect.resource.id": flow_run.resource_id,
                "prefect.resource.name": flow_run.name,
                "prefect.run-count": str(run_count),
                "prefect.state-message": messages.get(state_name, ""),
                "prefect.state-name": state_name,
                "prefect.state-timestamp": occurred.isoformat(),
                "prefect.state-type": state_type,
            },
            "related": related,
            "payload": {
                "intended": {"from": previous["resource"]["prefect.state-type"] if previous else None,
                             "to": state_type},
                "initial_state": ({"type": previous["resource"]["prefect.state-type"],
                                   "name": previous["resource"]["prefect.state-name"]}
                                  if previous else None),
                "validated_state": {"type": state_type, "name": state_name},
            },
            "id": str(uuid.uuid4()),
            "follows": previous["id"] if previous else None,
        }
        events.append(event)
        previous = event
    return events
