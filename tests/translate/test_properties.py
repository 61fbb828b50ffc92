"""Same events in, same spans out: whatever the order, repeats, or how the
input is split between batches and replicas (property-based)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

from support.factories import T0, FlowRun, flow_run_events, task_run_events
from support.helpers import convert, events
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_bridge.translate.assembler import Assembler
from otel_bridge.translate.span_layout import ATTR_EVENT_PATCH

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


# -- runs of odd events: what Prefect does not send, but a sender may --------

STATE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED",
               "CRASHED", "PAUSED", "CANCELLING"]
ROLES = ["flow-run", "task-run", "flow", "deployment", "work-queue", "work-pool", "creator",
         "tag", "something-else"]
# Span attribute names of the layout, which a sender may also use as labels
# (those the builders read as JSON: test_roundtrip has them).
LAYOUT_NAMES = ["prefect.tags", "prefect.task.key", "prefect.task-run.dynamic-key",
                "prefect.related.flow-run.id", "prefect.related.flow.name",
                "cicd.pipeline.task.name", "prefect.run.name", "error.type"]
texts = st.text(max_size=12)
INT64 = (-2**63, 2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(*INT64) | st.sampled_from([2**64, -10**30])
    | texts | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6)
# A task run's fields, integers beyond 64 bits included (OTLP's integers are
# 64-bit: such a value travels in its event's patch).
task_run_values = json_values


def reordered(draw, mapping: dict) -> dict:
    keys = draw(st.permutations(list(mapping)))
    return {key: mapping[key] for key in keys}


@st.composite
def odd_related(draw, related: list[dict]) -> list[dict]:
    related = [dict(r) for r in related]
    for _ in range(draw(st.integers(0, 3))):
        role = draw(st.sampled_from(ROLES))
        labels = {"prefect.resource.id": draw(st.sampled_from([
            f"prefect.{role}.{uuid.uuid4()}", f"prefect.{role}.x", "prefect.tag.x",
            "elsewhere.1"])), "prefect.resource.role": role}
        if draw(st.booleans()):
            labels["prefect.resource.name"] = draw(texts)
        if draw(st.booleans()):
            labels[draw(st.sampled_from(["prefect.work-pool.type", "extra", "prefect.x"]))] = (
                draw(texts))
        related.insert(draw(st.integers(0, len(related))), labels)
    if related and draw(st.booleans()):
        related.pop(draw(st.integers(0, len(related) - 1)))
    if draw(st.booleans()):
        related = draw(st.permutations(related))
    return [reordered(draw, r) if draw(st.booleans()) else r for r in related]


@st.composite
def odd_event(draw, event: dict, others: list[str]) -> dict:
    """`event` changed in the ways a sender other than Prefect may change it."""
    event = json.loads(json.dumps(event))
    resource, payload = event["resource"], event["payload"]
    if draw(st.booleans()):  # a state of a name Prefect does not have, or another type
        name = draw(st.sampled_from(["Queued", "Running", "Failed", "Odd.State", ""])
                    | st.text(min_size=1, max_size=10))
        resource["prefect.state-name"] = name
        resource["prefect.state-type"] = draw(st.sampled_from(STATE_TYPES))
        if name or draw(st.booleans()):
            event["event"] = event["event"].rsplit(".", 1)[0] + "." + (name or "x")
        if type(payload.get("validated_state")) is dict and draw(st.booleans()):
            payload["validated_state"]["name"] = name
    if draw(st.booleans()):  # a message: long, odd, or not where the payload has it
        message = draw(st.sampled_from(["", "x" * 1100, "ünïcødé\n\x00"]) | texts)
        resource["prefect.state-message"] = message
        if type(payload.get("validated_state")) is dict and draw(st.booleans()):
            payload["validated_state"]["message"] = message
    if draw(st.booleans()):  # labels added, taken away, in another order
        for _ in range(draw(st.integers(0, 2))):
            resource[draw(st.sampled_from(LAYOUT_NAMES) | texts.filter(bool))] = draw(texts)
        for label in draw(st.lists(st.sampled_from(
                ["prefect.state-message", "prefect.orchestration", "prefect.run-count",
                 "prefect.resource.name", "prefect.state-timestamp"]), max_size=2)):
            resource.pop(label, None)
        event["resource"] = reordered(draw, resource)
    if draw(st.booleans()):
        event["related"] = draw(odd_related(event["related"]))
    if draw(st.booleans()):  # follows: none, an unknown event, another of the run
        event["follows"] = draw(st.sampled_from([None, str(uuid.uuid4()), *others]))
    if draw(st.booleans()):  # the payload: extra keys, other values, another order
        for _ in range(draw(st.integers(1, 2))):
            payload[draw(texts)] = draw(json_values)
        task_run = payload.get("task_run")
        if type(task_run) is dict:
            for key in draw(st.lists(st.sampled_from(list(task_run)), max_size=3)):
                task_run[key] = draw(task_run_values)
            if draw(st.booleans()):
                payload["task_run"] = reordered(draw, task_run)
        validated = payload.get("validated_state")
        if type(validated) is dict:
            if draw(st.booleans()):
                validated["state_details"] = draw(json_values)
            if draw(st.booleans()):
                validated["data"] = draw(json_values)
        if draw(st.booleans()):
            payload.pop(draw(st.sampled_from(list(payload))))
        event["payload"] = reordered(draw, payload)
    if draw(st.booleans()):  # another time: the same instant as others, or before
        offset = draw(st.integers(-5_000, 5_000))
        occurred = datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))
        event["occurred"] = (occurred + timedelta(microseconds=offset)).isoformat()
    return event


@st.composite
def odd_runs(draw):
    """The events of one task or flow run, some of them odd."""
    flow_run = FlowRun(name=draw(st.sampled_from(["whimsical-loris", "x" * 1100])))
    states = draw(st.sampled_from(PATHS))
    if draw(st.booleans()):
        raw = flow_run_events(states, flow_run)
    else:
        raw = task_run_events(states, flow_run=flow_run if draw(st.booleans()) else None,
                              tags=draw(st.lists(texts, max_size=2, unique=True)),
                              name=draw(st.sampled_from(["add-50d", "odd name", ""])),
                              traceparent=draw(st.sampled_from([None, TRACEPARENT])))
    ids = [e["id"] for e in raw]
    odd = [draw(odd_event(e, ids)) if draw(st.booleans()) else e for e in raw]
    return [e for e in odd if "prefect.state-type" in e["resource"]]


TRACEPARENT = "00-980dd1b6dd24a7d35ea2b8a87e85f330-cfe86fe97227f3f7-01"


@settings(max_examples=100, deadline=None)
@given(data=st.data(), run=odd_runs())
def test_odd_events_give_the_same_span_in_any_order(data, run):
    expected = convert(run)
    assert len(expected) == 1
    assert convert(data.draw(st.permutations(run))) == expected


@settings(max_examples=100, deadline=None)
@given(workload=workloads())
def test_events_as_prefect_makes_them_need_no_patch(workload):
    """The builders rebuild Prefect-shaped events (factories) exactly: no
    span event carries a patch."""
    for span in convert(workload):
        assert not [e.name for e in span.events if ATTR_EVENT_PATCH in e.attributes], span.name


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
