"""A finished run's span -> its metric measurements (pure: no SDK, no clock).

Follows the OpenTelemetry CI/CD semantic conventions, release candidate, as
read from `model/cicd/metrics.yaml` and `model/cicd/registry.yaml` of
semantic-conventions v1.44.0 (+22 commits, 384d661): a flow run is a
pipeline run, a task run a pipeline task. docs/metrics.md is the
user-facing description; keep the two in step.

`cicd.pipeline.run.duration` is "grouped by pipeline, state and result", with
`cicd.pipeline.run.state` required: so a run gives one measurement per phase
it went through, as the conventions define the states. pending: from its
first state (Scheduled, Pending: the queue wait) to its first Running;
executing: from there (the span's start) to its end, or to Cancelling;
finalizing: Cancelling to Cancelled. The result, and `error.type` for a run
that failed, go on the phase in which the run ended ("if and only if the
pipeline run result has been set during that state"). Task runs get the same
under `prefect.task.run.*`, which the conventions do not define.

No run id, run name or span id is ever an attribute (low cardinality by
construction); the run's span id is the key that stops a run being counted
twice (`CountedRuns`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.model.states import KNOWN_STATE_NAMES, StateType
from otel_bridge.translate.forward import ATTR_SYNTHETIC_END, ATTR_SYNTHETIC_START
from otel_bridge.translate.span_layout import ATTR_STATE_TYPE, carried_state_events

__all__ = [
    "ATTR_PIPELINE_NAME", "ATTR_PIPELINE_RESULT", "ATTR_RUN_STATE", "ATTR_TASK_NAME",
    "ATTR_TASK_RESULT", "ATTR_TASK_RUN_STATE", "ATTR_ERROR_TYPE", "DURATION_BUCKETS",
    "FLOW_RUN_DURATION", "FLOW_RUN_ERRORS", "FLOW_RUN_ACTIVE", "TASK_RUN_DURATION",
    "TASK_RUN_ERRORS", "TASK_RUN_ACTIVE", "INSTRUMENTS", "InstrumentSpec", "Measurement",
    "RunMeasurements", "CountedRuns", "UNKNOWN_NAME", "phase_of", "run_measurements",
]

# -- attributes (the conventions' names, and ours where they have none) ------
ATTR_PIPELINE_NAME = "cicd.pipeline.name"
ATTR_PIPELINE_RESULT = "cicd.pipeline.result"
ATTR_RUN_STATE = "cicd.pipeline.run.state"  # pending, executing, finalizing
ATTR_TASK_NAME = "cicd.pipeline.task.name"
ATTR_TASK_RESULT = "cicd.pipeline.task.run.result"
# The conventions give a task run no state: ours takes cicd.pipeline.run.state's values.
ATTR_TASK_RUN_STATE = "prefect.task.run.state"
ATTR_ERROR_TYPE = "error.type"
# Where a span has no flow or task name: a required attribute is never left out.
UNKNOWN_NAME = "unknown"
# The flow a task run belongs to, as the forward bridge puts it on the task's span.
_SPAN_ATTR_FLOW_NAME = "prefect.related.flow.name"
# Only a flow run's span has it (never an attribute of a measurement).
_SPAN_ATTR_FLOW_RUN_ID = "cicd.pipeline.run.id"

PENDING, EXECUTING, FINALIZING = "pending", "executing", "finalizing"


@dataclass(frozen=True)
class InstrumentSpec:
    name: str
    kind: str  # "histogram", "counter", "updowncounter", "gauge"
    unit: str
    description: str


FLOW_RUN_DURATION = InstrumentSpec(
    "cicd.pipeline.run.duration", "histogram", "s",
    "Duration of a pipeline run grouped by pipeline, state and result.")
FLOW_RUN_ERRORS = InstrumentSpec(
    "cicd.pipeline.run.errors", "counter", "{error}",
    "The number of errors encountered in pipeline runs (eg. compile, test failures).")
FLOW_RUN_ACTIVE = InstrumentSpec(
    "cicd.pipeline.run.active", "updowncounter", "{run}",
    "The number of pipeline runs currently active in the system by state.")
TASK_RUN_DURATION = InstrumentSpec(
    "prefect.task.run.duration", "histogram", "s",
    "Duration of a Prefect task run grouped by task, state and result.")
TASK_RUN_ERRORS = InstrumentSpec(
    "prefect.task.run.errors", "counter", "{error}",
    "The number of Prefect task runs that failed, by task and error type.")
TASK_RUN_ACTIVE = InstrumentSpec(
    "prefect.task.run.active", "updowncounter", "{run}",
    "The number of Prefect task runs currently active by state.")
# The instruments measured from finished runs (the active and stuck ones are
# observed from the open runs: `open_run_metrics`).
INSTRUMENTS = (FLOW_RUN_DURATION, FLOW_RUN_ERRORS, TASK_RUN_DURATION, TASK_RUN_ERRORS)

# Seconds. The conventions advise none; runs last from a second to hours,
# so the boundaries go from 100 ms to a day, each 2 to 3 times the last.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
                    3600, 7200, 14400, 43200, 86400)


@dataclass(frozen=True)
class Measurement:
    instrument: InstrumentSpec
    value: float
    attributes: tuple[tuple[str, str], ...]  # sorted by key: hashable, comparable

    @property
    def attribute_map(self) -> dict[str, str]:
        return dict(self.attributes)


@dataclass(frozen=True)
class RunMeasurements:
    """What one finished run counts for, and the key that says it is the
    same run: its span id, deterministic from the run's id."""

    span_id: int
    measurements: tuple[Measurement, ...]


def phase_of(state_type: StateType) -> str:
    """The conventions' `cicd.pipeline.run.state` of a run in a Prefect
    state of this type: waiting to run is pending, being cancelled is
    finalizing (cleanup after execution), the rest executing."""
    if state_type in (StateType.SCHEDULED, StateType.PENDING):
        return PENDING
    if state_type is StateType.CANCELLING:
        return FINALIZING
    return EXECUTING


def run_measurements(span: Span) -> Optional[RunMeasurements]:
    """A finished run's measurements, from the span the forward bridge made
    of it; None for a span that did not reach a final state (its run is
    still open, or the bridge gave up on it: it is not counted)."""
    attributes = span.attributes
    if ATTR_SYNTHETIC_END in attributes:
        return None
    is_flow = _SPAN_ATTR_FLOW_RUN_ID in attributes  # a flow run's span, not a task run's
    result = attributes.get(ATTR_PIPELINE_RESULT if is_flow else ATTR_TASK_RESULT)
    if not isinstance(result, str):
        return None
    error_type = attributes.get(ATTR_ERROR_TYPE)
    error_type = str(error_type) if error_type else None
    if is_flow:
        names = ((ATTR_PIPELINE_NAME, _name(attributes, ATTR_PIPELINE_NAME)),)
        duration, errors, state, result_key = (
            FLOW_RUN_DURATION, FLOW_RUN_ERRORS, ATTR_RUN_STATE, ATTR_PIPELINE_RESULT)
    else:
        names = ((ATTR_TASK_NAME, _name(attributes, ATTR_TASK_NAME)),)
        flow = attributes.get(_SPAN_ATTR_FLOW_NAME)
        if isinstance(flow, str) and flow:
            names += ((ATTR_PIPELINE_NAME, flow),)
        duration, errors, state, result_key = (
            TASK_RUN_DURATION, TASK_RUN_ERRORS, ATTR_TASK_RUN_STATE, ATTR_TASK_RESULT)

    phases = _phases(span)
    out = []
    for index, (phase, seconds) in enumerate(phases):
        labels = dict(names)
        labels[state] = phase
        if index == len(phases) - 1:  # the phase in which the run ended
            labels[result_key] = result
            if error_type:
                labels[ATTR_ERROR_TYPE] = error_type
        out.append(Measurement(duration, seconds, _sorted(labels)))
    if error_type:
        out.append(Measurement(errors, 1, _sorted({**dict(names), ATTR_ERROR_TYPE: error_type})))
    return RunMeasurements(span.span_id, tuple(out))


def _phases(span: Span) -> list[tuple[str, float]]:
    """(phase, seconds) for each phase the run went through, in order; the
    seconds add up to the time from its first state to its end."""
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if ATTR_SYNTHETIC_START in span.attributes:  # never ran: pending throughout
        return [(PENDING, _seconds(end - start))]
    states = carried_state_events(span.events)
    first = min((e.time_unix_nano for e in states), default=start)
    cancelling = next((e.time_unix_nano for e in states
                       if start <= e.time_unix_nano <= end
                       and _type(e) is StateType.CANCELLING), None)
    phases = []
    if first < start:
        phases.append((PENDING, _seconds(start - first)))
    phases.append((EXECUTING, _seconds((cancelling if cancelling is not None else end) - start)))
    if cancelling is not None:
        phases.append((FINALIZING, _seconds(end - cancelling)))
    return phases


def _type(event: SpanEvent) -> Optional[StateType]:
    given = event.attributes.get(ATTR_STATE_TYPE)
    try:
        return StateType(given) if given is not None else KNOWN_STATE_NAMES.get(event.name)
    except ValueError:
        return None


def _seconds(nanoseconds: int) -> float:
    return max(nanoseconds, 0) / 1e9


def _name(attributes: Mapping[str, object], key: str) -> str:
    value = attributes.get(key)
    return value if isinstance(value, str) and value else UNKNOWN_NAME


def _sorted(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class CountedRuns:
    """The runs already counted, by span id: a run is counted the first time
    only, however often and in whatever order its span comes (an event seen
    twice, a restart that rebuilds it). Bounded as the assembler's memory of
    finished runs is: the oldest are forgotten first."""

    def __init__(self, limit: int = 100_000, counted: Sequence[int] = ()) -> None:
        self._limit = limit
        self._seen: OrderedDict[int, None] = OrderedDict()
        for span_id in counted:
            self.first_time(span_id)

    def first_time(self, span_id: int) -> bool:
        """Whether this run is new, remembering it if so."""
        if span_id in self._seen:
            return False
        self._seen[span_id] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True

    def __contains__(self, span_id: object) -> bool:
        # A lookup, not the scan `in` makes over `__iter__`: a sidecar asks
        # for every run it emits, with up to `limit` remembered.
        return span_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def __iter__(self):
        return iter(self._seen)
