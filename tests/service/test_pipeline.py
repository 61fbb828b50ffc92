"""The sidecar's core without a network: store, pipeline, delivery, settings.

The store is a real SQLite file; "a crash" is the store closed with no
shutdown step at all, which leaves exactly what a kill -9 leaves (every
intake is committed before it returns).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys

import pydantic_core
import pytest
from support.factories import FlowRun, task_run_events
from support.helpers import FIXTURES, convert, events, load_jsonl

from otel_bridge.service.config import ConfigError, load_settings
from otel_bridge.service.delivery import Delivery
from otel_bridge.model.events import parse_wire_event
from otel_bridge.model.otlp_protobuf import encode_span
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import SPAN, Pipeline, decode, encoded_span
from otel_bridge.service.store import Store, StoreError
from otel_bridge.translate.assembler import AssemblerOptions

SCENARIOS = ["retries-immediate", "nested-tasks", "rolled-back", "mapped", "huge-message", "deferred"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def outbox_spans(store: Store):
    return [decode(SPAN, item.body) for item in store.peek(SPAN, 10_000, 1 << 40)]


def sample(name):
    return events(load_jsonl(FIXTURES / f"{name}.jsonl"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_spans_survive_the_codec_of_the_outbox(scenario):
    for span in convert(load_jsonl(FIXTURES / f"{scenario}.jsonl")):
        assert decode(SPAN, encode_span(span)) == span
        assert encoded_span(encode_span(span)) == encode_span(span)


def _legacy_body(span) -> bytes:
    """An outbox span as stores written before the OTLP bytes kept it."""
    return pydantic_core.to_json((
        span.trace_id_hex, span.span_id_hex,
        None if span.parent_span_id is None else format(span.parent_span_id, "016x"),
        span.name, span.start_time_unix_nano, span.end_time_unix_nano, span.attributes,
        [(e.name, e.time_unix_nano, e.attributes) for e in span.events],
        [(format(l.trace_id, "032x"), format(l.span_id, "016x"), l.attributes, l.trace_flags)
         for l in span.links],
        span.kind.value, span.status_code.value, span.status_message,
    ))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_an_outbox_written_before_the_otlp_bytes_is_still_delivered(scenario):
    for span in convert(load_jsonl(FIXTURES / f"{scenario}.jsonl")):
        assert decode(SPAN, _legacy_body(span)) == span
        assert encoded_span(_legacy_body(span)) == encode_span(span)


def test_a_span_otlp_cannot_carry_is_set_aside_alone_and_the_runs_due_with_it_go(tmp_path):
    """A lone surrogate in a state message (JSON allows the escape; UTF-8
    cannot carry it) once failed the whole tick: every run due in it was
    lost from memory while /metrics counted it built."""
    flow_run = FlowRun()
    good = task_run_events(["Pending", "Running", "Completed"], name="good", flow_run=flow_run)
    bad = task_run_events(["Pending", "Running", "Failed"], name="bad", flow_run=flow_run,
                          messages={"Failed": "Task run encountered an exception \ud800"})
    bad_lines = [json.dumps(e) for e in bad]  # the escape, as JSON allows it
    clock, metrics, store = Clock(), Metrics(), Store(tmp_path / "store.sqlite3")
    pipeline = Pipeline(store, metrics, AssemblerOptions(linger_seconds=1), clock=clock)
    taken = [parse_wire_event(line) for line in bad_lines] + events(good)
    assert "\ud800" in taken[2].resource["prefect.state-message"]
    pipeline.take_events(taken, "test")
    clock.now = 2.0
    pipeline.tick()
    assert [s.name for s in outbox_spans(store)] == ["good"]
    assert metrics.dropped.labels(SPAN, "unencodable")._value.get() == 1
    assert pipeline.assembler.open_runs == 0


def test_a_transaction_that_rolls_back_leaves_memory_as_the_store_has_it(tmp_path, monkeypatch):
    """The store failing in a tick (disk full, say) rolls its transaction
    back; the runs it would have closed must stay open in memory too, and
    go out at the next tick, not be taken for finished."""
    clock, store = Clock(), Store(tmp_path / "store.sqlite3")
    pipeline = Pipeline(store, Metrics(), AssemblerOptions(linger_seconds=1), clock=clock)
    pipeline.take_events(sample("retries-immediate"), "test")
    runs = pipeline.assembler.open_runs
    clock.now = 2.0
    put = store.put
    calls = []

    def failing_put(*args):
        calls.append(args)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        put(*args)

    monkeypatch.setattr(store, "put", failing_put)
    with pytest.raises(sqlite3.OperationalError):
        pipeline.tick()
    assert pipeline.assembler.open_runs == runs and outbox_spans(store) == []
    monkeypatch.setattr(store, "put", put)
    clock.now = 4.0  # (restored runs linger from when they were restored)
    pipeline.tick()
    assert sorted(s.span_id for s in outbox_spans(store)) == sorted(
        s.span_id for s in convert(load_jsonl(FIXTURES / "retries-immediate.jsonl")))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_crash_anywhere_gives_the_spans_of_an_uninterrupted_run(tmp_path, scenario):
    evs = sample(scenario)
    expected = {s.span_id: s for s in convert(e.model_dump(mode="json") for e in evs)}
    for cut in (1, len(evs) // 3, len(evs) // 2, len(evs) - 1):
        path = tmp_path / f"cut{cut}.sqlite3"
        clock = Clock()
        store = Store(path)
        pipeline = Pipeline(store, Metrics(), AssemblerOptions(linger_seconds=5), clock=clock)
        pipeline.take_events(evs[:cut], "test")
        clock.now = 6.0
        pipeline.tick()  # some runs may be emitted before the crash
        store.close()  # the crash: nothing more is written

        store = Store(path)
        pipeline = Pipeline(store, Metrics(), AssemblerOptions(linger_seconds=5), clock=clock)
        # After a restart the source replays from its resume point: the
        # events seen before come again and must count as duplicates.
        pipeline.take_events(evs, "test")
        pipeline.assembler.flush()
        spans = outbox_spans(store)
        store.close()
        assert sorted(s.span_id for s in spans) == sorted(expected), f"cut at {cut}"
        for span in spans:
            assert span == expected[span.span_id], f"cut at {cut}: {span.name}"


def test_two_services_cannot_share_a_store(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    with pytest.raises(StoreError, match="another otel-bridge"):
        Store(tmp_path / "s.sqlite3")
    store.close()
    Store(tmp_path / "s.sqlite3").close()


def test_a_full_outbox_drops_and_counts(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    metrics = Metrics()
    pipeline = Pipeline(store, metrics, outbox_max_bytes=1)
    pipeline.take_events(sample("failure"), "test")
    pipeline.assembler.flush()
    built = sum(s.value for m in metrics.spans_built.collect() for s in m.samples
                if s.name.endswith("_total"))
    dropped = metrics.dropped.labels(SPAN, "outbox_full")._value.get()
    assert built > 0 and dropped == built
    assert store.outbox_items(SPAN) == 0


class RecordingSink:
    """Takes what it is given, except what `refuse` says; `down` refuses all."""

    def __init__(self, refuse=lambda item: False):
        self.got = []
        self.refuse = refuse
        self.down = False

    def export(self, items):
        if self.down or any(self.refuse(i) for i in items):
            raise RuntimeError("refused")
        self.got.extend(items)

    def close(self):
        pass


def fill_outbox(store: Store, scenario="mapped"):
    pipeline = Pipeline(store, Metrics())
    pipeline.take_events(sample(scenario), "test")
    pipeline.assembler.flush()
    return outbox_spans(store)


async def drive(delivery: Delivery, rounds: int):
    for _ in range(rounds):
        if not delivery.store.outbox_items(delivery.kind):
            break
        await delivery.deliver_once()


def test_delivery_waits_out_an_outage_and_loses_nothing(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    spans = fill_outbox(store)
    sink = RecordingSink()
    metrics = Metrics()
    delivery = Delivery(store, SPAN, sink, "test", metrics, batch_items=2)
    sink.down = True
    asyncio.run(drive(delivery, 30))
    assert sink.got == [] and store.outbox_items(SPAN) == len(spans)
    assert store.dead_letter_count() == 0  # an outage sets nothing aside
    sink.down = False
    asyncio.run(drive(delivery, 100))
    assert sink.got == spans and store.outbox_items(SPAN) == 0
    assert metrics.export_failures.labels("test")._value.get() == 30


def test_one_refused_item_is_set_aside_and_the_rest_delivered(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    spans = fill_outbox(store)
    poison = spans[1]
    sink = RecordingSink(refuse=lambda span: span == poison)
    metrics = Metrics()
    delivery = Delivery(store, SPAN, sink, "test", metrics, batch_items=4)
    asyncio.run(drive(delivery, 100))
    assert sink.got == [s for s in spans if s != poison]
    assert store.dead_letter_count() == 1
    assert metrics.dropped.labels(SPAN, "refused")._value.get() == 1


def test_delivery_backs_off_from_retry_initial_to_retry_max_and_a_success_resets_it(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    fill_outbox(store)
    sink = RecordingSink()
    delivery = Delivery(store, SPAN, sink, "test", Metrics(), batch_items=2,
                        retry_initial=0.5, retry_max=3.0)

    async def scenario():
        idle = delivery._pause()  # woken early by new output
        sink.down = True
        pauses = []
        for _ in range(5):
            assert not await delivery.deliver_once()
            pauses.append(delivery._pause())
        sink.down = False
        assert await delivery.deliver_once()
        return idle, pauses, delivery._pause()

    idle, pauses, after = asyncio.run(scenario())
    assert (idle, pauses, after) == (1.0, [0.5, 1.0, 2.0, 3.0, 3.0], 1.0)


def test_a_refused_item_deep_in_a_batch_costs_its_neighbours_no_repeated_failures(tmp_path):
    """Each good item ahead of a refused one once cost three failed batch
    attempts (after every success the delivery went back to whole batches,
    the refused item in them): 15 of 280 spans in 60 s."""
    store = Store(tmp_path / "s.sqlite3")
    spans = fill_outbox(store)
    assert len(spans) >= 12
    poison = spans[10]
    sink = RecordingSink(refuse=lambda span: span == poison)
    metrics = Metrics()
    delivery = Delivery(store, SPAN, sink, "test", metrics, batch_items=len(spans))
    asyncio.run(drive(delivery, 100))
    assert sink.got == [s for s in spans if s != poison]
    # The whole batch three times, then the refused item alone twice.
    assert metrics.export_failures.labels("test")._value.get() <= 5


def test_settings_layer_flags_over_env_over_file(tmp_path, monkeypatch):
    config = tmp_path / "bridge.yaml"
    config.write_text("max_open_runs: 5\nlinger_seconds: 2\nhttp_port: 9000\npush_token: t\n")
    monkeypatch.setenv("OTEL_BRIDGE_LINGER_SECONDS", "3")
    monkeypatch.setenv("OTEL_BRIDGE_HTTP_PORT", "9001")
    settings = load_settings({"http_port": "9002"}, str(config))
    assert (settings.max_open_runs, settings.linger_seconds, settings.http_port) == (5, 3.0, 9002)
    assert settings.listen_host == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize("flags, config, message", [
    ({"http_port": "http"}, None, "bad setting http_port"),
    ({"max_open_runs": "0"}, None, "bad setting max_open_runs"),
    ({"forward_to": "file"}, None, "forward_file is not set"),
    ({}, "max_open_run: 5\n", "unknown setting 'max_open_run'"),
    ({}, "max_open_runs: [\n", "cannot read"),
])
def test_a_bad_setting_is_one_clear_error(tmp_path, monkeypatch, flags, config, message):
    monkeypatch.setenv("OTEL_BRIDGE_PUSH_TOKEN", "t")
    path = None
    if config is not None:
        path = tmp_path / "bridge.yaml"
        path.write_text(config)
    with pytest.raises(ConfigError, match=message):
        load_settings(flags, str(path) if path else None)


def test_serve_exits_2_with_the_error_on_a_bad_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "otel_bridge", "serve", "--push-token", "t", "--http-port", "-1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert "bad setting http_port" in result.stderr and "Traceback" not in result.stderr


def test_a_misspelt_or_bad_secret_is_never_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BRIDGE_PUSH_TOKEN", "t")
    config = tmp_path / "bridge.yaml"
    config.write_text("push_tokn: SECRET-1234\n")
    with pytest.raises(ConfigError) as error:
        load_settings({}, str(config))
    assert "unknown setting 'push_tokn'" in str(error.value) and "SECRET" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_settings({"push_token": "   "})
    assert "push_token is empty" in str(error.value)


def test_tokens_are_read_from_files_and_stripped(tmp_path, monkeypatch):
    """A Kubernetes secret file ends in a newline; a token pasted into an
    environment variable may carry spaces. Neither is part of the token."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    settings = load_settings({"push_token_file": str(token_file), "otlp_receiver": True,
                              "reverse_to": "file", "reverse_file": str(tmp_path / "out")})
    assert settings.push_token.get_secret_value() == "s3cret-token"
    settings = load_settings({"push_token": " s3cret-token\t"})
    assert settings.push_token.get_secret_value() == "s3cret-token"
    with pytest.raises(ConfigError, match="both set"):
        load_settings({"push_token": "a-token", "push_token_file": str(token_file)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({"push_token_file": str(tmp_path / "missing")})


def test_the_otlp_receiver_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    common = {"otlp_receiver": True, "reverse_to": "file", "reverse_file": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="set otlp_token"):
        load_settings({**common, "listen_host": "0.0.0.0"})
    assert load_settings({**common, "listen_host": "0.0.0.0", "otlp_token": "a-token"})
    assert load_settings({**common, "listen_host": "::1"})
    with pytest.raises(ConfigError, match="tls_key_file"):
        load_settings({**common, "tls_cert_file": str(tmp_path / "cert.pem")})


def test_choices_take_any_case_and_the_store_lives_in_a_state_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    settings = load_settings({"push_token": "a-token", "log_level": "warning",
                              "forward_to": "OTLP"})
    assert (settings.log_level, settings.forward_to) == ("WARNING", "otlp")
    assert settings.store_path == tmp_path / "state" / "otel-bridge" / "store.sqlite3"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert load_settings({"push_token": "a-token"}).store_path.parts[-4:] == (
        ".local", "state", "otel-bridge", "store.sqlite3")
    with pytest.raises(ConfigError) as error:
        load_settings({})
    assert "PREFECT_API_URL" in str(error.value) and "--push-token" in str(error.value)


def test_an_outage_is_one_clear_line_then_quiet_then_a_line_when_it_ends(tmp_path, caplog):
    """No Collector running once meant 13 warnings in 46 s, the last saying
    `items: 1` with 6 spans waiting and `TimeoutError: ` with no message."""
    store = Store(tmp_path / "s.sqlite3")
    spans = fill_outbox(store)
    sink = RecordingSink()
    delivery = Delivery(store, SPAN, sink, "test", Metrics(), batch_items=2)
    sink.down = True
    with caplog.at_level(logging.DEBUG, logger="otel_bridge.service.delivery"):
        asyncio.run(drive(delivery, 20))
        sink.down = False
        asyncio.run(drive(delivery, 100))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].waiting == len(spans) and "sent again" in warnings[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "delivering again"]
    assert sink.got == spans


def test_an_error_with_no_message_still_says_what_it_was():
    from otel_bridge.service.delivery import _describe

    assert _describe(TimeoutError()) == "TimeoutError: no answer in time"
    assert _describe(ValueError("bad")) == "ValueError: bad"
    assert _describe(KeyError()) == "KeyError"
