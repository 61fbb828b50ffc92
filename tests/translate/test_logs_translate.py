"""Prefect log lines -> log records (translate.logs), and the records out
through the SDK (sinks.otlp_logs): ids equal to the spans' for the same runs,
severities, attributes, and bad input refused with a reason."""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timezone

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from support.factories import LOG_FLOW_RUN, LOG_TASK_RUN, prefect_log, runs_of_span
from support.helpers import FIXTURES, convert, load_jsonl
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from otel_bridge.model.events import EventRejected
from otel_bridge.model.logs import MAX_LOG_MESSAGE_CHARS
from otel_bridge.sinks.otlp_logs import OtlpJsonLogWriter, batches_by_size
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.translate.logs import (
    ATTR_FLOW_RUN_ID,
    ATTR_LOG_ID,
    ATTR_TASK_RUN_ID,
    checked_log,
    log_record,
    looks_like_log,
    parse_log_lines,
    severity,
)

CAPTURES = sorted(p for p in FIXTURES.glob("*.jsonl") if not p.name.endswith(".ws.jsonl"))


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_a_log_line_of_each_captured_run_gets_its_spans_trace_and_span_id(capture):
    spans = convert(load_jsonl(capture))
    assert spans
    for span in spans:
        flow_run, task_run = runs_of_span(span)
        record = log_record(prefect_log(flow_run_id=flow_run, task_run_id=task_run))
        assert (record.trace_id_hex, record.span_id_hex) == (span.trace_id_hex, span.span_id_hex), \
            span.attributes.get("prefect.resource.id")


def test_the_record_carries_time_severity_body_logger_and_run_ids():
    log = prefect_log(level=40, message="boom\nTraceback ...")
    record = log_record(log)
    assert record.time_unix_nano == 1_772_359_201_250_000_000
    assert record.observed_time_unix_nano == 1_772_359_201_500_000_000  # when the server stored it
    assert (record.severity_number, record.severity_text) == (17, "ERROR")
    assert record.body == "boom\nTraceback ..."
    assert record.logger_name == "prefect.task_runs"
    assert record.attributes == {ATTR_LOG_ID: log["id"], ATTR_FLOW_RUN_ID: LOG_FLOW_RUN,
                                 ATTR_TASK_RUN_ID: LOG_TASK_RUN}


def test_a_flow_runs_line_is_on_the_flow_runs_span_and_a_lone_task_runs_on_its_own():
    flow_line = log_record(prefect_log(task_run_id=None, name="prefect.flow_runs"))
    task_line = log_record(prefect_log())
    lone_task = log_record(prefect_log(flow_run_id=None))
    assert flow_line.trace_id == task_line.trace_id  # one trace per flow run
    assert flow_line.span_id != task_line.span_id
    assert lone_task.trace_id != task_line.trace_id and lone_task.span_id == task_line.span_id
    assert ATTR_TASK_RUN_ID not in flow_line.attributes


def test_a_line_of_no_run_is_passed_over():
    assert log_record(prefect_log(flow_run_id=None, task_run_id=None)) is None


@pytest.mark.parametrize("level, expected", [
    (10, (5, "DEBUG")), (20, (9, "INFO")), (30, (13, "WARNING")), (40, (17, "ERROR")),
    (50, (21, "CRITICAL")), (0, (0, "NOTSET")), (5, (1, "Level 5")), (11, (6, "Level 11")),
    (25, (12, "Level 25")), (53, (24, "Level 53")), (60, (24, "Level 60"))])
def test_python_levels_map_to_otel_severities_as_the_sdks_logging_handler_maps_them(level, expected):
    assert severity(level) == expected


@pytest.mark.parametrize("change, reason", [
    ({"level": "INFO"}, "invalid_level"), ({"level": True}, "invalid_level"),
    ({"level": -1}, "invalid_level"), ({"level": 40_000}, "invalid_level"),
    ({"message": None}, "invalid_log"), ({"name": 3}, "invalid_log"),
    ({"timestamp": "yesterday"}, "invalid_log"), ({"timestamp": 1700000000}, "invalid_log"),
    ({"timestamp": "1969-12-31T23:59:59Z"}, "invalid_log"),
    ({"timestamp": "9999-12-31T23:59:59Z"}, "invalid_log"),
    ({"flow_run_id": "not-a-uuid"}, "invalid_log"), ({"task_run_id": 7}, "invalid_log"),
    ({"id": "x"}, "invalid_log"), ({"message": "x" * (MAX_LOG_MESSAGE_CHARS + 1)}, "too_large"),
])
def test_bad_log_lines_are_refused_with_a_reason(change, reason):
    with pytest.raises(EventRejected) as refused:
        log_record(prefect_log(**change))
    assert refused.value.reason == reason


@pytest.mark.parametrize("missing", ["level", "message", "timestamp", "name"])
def test_a_line_without_a_field_is_refused(missing):
    log = prefect_log()
    del log[missing]
    with pytest.raises(EventRejected):
        log_record(log)


def test_not_an_object_is_refused_and_uuids_are_made_canonical():
    with pytest.raises(EventRejected, match="invalid_log"):
        log_record(["a", "list"])
    assert checked_log(prefect_log(flow_run_id=LOG_FLOW_RUN.upper()))["flow_run_id"] == LOG_FLOW_RUN
    assert log_record(prefect_log(task_run_id=LOG_TASK_RUN.upper())).span_id == \
        log_record(prefect_log()).span_id


def test_log_lines_are_told_from_events_by_shape_and_read_as_pages_or_lines():
    assert looks_like_log(prefect_log())
    assert not looks_like_log({"event": "prefect.task-run.Completed", "level": 1,
                               "message": "", "timestamp": ""})
    assert len(parse_log_lines(json.dumps([prefect_log(), prefect_log()]).encode())) == 2
    assert len(parse_log_lines(json.dumps(prefect_log()).encode())) == 1
    with pytest.raises(EventRejected, match="malformed_json"):
        parse_log_lines(b"{nope")


def test_the_otlp_json_writer_writes_what_protobuf_reads_back_with_the_records_fields():
    stream = io.StringIO()
    records = [log_record(prefect_log(message=f"line {i}")) for i in range(3)]
    writer = OtlpJsonLogWriter(stream, resource_from_env())
    writer.export(records)
    line = json.loads(stream.getvalue())
    logs = line["resourceLogs"][0]["scopeLogs"][0]
    assert logs["scope"]["name"] == "prefect.task_runs"
    assert [r["body"]["stringValue"] for r in logs["logRecords"]] == ["line 0", "line 1", "line 2"]
    first = logs["logRecords"][0]
    assert (first["traceId"], first["spanId"]) == (records[0].trace_id_hex, records[0].span_id_hex)
    assert first["severityNumber"] == 9 and first["severityText"] == "INFO"
    assert first["timeUnixNano"] == str(records[0].time_unix_nano)
    # OTLP/JSON: hex ids, which protobuf's own mapping (base64) takes after the swap.
    for record in logs["logRecords"]:
        for key in ("traceId", "spanId"):
            record[key] = base64.b64encode(bytes.fromhex(record[key])).decode()
    json_format.ParseDict(line, ExportLogsServiceRequest())
    assert writer.records_written == 3


def test_requests_are_cut_by_size_and_a_huge_record_goes_alone():
    small = log_record(prefect_log(message="x" * 100))
    huge = log_record(prefect_log(message="y" * 900_000))
    batches = list(batches_by_size([small, huge, huge, huge, huge, small], limit=2_000_000))
    assert [len(b) for b in batches] == [3, 3]  # two huge ones fit, a third does not
    assert list(batches_by_size([huge], limit=10)) == [[huge]]


def test_a_line_whose_text_is_not_unicode_is_rejected_not_a_failed_export():
    import uuid

    from otel_bridge.model.events import EventRejected
    from otel_bridge.translate.logs import checked_log

    line = {"id": str(uuid.uuid4()), "name": "x", "level": 20, "message": "a\ud800",
            "timestamp": "2026-01-01T00:00:00+00:00", "flow_run_id": str(uuid.uuid4())}
    with pytest.raises(EventRejected, match="not Unicode"):
        checked_log(line)
    with pytest.raises(EventRejected, match="name is text"):
        checked_log({**line, "message": "fine", "name": "\udfff"})


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2553, 12, 31),
                    timezones=st.just(timezone.utc)), st.sampled_from(["Z", "+00:00"]))
def test_a_time_in_prefects_form_is_taken_as_parsing_it_would_give_it(moment, zone):
    from otel_bridge.translate.logs import _time

    text = moment.isoformat().replace("+00:00", zone)
    assert _time(text, "timestamp") == datetime.fromisoformat(text).astimezone(
        timezone.utc).isoformat()


def test_a_uuid_in_any_form_comes_out_in_prefects():
    import uuid

    from otel_bridge.translate.logs import _uuid

    value = uuid.uuid4()
    for form in (str(value), str(value).upper(), value.hex, "{" + str(value) + "}"):
        assert _uuid(form, "id") == str(value)
