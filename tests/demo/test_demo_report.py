"""What the demo prints beside its tree (demo.report, sinks.tree's notes),
on spans converted from real captures and log lines as the REST API gives
them: pure functions, no server."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import datetime, timezone

import pytest
from support.factories import prefect_log, runs_of_span
from support.helpers import FIXTURES, convert, load_jsonl

from otel_bridge.demo.report import failed_task_notes, log_note, metrics_lines
from otel_bridge.sinks.tree import render_trace
from otel_bridge.translate.logs import log_record
from otel_bridge.translate.run_metrics import run_measurements

CAPTURES = sorted(p for p in FIXTURES.glob("*.jsonl") if not p.name.endswith(".ws.jsonl"))


def spans_of(name: str):
    return convert(load_jsonl(FIXTURES / f"{name}.jsonl"))


def span_named(spans, prefix: str):
    (span,) = [s for s in spans if str(s.attributes.get("prefect.run.name", "")).startswith(prefix)]
    return span


def line_of(span, seconds_after_start: float, **fields):
    """A REST log line of this span's run, logged this long after its start."""
    flow_run, task_run = runs_of_span(span)
    moment = (span.start_time_unix_nano + int(seconds_after_start * 1e9)) / 1e9
    stamp = datetime.fromtimestamp(moment, timezone.utc).isoformat()
    return prefect_log(flow_run_id=flow_run, task_run_id=task_run, timestamp=stamp,
                       created=stamp, **fields)


def test_the_metrics_of_a_failed_flow_run_read_as_a_short_table():
    assert metrics_lines(spans_of("failure")) == [
        "run metrics, as `otel-bridge convert --metrics` records them (durations summed):",
        "  cicd.pipeline.run.duration  s-failure  failure     1 run    executing 1.11s  pending 31.7ms",
        "  prefect.task.run.duration   add        success     1 run    executing 2.8ms  pending 16.3ms",
        "                              boom       failure     1 run    executing 4.9ms  pending 0.9ms",
        "  cicd.pipeline.run.errors    s-failure  ValueError  1 error",
        "  prefect.task.run.errors     boom       ValueError  1 error",
    ]


def test_runs_of_one_task_and_result_are_summed_on_one_line():
    lines = metrics_lines(spans_of("nested-tasks"))
    (leaf,) = [line for line in lines if " leaf " in line]
    assert re.search(r"leaf\s+success\s+2 runs\s+executing 2\.5ms\s+pending 1\.5ms$", leaf)
    # A cancelled run's time being cancelled is its own phase.
    (flow,) = [line for line in metrics_lines(spans_of("cancelled")) if "s-cancellable" in line]
    assert "cancellation" in flow and "finalizing 30.07s" in flow


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_the_lines_count_what_convert_metrics_measures(capture):
    spans = convert(load_jsonl(capture))
    measured = [m for m in map(run_measurements, spans) if m is not None]
    lines = metrics_lines(spans)
    if not measured:
        assert lines == []
        return
    runs = sum(int(n) for n in re.findall(r"  (\d+) runs?\b", "\n".join(lines)))
    assert runs == len(measured)
    errors = Counter()
    for run in measured:
        for m in run.measurements:
            if m.instrument.name.endswith(".errors"):
                errors[m.attribute_map["error.type"]] += 1
    shown = Counter()
    for line in lines[1:]:
        found = re.search(r"  (\S+)\s+(\d+) errors?$", line)
        if found:
            shown[found.group(1)] += int(found.group(2))
    assert shown == errors


def test_no_finished_run_no_metrics_lines():
    spans = [s for s in spans_of("cancelled") if run_measurements(s) is None]
    assert spans and metrics_lines(spans) == []


def test_a_failed_task_runs_last_lines_in_time_order_and_no_one_elses():
    spans = spans_of("failure")
    boom, add = span_named(spans, "boom"), span_named(spans, "add")
    flow = next(s for s in spans if not s.parent_span_id)
    lines = [line_of(boom, 0.0001 * i, message=f"step {i}") for i in range(7)]
    lines += [line_of(add, 0.001, message="the task that succeeded"),
              line_of(flow, 0.001, message="the flow run's own line")]
    random.Random(1).shuffle(lines)
    records = [log_record(line) for line in lines]
    notes = failed_task_notes(spans, records)
    assert list(notes) == [boom.span_id]
    assert notes[boom.span_id] == ["log ... 2 earlier lines"] + [
        f"log +{0.1 * i:.1f}ms INFO step {i}" for i in range(2, 7)]
    assert failed_task_notes(spans, records, last=7)[boom.span_id][0] == "log +0.0ms INFO step 0"


def test_a_failed_task_run_with_no_lines_gets_no_notes():
    spans = spans_of("failure")
    add = span_named(spans, "add")
    assert failed_task_notes(spans, [log_record(line_of(add, 0.001))]) == {}
    assert failed_task_notes(spans, []) == {}


def test_a_note_is_the_first_line_of_the_message_cut_and_says_how_many_follow():
    span = span_named(spans_of("failure"), "boom")
    traceback = "Task run failed: ValueError('boom')\nTraceback (most recent call last):\n  ..."
    record = log_record(line_of(span, 0.0019, level=40, message=traceback))
    assert log_note(record, span) == "log +1.9ms ERROR Task run failed: ValueError('boom') (+2 lines)"
    long = log_record(line_of(span, 2.5, level=30, message="x" * 500))
    assert log_note(long, span) == f"log +2.50s WARNING {'x' * 117}..."


def test_notes_go_right_under_their_span_and_the_tree_is_otherwise_unchanged():
    spans = spans_of("nested-tasks")
    parent, leaf = span_named(spans, "parent_task"), span_named(spans, "leaf-752")
    plain = render_trace(spans).splitlines()
    noted = render_trace(spans, {parent.span_id: ["note a", "note b"],
                                 leaf.span_id: ["note c"]}).splitlines()
    assert [line for line in noted if "note" not in line] == plain
    at = next(i for i, line in enumerate(noted) if "task parent_task" in line)
    # The parent's branch down to its children runs past its notes.
    assert noted[at + 1:at + 3] == ["      │  note a", "      │  note b"]
    assert noted[at + 3].startswith("      ├─ task leaf-b2b")
    # The last leaf has no children: its note is under it, no branch beside.
    assert noted[-2].startswith("      └─ task leaf-752") and noted[-1] == " " * 12 + "note c"
