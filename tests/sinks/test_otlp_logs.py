"""Log records encoded directly are the SDK's encoding, byte for byte: the
records its `LoggerProvider` makes of them, through its `encode_logs`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.sdk.resources import Resource

from otel_bridge.model.logs import LogRecord
from otel_bridge.model.otlp_protobuf import LogsRequest, encode_log_record
from otel_bridge.sinks.otlp_logs import SdkLogRecords, logs_request

RESOURCE = Resource.create({"service.name": "prefect", "deployment.environment": "test"})

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
RECORDS = st.builds(
    LogRecord,
    time_unix_nano=st.integers(min_value=1, max_value=2**63),
    observed_time_unix_nano=st.integers(min_value=1, max_value=2**63),
    severity_number=st.integers(min_value=1, max_value=24),
    severity_text=st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "LEVEL 7"]),
    body=TEXT,
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    span_id=st.integers(min_value=1, max_value=2**64 - 1),
    logger_name=st.sampled_from(["prefect.task_runs", "prefect.flow_runs", "my.module", ""]),
    attributes=st.dictionaries(st.sampled_from(["log.record.uid", "cicd.pipeline.run.id",
                                                "prefect.log.worker_id", "x"]), TEXT, max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(RECORDS, min_size=1, max_size=8))
def test_records_encode_to_the_sdks_very_bytes(records):
    sdk = encode_logs(SdkLogRecords(RESOURCE).convert(records)).SerializeToString()
    ours = logs_request(RESOURCE).encode(
        (record.logger_name, encode_log_record(record)) for record in records)
    assert ours == sdk


def test_a_request_groups_records_under_their_loggers_scope_in_order():
    made = [LogRecord(1, 2, 9, "INFO", f"line {n}", 1, 1, name) for n, name in
            enumerate(["b", "a", "b"])]
    request = LogsRequest(b"")
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    parsed = ExportLogsServiceRequest.FromString(
        request.encode((r.logger_name, encode_log_record(r)) for r in made))
    scopes = parsed.resource_logs[0].scope_logs
    assert [s.scope.name for s in scopes] == ["b", "a"]
    assert [[r.body.string_value for r in s.log_records] for s in scopes] == [
        ["line 0", "line 2"], ["line 1"]]
