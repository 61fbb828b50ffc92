"""Prefect's state types, and which of them end a run."""

from __future__ import annotations

import enum


class StateType(str, enum.Enum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_TYPES


TERMINAL_TYPES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)

# The state names the spec lists, with their types. Prefect allows any name, so
# this is used to fill in a type where only a name is known (reverse direction),
# never to reject an event whose name is not here.
KNOWN_STATE_NAMES: dict[str, StateType] = {
    "Scheduled": StateType.SCHEDULED,
    "Late": StateType.SCHEDULED,
    "AwaitingConcurrencySlot": StateType.SCHEDULED,
    "AwaitingRetry": StateType.SCHEDULED,
    "Pending": StateType.PENDING,
    "Submitting": StateType.PENDING,
    "InfrastructurePending": StateType.PENDING,
    "NotReady": StateType.PENDING,
    "Running": StateType.RUNNING,
    "Retrying": StateType.RUNNING,
    "Completed": StateType.COMPLETED,
    "Cached": StateType.COMPLETED,
    "RolledBack": StateType.COMPLETED,
    "Failed": StateType.FAILED,
    "TimedOut": StateType.FAILED,
    "Crashed": StateType.CRASHED,
    "Cancelled": StateType.CANCELLED,
    "Cancelling": StateType.CANCELLING,
    "Paused": StateType.PAUSED,
    "Suspended": StateType.PAUSED,
}

# Each state type by the value an event's `prefect.state-type` label holds.
STATE_TYPES_BY_VALUE: dict[str, StateType] = {member.value: member for member in StateType}
