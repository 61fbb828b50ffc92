"""The run metrics' cumulative totals, series by series (pure).

`serve` keeps these in its store, in the transaction that counts a run, so
its cumulative series go on across restarts: the SDK aggregates what this
process records, and the totals of the processes before it are added to
each exported point (`sinks.otlp_metrics.BaselineExporter`). A series is an
instrument and one set of attributes, as the SDK aggregates them.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from otel_bridge.translate.run_metrics import DURATION_BUCKETS, Measurement

__all__ = ["SeriesKey", "SeriesTotal", "add_measurements"]

# (instrument name, attributes sorted by key)
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class SeriesTotal:
    """A counter's sum, or a histogram's count, sum, min, max and bucket
    counts (`bucket_counts` is None for a counter), aggregated exactly as
    the SDK's explicit-bucket histogram aggregates."""

    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    bucket_counts: Optional[list[int]] = None
    bounds: Sequence[float] = field(default=DURATION_BUCKETS, repr=False)

    def add(self, measurement: Measurement) -> None:
        value = measurement.value
        self.count += 1
        self.sum += value
        if measurement.instrument.kind == "histogram":
            self.min, self.max = min(self.min, value), max(self.max, value)
            if self.bucket_counts is None:
                self.bucket_counts = [0] * (len(self.bounds) + 1)
            # As the SDK: a value on a boundary goes in the bucket it closes.
            self.bucket_counts[bisect_left(self.bounds, value)] += 1

    def copy(self) -> "SeriesTotal":
        return SeriesTotal(self.count, self.sum, self.min, self.max,
                           None if self.bucket_counts is None else list(self.bucket_counts))

    def to_json(self) -> str:
        return json.dumps({"count": self.count, "sum": self.sum,
                           "min": None if math.isinf(self.min) else self.min,
                           "max": None if math.isinf(self.max) else self.max,
                           "bucket_counts": self.bucket_counts})

    @classmethod
    def from_json(cls, text: str) -> "SeriesTotal":
        """Raises ValueError (or TypeError) for text that is not one."""
        data = json.loads(text)
        buckets = data["bucket_counts"]
        if buckets is not None and (not isinstance(buckets, list)
                                    or len(buckets) != len(DURATION_BUCKETS) + 1):
            raise ValueError("bucket counts for other bounds")
        low, high = data["min"], data["max"]
        return cls(int(data["count"]), float(data["sum"]),
                   math.inf if low is None else float(low),
                   -math.inf if high is None else float(high),
                   None if buckets is None else [int(b) for b in buckets])


def add_measurements(totals: dict[SeriesKey, SeriesTotal],
                     measurements: Iterable[Measurement]) -> set[SeriesKey]:
    """Add to the totals; returns the series that changed."""
    changed = set()
    for m in measurements:
        key = (m.instrument.name, m.attributes)
        total = totals.get(key)
        if total is None:
            total = totals[key] = SeriesTotal()
        total.add(m)
        changed.add(key)
    return changed
