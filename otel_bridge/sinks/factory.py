"""One place that opens a sink by name: for `convert --to`, and for
`serve`'s forward_to and reverse_to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from otel_bridge.sinks import Sink

if TYPE_CHECKING:  # (the module loads the OTLP exporters: only for the sinks that need them)
    from otel_bridge.sinks.otlp import OnUnencodable

__all__ = ["EVENT_SINKS", "FILE_SINKS", "LOG_SINKS", "SPAN_SINKS", "open_log_sink", "open_sink"]

SPAN_SINKS = ("otlp-json", "otlp", "tree")
EVENT_SINKS = ("events", "prefect")
# Where log records can go: OTLP/JSON lines, or the OTLP endpoint.
LOG_SINKS = ("otlp-json", "otlp")
# The sinks that write a file (or stdout); the others send over the network.
FILE_SINKS = ("otlp-json", "tree", "events")


def open_sink(
    name: str,
    output: Union[str, Path] = "-",
    *,
    append: bool = False,
    on_unencodable: Optional[OnUnencodable] = None,
    prefect_api_url: Optional[str] = None,
    prefect_api_key: Optional[str] = None,
) -> Sink:
    """The sink called `name` (one of `SPAN_SINKS` or `EVENT_SINKS`).

    otlp-json, tree and events write `output` ("-": stdout), appending to it
    with `append`; otlp sends to the endpoint of OTEL_EXPORTER_OTLP_*, and it
    and otlp-json hand a span OTLP cannot carry to `on_unencodable` (by
    default a log line); prefect sends to the given server, else to
    PREFECT_API_URL (`otel_bridge.prefect_client`). Raises ValueError for an
    unknown name or Prefect settings that cannot work, OSError for a file
    that cannot be opened."""
    if name not in SPAN_SINKS + EVENT_SINKS:
        raise ValueError(f"no sink called {name!r}: one of {', '.join(SPAN_SINKS + EVENT_SINKS)}")
    if name == "prefect":
        from otel_bridge.sinks.prefect_events import PrefectEventSink

        return PrefectEventSink(prefect_api_url, prefect_api_key)
    if name == "events":
        from otel_bridge.sinks.events_jsonl import EventsJsonlWriter

        return EventsJsonlWriter(_open(output, append))
    if name == "tree":
        from otel_bridge.sinks.tree import TreeWriter

        return TreeWriter(_open(output, append))
    from otel_bridge.sinks.otlp import log_unencodable
    from otel_bridge.sinks.sdk import resource_from_env

    on_unencodable = on_unencodable or log_unencodable
    if name == "otlp":
        from otel_bridge.sinks.otlp import OtlpSink, exporter_from_env

        return OtlpSink(exporter_from_env(), resource_from_env(), on_unencodable)
    from otel_bridge.sinks.otlp_json import OtlpJsonWriter

    return OtlpJsonWriter(_open(output, append), resource_from_env(), on_unencodable)


def open_log_sink(name: str, output: Union[str, Path] = "-", *, append: bool = False) -> Sink:
    """The log record sink called `name` (one of `LOG_SINKS`): otlp-json
    writes `output` ("-": stdout), otlp sends to the endpoint of
    OTEL_EXPORTER_OTLP_LOGS_* / OTEL_EXPORTER_OTLP_*. Raises ValueError for
    an unknown name, OSError for a file that cannot be opened,
    `LogsUnavailable` for an SDK without the logs API."""
    if name not in LOG_SINKS:
        raise ValueError(f"log records cannot go to {name!r}: one of {', '.join(LOG_SINKS)}")
    from otel_bridge.sinks.otlp_logs import OtlpJsonLogWriter, OtlpLogSink, log_exporter_from_env
    from otel_bridge.sinks.sdk import resource_from_env

    if name == "otlp":
        return OtlpLogSink(log_exporter_from_env(), resource_from_env())
    return OtlpJsonLogWriter(_open(output, append), resource_from_env())


def _open(output: Union[str, Path], append: bool):
    if str(output) == "-":
        return sys.stdout
    return open(output, "a" if append else "w", encoding="utf-8")
