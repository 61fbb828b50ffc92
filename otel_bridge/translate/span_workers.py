"""Spans built in other processes: what `convert` hands its worker
processes, and what they give back.

Building a run's span (its events unpacked, rebuilt from the span to check
the round trip, encoded) is most of what a conversion costs, and runs are
independent of each other; a closed run travels as its packed events, a few
hundred bytes, and comes back as its encoded span. So `convert` reads and
assembles in its own process and builds in the others.
"""

from __future__ import annotations

from typing import Optional, Union

from otel_bridge.model.otlp_protobuf import Unencodable, encode_span
from otel_bridge.model.spans import Span
from otel_bridge.translate.assembler import ClosedRun, build_span
from otel_bridge.translate.forward import ForwardOptions
from otel_bridge.translate.packed_events import EventPacker
from otel_bridge.translate.run_metrics import RunMeasurements, run_measurements

__all__ = ["Built", "build_spans", "start_worker"]

_worker: dict = {}


def start_worker(options: ForwardOptions, encoded: bool, measured: bool = False) -> None:
    """A worker process's start: what every batch is built with.
    `encoded`: give back each span as its OTLP bytes, not as a `Span`;
    `measured`: give back its run's metric measurements too."""
    _worker.update(options=options, encoded=encoded, measured=measured, packer=EventPacker())


# What comes back for a run: its span (a `Span`, or its OTLP `Span` message);
# or None, with why and which span, when it cannot be made or encoded; and
# its run's measurements when asked for (even when the span cannot be encoded).
Built = tuple[Optional[Union[Span, bytes]], Optional[str], Optional[Span],
              Optional[RunMeasurements]]


def build_spans(batch: list[ClosedRun]) -> list[Built]:
    out: list[Built] = []
    for closed in batch:
        span, _ = build_span(closed, _worker["options"], _worker["packer"])
        if span is None:
            out.append((None, "unbuildable", None, None))
            continue
        measured = run_measurements(span) if _worker.get("measured") else None
        if not _worker["encoded"]:
            out.append((span, None, None, measured))
        else:
            try:
                out.append((encode_span(span), None, None, measured))
            except Unencodable as error:
                out.append((None, str(error), span, measured))
    return out
