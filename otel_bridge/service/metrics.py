"""The service's Prometheus metrics (`/metrics`); docs/sidecar.md lists what
each means.

One registry per service, so tests and embedders can run several. Label
values come from small fixed sets (a state event's name only for Prefect's
run-state events, everything else is "other") so a stream of odd input
cannot grow the series without bound.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from otel_bridge.model.states import KNOWN_STATE_NAMES

__all__ = ["Metrics", "event_label"]

# The event label takes Prefect's run-state events by name and nothing else:
# a sender chooses event names, and each new name would be a new series.
_RUN_STATE_EVENTS = frozenset(f"prefect.{kind}.{state}" for kind in ("task-run", "flow-run")
                              for state in KNOWN_STATE_NAMES)
_LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)


def event_label(name: str) -> str:
    return name if name in _RUN_STATE_EVENTS else "other"


class Metrics:
    def __init__(self) -> None:
        # `_created` series double every counter for a timestamp no alert uses.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "otel_bridge_events_received", "Prefect events taken in, by source and event name",
            ["source", "event"], registry=r)
        self.inputs_rejected = Counter(
            "otel_bridge_inputs_rejected",
            "Inputs refused (events, spans, request bodies), by endpoint and reason",
            ["endpoint", "reason"], registry=r)
        self.events_set_aside = Counter(
            "otel_bridge_events_set_aside",
            "Events kept out of spans: late (after their run's span was sent), run_event_cap",
            ["reason"], registry=r)
        self.events_duplicate = Counter(
            "otel_bridge_events_duplicate", "Events seen before (same id), ignored", registry=r)
        self.spans_in = Counter(
            "otel_bridge_spans_received", "OTLP spans received for the reverse path", ["transport"],
            registry=r)
        self.spans_built = Counter(
            "otel_bridge_spans_built",
            "Spans made from runs, by how the run ended: final, or synthetic (timeout, evicted)",
            ["end"], registry=r)
        self.exported = Counter(
            "otel_bridge_exported", "Items a sink accepted: spans (otlp, file), events (prefect, file)",
            ["sink"], registry=r)
        self.export_failures = Counter(
            "otel_bridge_export_failures", "Export attempts that failed (each is retried)", ["sink"],
            registry=r)
        self.export_retries = Counter(
            "otel_bridge_export_retries", "Items sent again after a failed attempt", ["sink"], registry=r)
        self.dropped = Counter(
            "otel_bridge_dropped",
            "Output lost: outbox_full (the disk bound was hit), refused (the sink refused the item "
            "while accepting the ones after it; kept in the store's dead_letters table), unencodable "
            "(a span OTLP cannot carry: a time before 1970, text that is not Unicode; logged), unreadable "
            "(store rows restore could not read; see `otel-bridge store check`), unbuildable (a run "
            "whose span could not be made: a bug; its events are set aside and logged)",
            ["kind", "reason"], registry=r)
        self.event_lag = Histogram(
            "otel_bridge_event_lag_seconds",
            "From an event's occurred time to its intake", buckets=_LAG_BUCKETS, registry=r)
        self.export_lag = Histogram(
            "otel_bridge_export_lag_seconds",
            "End to end: from a span's end (an event's occurred time) to a sink accepting it",
            ["kind"], buckets=_LAG_BUCKETS, registry=r)

    def watch(self, name: str, doc: str, read: Callable[[], dict[tuple[str, ...], float]],
              labels: tuple[str, ...] = (), counter: bool = False) -> None:
        """Expose values owned elsewhere (open runs, outbox size, subscription
        counters), read at scrape time."""
        self.registry.register(_Watched(name, doc, read, labels, counter))


class _Watched:
    def __init__(self, name, doc, read, labels, counter):
        self._name, self._doc, self._read, self._labels, self._counter = name, doc, read, labels, counter

    def collect(self):
        family_type = CounterMetricFamily if self._counter else GaugeMetricFamily
        family = family_type(self._name, self._doc, labels=list(self._labels))
        for label_values, value in self._read().items():
            family.add_metric(list(label_values), value)
        yield family

    def describe(self):
        return []
