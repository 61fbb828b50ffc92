"""Run metrics from real captured runs: the measurements agree with the
spans, carry no run id, and a run counts once however often it is seen."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from support.helpers import FIXTURES, convert, load_jsonl

from otel_bridge.translate.run_metrics import (
    FLOW_RUN_DURATION,
    FLOW_RUN_ERRORS,
    TASK_RUN_DURATION,
    TASK_RUN_ERRORS,
    CountedRuns,
    run_measurements,
)
from otel_bridge.translate.span_layout import carried_state_events

CAPTURES = sorted(p for p in FIXTURES.glob("*.jsonl") if not p.name.endswith(".ws.jsonl"))
ALLOWED_ATTRIBUTES = {"cicd.pipeline.name", "cicd.pipeline.run.state", "cicd.pipeline.result",
                      "cicd.pipeline.task.name", "cicd.pipeline.task.run.result",
                      "prefect.task.run.state", "error.type"}


def _finished(span) -> bool:
    return "otel_bridge.synthetic.end" not in span.attributes


def _counted(spans) -> Counter:
    """What a batch of spans counts for: (instrument, attributes) -> [sum, n]."""
    counted, totals = CountedRuns(), Counter()
    for span in spans:
        found = run_measurements(span)
        if found is None or not counted.first_time(found.span_id):
            continue
        for m in found.measurements:
            totals[(m.instrument.name, m.attributes, "sum")] += round(m.value * 1e9)  # ns: exact
            totals[(m.instrument.name, m.attributes, "n")] += 1
    return totals


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_measurements_agree_with_the_spans(capture):
    for span in convert(load_jsonl(capture)):
        found = run_measurements(span)
        if not _finished(span):
            assert found is None, "a run that did not end is not counted"
            continue
        assert found is not None and found.span_id == span.span_id
        attrs = span.attributes
        flow = "cicd.pipeline.run.id" in attrs
        duration, errors = ((FLOW_RUN_DURATION, FLOW_RUN_ERRORS) if flow
                            else (TASK_RUN_DURATION, TASK_RUN_ERRORS))
        state_key = "cicd.pipeline.run.state" if flow else "prefect.task.run.state"
        result_key = "cicd.pipeline.result" if flow else "cicd.pipeline.task.run.result"
        phases = [m for m in found.measurements if m.instrument is duration]
        by_phase = {m.attribute_map[state_key]: m.value for m in phases}
        first_state = min(e.time_unix_nano for e in carried_state_events(span.events))
        # The phases add up to the run's time from its first state to its end.
        assert sum(by_phase.values()) == pytest.approx(
            (span.end_time_unix_nano - first_state) / 1e9, abs=1e-6)
        if "otel_bridge.synthetic.start" not in attrs:
            ran = by_phase["executing"] + by_phase.get("finalizing", 0)
            assert ran == pytest.approx(
                (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9, abs=1e-6)
            assert by_phase.get("pending", 0) == pytest.approx(
                (span.start_time_unix_nano - first_state) / 1e9, abs=1e-6)
        # The result, and error.type, on the phase the run ended in only.
        last = phases[-1].attribute_map
        assert last[result_key] == attrs[result_key]
        assert last.get("error.type") == attrs.get("error.type")
        assert all(result_key not in m.attribute_map for m in phases[:-1])
        name_key = "cicd.pipeline.name" if flow else "cicd.pipeline.task.name"
        assert all(m.attribute_map[name_key] == attrs[name_key] for m in found.measurements)
        error_counts = [m for m in found.measurements if m.instrument is errors]
        if "error.type" in attrs:
            assert [(m.value, m.attribute_map["error.type"]) for m in error_counts] == [
                (1, attrs["error.type"])]
        else:
            assert error_counts == []


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_no_run_identity_in_any_attribute(capture):
    for span in convert(load_jsonl(capture)):
        found = run_measurements(span)
        # (A run's name is no identity to check for: a deferred task run's is its task's.)
        identities = {str(v) for k, v in span.attributes.items() if k.endswith(".id")}
        identities |= {span.span_id_hex, span.trace_id_hex}
        for m in found.measurements if found else ():
            assert set(m.attribute_map) <= ALLOWED_ATTRIBUTES
            assert not identities & set(m.attribute_map.values())


def test_the_captures_cover_every_result_and_an_error_per_kind():
    totals = _counted(s for c in CAPTURES for s in convert(load_jsonl(c)))
    results = {dict(attrs).get(k) for (name, attrs, _) in totals
               for k in ("cicd.pipeline.result", "cicd.pipeline.task.run.result")} - {None}
    assert {"success", "failure", "error", "timeout", "cancellation", "skip"} <= results
    flow_errors = {dict(a)["error.type"] for (n, a, _) in totals if n == FLOW_RUN_ERRORS.name}
    assert {"ValueError", "Crashed"} <= flow_errors


def test_a_run_seen_twice_in_any_order_counts_once():
    lines = [line for c in CAPTURES for line in load_jsonl(c)]
    once = _counted(convert(lines))
    shuffled = lines * 2
    random.Random(14).shuffle(shuffled)
    spans = convert(shuffled)
    spans += convert(lines)  # a restart that rebuilds every span again
    assert _counted(spans) == once
    assert sum(v for (n, _, kind), v in once.items() if kind == "n") > 100


def test_counted_runs_answers_membership_by_lookup_not_by_scanning(monkeypatch):
    # `in` fell back to __iter__: a scan of up to 100,000 span ids for every
    # run a sidecar emitted, which made --metrics cost 1.5x the spans alone.
    counted = CountedRuns(counted=range(1, 1001))
    monkeypatch.setattr(CountedRuns, "__iter__", lambda self: pytest.fail("scanned"))
    assert 500 in counted and 1001 not in counted
    counted.first_time(1001)
    assert 1001 in counted


def test_counted_runs_is_bounded_and_forgets_the_oldest_first():
    counted = CountedRuns(limit=2, counted=[1, 2])
    assert not counted.first_time(1)
    assert counted.first_time(3)  # 1 is forgotten now
    assert list(counted) == [2, 3] and len(counted) == 2
    assert counted.first_time(1)
