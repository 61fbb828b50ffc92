"""Flow-run state events built the way Prefect's server builds them
(`prefect.server.models.events.flow_run_state_change_event`, 3.9): the same
labels, related resources, payload and `follows` rule, from a run and the
states it went through. The forward bridge rebuilds a flow run's events from
its span with this, the way `task_run_events` does for task runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

from otel_bridge.model.events import Event, Labels, validate_event
from otel_bridge.translate.task_run_events import StateRecord, truncated

__all__ = ["FlowRunEventBuilder", "FlowRunRecord"]

# The server chains an event to the one before (`follows`) only when the two
# states are this close in time (`_timing_is_tight`).
TIGHT_TIMING = timedelta(minutes=5)


@dataclass(frozen=True)
class FlowRunRecord:
    resource_id: str  # prefect.flow-run.<uuid>
    name: str
    # As the server lists them: flow, deployment, work-queue, work-pool,
    # the parent task run, then the tags, then the creator.
    related: Sequence[Labels] = ()


class FlowRunEventBuilder:
    """Builds a flow run's events one state at a time, as the server does:
    the run count goes up on every RUNNING-type state, and each event
    follows the one before when their states are close in time."""

    def __init__(self, run: FlowRunRecord):
        self.run = run
        self.events: list[Event] = []
        self._run_count = 0
        self._previous: Optional[StateRecord] = None

    def add(self, state: StateRecord) -> Event:
        """The run's next event, in `state`, checked as Prefect checks events.
        Raises `EventRejected`."""
        event = self.check(self.next_fields(state), state)
        self.events.append(event)
        return event

    def check(self, fields: dict[str, Any], state: StateRecord) -> Event:
        """The event of `next_fields(state)`, checked. Raises `EventRejected`."""
        return validate_event(fields)

    def next_fields(self, state: StateRecord) -> dict[str, Any]:
        """The fields of the run's next event, in `state`, unchecked."""
        if state.type.value == "RUNNING":
            self._run_count += 1
        previous = self._previous
        message = truncated(state.message)
        follows = None
        if previous is not None and -TIGHT_TIMING < state.timestamp - previous.timestamp < TIGHT_TIMING:
            follows = previous.id
        fields = {
            "occurred": state.timestamp,
            "event": f"prefect.flow-run.{state.name}",
            "resource": {
                "prefect.resource.id": self.run.resource_id,
                "prefect.resource.name": self.run.name,
                "prefect.run-count": str(self._run_count),
                "prefect.state-message": message,
                "prefect.state-name": state.name,
                "prefect.state-timestamp": state.timestamp.isoformat(),
                "prefect.state-type": state.type.value,
            },
            "related": [dict(labels) for labels in self.run.related],
            "payload": {
                "intended": {"from": previous.type.value if previous else None,
                             "to": state.type.value},
                "initial_state": _state_payload(previous),
                "validated_state": _state_payload(state),
            },
            "id": state.id,
            "follows": follows,
        }
        self._previous = state
        return fields


def _state_payload(state: Optional[StateRecord]) -> Optional[dict[str, Any]]:
    """The server's `state_payload`: type, and name and message when set."""
    if state is None:
        return None
    payload: dict[str, Any] = {"type": state.type.value}
    if state.name:
        payload["name"] = state.name
    if state.message:
        payload["message"] = truncated(state.message)
    return payload
