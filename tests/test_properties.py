"""Same events in, same spans out: whatever the order, repeats, or how the
input is split between batches and replicas (property-based)."""

from __future__ import annotations

from datetime import timedelta

from factories import T0, FlowRun, flow_run_events, task_run_events
from helpers import convert, events
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_bridge.translate.assembler import Assembler

PATHS = [
    ["Pending", "Running", "Completed"],
    ["Pending", "Running", "Failed"],
    ["Pending", "Running", "Retrying", "Completed"],
    ["Pending", "Running", "AwaitingRetry", "Retrying", "AwaitingRetry", "Retrying", "Failed"],
    ["Pending", "Running", "Cached"],
    ["Pending", "NotReady"],
    ["Pending", "Running", "Crashed"],
    ["Pending", "Running", "TimedOut"],
    ["Pending", "Running", "Completed", "RolledBack"],
    ["Scheduled", "Pending", "Running", "Completed"],
    ["Pending", "Running"],  # never ends
]


@st.composite
def workloads(draw):
    flow_run = FlowRun()
    runs: list[list[dict]] = []
    for i in range(draw(st.integers(1, 6))):
        parent = None
        if runs and draw(st.booleans()):
            parent = runs[-1][0]["resource"]["prefect.resource.id"].removeprefix(
                "prefect.task-run.")
        # step 0 puts every state of a run at the same instant: only the
        # follows chain can order them then.
        step = timedelta(microseconds=draw(st.sampled_from([0, 1, 1500])))
        runs.append(task_run_events(
            draw(st.sampled_from(PATHS)), name=f"task-{i}", flow_run=flow_run,
            parent_task_id=parent, step=step,
            start=T0 + timedelta(milliseconds=draw(st.integers(0, 50))),
            messages={"Failed": "Task run encountered an exception ValueError: x"},
        ))
    if draw(st.booleans()):
        runs.append(flow_run_events(["Pending", "Running", "Completed"], flow_run))
    if draw(st.booleans()):
        runs.append(task_run_events(["Scheduled", "Pending", "Running", "Completed"],
                                    name="deferred"))
    return [event for run in runs for event in run]


def canonical(spans):
    return sorted(spans, key=lambda s: s.span_id)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), workload=workloads())
def test_order_and_repeats_do_not_change_the_spans(data, workload):
    expected = canonical(convert(workload))
    shuffled = data.draw(st.permutations(workload))
    repeats = data.draw(st.lists(st.sampled_from(workload), max_size=10))
    assert canonical(convert(shuffled + repeats)) == expected
    assert len(expected) == len({e["resource"]["prefect.resource.id"] for e in workload})


@settings(max_examples=100, deadline=None)
@given(data=st.data(), workload=workloads())
def test_replicas_that_each_see_some_runs_agree_with_one_that_sees_all(data, workload):
    """Partitioned by run (as a load balancer keyed on the resource id would),
    in any order, several assemblers give exactly the spans of one."""
    expected = canonical(convert(workload))
    replicas = data.draw(st.integers(2, 4))
    parts: list[list[dict]] = [[] for _ in range(replicas)]
    for event in data.draw(st.permutations(workload)):
        parts[hash(event["resource"]["prefect.resource.id"]) % replicas].append(event)
    spans = [span for part in parts for span in convert(part)]
    assert canonical(spans) == expected


@settings(max_examples=100, deadline=None)
@given(data=st.data(), workload=workloads())
def test_batches_fed_to_one_assembler_in_any_order_agree(data, workload):
    shuffled = data.draw(st.permutations(workload))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(shuffled)), max_size=4)))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)])]
    assembler = Assembler()
    spans = []
    for batch in data.draw(st.permutations(batches)):
        for event in events(batch):
            spans.extend(assembler.add(event))
        spans.extend(assembler.expire())
    spans.extend(assembler.flush())
    assert canonical(spans) == canonical(convert(workload))
