"""The event -> span mapping, state by state (README: "Mapping")."""

from __future__ import annotations

import json

import pytest
from factories import FlowRun, flow_run_events, task_run_events
from helpers import by_name, convert, state_names
from opentelemetry.trace import SpanKind, StatusCode

from otel_bridge.translate.assembler import AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions, to_unix_nano
from otel_bridge.translate.ids import span_id_for, trace_id_for

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


def test_each_span_event_carries_the_whole_event():
    raw = task_run_events(["Pending", "Running", "Failed"], tags=["etl"],
                          messages={"Failed": FAIL_MESSAGE}, flow_run=FlowRun())
    (span,) = convert(raw)
    for event, span_event in zip(raw, span.events):
        attrs = span_event.attributes
        assert span_event.name == event["event"]
        assert attrs["prefect.event.id"] == event["id"]
        assert attrs.get("prefect.event.follows") == event["follows"]
        for label, value in event["resource"].items():
            assert attrs[label] == value
        assert json.loads(attrs["prefect.event.payload"]) == event["payload"]
        assert json.loads(attrs["prefect.related"]) == event["related"]
    assert "prefect.related" not in span.attributes


def test_labels_related_and_cicd_attributes():
    flow_run = FlowRun(name="whimsical-loris", flow_name="etl")
    raw = task_run_events(["Pending", "Running", "Completed"], name="add-50d",
                          flow_run=flow_run, tags=["b", "a"])
    (span,) = convert(raw)
    a = span.attributes
    run_id = raw[0]["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")
    assert a["prefect.resource.id"] == f"prefect.task-run.{run_id}"
    assert a["prefect.resource.name"] == "add-50d"
    assert a["prefect.run-count"] == "1"
    assert a["prefect.orchestration"] == "client"
    assert a["prefect.run.type"] == "task"
    assert a["prefect.run.id"] == run_id
    assert a["prefect.tags"] == ["a", "b"]
    assert a["prefect.related.flow-run.id"] == flow_run.resource_id
    assert a["prefect.related.flow-run.name"] == "whimsical-loris"
    assert a["prefect.related.flow.name"] == "etl"
    assert a["cicd.pipeline.task.name"] == "add"
    assert a["cicd.pipeline.task.run.id"] == run_id
    assert a["cicd.pipeline.name"] == "etl"
    assert a["cicd.pipeline.run.id"] == flow_run.id
    assert a["prefect.task.key"] == "add-971ebf84"
    assert span.name == "add-50d"


def test_task_spans_nest_under_flow_run_and_parent_task_in_one_trace():
    flow_run = FlowRun()
    outer = task_run_events(["Pending", "Running", "Completed"], name="outer-1ab",
                            flow_run=flow_run)
    outer_id = outer[0]["resource"]["prefect.resource.id"].removeprefix("prefect.task-run.")
    inner = task_run_events(["Pending", "Running", "Completed"], name="inner-2cd",
                            flow_run=flow_run, parent_task_id=outer_id)
    flow = flow_run_events(["Pending", "Running", "Completed"], flow_run)
    spans = by_name(convert(outer + inner + flow))
    trace = trace_id_for(flow_run.resource_id)
    assert {s.trace_id for s in spans.values()} == {trace}
    assert spans[flow_run.name].parent_span_id is None
    assert spans[flow_run.name].span_id == span_id_for(flow_run.resource_id)
    assert spans["outer-1ab"].parent_span_id == spans[flow_run.name].span_id
    assert spans["inner-2cd"].parent_span_id == spans["outer-1ab"].span_id
    assert spans[flow_run.name].attributes["prefect.run.type"] == "flow"
    assert spans[flow_run.name].attributes["cicd.pipeline.result"] == "success"


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
    assert span.attributes["prefect.related.task-run.id"] == "prefect.task-run." + "1" * 32


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
    assert span.events[-1].attributes["prefect.state-message"] == message
