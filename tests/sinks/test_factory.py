"""`sinks.factory.open_sink` is the one place that opens a sink by name, for
`convert --to` and `serve`'s forward_to / reverse_to alike."""

from __future__ import annotations

import pytest
from support.factories import task_run_events

from otel_bridge.model.events import parse_wire_event
from otel_bridge.sinks import Sink
from otel_bridge.sinks.factory import EVENT_SINKS, FILE_SINKS, SPAN_SINKS, open_sink

API_URL = "http://127.0.0.1:1/api"  # never reached: nothing is sent


@pytest.mark.parametrize("name", SPAN_SINKS + EVENT_SINKS)
def test_every_sink_the_factory_opens_declares_the_sink_protocol(name, tmp_path):
    sink = open_sink(name, tmp_path / "out", prefect_api_url=API_URL)
    try:
        assert Sink in type(sink).__mro__, f"{type(sink).__name__} does not say it is a Sink"
        assert isinstance(sink, Sink)
    finally:
        sink.close()


def test_the_factory_knows_every_name_and_nothing_else():
    assert set(FILE_SINKS) < set(SPAN_SINKS + EVENT_SINKS)
    with pytest.raises(ValueError, match="no sink called 'jaeger'"):
        open_sink("jaeger")


def test_file_sinks_overwrite_for_convert_and_append_for_serve(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("kept?\n")
    events = [parse_wire_event(e) for e in task_run_events(["Pending", "Running"], flow_run=None)]
    sink = open_sink("events", path)  # convert: the output is this run's
    sink.export(events[:1])
    sink.close()
    assert "kept?" not in path.read_text() and len(path.read_text().splitlines()) == 1
    sink = open_sink("events", path, append=True)  # serve: a restart adds to it
    sink.export(events[1:])
    sink.close()
    lines = path.read_text().splitlines()
    assert [parse_wire_event(line).id for line in lines] == [e.id for e in events]
