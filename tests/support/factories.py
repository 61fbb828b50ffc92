"""Prefect-shaped events for tests, built the way Prefect 3.9's engines build
them (`emit_task_run_state_change_event` for task runs, the server's
orchestration for flow runs): the same labels, related resources, payload
(run counts, start and end time, total run time) and `follows` chain, so the
span layout rebuilds them with no patch, as it does Prefect's own. Real
captures live in tests/fixtures; these cover what a capture cannot choose
(exact timestamps, ids, rare orders, sizes)."""

from __future__ import annotations

import re
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


_FINAL_TYPES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


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
    task_key: Optional[str] = None,
) -> list[dict]:
    """The events of one task run passing through `states` (state names).
    The task key defaults to the run's name without its 3-character suffix
    (as Prefect names runs after their task) and a fixed hash."""
    run_id = run_id or str(uuid.uuid4())
    task_key = task_key or f"{re.sub(r'-[0-9a-f]{3}$', '', name)}-971ebf84"
    messages = messages or {}
    events: list[dict] = []
    run_count = 0
    previous: Optional[dict] = None
    # As the engine keeps them: set at the first Running and at the first
    # final state after it (once), and the time spent in Running states.
    start_time: Optional[datetime] = None
    end_time: Optional[datetime] = None
    total_run_time = 0.0
    for i, state_name in enumerate(states):
        state_type = _state_type(state_name)
        occurred = start + step * i
        if previous is not None and previous["resource"]["prefect.state-type"] == "RUNNING":
            total_run_time += (occurred - (start + step * (i - 1))).total_seconds()
        if state_type == "RUNNING":
            run_count += 1
            start_time = start_time or occurred
        if state_type in _FINAL_TYPES and start_time is not None and end_time is None:
            end_time = occurred
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
                    "task_key": task_key,
                    "dynamic_key": "525696d2-52ae-403a-8fb1-05ecda42d76a",
                    "empirical_policy": {"max_retries": 0, "retry_delay_seconds": 0.0,
                                         "retries": 0, "retry_delay": 0},
                    "tags": sorted(tags),
                    "labels": labels,
                    "task_inputs": task_inputs,
                    "run_count": run_count,
                    # The engine sets it when the run starts.
                    "flow_run_run_count": 1 if flow_run and run_count else 0,
                    "expected_start_time": iso_z(start),
                    **({"start_time": iso_z(start_time)} if start_time else {}),
                    **({"end_time": iso_z(end_time)} if end_time else {}),
                    "total_run_time": round(total_run_time, 6),
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
        # The server's state_payload: the type, and the name and the
        # message where set.
        state = {"type": state_type, "name": state_name}
        if messages.get(state_name):
            state["message"] = messages[state_name]
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
                "initial_state": previous["payload"]["validated_state"] if previous else None,
                "validated_state": state,
            },
            "id": str(uuid.uuid4()),
            "follows": previous["id"] if previous else None,
        }
        events.append(event)
        previous = event
    return events


# -- log lines --------------------------------------------------------------

LOG_FLOW_RUN = "0f6b3c1e-4a3e-4f7e-9a52-1d2c3b4a5f60"
LOG_TASK_RUN = "7c1d2e3f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


def prefect_log(**fields):
    """A log line as POST /api/logs/filter returns it (Prefect 3.9.1)."""
    log = {"id": str(uuid.uuid4()), "created": "2026-03-01T10:00:01.500000Z",
           "updated": "2026-03-01T10:00:01.500000Z", "name": "prefect.task_runs", "level": 20,
           "message": "Finished in state Completed()", "timestamp": "2026-03-01T10:00:01.250000Z",
           "flow_run_id": LOG_FLOW_RUN, "task_run_id": LOG_TASK_RUN}
    log.update(fields)
    return log


def runs_of_span(span):
    """(flow_run_id, task_run_id) of a span made by the forward bridge."""
    attributes = span.attributes
    if "cicd.pipeline.task.run.id" in attributes:
        return attributes.get("prefect.related.flow-run.id"), attributes["cicd.pipeline.task.run.id"]
    return attributes["cicd.pipeline.run.id"], None
