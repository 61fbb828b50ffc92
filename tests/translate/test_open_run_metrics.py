"""Active and stuck runs, from the open runs and a clock given."""

from __future__ import annotations

from otel_bridge.model.states import StateType
from otel_bridge.translate.open_run_metrics import (
    OpenRun,
    StuckThresholds,
    active_runs,
    stuck_runs,
)

S = 1_000_000_000
NOW = 10_000 * S


def _run(kind, name, state, state_type, seconds_ago):
    return OpenRun(kind, name, state, state_type, NOW - seconds_ago * S)


RUNS = [
    _run("flow-run", "etl", "Late", StateType.SCHEDULED, 301),
    _run("flow-run", "etl", "Scheduled", StateType.SCHEDULED, 5000),  # due later: not stuck
    _run("flow-run", "etl", "Pending", StateType.PENDING, 599),
    _run("flow-run", "etl", "Running", StateType.RUNNING, 3601),
    _run("flow-run", "etl", "Cancelling", StateType.CANCELLING, 1),
    _run("task-run", "load", "Running", StateType.RUNNING, 7200),
    _run("task-run", "load", "Running", StateType.RUNNING, 10),
]


def _table(measurements):
    return [(m.instrument.name, m.attribute_map, m.value) for m in measurements]


def test_active_runs_by_the_conventions_states():
    assert _table(active_runs(RUNS)) == [
        ("cicd.pipeline.run.active",
         {"cicd.pipeline.name": "etl", "cicd.pipeline.run.state": "executing"}, 1),
        ("cicd.pipeline.run.active",
         {"cicd.pipeline.name": "etl", "cicd.pipeline.run.state": "finalizing"}, 1),
        ("cicd.pipeline.run.active",
         {"cicd.pipeline.name": "etl", "cicd.pipeline.run.state": "pending"}, 3),
        ("prefect.task.run.active",
         {"cicd.pipeline.task.name": "load", "prefect.task.run.state": "executing"}, 2),
    ]


def test_stuck_runs_past_the_default_thresholds():
    assert _table(stuck_runs(RUNS, NOW)) == [
        ("prefect.flow.run.stuck", {"cicd.pipeline.name": "etl", "prefect.state.name": "Late"}, 1),
        ("prefect.flow.run.stuck",
         {"cicd.pipeline.name": "etl", "prefect.state.name": "Running"}, 1),
        ("prefect.task.run.stuck",
         {"cicd.pipeline.task.name": "load", "prefect.state.name": "Running"}, 1),
    ]


def test_thresholds_are_options_and_name_the_states_measured():
    thresholds = StuckThresholds({"Scheduled": 60, "Pending": 1})
    assert [(m.attribute_map["prefect.state.name"], m.value)
            for m in stuck_runs(RUNS, NOW, thresholds)] == [("Pending", 1), ("Scheduled", 1)]
    assert stuck_runs([], NOW) == [] and active_runs([]) == []
