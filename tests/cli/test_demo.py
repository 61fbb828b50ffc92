"""`otel-bridge demo`, the README's first command, run as a user runs it:
a real Prefect server, the real example flow, the real output files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.helpers import convert, load_jsonl
from test_cli import parse_otlp_json_line

pytestmark = pytest.mark.integration


@pytest.mark.prefect_server
def test_demo_shows_and_writes_the_example_flows_trace(tmp_path):
    otlp, events = tmp_path / "demo.otlp.jsonl", tmp_path / "demo.events.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "otel_bridge", "demo", "-o", str(otlp),
         "--events-output", str(events)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr
    tree = result.stdout.splitlines()
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
