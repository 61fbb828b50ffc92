"""benchmarks/span_weight.py on the committed captures with Prefect's own spans
(tests/fixtures/prefect-3.9.1-telemetry): the comparison is of like with like.
Only structural facts; the weight target is the benchmark's to judge."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("span_weight", ROOT / "benchmarks" / "span_weight.py")
span_weight = sys.modules["span_weight"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(span_weight)

FIXTURES = ROOT / "tests" / "fixtures" / "prefect-3.9.1-telemetry"

# Runs Prefect 3.9.1 starts a span for but never ends, so never exports: the
# task that timed out (sync handle_timeout), the one NotReady, the one left
# Running in a worker thread when the runner killed the flow's process, and
# that flow run itself.
UNTRACED_TASKS = {"timeout": ["too_slow"], "not-ready": ["downstream"], "cancelled": ["slow"]}
UNTRACED_FLOWS = {"cancelled": 1}


@pytest.fixture(scope="module")
def results():
    return span_weight.compare(FIXTURES)


def test_every_goal_scenario_is_captured(results):
    assert set(span_weight.GOAL_SCENARIOS) <= results.keys()
    for scenario in results:
        assert (FIXTURES / f"{scenario}.jsonl").stat().st_size > 0


def test_every_run_prefect_traced_has_a_span_of_ours(results):
    for scenario, kinds in results.items():
        for kind, weight in kinds.items():
            assert weight.only_prefect == [], (scenario, kind)


def test_runs_without_a_prefect_span_are_the_ones_prefect_never_ends(results):
    for scenario, kinds in results.items():
        untraced = [name.rsplit("-", 1)[0] for name in kinds["task"].only_ours]
        assert untraced == UNTRACED_TASKS.get(scenario, []), scenario
        assert len(kinds["flow"].only_ours) == UNTRACED_FLOWS.get(scenario, 0), scenario


def test_every_scenario_has_matched_task_runs(results):
    for scenario, kinds in results.items():
        if scenario == "timeout":  # its one task run is untraced by Prefect
            continue
        task = kinds["task"]
        assert task.matched > 0, scenario
        assert task.ours > 0 and task.prefect > 0, scenario


def test_map_500_matches_every_task_run(results):
    task = results["map-500"]["task"]
    assert task.matched == 500 and not task.only_ours
