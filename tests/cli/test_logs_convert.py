"""`otel-bridge convert --logs`: Prefect log lines, as /api/logs/filter
returns them, to OTLP/JSON log records on the spans `convert` makes of the
same runs' events, end to end through the command."""

from __future__ import annotations

import json
import uuid

from support.helpers import FIXTURES
from test_cli import run_cli
from support.factories import prefect_log, runs_of_span

from otel_bridge.model.otlp import request_from_json, spans_from_request


def test_log_lines_of_captured_runs_land_on_the_spans_convert_makes_of_their_events(tmp_path):
    events = FIXTURES / "nested-tasks.jsonl"
    traces = tmp_path / "traces.jsonl"
    assert run_cli("convert", str(events), "-o", str(traces)).returncode == 0
    spans = [span for line in traces.read_text().splitlines()
             for _, span in spans_from_request(request_from_json(json.loads(line)))]
    logs = [prefect_log(flow_run_id=flow_run, task_run_id=task_run, message=f"hello from {i}")
            for i, span in enumerate(spans) for flow_run, task_run in [runs_of_span(span)]]
    # One page (a JSON array, as the REST API answers) and one line per log.
    source = tmp_path / "logs.json"
    source.write_text(json.dumps(logs[:2]) + "\n" + "".join(json.dumps(l) + "\n" for l in logs[2:]))
    out = tmp_path / "logs.otlp.jsonl"

    done = run_cli("convert", "--logs", str(source), "-o", str(out))

    assert done.returncode == 0, done.stderr
    assert f"{len(logs)} log lines -> {len(logs)} log records" in done.stderr
    records = [record for line in out.read_text().splitlines()
               for resource in json.loads(line)["resourceLogs"]
               for scope in resource["scopeLogs"] for record in scope["logRecords"]]
    placed = {r["body"]["stringValue"]: (r["traceId"], r["spanId"]) for r in records}
    assert placed == {f"hello from {i}": (span.trace_id_hex, span.span_id_hex)
                      for i, span in enumerate(spans)}


def test_a_bad_line_is_reported_with_its_place_and_the_rest_still_converted(tmp_path):
    source = tmp_path / "logs.jsonl"
    page = [prefect_log(), prefect_log(level="loud"), prefect_log(flow_run_id=None, task_run_id=None)]
    source.write_text(json.dumps(page) + "\n{not json\n" + json.dumps(prefect_log()) + "\n")
    out = tmp_path / "out.jsonl"

    done = run_cli("convert", "--logs", str(source), "-o", str(out))

    assert done.returncode == 1
    assert f"{source}:1[1]: rejected (invalid_level)" in done.stderr
    assert f"{source}:2: rejected (malformed_json)" in done.stderr
    assert "4 log lines -> 2 log records, 1 lines of no run passed over, 2 lines rejected" \
        in done.stderr
    assert sum(len(s["logRecords"]) for line in out.read_text().splitlines()
               for r in json.loads(line)["resourceLogs"] for s in r["scopeLogs"]) == 2


def test_logs_read_as_events_get_a_hint_and_logs_go_only_to_log_sinks(tmp_path):
    source = tmp_path / "logs.jsonl"
    source.write_text(json.dumps(prefect_log(id=str(uuid.uuid4()))) + "\n")
    as_events = run_cli("convert", str(source), "-o", str(tmp_path / "x"))
    assert as_events.returncode == 1 and "read them with --logs" in as_events.stderr
    as_tree = run_cli("convert", "--logs", str(source), "--to", "tree")
    assert as_tree.returncode == 2 and "--to otlp-json or otlp" in as_tree.stderr
