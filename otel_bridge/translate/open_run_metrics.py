"""The runs still open -> how many are active, and how many are stuck (pure).

A run stuck in Late, Pending or Running shows here while it is stuck, not
when (if ever) it ends: `serve` observes these at each metric export from
the runs its assembler holds open, with its own clock as `now`.
docs/metrics.md describes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from otel_bridge.model.events import Event
from otel_bridge.model.states import StateType
from otel_bridge.translate.forward import pipeline_name, state_type
from otel_bridge.translate.run_metrics import (
    ATTR_PIPELINE_NAME,
    ATTR_RUN_STATE,
    ATTR_TASK_NAME,
    ATTR_TASK_RUN_STATE,
    FLOW_RUN_ACTIVE,
    TASK_RUN_ACTIVE,
    UNKNOWN_NAME,
    InstrumentSpec,
    Measurement,
    phase_of,
)
from otel_bridge.translate.span_layout import FLOW_RUN
from otel_bridge.translate.times import to_unix_nano

__all__ = ["ATTR_STATE_NAME", "FLOW_RUN_STUCK", "OPEN_RUN_INSTRUMENTS", "TASK_RUN_STUCK", "OpenRun",
           "StuckThresholds", "active_runs", "open_run_of", "stuck_runs"]

ATTR_STATE_NAME = "prefect.state.name"

FLOW_RUN_STUCK = InstrumentSpec(
    "prefect.flow.run.stuck", "gauge", "{run}",
    "Flow runs in a state for longer than its threshold, by flow and state name.")
TASK_RUN_STUCK = InstrumentSpec(
    "prefect.task.run.stuck", "gauge", "{run}",
    "Task runs in a state for longer than its threshold, by task and state name.")

# What is observed of the open runs, at each export.
OPEN_RUN_INSTRUMENTS = (FLOW_RUN_ACTIVE, TASK_RUN_ACTIVE, FLOW_RUN_STUCK, TASK_RUN_STUCK)


@dataclass(frozen=True)
class OpenRun:
    kind: str  # span_layout.FLOW_RUN or TASK_RUN
    name: str  # the flow's name (a flow run) or the task's (a task run)
    state_name: str  # as Prefect names it: Late, Pending, Running, ...
    state_type: StateType
    entered_unix_nano: int  # when the run entered that state


def open_run_of(kind: str, event: Event, before: Optional[OpenRun] = None) -> OpenRun:
    """The open run as this state-change event leaves it: the state the
    event names, entered when the event occurred. Names as the run's span
    will carry them (`UNKNOWN_NAME` where the event tells none); `before`,
    the run as its last event left it, lends its name when it has one."""
    name = before.name if before is not None and before.name != UNKNOWN_NAME else (
        pipeline_name(kind, event) or UNKNOWN_NAME)
    return OpenRun(kind, name, event.resource.get("prefect.state-name") or "",
                   state_type(event), to_unix_nano(event.occurred))


def _default_after() -> dict[str, float]:
    # Scheduled is not here: a run scheduled for tomorrow is in it by design,
    # and Prefect itself marks one Late once its start time has passed.
    return {"Late": 5 * 60, "Pending": 10 * 60, "Running": 60 * 60}


@dataclass(frozen=True)
class StuckThresholds:
    """Seconds in a state, by state name, after which a run is stuck. Only
    these names are measured, so the state name attribute stays bounded."""

    after: Mapping[str, float] = field(default_factory=_default_after)


def active_runs(runs: Iterable[OpenRun]) -> list[Measurement]:
    """`cicd.pipeline.run.active` (flow runs) and `prefect.task.run.active`
    (task runs): open runs by name and the conventions' run state, in a
    stable order. Runs in a final state are not open and must not be given."""
    counts: Counter = Counter()
    for run in runs:
        counts[(run.kind, run.name, phase_of(run.state_type))] += 1
    return [_measurement(kind, name, phase, count, FLOW_RUN_ACTIVE, TASK_RUN_ACTIVE,
                         (ATTR_RUN_STATE, ATTR_TASK_RUN_STATE))
            for (kind, name, phase), count in sorted(counts.items())]


def stuck_runs(runs: Iterable[OpenRun], now_unix_nano: int,
               thresholds: StuckThresholds = StuckThresholds()) -> list[Measurement]:
    """Open runs in a state for longer than its threshold at `now`, by name
    and state name, in a stable order; a name and state with none stuck is
    left out (an observed gauge then reports no point for it)."""
    counts: Counter = Counter()
    for run in runs:
        limit = thresholds.after.get(run.state_name)
        if limit is not None and now_unix_nano - run.entered_unix_nano > limit * 1e9:
            counts[(run.kind, run.name, run.state_name)] += 1
    return [_measurement(kind, name, state, count, FLOW_RUN_STUCK, TASK_RUN_STUCK,
                         (ATTR_STATE_NAME, ATTR_STATE_NAME))
            for (kind, name, state), count in sorted(counts.items())]


def _measurement(kind: str, name: str, state: str, count: int, flow: InstrumentSpec,
                 task: InstrumentSpec, state_keys: tuple[str, str]) -> Measurement:
    if kind == FLOW_RUN:
        labels = ((ATTR_PIPELINE_NAME, name), (state_keys[0], state))
        return Measurement(flow, count, tuple(sorted(labels)))
    labels = ((ATTR_TASK_NAME, name), (state_keys[1], state))
    return Measurement(task, count, tuple(sorted(labels)))
