"""`otel-bridge demo`, the README's first command, run as a user runs it:
a real Prefect server, the real example flow, the real output files: the
trace tree with the failed task run's last log lines under its span, the run
metrics under the tree, and the spans and log records as OTLP/JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from support.helpers import convert, load_jsonl
from test_cli import parse_otlp_json_line

pytestmark = pytest.mark.integration


@pytest.mark.prefect_server
def test_demo_shows_and_writes_the_example_flows_trace(tmp_path):
    otlp, events = tmp_path / "demo.otlp.jsonl", tmp_path / "demo.events.jsonl"
    logs = tmp_path / "demo.logs.otlp.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "otel_bridge", "demo", "-o", str(otlp),
         "--events-output", str(events), "--logs-output", str(logs)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr
    tree = result.stdout.split("\n\n")[0].splitlines()
    assert tree[0].startswith("trace ")
    assert tree[1].startswith("└─ flow ") and "(RUN otel-bridge-demo) [Completed]" in tree[1]
    assert any("task flaky_transform" in l and "Running > Retrying > Completed" in l for l in tree)
    assert any("task validate" in l and "ERROR" in l and "ValueError" in l for l in tree)
    checksum = next(l for l in tree if "task checksum" in l)
    load = next(l for l in tree if "task load" in l)
    # checksum runs inside load: one level deeper in the tree.
    assert checksum.index("task") > load.index("task")

    (line,) = otlp.read_text().splitlines()
    spans = parse_otlp_json_line(line).resource_spans[0].scope_spans[0].spans
    # Task spans named after their tasks, the flow run's after its flow.
    assert sorted(s.name for s in spans if s.parent_span_id) == [
        "checksum", "extract", "flaky_transform", "load", "validate"]
    assert [s.name for s in spans if not s.parent_span_id] == ["RUN otel-bridge-demo"]
    # The file holds exactly what converting the saved events gives.
    expected = convert(load_jsonl(events))
    assert sorted(s.span_id.hex() for s in spans) == sorted(s.span_id_hex for s in expected)
    assert all(json.loads(l)["event"] for l in events.read_text().splitlines())

    # The failed task run's last log lines, read back from the server, right
    # under its span and indented past it: its own two lines, then the engine's.
    at = next(i for i, l in enumerate(tree) if "task validate" in l)
    notes = tree[at + 1:]
    assert len(notes) == 4 and all(l.startswith(" " * 9 + "log +") for l in notes), notes
    assert "INFO validating 10 rows against the expected 100" in notes[0]
    assert "WARNING 90 rows missing; the first is 10" in notes[1]
    assert re.search(r"ERROR Task run failed with exception: ValueError\(.*\) \(\+\d+ lines\)$",
                     notes[2])
    assert "ERROR Finished in state Failed(" in notes[3]
    # A task run that did not fail shows nothing more, though it logged.
    for name, following in (("flaky_transform", "task load"), ("load", "task checksum")):
        at = next(i for i, l in enumerate(tree) if f"task {name}" in l)
        assert following in tree[at + 1]

    # The run metrics, after the tree: each run counted once, by name and result.
    metrics = result.stdout.split("\n\n")[1].splitlines()
    assert metrics[0].startswith("run metrics, as `otel-bridge convert --metrics` records them")
    rows = [re.sub(r"\s+", " ", l.strip()) for l in metrics[1:]]
    assert rows[0].startswith("cicd.pipeline.run.duration otel-bridge-demo success 1 run executing")
    for task, outcome in (("checksum", "success"), ("extract", "success"),
                          ("flaky_transform", "success"), ("load", "success"),
                          ("validate", "failure")):
        assert any(re.match(rf"(prefect\.task\.run\.duration )?{task} {outcome} 1 run executing", r)
                   for r in rows), (task, rows)
    assert rows[-1] == "prefect.task.run.errors validate ValueError 1 error"
    assert len(rows) == 7

    # The log records: every line the flow logged, on its run's span.
    span_ids = {s.name: s.span_id.hex() for s in spans}
    records = [r for line in logs.read_text().splitlines()
               for resource in json.loads(line)["resourceLogs"]
               for scope in resource["scopeLogs"] for r in scope["logRecords"]]
    on_span = {}
    for r in records:
        on_span.setdefault(r["spanId"], []).append(r["body"]["stringValue"])
        assert r["traceId"] == spans[0].trace_id.hex()
    assert "attempt 1: upstream not ready, raising so Prefect retries" in on_span[
        span_ids["flaky_transform"]]
    assert on_span[span_ids["validate"]][:2] == [
        "validating 10 rows against the expected 100", "90 rows missing; the first is 10"]
    assert any("Beginning flow run" in b for b in on_span[span_ids["RUN otel-bridge-demo"]])
    assert f"{len(records)} log records to {logs}" in result.stderr
