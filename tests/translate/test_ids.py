"""The documented id scheme (docs/mapping.md: "Identities"), checked against
an independent computation, so a change to the scheme cannot go unnoticed."""

import hashlib

from otel_bridge.translate.ids import span_id_for, trace_id_for

RUN = "prefect.task-run.01a22348-1153-7a70-9d6e-1e43e7e7cefb"


def test_trace_id_is_sha256_of_prefixed_resource_id():
    expected = hashlib.sha256(f"otel-bridge/v1 trace {RUN}".encode()).digest()[:16]
    assert trace_id_for(RUN) == int.from_bytes(expected, "big")


def test_span_id_is_sha256_of_prefixed_resource_id():
    expected = hashlib.sha256(f"otel-bridge/v1 span {RUN}".encode()).digest()[:8]
    assert span_id_for(RUN) == int.from_bytes(expected, "big")


def test_ids_differ_between_runs_and_kinds():
    other = RUN.replace("task-run", "flow-run")
    assert len({trace_id_for(RUN), trace_id_for(other)}) == 2
    assert len({span_id_for(RUN), span_id_for(other)}) == 2
    assert 0 < span_id_for(RUN) < 2**64
    assert 0 < trace_id_for(RUN) < 2**128
