"""`otel-bridge convert`: the command-line contract, run as a real process."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from support.factories import FlowRun, flow_run_events, task_run_events
from google.protobuf import json_format
from support.helpers import SAMPLES
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def run_cli(*args, stdin: str = "", env=None):
    return subprocess.run(
        [sys.executable, "-m", "otel_bridge", *args],
        input=stdin, capture_output=True, text=True, timeout=120, env=env,
    )


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def parse_otlp_json_line(line: str) -> ExportTraceServiceRequest:
    """Read a line back with protobuf's own JSON parser (ids hex -> base64, as
    the OTLP/JSON spec maps them), so the format is checked by the schema."""
    obj = json.loads(line)
    for rs in obj["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for holder in [span, *span.get("links", [])]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if holder.get(key):
                            holder[key] = base64.b64encode(bytes.fromhex(holder[key])).decode()
    return json_format.ParseDict(obj, ExportTraceServiceRequest())


def test_bad_lines_are_reported_with_place_and_good_lines_still_converted(tmp_path):
    flow_run = FlowRun()
    good = task_run_events(["Pending", "Running", "Completed"], flow_run=flow_run)
    bad_resource = dict(good[0], id="01a22348-0000-7000-8000-000000000001", resource={})
    first = write_jsonl(tmp_path / "a.jsonl", [good[0], "{broken", bad_resource, good[1]])
    second = write_jsonl(tmp_path / "b.jsonl", ["", "[1,2]", good[2]])
    out = tmp_path / "out.jsonl"
    result = run_cli("convert", str(first), str(second), "-o", str(out))
    assert result.returncode == 1, result.stderr
    assert f"{first}:2: rejected (malformed_json)" in result.stderr
    assert f"{first}:3: rejected (invalid_event)" in result.stderr
    assert f"{second}:2: rejected (not_an_object)" in result.stderr
    (request,) = [parse_otlp_json_line(l) for l in out.read_text().splitlines()]
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert [e.name for e in span.events] == [g["resource"]["prefect.state-name"] for g in good]
    assert [{a.key: a.value.string_value for a in e.attributes}["prefect.state.id"]
            for e in span.events] == [g["id"] for g in good]


def test_clean_input_exits_zero_and_reads_stdin(tmp_path):
    flow_run = FlowRun()
    raw = (flow_run_events(["Pending", "Running", "Completed"], flow_run)
           + task_run_events(["Pending", "Running", "Completed"], flow_run=flow_run))
    result = run_cli("convert", "-", stdin="".join(json.dumps(e) + "\n" for e in raw))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    request = parse_otlp_json_line(line)
    spans = request.resource_spans[0].scope_spans[0].spans
    assert len(spans) == 2
    assert len({s.trace_id for s in spans}) == 1
    obj = json.loads(line)
    ids = [s["spanId"] for s in obj["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    assert all(len(i) == 16 and int(i, 16) for i in ids)
    resource = {a["key"]: a["value"] for a in obj["resourceSpans"][0]["resource"]["attributes"]}
    assert resource["service.name"] == {"stringValue": "prefect"}


def test_otel_service_name_and_resource_attributes_are_honoured(tmp_path):
    import os

    env = dict(os.environ, OTEL_SERVICE_NAME="etl-prefect",
               OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=staging")
    result = run_cli("convert", str(SAMPLES / "task_fails.jsonl"), env=env)
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout.splitlines()[0])
    resource = {a["key"]: a["value"]["stringValue"]
                for a in obj["resourceSpans"][0]["resource"]["attributes"]}
    assert resource["service.name"] == "etl-prefect"
    assert resource["deployment.environment.name"] == "staging"


def test_usage_errors_exit_two(tmp_path):
    assert run_cli("convert", str(tmp_path / "missing.jsonl")).returncode == 2
    assert run_cli("convert", "--to", "nowhere").returncode == 2
    assert run_cli().returncode == 2


def test_oversized_line_is_rejected_without_losing_the_next(tmp_path):
    raw = task_run_events(["Pending", "Running", "Completed"])
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps(raw[0]) + "\n")
        f.write('{"pad": "' + "x" * 3_000_000 + '"}\n')
        f.write(json.dumps(raw[1]) + "\n" + json.dumps(raw[2]) + "\n")
    result = run_cli("convert", str(path), "--to", "tree")
    assert result.returncode == 1
    assert f"{path}:2: rejected (too_large)" in result.stderr
    assert "Pending > Running > Completed" in result.stdout


def test_same_input_gives_byte_identical_output_in_any_order(tmp_path):
    lines = []
    for sample in sorted(SAMPLES.glob("*.jsonl")):
        lines += sample.read_text().splitlines()
    forward = run_cli("convert", stdin="\n".join(lines) + "\n")
    backward = run_cli("convert", stdin="\n".join(reversed(lines)) + "\n")
    assert forward.returncode == backward.returncode == 0
    assert forward.stdout == backward.stdout
    assert len(forward.stdout.splitlines()) == 5  # one line per flow run's trace


def test_tree_shows_the_nesting():
    result = run_cli("convert", str(SAMPLES / "task_retries.jsonl"), "--to", "tree")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Each run by its own name; a flow run's span name says its flow.
    assert lines[1].startswith("└─ flow ") and "(RUN f-task-retries) [Completed]" in lines[1]
    assert "Pending > Running > Completed" in lines[1]
    assert any(l.startswith("   ├─ task flaky_immediate") and "Retrying" in l for l in lines)
    assert any("ERROR Task run encountered an exception RuntimeError" in l for l in lines)


def test_reverse_gives_back_the_events_and_reports_bad_lines(tmp_path):
    source = SAMPLES / "task_retries.jsonl"
    otlp = tmp_path / "spans.jsonl"
    assert run_cli("convert", str(source), "-o", str(otlp)).returncode == 0
    lines = otlp.read_text().splitlines()
    broken = write_jsonl(tmp_path / "broken.jsonl", [
        "{not json", lines[0], '{"resourceSpans": [{"scopeSpans": [{"spans": '
        '[{"traceId": "zz", "spanId": "00"}]}]}]}', "[]"])
    result = run_cli("convert", str(broken), "--to", "events")
    assert result.returncode == 1
    assert f"{broken}:1: rejected (malformed_json)" in result.stderr
    assert f"{broken}:3: rejected (invalid_otlp)" in result.stderr
    assert f"{broken}:4: rejected (not_an_object)" in result.stderr
    got = {json.loads(l)["id"]: json.loads(l) for l in result.stdout.splitlines()}
    expected = {e["id"]: {k: v for k, v in e.items() if k != "received"}
                for e in (json.loads(l) for l in source.read_text().splitlines())
                if "prefect.state-type" in e["resource"]}
    assert got == expected


def test_reverse_reads_a_pretty_printed_document(tmp_path):
    otlp = run_cli("convert", str(SAMPLES / "task_fails.jsonl")).stdout.splitlines()[0]
    document = tmp_path / "trace.json"
    document.write_text(json.dumps(json.loads(otlp), indent=2))
    result = run_cli("convert", str(document), "--to", "events")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6


def span_attributes(stdout: str) -> list[dict]:
    request = parse_otlp_json_line(stdout.splitlines()[0])
    return [{a.key: a.value.string_value for a in span.attributes}
            for span in request.resource_spans[0].scope_spans[0].spans]


def test_prefects_ui_address_links_each_span_to_its_runs_page():
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    source = str(SAMPLES / "task_fails.jsonl")
    for env, ui in [({"PREFECT_UI_URL": "https://prefect.example/"}, "https://prefect.example"),
                    ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, "http://127.0.0.1:4200")]:
        result = run_cli("convert", source, env={**base, **env})
        assert result.returncode == 0, result.stderr
        spans = span_attributes(result.stdout)
        for attrs in spans:
            if "cicd.pipeline.task.run.id" in attrs:
                assert attrs["cicd.pipeline.task.run.url.full"] == (
                    f"{ui}/runs/task-run/{attrs['cicd.pipeline.task.run.id']}")
            else:
                assert attrs["cicd.pipeline.run.url.full"] == (
                    f"{ui}/runs/flow-run/{attrs['cicd.pipeline.run.id']}")
    result = run_cli("convert", source, env=base)
    assert not [k for attrs in span_attributes(result.stdout) for k in attrs if "url" in k]


def test_convert_streams_runs_out_as_they_finish_and_counts_a_state_past_the_window(tmp_path):
    """A run's span is written once `--linger-events` more events are read
    after its final state: memory holds the open runs, not the input. A
    state read later than that is set aside, counted, and the exit status
    says so."""
    flow_run = FlowRun()
    early = task_run_events(["Pending", "Running", "Completed"], name="early", flow_run=flow_run)
    rolled_back = task_run_events(["Pending", "Running", "Completed", "RolledBack"],
                                  name="rolled-back", flow_run=flow_run)
    filler = [e for i in range(4) for e in task_run_events(
        ["Pending", "Running", "Completed"], name=f"filler-{i}", flow_run=flow_run)]
    events = write_jsonl(tmp_path / "in.jsonl",
                         early + rolled_back[:3] + filler + rolled_back[3:])
    out = tmp_path / "out.jsonl"

    held = run_cli("convert", str(events), "-o", str(out), "--linger-events", "100")
    assert held.returncode == 0, held.stderr
    spans = {s.name: s for line in out.read_text().splitlines()
             for s in parse_otlp_json_line(line).resource_spans[0].scope_spans[0].spans}
    assert [e.name for e in spans["rolled-back"].events][-1] == "RolledBack"

    streamed = run_cli("convert", str(events), "-o", str(out), "--linger-events", "3")
    assert streamed.returncode == 1
    assert "1 late events set aside" in streamed.stderr and "--linger-events" in streamed.stderr
    spans = {s.name: s for line in out.read_text().splitlines()
             for s in parse_otlp_json_line(line).resource_spans[0].scope_spans[0].spans}
    assert len(spans) == 6
    assert [e.name for e in spans["rolled-back"].events] == ["Pending", "Running", "Completed"]


def test_a_run_otlp_cannot_carry_is_set_aside_and_the_others_are_written(tmp_path):
    """A run dated 1900 (a negative time in OTLP) or a state message with a
    lone surrogate escape once failed the whole output, every good span lost."""
    good = task_run_events(["Pending", "Running", "Completed"], name="good")
    old = task_run_events(["Pending", "Running", "Completed"], name="old")
    for i, event in enumerate(old):
        event["occurred"] = f"1900-01-01T00:00:0{i}Z"
        event["resource"]["prefect.state-timestamp"] = f"1900-01-01T00:00:0{i}+00:00"
    surrogate = task_run_events(["Pending", "Running", "Failed"], name="surrogate",
                                messages={"Failed": "broken \ud800 text"})
    events = write_jsonl(tmp_path / "in.jsonl", good + old + surrogate)  # (escaped by json.dumps)
    out = tmp_path / "out.jsonl"
    result = run_cli("convert", str(events), "-o", str(out))
    assert result.returncode == 1
    assert "2 spans OTLP cannot carry set aside" in result.stderr
    assert "(unencodable): a time of" in result.stderr and "lone surrogate" in result.stderr
    assert "\\ud800" not in result.stderr and "broken" not in result.stderr  # not its content
    (request,) = [parse_otlp_json_line(line) for line in out.read_text().splitlines()]
    assert [s.name for s in request.resource_spans[0].scope_spans[0].spans] == ["good"]


def test_the_first_hour_slips(tmp_path):
    """What a new user met: no --version, the top-level usage for a missing
    file, two line numbers in one message, silence for events given to the
    reverse direction, an example that crashed without its argument."""
    assert run_cli("--version").stdout.startswith("otel-bridge ")
    missing = run_cli("convert", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "usage: otel-bridge convert" in missing.stderr
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"a":'])
    message = run_cli("convert", str(broken)).stderr
    assert "broken.jsonl:1: rejected (malformed_json)" in message and "line 2" not in message
    events = write_jsonl(tmp_path / "events.jsonl", task_run_events(["Pending", "Running"]))
    reverse = run_cli("convert", str(events), "--to", "events")
    assert reverse.returncode == 1 and "looks like Prefect events" in reverse.stderr
    example = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "examples"
                                                  / "minimal_engine.py")],
                             capture_output=True, text=True, timeout=60)
    assert example.returncode == 1 and "minimal_engine.py EVENTS.jsonl" in example.stderr


def test_the_tree_shows_the_flow_tags_and_why_a_run_was_retried(tmp_path):
    """What a person reading the tree asked for. (Prefect 3.9 writes no
    message on its retry states; an engine that does gets it shown.)"""
    flow_run = FlowRun()
    raw = flow_run_events(["Pending", "Running", "Completed"], flow_run) + task_run_events(
        ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"], name="load-1a2",
        flow_run=flow_run, tags=["etl", "db"],
        messages={"AwaitingRetry": "Task run encountered an exception TimeoutError: db slow"})
    tree = run_cli("convert", str(write_jsonl(tmp_path / "in.jsonl", raw)), "--to", "tree").stdout
    flow_line, task_line = [line for line in tree.splitlines() if "[" in line]
    assert f"(RUN {flow_run.flow_name})" in flow_line
    assert "#db #etl" in task_line  # (Prefect sorts a run's tags)
    assert "AwaitingRetry (TimeoutError: db slow) > Retrying" in task_line


def test_spans_built_in_worker_processes_are_byte_for_byte_the_same(tmp_path):
    """--jobs builds spans in other processes; the output does not depend on
    how many, a run OTLP cannot carry is set aside the same way."""
    from support.helpers import FIXTURES

    events = tmp_path / "in.jsonl"
    old = task_run_events(["Pending", "Running", "Completed"], name="old")
    for i, event in enumerate(old):
        event["occurred"] = f"1900-01-01T00:00:0{i}Z"
    with open(events, "w") as out:
        for path in sorted(FIXTURES.glob("*.jsonl")):
            if not path.name.endswith(".ws.jsonl"):
                out.write(path.read_text())
        out.write("".join(json.dumps(e) + "\n" for e in old))
    outputs = {}
    for jobs in ("1", "2", "3"):
        out = tmp_path / f"out-{jobs}.jsonl"
        result = run_cli("convert", str(events), "-o", str(out), "--jobs", jobs)
        assert result.returncode == 1 and "1 spans OTLP cannot carry" in result.stderr, jobs
        outputs[jobs] = out.read_bytes()
    assert outputs["1"] == outputs["2"] == outputs["3"] and len(outputs["1"]) > 100_000


def test_serve_help_teaches_every_setting():
    """Once about 20 options showed as bare VALUE, with no help, default or
    choices."""
    import re

    from otel_bridge.service.config import ServeSettings

    text = run_cli("serve", "--help").stdout
    flat = re.sub(r"\s+", " ", text)
    for name, field in ServeSettings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"OTEL_BRIDGE_{name.upper()}" in flat.replace("OTEL_BRIDGE_ ", "OTEL_BRIDGE_"), name
        assert field.description, name
    assert "--log-level {debug|info|warning|error}" in flat
    assert "(default: 5.0; env OTEL_BRIDGE_LINGER_SECONDS)" in flat
