"""The event -> span mapping, state by state (docs/mapping.md)."""

from __future__ import annotations

import json

import pytest
from support.factories import FlowRun, flow_run_events, task_run_events
from support.helpers import by_name, convert, events, state_names
from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.translate.assembler import AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions, to_unix_nano
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.reverse import events_from_bridge_span

FAIL_MESSAGE = "Task run encountered an exception ValueError: boom"


def one_task(states, **kwargs):
    (span,) = convert(task_run_events(states, **kwargs))
    return span


@pytest.mark.parametrize(
    "states, result, status, error_type",
    [
        (["Pending", "Running", "Completed"], "success", StatusCode.UNSET, None),
        (["Pending", "Running", "Cached"], "success", StatusCode.UNSET, None),
        (["Pending", "Running", "Retrying", "Completed"], "success", StatusCode.UNSET, None),
        (["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"], "success",
         StatusCode.UNSET, None),
        (["Pending", "Running", "Failed"], "failure", StatusCode.ERROR, "ValueError"),
        (["Pending", "Running", "Retrying", "Failed"], "failure", StatusCode.ERROR, "ValueError"),
        (["Pending", "Running", "TimedOut"], "timeout", StatusCode.ERROR, "TimedOut"),
        (["Pending", "Running", "Crashed"], "error", StatusCode.ERROR, "Crashed"),
        (["Pending", "Running", "Cancelled"], "cancellation", StatusCode.UNSET, None),
    ],
)
def test_final_state_sets_result_and_status(states, result, status, error_type):
    messages = {"Failed": FAIL_MESSAGE, "TimedOut": "Task run exceeded timeout of 1.0 second(s)",
                "Crashed": "Execution was aborted by an interrupt signal."}
    span = one_task(states, messages=messages)
    assert span.attributes["cicd.pipeline.task.run.result"] == result
    assert span.status_code is status
    assert span.attributes.get("error.type") == error_type
    if status is StatusCode.ERROR:
        assert span.status_message == messages[states[-1]]
    else:
        assert span.status_message == ""
    assert span.kind is SpanKind.INTERNAL
    assert state_names(span) == states
    assert span.attributes["prefect.state-name"] == states[-1]


def test_span_runs_from_first_running_to_final_state_and_keeps_every_state_as_event():
    states = ["Scheduled", "Pending", "Running", "AwaitingRetry", "Retrying", "Completed",
              "RolledBack"]
    span = one_task(states)
    assert state_names(span) == states
    first_running = span.events[2].time_unix_nano
    completed = span.events[5].time_unix_nano
    assert span.start_time_unix_nano == first_running
    assert span.end_time_unix_nano == completed
    # RolledBack comes after the final state: an event, but not the span's state.
    assert span.attributes["prefect.state-name"] == "Completed"
    assert span.events[6].time_unix_nano > span.end_time_unix_nano
    assert "otel_bridge.synthetic.start" not in span.attributes
    assert "otel_bridge.synthetic.end" not in span.attributes


def test_each_span_event_is_a_state_named_after_it_and_gives_back_its_event():
    raw = task_run_events(["Pending", "Running", "Failed"], tags=["etl"],
                          messages={"Failed": FAIL_MESSAGE}, flow_run=FlowRun())
    (span,) = convert(raw)
    for event, span_event in zip(raw, span.events, strict=True):
        attrs = span_event.attributes
        assert span_event.name == event["resource"]["prefect.state-name"]
        assert attrs["prefect.state.id"] == event["id"]
        # A known state name says its type; the message only where there is
        # one; the builders rebuild Prefect's events exactly: no patch.
        message = event["resource"]["prefect.state-message"]
        expected = {"prefect.state.id": event["id"]}
        if message:
            expected["prefect.state.message"] = message
        assert attrs == expected
    # The related resources once, on the span, as prefect.related.<role>.*.
    assert "prefect.related" not in span.attributes
    assert [e.model_dump_json(exclude={"received"}) for e in events_from_bridge_span(span)] == [
        e.model_dump_json(exclude={"received"}) for e in events(raw)]


def test_state_type_details_and_data_go_on_the_span_event_only_where_needed():
    raw = task_run_events(["Pending", "Running", "Completed"])
    # A state name Prefect does not have, and a known name of another type.
    raw[0]["resource"].update({"prefect.state-name": "Queued", "prefect.state-type": "PENDING"})
    raw[0]["payload"]["validated_state"]["name"] = "Queued"
    raw[0]["event"] = "prefect.task-run.Queued"
    raw[1]["resource"]["prefect.state-type"] = "PAUSED"
    details = {"cache_key": "k", "retriable": False}
    raw[2]["payload"]["validated_state"].update(state_details=details, data={"n": 1.5})
    (span,) = convert(raw)
    pending, running, completed = (e.attributes for e in span.events)
    assert [e.name for e in span.events] == ["Queued", "Running", "Completed"]
    assert pending["prefect.state.type"] == "PENDING"
    assert running["prefect.state.type"] == "PAUSED"
    assert "prefect.state.type" not in completed
    assert json.loads(completed["prefect.state.details"]) == details
    assert json.loads(completed["prefect.state.data"]) == {"n": 1.5}
    assert "prefect.state.details" not in pending and "prefect.state.data" not in pending
    assert [e.model_dump_json(exclude={"received"}) for e in events_from_bridge_span(span)] == [
        e.model_dump_json(exclude={"received"}) for e in events(raw)]


def test_labels_related_and_cicd_attributes():
    flow_run = FlowRun(name="whimsical-loris", flow_name="etl")
    raw = task_run_events(["Pending", "Running", "Completed"], name="add-50d",
                          flow_run=flow_run, tags=["b", "a"])
    (span,) = convert(raw)
    a = span.attributes
    run_id = raw[0]["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")
    assert a["prefect.resource.id"] == f"prefect.task-run.{run_id}"
    assert a["prefect.resource.name"] == "add-50d"
    assert a["prefect.run.name"] == "add-50d"
    assert a["prefect.run-count"] == "1"
    assert a["prefect.orchestration"] == "client"
    assert a["prefect.tags"] == ["a", "b"]
    # The related resources: the id alone where it is of its role's kind.
    assert a["prefect.related.flow-run.id"] == flow_run.id
    assert a["prefect.related.flow-run.name"] == "whimsical-loris"
    assert a["prefect.related.flow.id"] == flow_run.flow_id
    assert a["prefect.related.flow.name"] == "etl"
    assert a["cicd.pipeline.task.name"] == "add"
    assert a["cicd.pipeline.task.run.id"] == run_id
    assert a["cicd.pipeline.task.run.result"] == "success"
    assert a["prefect.task.key"] == "add-971ebf84"
    assert a["prefect.task-run.dynamic-key"] == raw[0]["payload"]["task_run"]["dynamic_key"]
    assert json.loads(a["prefect.task-run.inputs"]) == {"x": [], "y": []}
    # Named after its task (low cardinality), not its run.
    assert span.name == "add"
    assert span.kind is SpanKind.INTERNAL
    # Each fact once: the run's kind and id are in its resource id and the
    # CI/CD task run id; its flow run's in prefect.related.flow-run.*; what
    # the events rebuild (run time, retries, the expected start when it is
    # the first state's time) is not repeated; no link without a UI address.
    for gone in ("prefect.run.type", "prefect.run.id", "cicd.pipeline.name",
                 "cicd.pipeline.run.id", "prefect.task-run.total-run-time",
                 "prefect.task-run.retries", "prefect.task-run.expected-start-time",
                 "prefect.task-run.policy", "prefect.task-run.labels",
                 "prefect.task-run.flow-run-run-count", "cicd.pipeline.task.run.url.full",
                 "error.type"):
        assert gone not in a, gone


def test_expected_start_time_is_carried_only_when_it_is_not_the_first_states():
    raw = task_run_events(["Pending", "Running", "Completed"])
    (span,) = convert(raw)
    assert "prefect.task-run.expected-start-time" not in span.attributes
    later = "2026-11-28T17:51:00.000000Z"
    for event in raw:
        event["payload"]["task_run"]["expected_start_time"] = later
    (span,) = convert(raw)
    assert span.attributes["prefect.task-run.expected-start-time"] == later
    assert [e.model_dump_json(exclude={"received"}) for e in events_from_bridge_span(span)] == [
        e.model_dump_json(exclude={"received"}) for e in events(raw)]


def test_span_names_and_kinds_follow_the_cicd_conventions():
    flow_run = FlowRun(name="whimsical-loris", flow_name="etl")
    raw = (task_run_events(["Pending", "Running", "Completed"], name="add-50d", flow_run=flow_run)
           + task_run_events(["Pending", "Running", "Completed"], name="custom run name",
                             task_key="load_rows-0a1b2c3d", flow_run=flow_run)
           + flow_run_events(["Pending", "Running", "Completed"], flow_run))
    spans = {s.attributes["prefect.run.name"]: s for s in convert(raw)}
    assert spans["add-50d"].name == "add"
    assert spans["custom run name"].name == "load_rows"
    flow = spans["whimsical-loris"]
    assert flow.name == "RUN etl"
    assert flow.kind is SpanKind.SERVER
    assert flow.attributes["cicd.pipeline.name"] == "etl"
    assert flow.attributes["cicd.pipeline.run.id"] == flow_run.id
    assert "prefect.run.type" not in flow.attributes
    assert "prefect.run.id" not in flow.attributes
    # A flow run whose events do not name its flow.
    lone = FlowRun(name="lonely-lark")
    raw = flow_run_events(["Pending", "Running", "Completed"], lone)
    for event in raw:
        event["related"] = []
    (span,) = convert(raw)
    assert span.name == "RUN"
    assert span.kind is SpanKind.SERVER
    assert "cicd.pipeline.name" not in span.attributes


def test_one_task_function_mapped_500_times_gives_one_span_name():
    flow_run = FlowRun()
    raw = [event for i in range(500)
           for event in task_run_events(["Pending", "Running", "Completed"],
                                        name=f"square-{i:03x}", flow_run=flow_run)]
    raw += flow_run_events(["Pending", "Running", "Completed"], flow_run)
    spans = convert(raw)
    tasks = [s for s in spans if s.kind is SpanKind.INTERNAL]
    assert len(tasks) == 500
    assert len({s.attributes["prefect.run.name"] for s in tasks}) == 500
    assert {s.name for s in tasks} == {"square"}
    assert {s.name for s in spans if s.kind is SpanKind.SERVER} == {"RUN my-flow"}


def test_the_ui_address_gives_each_span_its_runs_page():
    flow_run = FlowRun()
    raw = (task_run_events(["Pending", "Running", "Completed"], flow_run=flow_run)
           + flow_run_events(["Pending", "Running", "Completed"], flow_run))
    options = AssemblerOptions(forward=ForwardOptions(ui_url="http://127.0.0.1:4200"))
    task, flow = sorted(convert(raw, options), key=lambda s: s.kind is SpanKind.SERVER)
    task_run_id = task.attributes["cicd.pipeline.task.run.id"]
    assert task.attributes["cicd.pipeline.task.run.url.full"] == (
        f"http://127.0.0.1:4200/runs/task-run/{task_run_id}")
    assert flow.attributes["cicd.pipeline.run.url.full"] == (
        f"http://127.0.0.1:4200/runs/flow-run/{flow_run.id}")
    # The link is for people; the events come back the same with it.
    assert [e.model_dump_json(exclude={"received"}) for e in events_from_bridge_span(task)] == [
        e.model_dump_json(exclude={"received"}) for e in events(raw[:3])]


def test_task_spans_nest_under_flow_run_and_parent_task_in_one_trace():
    flow_run = FlowRun()
    outer = task_run_events(["Pending", "Running", "Completed"], name="outer-1ab",
                            flow_run=flow_run)
    outer_id = outer[0]["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")
    inner = task_run_events(["Pending", "Running", "Completed"], name="inner-2cd",
                            flow_run=flow_run, parent_task_id=outer_id)
    flow = flow_run_events(["Pending", "Running", "Completed"], flow_run)
    spans = by_name(convert(outer + inner + flow))
    assert set(spans) == {"outer", "inner", "RUN my-flow"}
    flow_span = spans["RUN my-flow"]
    trace = trace_id_for(flow_run.resource_id)
    assert {s.trace_id for s in spans.values()} == {trace}
    assert flow_span.parent_span_id is None
    assert flow_span.span_id == span_id_for(flow_run.resource_id)
    assert spans["outer"].parent_span_id == flow_span.span_id
    assert spans["inner"].parent_span_id == spans["outer"].span_id
    assert flow_span.kind is SpanKind.SERVER
    assert flow_span.attributes["prefect.resource.id"] == flow_run.resource_id
    assert flow_span.attributes["cicd.pipeline.result"] == "success"


def test_task_without_flow_run_is_the_root_of_its_own_trace():
    raw = task_run_events(["Scheduled", "Pending", "Running", "Completed"])
    (span,) = convert(raw)
    resource_id = raw[0]["resource"]["prefect.resource.id"]
    assert span.parent_span_id is None
    assert span.trace_id == trace_id_for(resource_id)
    assert span.span_id == span_id_for(resource_id)


def test_subflow_is_root_of_its_own_trace_and_names_its_placeholder_task_run():
    sub = FlowRun(name="sub-run")
    raw = flow_run_events(["Pending", "Running", "Completed"], sub, parent_task_id="1" * 32)
    (span,) = convert(raw)
    assert span.parent_span_id is None
    assert span.trace_id == trace_id_for(sub.resource_id)
    # The placeholder task run is named by its id alone (a task run's).
    assert span.attributes["prefect.related.task-run.id"] == "1" * 32
    assert span.attributes["prefect.related.task-run.name"] == "sub-abc"
    assert span.name == "RUN my-flow"


def test_failed_flow_run_is_an_error_with_exception_type():
    flow_run = FlowRun()
    message = "Flow run encountered an exception: ValueError: boom"
    (span,) = convert(flow_run_events(["Pending", "Running", "Failed"], flow_run,
                                      messages={"Failed": message}))
    assert span.status_code is StatusCode.ERROR
    assert span.status_message == message
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["cicd.pipeline.result"] == "failure"


def test_not_ready_run_never_started():
    span = one_task(["Pending", "NotReady"])
    assert span.attributes["cicd.pipeline.task.run.result"] == "skip"
    assert span.status_code is StatusCode.UNSET
    assert span.attributes["otel_bridge.synthetic.start"] == "no_running_state"
    assert "otel_bridge.synthetic.end" not in span.attributes
    assert span.start_time_unix_nano == span.events[0].time_unix_nano
    assert span.end_time_unix_nano == span.events[1].time_unix_nano


@pytest.mark.parametrize("states", [["Pending", "Running"], ["Running"], ["Pending"]])
def test_unfinished_run_is_ended_at_its_last_event_and_marked(states):
    span = one_task(states)
    assert span.attributes["otel_bridge.synthetic.end"] == "end_of_input"
    assert "cicd.pipeline.task.run.result" not in span.attributes
    assert span.end_time_unix_nano == span.events[-1].time_unix_nano
    assert span.status_code is StatusCode.UNSET


def test_missing_running_still_gives_true_span():
    span = one_task(["Pending", "Completed"])
    assert span.attributes["otel_bridge.synthetic.start"] == "no_running_state"
    assert span.attributes["cicd.pipeline.task.run.result"] == "success"
    assert span.start_time_unix_nano == span.events[0].time_unix_nano


def test_end_is_never_before_start():
    raw = task_run_events(["Pending", "Running", "Completed"])
    raw[2]["occurred"] = "2020-01-01T00:00:00.000000Z"  # a clock gone wrong
    (span,) = convert(raw)
    assert span.end_time_unix_nano >= span.start_time_unix_nano


TRACEPARENT = "00-980dd1b6dd24a7d35ea2b8a87e85f330-cfe86fe97227f3f7-03"


def test_prefect_trace_context_is_linked_by_default():
    span = one_task(["Pending", "Running", "Completed"], traceparent=TRACEPARENT,
                    flow_run=FlowRun())
    (link,) = span.links
    assert link.trace_id == 0x980DD1B6DD24A7D35EA2B8A87E85F330
    assert link.span_id == 0xCFE86FE97227F3F7
    assert span.trace_id != link.trace_id
    assert span.span_id != link.span_id


def test_prefect_trace_context_can_be_adopted():
    raw = task_run_events(["Pending", "Running", "Completed"], traceparent=TRACEPARENT,
                          flow_run=FlowRun())
    (span,) = convert(raw, AssemblerOptions(forward=ForwardOptions(prefect_trace_context="adopt")))
    assert span.trace_id == 0x980DD1B6DD24A7D35EA2B8A87E85F330
    assert span.parent_span_id == 0xCFE86FE97227F3F7
    assert span.span_id != 0xCFE86FE97227F3F7
    assert span.links == ()


def test_timestamps_are_exact_to_the_microsecond():
    raw = task_run_events(["Pending", "Running", "Completed"])
    (span,) = convert(raw)
    from datetime import datetime

    for event, span_event in zip(raw, span.events):
        moment = datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))
        assert span_event.time_unix_nano == to_unix_nano(moment)
        assert span_event.time_unix_nano % 1000 == 0


def test_states_at_the_same_instant_are_ordered_by_their_follows_chain():
    states = ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    from datetime import timedelta

    raw = task_run_events(states, step=timedelta(0))
    (span,) = convert(list(reversed(raw)))
    assert state_names(span) == states


def test_parent_comes_from_task_inputs_not_from_the_task_current_at_sending():
    """Prefect sends a RolledBack state from inside the task whose failure
    rolled the transaction back, and names that task as related `task-run`."""
    flow_run = FlowRun()
    raw = task_run_events(["Pending", "Running", "Completed", "RolledBack"], flow_run=flow_run)
    raw[3]["related"].append({"prefect.resource.id": "prefect.task-run." + "2" * 32,
                              "prefect.resource.role": "task-run"})
    (span,) = convert(raw)
    assert span.parent_span_id == span_id_for(flow_run.resource_id)


def test_long_state_message_is_cut_on_the_span_attribute_only_and_marked():
    message = "Task run encountered an exception ValueError: " + "x" * 5000
    span = one_task(["Pending", "Running", "Failed"], messages={"Failed": message})
    assert len(span.attributes["prefect.state-message"]) == 1024
    assert span.attributes["prefect.state-message"].endswith("...")
    assert span.attributes["otel_bridge.truncated.prefect.state-message"] == len(message)
    assert span.status_message == message
    assert span.events[-1].attributes["prefect.state.message"] == message
    assert "otel_bridge.event.patch" not in span.events[-1].attributes
