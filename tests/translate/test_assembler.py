"""Assembling a stream: duplicates, linger, timeouts, caps (docs/mapping.md: "Assembly (streams)")."""

from __future__ import annotations

from support.factories import FlowRun, task_run_events
from support.helpers import events, state_names

from otel_bridge.translate.assembler import Assembler, AssemblerOptions


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def assembler(clock=None, set_aside=None, **options):
    return Assembler(AssemblerOptions(**options), clock=clock or Clock(), on_set_aside=set_aside)


def feed(asm, dicts):
    out = []
    for event in events(dicts):
        out.extend(asm.add(event))
    return out


def test_span_waits_for_linger_after_final_state_then_includes_late_states():
    clock = Clock()
    asm = assembler(clock, linger_seconds=5)
    raw = task_run_events(["Pending", "Running", "Completed", "RolledBack"])
    assert feed(asm, raw[:3]) == []
    clock.now += 4
    assert asm.expire() == []
    feed(asm, raw[3:])
    clock.now += 1
    (span,) = asm.expire()
    assert state_names(span) == ["Pending", "Running", "Completed", "RolledBack"]
    assert asm.open_runs == 0


def test_a_finished_run_waits_for_the_watermark_to_pass_its_final_state():
    from datetime import timedelta

    from otel_bridge.model.events import parse_wire_event

    clock = Clock()
    asm = assembler(clock, linger_seconds=1)
    raw = task_run_events(["Pending", "Running", "Completed"])
    final = parse_wire_event(raw[-1]).occurred
    # The live stream missed Running; its final state came.
    feed(asm, [raw[0], raw[2]])
    clock.now += 2
    assert asm.expire(watermark=final - timedelta(seconds=1)) == []
    assert asm.flush_finished(watermark=final - timedelta(seconds=1)) == []
    feed(asm, [raw[1]])  # recovered from REST before the watermark passed
    (span,) = asm.expire(watermark=final)
    assert state_names(span) == ["Pending", "Running", "Completed"]


def test_a_run_ahead_of_the_watermark_does_not_hold_back_the_others():
    from datetime import timedelta

    from support.factories import T0

    from otel_bridge.model.events import parse_wire_event

    clock = Clock()
    asm = assembler(clock, linger_seconds=1)
    later = task_run_events(["Running", "Completed"], start=T0 + timedelta(minutes=1))
    sooner = task_run_events(["Running", "Completed"])
    feed(asm, later + sooner)  # `later` lingers first, but ends after the watermark
    clock.now += 2
    watermark = parse_wire_event(sooner[-1]).occurred + timedelta(seconds=1)
    (span,) = asm.expire(watermark=watermark)
    assert span.attributes["prefect.resource.id"] == sooner[0]["resource"]["prefect.resource.id"]
    assert asm.open_runs == 1


def test_events_after_the_span_was_emitted_are_set_aside_and_counted():
    clock, aside = Clock(), []
    asm = assembler(clock, set_aside=lambda e, why: aside.append((e.event, why)),
                    linger_seconds=1)
    raw = task_run_events(["Pending", "Running", "Completed", "RolledBack"])
    feed(asm, raw[:3])
    clock.now += 2
    (span,) = asm.expire()
    feed(asm, raw[3:])
    feed(asm, raw[:1])  # a re-sent duplicate is not late
    assert aside == [("prefect.task-run.RolledBack", "late")]
    assert asm.counts["events_set_aside_late"] == 1
    assert asm.counts["events_duplicate"] == 1
    assert asm.flush() == []


def test_duplicates_are_ignored():
    asm = assembler()
    raw = task_run_events(["Pending", "Running", "Completed"])
    feed(asm, raw + raw + raw[1:2])
    (span,) = asm.flush()
    assert state_names(span) == ["Pending", "Running", "Completed"]
    assert asm.counts["events_duplicate"] == 4


def test_run_that_never_ends_times_out_and_is_marked():
    clock = Clock()
    asm = assembler(clock, run_timeout_seconds=60)
    feed(asm, task_run_events(["Pending", "Running"]))
    clock.now += 59
    assert asm.expire() == []
    clock.now += 1
    (span,) = asm.expire()
    assert span.attributes["otel_bridge.synthetic.end"] == "timeout"
    assert asm.counts["spans_synthetic_end_timeout"] == 1


def test_activity_postpones_the_timeout():
    clock = Clock()
    asm = assembler(clock, run_timeout_seconds=60)
    raw = task_run_events(["Pending", "Running", "Completed"])
    feed(asm, raw[:1])
    clock.now += 50
    feed(asm, raw[1:2])
    clock.now += 50
    assert asm.expire() == []


def test_cap_on_open_runs_ends_the_least_recently_active_run():
    clock = Clock()
    asm = assembler(clock, max_open_runs=2)
    first = task_run_events(["Pending", "Running"], name="first")
    second = task_run_events(["Pending", "Running"], name="second")
    third = task_run_events(["Pending", "Running"], name="third")
    feed(asm, first[:1] + second)
    feed(asm, first[1:])  # first is now the more recent
    (evicted,) = feed(asm, third)
    assert evicted.attributes["prefect.run.name"] == "second"
    assert evicted.attributes["otel_bridge.synthetic.end"] == "evicted"
    assert asm.open_runs == 2
    assert asm.counts["spans_synthetic_end_evicted"] == 1


def test_cap_on_events_per_run_is_counted_on_the_span():
    aside = []
    asm = assembler(max_events_per_run=3, set_aside=lambda e, why: aside.append(why))
    raw = task_run_events(["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"])
    feed(asm, raw)
    (span,) = asm.flush()
    assert len(span.events) == 3
    assert span.attributes["otel_bridge.events.dropped"] == 2
    assert aside == ["run_event_cap", "run_event_cap"]


def test_other_events_are_passed_over():
    asm = assembler()
    heartbeat = {
        "occurred": "2026-11-28T17:50:55.325176Z", "event": "prefect.flow-run.heartbeat",
        "resource": {"prefect.resource.id": FlowRun().resource_id},
        "payload": {}, "id": "01a22348-115e-7ad7-9a41-192b1e7464f9",
    }
    assert feed(asm, [heartbeat]) == []
    assert asm.flush() == []
    assert asm.counts["events_not_run_state"] == 1


def test_unknown_state_type_is_rejected_without_harming_the_run():
    import pytest

    from otel_bridge.model.events import EventRejected

    asm = assembler()
    raw = task_run_events(["Pending", "Running", "Completed"])
    bad = dict(raw[1], id="01a22348-115e-7ad7-9a41-192b1e7464f0",
               resource=dict(raw[1]["resource"], **{"prefect.state-type": "EXPLODING"}))
    feed(asm, raw[:1])
    with pytest.raises(EventRejected) as caught:
        feed(asm, [bad])
    assert caught.value.reason == "unknown_state_type"
    feed(asm, raw[1:])
    (span,) = asm.flush()
    assert state_names(span) == ["Pending", "Running", "Completed"]


def test_a_run_whose_span_cannot_be_made_costs_that_run_alone(monkeypatch):
    """Whatever breaks building one run's span (a bug, input nothing
    foresaw) must not hold back the runs due with it: raised again at every
    tick, it once would have."""
    from otel_bridge.translate import assembler as module

    flow_run = FlowRun()
    raw = [e for name in ("a", "b", "c") for e in task_run_events(
        ["Pending", "Running", "Completed"], name=name, flow_run=flow_run)]
    real = module.run_span

    def breaks_on_b(events, *args, **kwargs):
        if events[0].resource.get("prefect.resource.name") == "b":
            raise KeyError("a bug")
        return real(events, *args, **kwargs)

    monkeypatch.setattr(module, "run_span", breaks_on_b)
    set_aside = []
    assembler = Assembler(on_set_aside=lambda event, why: set_aside.append(why))
    for event in events(raw):
        assembler.add(event)
    spans = assembler.flush()
    assert sorted(s.name for s in spans) == ["a", "c"]
    assert set_aside == ["unbuildable"] * 3 and assembler.counts["runs_unbuildable"] == 1
