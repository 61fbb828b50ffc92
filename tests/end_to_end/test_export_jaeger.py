"""`otel-bridge convert --to otlp` into a real Jaeger v2, over OTLP/gRPC and
OTLP/HTTP, configured only by the standard OTEL_* variables; the traces are
read back through Jaeger's query API and checked span by span."""

from __future__ import annotations

import uuid

import pytest
from support.helpers import SAMPLES, convert, convert_to_otlp, load_jsonl
from support.backends import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.integration]


def tags(obj) -> dict:
    return {t["key"]: t["value"] for t in obj.get("tags", [])}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_convert_exports_every_span_to_jaeger(jaeger, protocol, tmp_path):
    service = f"prefect-{uuid.uuid4().hex[:8]}"
    convert_to_otlp(sorted(SAMPLES.glob("*.jsonl")), jaeger, protocol, service)

    expected = convert([e for p in sorted(SAMPLES.glob("*.jsonl")) for e in load_jsonl(p)])
    for trace_id in {s.trace_id for s in expected}:
        mine = {s.span_id_hex: s for s in expected if s.trace_id == trace_id}
        # Ids are derived from the runs, so the other protocol's run of this
        # test sent the same span ids: tell them apart by service.
        def ours():
            trace = jaeger.trace(format(trace_id, "032x")) or {"spans": [], "processes": {}}
            return [s for s in trace["spans"]
                    if trace["processes"][s["processID"]]["serviceName"] == service]

        wait_until(lambda: len(ours()) >= len(mine), 20, what=f"{len(mine)} spans in Jaeger")
        assert sorted(s["spanID"] for s in ours()) == sorted(mine)
        for got in ours():
            span = mine[got["spanID"]]
            assert got["operationName"] == span.name
            parents = [r["spanID"] for r in got.get("references", []) if r["refType"] == "CHILD_OF"]
            assert parents == ([format(span.parent_span_id, "016x")] if span.parent_span_id else [])
            assert got["startTime"] == span.start_time_unix_nano // 1000
            assert got["duration"] == (span.end_time_unix_nano - span.start_time_unix_nano) // 1000
            got_tags = tags(got)
            assert got_tags["prefect.resource.id"] == span.attributes["prefect.resource.id"]
            assert got_tags["prefect.state-name"] == span.attributes["prefect.state-name"]
            if span.status_code.name == "ERROR":
                assert got_tags["error"] is True
                assert got_tags["otel.status_description"] == span.status_message
            else:
                assert "error" not in got_tags
            assert got_tags["prefect.run.name"] == span.attributes["prefect.run.name"]
            # Span events arrive as logs, one per state, named after it, with
            # their attributes.
            logs = got["logs"]
            assert [tags({"tags": log["fields"]}).get("event") for log in logs] == [
                e.name for e in span.events]
            assert [log["timestamp"] for log in logs] == [
                e.time_unix_nano // 1000 for e in span.events]
            assert [{k: v for k, v in tags({"tags": log["fields"]}).items() if k != "event"}
                    for log in logs] == [dict(e.attributes) for e in span.events]
