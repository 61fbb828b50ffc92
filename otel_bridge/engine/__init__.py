"""Dual emission for engines: one call per state change gives both the
Prefect event (exactly as Prefect's task engine builds it) and a live
OpenTelemetry span (exactly the span the forward bridge makes from those
events, so a sidecar that also sees them makes the same span with the same
id).

    from otel_bridge.engine import JsonlEventSink, TaskRunTracker

    with JsonlEventSink("events.jsonl") as sink:
        with TaskRunTracker("extract", sink=sink, tags=["etl"]) as run:
            ...  # spans opened here are children of the run's span
            # run.set_state("RUNNING", "Retrying", "attempt 1 failed") etc.
"""

from otel_bridge.translate.task_run_events import TaskRunEventBuilder
from otel_bridge.engine._sinks import BatchEventSink, EventList, EventSink, JsonlEventSink
from otel_bridge.engine._tracing import tracer_provider_from_env
from otel_bridge.engine._tracker import (
    FlowRunRef,
    TaskRunTracker,
    crash_message,
    current_task_run,
    failure_text,
)
from otel_bridge.model.states import StateType

__all__ = [
    "BatchEventSink",
    "EventList",
    "EventSink",
    "FlowRunRef",
    "TaskRunEventBuilder",
    "JsonlEventSink",
    "StateType",
    "TaskRunTracker",
    "crash_message",
    "current_task_run",
    "failure_text",
    "tracer_provider_from_env",
]
