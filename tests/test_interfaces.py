"""Every sink is a `sinks.Sink` and every source that follows Prefect a
`sources.Source`: declared, not only duck-typed."""

from __future__ import annotations

import inspect

import pytest

from otel_bridge.sinks import Sink
from otel_bridge.sinks.events_jsonl import EventsJsonlWriter
from otel_bridge.sinks.otlp import OtlpSink
from otel_bridge.sinks.otlp_json import OtlpJsonWriter
from otel_bridge.sinks.otlp_logs import OtlpJsonLogWriter, OtlpLogSink
from otel_bridge.sinks.prefect_events import PrefectEventSink
from otel_bridge.sinks.tree import TreeWriter
from otel_bridge.sources import Source
from otel_bridge.sources.prefect_subscription import PrefectSubscription
from otel_bridge.sources.prefect_ws import PrefectEventStream, ReconnectingEventStream

API_URL = "http://127.0.0.1:1/api"  # never reached: nothing is sent


@pytest.mark.parametrize("sink", [EventsJsonlWriter, TreeWriter, OtlpJsonWriter, OtlpSink,
                                  PrefectEventSink, OtlpJsonLogWriter, OtlpLogSink])
def test_every_sink_declares_the_sink_protocol_and_implements_all_of_it(sink):
    assert Sink in sink.__mro__, f"{sink.__name__} does not say it is a Sink"
    assert not inspect.isabstract(sink)


@pytest.mark.parametrize("source", [PrefectEventStream, ReconnectingEventStream,
                                    PrefectSubscription])
def test_every_source_that_follows_prefect_declares_the_source_protocol(source):
    assert Source in source.__mro__
    assert inspect.isasyncgenfunction(source.events)
    assert inspect.iscoroutinefunction(source.close)
    assert isinstance(source(API_URL), Source)


def test_a_sink_that_leaves_out_part_of_the_protocol_cannot_be_made():
    class Forgetful(Sink[object]):
        def export(self, items) -> None:
            pass

    with pytest.raises(TypeError, match="close"):
        Forgetful()
