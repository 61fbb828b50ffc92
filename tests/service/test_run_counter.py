"""Run metrics in the sidecar without a network: each finished run counted
once, in the store, through crashes, restarts, repeated events, rollbacks
and replicas. "A crash" is the store closed with no shutdown step, which
leaves what a kill -9 leaves."""

from __future__ import annotations

import sqlite3

import pytest
from opentelemetry.sdk.resources import Resource
from support.helpers import (
    FIXTURES,
    events,
    load_jsonl,
    measured_runs,
    metric_points,
    totals_points,
)

from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import Pipeline
from otel_bridge.service.run_metrics import RunCounter, Shard
from otel_bridge.service.store import Store
from otel_bridge.sinks.otlp_metrics import with_baseline
from otel_bridge.translate.assembler import AssemblerOptions
from otel_bridge.translate.metric_totals import add_measurements

CAPTURES = ["failure", "crash-sigterm", "timeout", "cancelled", "retries-immediate", "not-ready",
            "nested-tasks", "mapped"]
RESOURCE = Resource.create({"service.name": "test"})


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _events(names):
    return [e for name in names for e in events(load_jsonl(FIXTURES / f"{name}.jsonl"))]


class Process:
    """One life of the sidecar on a store: pipeline, counter, SDK recorder."""

    def __init__(self, path, shard=Shard(), remember_runs=100_000):
        self.store = Store(path)
        self.clock = Clock()
        self.pipeline = Pipeline(self.store, Metrics(), AssemblerOptions(
            linger_seconds=1, track_states=True, remember_finished_runs=remember_runs),
            clock=self.clock)
        self.counter = RunCounter(self.store, shard=shard)
        self.pipeline.run_counter = self.counter

    def take(self, evs):
        self.pipeline.take_events(evs, "test")
        self.clock.now += 2
        self.pipeline.tick()

    def exported(self) -> dict:
        """What serve's exporter would send now: the committed totals as points."""
        return metric_points(with_baseline(None, self.counter.totals,
                                           self.counter.started_unix_nano, RESOURCE))

    def crash(self):
        self.store.close()


def _expected(names, shard=Shard()) -> dict:
    """What one uninterrupted process makes of these captures: the pure core."""
    totals: dict = {}
    for found in measured_runs(FIXTURES / f"{name}.jsonl" for name in names):
        if shard.mine(found.span_id):
            add_measurements(totals, found.measurements)
    return totals_points(totals)


def test_a_restart_mid_stream_with_every_event_read_again_changes_no_count(tmp_path):
    evs = _events(CAPTURES)
    first = Process(tmp_path / "store.sqlite3")
    first.take(evs[: len(evs) // 2])
    assert first.counter.runs_counted > 0
    first.crash()
    second = Process(tmp_path / "store.sqlite3")
    second.take(evs)  # the first half again (duplicates), and the rest
    assert second.exported() == _expected(CAPTURES)
    second.crash()
    third = Process(tmp_path / "store.sqlite3")  # nothing new: the totals as they were
    third.take(evs)
    assert third.counter.runs_counted == 0
    assert third.exported() == _expected(CAPTURES)


def test_a_run_built_again_after_the_assembler_forgot_it_is_not_counted_again(tmp_path):
    # The assembler remembers one finished run: every event read again makes
    # its run's span again, with the same span id; the store says it was counted.
    process = Process(tmp_path / "store.sqlite3", remember_runs=1)
    evs = _events(["failure", "retries-immediate"])
    process.take(evs)
    counted = process.counter.runs_counted
    process.take(evs)
    assert process.counter.runs_counted == counted
    assert process.exported() == _expected(["failure", "retries-immediate"])


def test_a_transaction_that_rolls_back_counts_nothing_and_the_retry_counts_once(tmp_path, monkeypatch):
    process = Process(tmp_path / "store.sqlite3")
    process.pipeline.take_events(_events(["failure"]), "test")
    process.clock.now = 2
    put = process.store.put

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(process.store, "put", full)
    with pytest.raises(sqlite3.OperationalError):
        process.pipeline.tick()
    assert process.counter.runs_counted == 0 and process.store.counted_runs() == []
    assert process.exported() == {}
    monkeypatch.setattr(process.store, "put", put)
    process.clock.now = 4
    process.pipeline.tick()
    assert process.exported() == _expected(["failure"])
    assert len(process.store.counted_runs()) == process.counter.runs_counted > 0


def test_replicas_that_split_the_runs_by_span_id_sum_to_one_count(tmp_path):
    evs = _events(CAPTURES)
    shares = []
    for index in range(3):
        replica = Process(tmp_path / f"replica{index}.sqlite3", shard=Shard(index, 3))
        replica.take(evs)
        got = replica.exported()
        assert got == _expected(CAPTURES, Shard(index, 3))
        shares.append(replica.counter.runs_counted)
    whole = Process(tmp_path / "whole.sqlite3")
    whole.take(evs)
    assert sum(shares) == whole.counter.runs_counted and all(shares)


def test_the_open_runs_are_observed_active_then_stuck(tmp_path):
    process = Process(tmp_path / "store.sqlite3")
    running = [e for e in _events(["failure"]) if not e.event.endswith(("Failed", "Completed"))]
    process.pipeline.take_events(running, "test")
    states = process.pipeline.assembler.open_run_states()
    assert states and all(state.state_name for _, state in states)
    entered = max(state.entered_unix_nano for _, state in states)
    process.counter.observe_open_runs(states, entered + 1)
    now = process.counter.open_run_measurements()
    assert {m.instrument.name for m in now} == {"cicd.pipeline.run.active", "prefect.task.run.active"}
    process.counter.observe_open_runs(states, entered + 2 * 3600 * 10**9)
    stuck = [m for m in process.counter.open_run_measurements() if m.instrument.name.endswith("stuck")]
    assert stuck and all(dict(m.attributes)["prefect.state.name"] == "Running" for m in stuck)


def test_a_shard_is_written_k_of_n():
    assert Shard.parse("1/3").mine(4) and not Shard.parse("1/3").mine(5)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
