"""Run metrics in `serve` (docs/metrics.md): each finished run counted once,
in the store, whatever restarts; the open runs observed at each export.

A run is counted when its span is emitted, in the same transaction: its
span id goes in `counted_runs`, and the totals of the series it adds to in
`metric_totals` (written once per transaction, just before it commits).
Memory follows only once the transaction has committed, so an export never
shows a count the disk does not hold. The committed totals are the
cumulative series the exporter sends (`BaselineExporter`): exact, and
continued by the next process on the same store, which starts from them;
the counted span ids are the runs not to count again (a run built again
after the assembler forgot it, or read again after a crash).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

from otel_bridge.model.spans import Span
from otel_bridge.service.store import Store
from otel_bridge.translate.ids import span_id_for
from otel_bridge.translate.metric_totals import SeriesKey, SeriesTotal
from otel_bridge.translate.open_run_metrics import OpenRun, StuckThresholds, active_runs, stuck_runs
from otel_bridge.translate.run_metrics import CountedRuns, Measurement, RunMeasurements, run_measurements

__all__ = ["STARTED_KEY", "RunCounter", "Shard"]

logger = logging.getLogger(__name__)

# meta: when the store first counted a run (the cumulative series' start).
STARTED_KEY = "run_metrics_started_unix_nano"


class Shard:
    """Which runs this replica counts: those whose span id is `index`
    modulo `count` (0 of 1: all of them). Span ids are derived from run
    ids, so replicas that see the same events split the runs between them
    exactly, and a sum across them counts each run once."""

    def __init__(self, index: int = 0, count: int = 1) -> None:
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: the index must be at least 0 and below {count}")
        self.index, self.count = index, count

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """"K/N" (replica K of N, from 0)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r}: write it K/N, e.g. 0/2") from None
        return cls(index, count)

    def mine(self, span_id: int) -> bool:
        return span_id % self.count == self.index


class RunCounter:
    """Counts finished runs into the store, once each, and keeps the
    committed totals (`totals`, what a cumulative export reads); observes
    the open runs. `record`, if given, also gets each run's measurements
    once committed (for an SDK that aggregates them itself: delta)."""

    def __init__(self, store: Store, record: Optional[Callable[[Sequence[Measurement]], None]] = None,
                 shard: Shard = Shard(), thresholds: StuckThresholds = StuckThresholds()) -> None:
        self.store, self.record, self.shard, self.thresholds = store, record, shard, thresholds
        self._counted = CountedRuns(store.remember_finished_runs, store.counted_runs())
        # Committed totals, replaced whole at each commit (never changed in
        # place): the exporter's thread reads them as they were at a commit.
        self.totals: dict[SeriesKey, SeriesTotal] = store.metric_totals()
        self._staged: dict[SeriesKey, SeriesTotal] = {}
        self._pending: dict[int, RunMeasurements] = {}  # by span id, in the order counted
        self._open_runs: list[Measurement] = []
        if store.get_meta(STARTED_KEY) is None:
            with store.transaction():
                store.set_meta(STARTED_KEY, str(time.time_ns()))
        self.started_unix_nano = int(store.get_meta(STARTED_KEY) or 0)
        self.runs_counted = 0

    def span_emitted(self, span: Span) -> None:
        """Within the transaction that emits the span: count its run, unless
        it is not this replica's, not finished, or counted already. What a
        transaction counts is written to the store once, just before it
        commits (a few statements for hundreds of runs)."""
        if not self.shard.mine(span.span_id):
            return
        found = run_measurements(span)
        if found is None or found.span_id in self._counted or found.span_id in self._pending:
            return
        for m in found.measurements:
            key = (m.instrument.name, m.attributes)
            total = self._staged.get(key)
            if total is None:
                base = self.totals.get(key)
                total = self._staged[key] = base.copy() if base is not None else SeriesTotal()
            total.add(m)
        if not self._pending:
            self.store.on_commit(self._committed, self._rolled_back, before=self._write)
        self._pending[found.span_id] = found

    def _write(self) -> None:
        self.store.count_runs(list(self._pending), self._staged)

    def _committed(self) -> None:
        self.totals = {**self.totals, **self._staged}
        for found in self._pending.values():
            self._counted.first_time(found.span_id)
            if self.record is not None:
                self.record(found.measurements)
        self.runs_counted += len(self._pending)
        self._staged, self._pending = {}, {}

    def _rolled_back(self) -> None:
        self._staged, self._pending = {}, {}

    # -- the open runs --------------------------------------------------------------------

    def observe_open_runs(self, states: Sequence[tuple[str, OpenRun]],
                          now_unix_nano: Optional[int] = None) -> None:
        """Take the open runs as of now (on the event loop); the exporter's
        thread reads what was last taken (`open_run_measurements`)."""
        now = time.time_ns() if now_unix_nano is None else now_unix_nano
        mine = [state for resource_id, state in states if self.shard.mine(span_id_for(resource_id))]
        self._open_runs = active_runs(mine) + stuck_runs(mine, now, self.thresholds)

    def open_run_measurements(self) -> list[Measurement]:
        return self._open_runs
