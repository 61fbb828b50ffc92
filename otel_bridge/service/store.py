"""The service's memory on disk: open runs, finished runs, the outbox.

One SQLite file (WAL, so a `kill -9` loses nothing that was committed):

- ``run_events``: every event of every open run. Restored into the
  assembler at start, so a run that was open when the process died is still
  exported, once, with all its events.
- ``finished_runs``: the event ids of runs already emitted (bounded), so an
  event re-read after a restart is a duplicate, not a late event.
- ``outbox``: what is due to leave (spans to the OTLP endpoint, events to
  Prefect), in order. A run's span goes in in the same transaction that
  takes the run out of ``run_events``, and leaves the outbox only once a sink
  has accepted it: a crash in between re-sends the same bytes, never
  different content under one span id.
- ``seen_logs``: the ids of Prefect log lines taken, with their timestamps,
  for as long as a pass may read them again (`sources.prefect_logs`).
- ``counted_runs`` and ``metric_totals``: the span ids of the runs counted
  in the run metrics (bounded as ``finished_runs``) and the cumulative
  totals of each metric series, written in the transaction that emits the
  run's span, so a run is counted once whatever restarts.
- ``meta``: small values, like the subscription's resume point.

Only the event loop's thread uses a `Store`; writes are grouped into one
transaction by `transaction()` and committed when it ends.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional
from uuid import UUID

from otel_bridge.model.events import Event, EventRejected, parse_wire_event
from otel_bridge.translate.metric_totals import SeriesKey, SeriesTotal

__all__ = ["OutboxItem", "OutboxReader", "Store", "StoreError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_events (
    event_id TEXT PRIMARY KEY,
    run_id   TEXT NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_events_by_run ON run_events (run_id);
CREATE TABLE IF NOT EXISTS finished_runs (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL UNIQUE,
    event_ids TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL,
    body     BLOB NOT NULL,
    size     INTEGER NOT NULL,
    stamp    REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_kind ON outbox (kind, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq    INTEGER PRIMARY KEY,
    kind   TEXT NOT NULL,
    body   BLOB NOT NULL,
    reason TEXT NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_logs (
    log_id TEXT PRIMARY KEY,
    stamp  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_logs_by_stamp ON seen_logs (stamp);
CREATE TABLE IF NOT EXISTS counted_runs (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    span_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS metric_totals (
    instrument TEXT NOT NULL,
    attributes TEXT NOT NULL,
    total      TEXT NOT NULL,
    PRIMARY KEY (instrument, attributes)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def read_event(body: object) -> Optional[Event]:
    """A `run_events` row's event, or None if the row holds none."""
    if not isinstance(body, (str, bytes)):
        return None
    try:
        return parse_wire_event(body)
    except EventRejected:
        return None


def read_event_ids(text: object) -> Optional[list[UUID]]:
    """A `finished_runs` row's event ids, or None if the row holds none."""
    try:
        ids = json.loads(text)  # type: ignore[arg-type]
        return [UUID(i) for i in ids]
    except (TypeError, ValueError, AttributeError):
        return None


class StoreError(RuntimeError):
    """The store cannot be opened (path, permissions, another process) or
    is damaged."""


def damaged(path: Path, exc: Exception) -> StoreError:
    return StoreError(
        f"the store at {path} is damaged ({exc}). `otel-bridge store check {path}` says what "
        f"can be read; `otel-bridge store salvage {path} NEW` copies it to a new store, which "
        f"serve can then use (--store-path NEW); or move the file away to start afresh.")


def _exclusive_lock(path: Path):
    # One service per store: two would each export every run. The OS drops
    # the lock when the process dies, kill -9 included.
    handle = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, documented
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(f"another otel-bridge process is using the store {path.with_suffix('')}") from None
    return handle


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    kind: str
    body: bytes
    size: int
    stamp: float  # when the item's content was complete (span end, event occurred)
    attempts: int


class Store:
    def __init__(self, path: str | Path, *, remember_finished_runs: int = 100_000):
        self.path = Path(path)
        self.remember_finished_runs = remember_finished_runs
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a committed transaction survives the process
            # dying; only a power cut can take the last ones.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            # Damage found now, with what to do, rather than as a traceback
            # in whatever reads the damaged page first (once over the file).
            found = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
            if found != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(found))
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from None
        self._lock = _exclusive_lock(self.path.with_name(self.path.name + ".lock"))
        self._depth = 0
        self._on_commit: list[tuple[Callable[[], None], Optional[Callable[[], None]]]] = []
        self._before_commit: list[Callable[[], None]] = []
        # Rows restore could not read (`open_events`, `finished_runs`):
        # passed over, counted, logged by the service.
        self.unreadable_rows = 0
        try:
            self._reload_outbox_totals()
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from None

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes; nested uses join the outer one."""
        if self._depth == 0:
            self._db.execute("BEGIN")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._roll_back()
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                for before in self._before_commit:
                    before()
                self._db.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
            callbacks, self._on_commit, self._before_commit = self._on_commit, [], []
            for committed, _ in callbacks:
                committed()

    def _roll_back(self) -> None:
        callbacks, self._on_commit, self._before_commit = self._on_commit, [], []
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._reload_outbox_totals()
        for _, rolled_back in callbacks:
            if rolled_back is not None:
                rolled_back()

    def on_commit(self, committed: Callable[[], None],
                  rolled_back: Optional[Callable[[], None]] = None,
                  before: Optional[Callable[[], None]] = None) -> None:
        """Call `committed` once the current transaction has committed, or
        `rolled_back` if it rolls back: for memory that must not run ahead
        of the disk. `before` runs in the transaction, just before it
        commits: for writes gathered over the transaction."""
        assert self._depth > 0, "on_commit outside a transaction"
        self._on_commit.append((committed, rolled_back))
        if before is not None:
            self._before_commit.append(before)

    # -- open and finished runs -------------------------------------------------

    def keep_event(self, run_id: str, event: Event, raw: bytes) -> None:
        """`raw`: JSON that `parse_wire_event` reads back to `event` (what it
        was parsed from, when known), kept as it is."""
        self._db.execute("INSERT OR IGNORE INTO run_events VALUES (?, ?, ?)",
                         (str(event.id), run_id, raw))

    def close_run(self, run_id: str, event_ids: frozenset[UUID]) -> None:
        self._db.execute("DELETE FROM run_events WHERE run_id = ?", (run_id,))
        cur = self._db.execute(
            "INSERT OR REPLACE INTO finished_runs (run_id, event_ids) VALUES (?, ?)",
            (run_id, json.dumps(sorted(map(str, event_ids)))),
        )
        self._db.execute(
            "DELETE FROM finished_runs WHERE seq <= ?", (cur.lastrowid - self.remember_finished_runs,)
        )

    def open_events(self) -> Iterator[Event]:
        """The open runs' events; a row that is not one is passed over and
        counted (`unreadable_rows`). Raises `StoreError` if the file is damaged."""
        for (body,) in self._rows("SELECT body FROM run_events ORDER BY rowid"):
            # Any wire form, as taken (`parse_wire_event` reads each again to
            # the very same event); JSON escapes of text UTF-8 cannot carry too.
            event = read_event(body)
            if event is None:
                self.unreadable_rows += 1
                continue
            yield event

    def finished_runs(self) -> Iterator[tuple[str, list[UUID]]]:
        """As `open_events`, for the runs already emitted."""
        for run_id, ids in self._rows("SELECT run_id, event_ids FROM finished_runs ORDER BY seq"):
            event_ids = read_event_ids(ids)
            if not isinstance(run_id, str) or event_ids is None:
                self.unreadable_rows += 1
                continue
            yield run_id, event_ids

    def _rows(self, query: str) -> Iterator[tuple]:
        try:
            yield from self._db.execute(query)
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from None

    # -- outbox -----------------------------------------------------------------

    def outbox_bytes(self, kind: str) -> int:
        return self._outbox_bytes.get(kind, 0)

    def outbox_items(self, kind: str) -> int:
        return self._outbox_items.get(kind, 0)

    def put(self, kind: str, body: bytes, stamp: float) -> None:
        self.put_many(kind, [(body, stamp)])

    def put_many(self, kind: str, items: list[tuple[bytes, float]]) -> None:
        """(body, stamp) items, a few hundred rows a statement: SQLite lets go
        of the GIL at each statement step, and a busy delivery thread then
        held it a switch interval each time (see `OutboxReader`)."""
        for start in range(0, len(items), _ROWS_PER_STATEMENT):
            rows = items[start:start + _ROWS_PER_STATEMENT]
            self._db.execute(
                "INSERT INTO outbox (kind, body, size, stamp) VALUES "
                + ",".join(["(?, ?, ?, ?)"] * len(rows)),
                [value for body, stamp in rows for value in (kind, body, len(body), stamp)],
            )
        self._outbox_bytes[kind] = self.outbox_bytes(kind) + sum(len(body) for body, _ in items)
        self._outbox_items[kind] = self.outbox_items(kind) + len(items)

    def peek(self, kind: str, max_items: int, max_bytes: int, after: int = 0) -> list[OutboxItem]:
        """The oldest items of `kind` (after seq `after`): at least one, then
        as many as fit in `max_items` and `max_bytes`."""
        return _peek(self._db, kind, max_items, max_bytes, after)

    def outbox_reader(self) -> "OutboxReader":
        return OutboxReader(self.path)

    def remove(self, items: list[OutboxItem]) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
                             (_seqs(items),))
        for item in items:
            self._outbox_bytes[item.kind] -= item.size
            self._outbox_items[item.kind] -= 1

    def failed(self, items: list[OutboxItem]) -> None:
        with self.transaction():
            self._db.execute("UPDATE outbox SET attempts = attempts + 1 "
                             "WHERE seq IN (SELECT value FROM json_each(?))", (_seqs(items),))

    def set_aside(self, item: OutboxItem, reason: str) -> None:
        """Move an item its sink keeps refusing out of the way, kept for a human."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                (item.seq, item.kind, item.body, reason, time.time()),
            )
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (item.seq,))
        self._outbox_bytes[item.kind] -= item.size
        self._outbox_items[item.kind] -= 1

    def dead_letter_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def _reload_outbox_totals(self) -> None:
        self._outbox_bytes = dict(self._db.execute("SELECT kind, SUM(size) FROM outbox GROUP BY kind").fetchall())
        self._outbox_items = dict(self._db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())

    # -- Prefect log lines taken ------------------------------------------------

    def unseen_logs(self, ids: list[str]) -> set[str]:
        """Those of these log ids not taken yet."""
        seen = {row[0] for row in self._db.execute(
            "SELECT log_id FROM seen_logs WHERE log_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),))}
        return set(ids) - seen

    def remember_logs(self, logs: list[tuple[str, float]]) -> None:
        """(log id, timestamp) of lines taken, in the transaction that takes them."""
        for start in range(0, len(logs), _ROWS_PER_STATEMENT):  # (as `put_many`)
            rows = logs[start:start + _ROWS_PER_STATEMENT]
            self._db.execute("INSERT OR IGNORE INTO seen_logs VALUES "
                             + ",".join(["(?, ?)"] * len(rows)),
                             [value for row in rows for value in row])

    def forget_logs_before(self, stamp: float) -> None:
        self._db.execute("DELETE FROM seen_logs WHERE stamp < ?", (stamp,))

    # -- run metrics ------------------------------------------------------------

    def counted_runs(self) -> list[int]:
        """The span ids of the runs counted, oldest first."""
        out = []
        for (span_id,) in self._rows("SELECT span_id FROM counted_runs ORDER BY seq"):
            try:
                out.append(int(span_id, 16))
            except (TypeError, ValueError):
                self.unreadable_rows += 1
        return out

    def count_runs(self, span_ids: list[int], changed: dict[SeriesKey, SeriesTotal]) -> None:
        """Runs counted: their span ids, and the series totals they changed."""
        for start in range(0, len(span_ids), _ROWS_PER_STATEMENT):
            rows = span_ids[start:start + _ROWS_PER_STATEMENT]
            self._db.execute("INSERT OR IGNORE INTO counted_runs (span_id) VALUES "
                             + ",".join(["(?)"] * len(rows)), [f"{i:016x}" for i in rows])
        last = self._db.execute("SELECT MAX(seq) FROM counted_runs").fetchone()[0] or 0
        self._db.execute("DELETE FROM counted_runs WHERE seq <= ?",
                         (last - self.remember_finished_runs,))
        self._db.executemany(
            "INSERT OR REPLACE INTO metric_totals VALUES (?, ?, ?)",
            [(name, json.dumps(attributes), total.to_json())
             for (name, attributes), total in changed.items()])

    def metric_totals(self) -> dict[SeriesKey, SeriesTotal]:
        """Every series' totals; a row that is not one is passed over and counted."""
        totals: dict[SeriesKey, SeriesTotal] = {}
        for name, attributes, total in self._rows(
                "SELECT instrument, attributes, total FROM metric_totals"):
            try:
                key = (name, tuple((str(k), str(v)) for k, v in json.loads(attributes)))
                totals[key] = SeriesTotal.from_json(total)
            except (TypeError, ValueError, KeyError):
                self.unreadable_rows += 1
        return totals

    # -- meta ---------------------------------------------------------------------

    def get_meta(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class OutboxReader:
    """The outbox read from a delivery's own thread, on a connection of its
    own (under WAL a reader never waits for the writer). Fetched on the
    event loop, a batch of 512 rows let go of the GIL 512 times, and a busy
    delivery thread kept it a switch interval each time: /healthz waited."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")

    def peek(self, kind: str, max_items: int, max_bytes: int, after: int = 0) -> list[OutboxItem]:
        """As `Store.peek`."""
        return _peek(self._db, kind, max_items, max_bytes, after)

    def close(self) -> None:
        self._db.close()


_ROWS_PER_STATEMENT = 200  # 800 parameters, under SQLite's oldest limit (999)


def _peek(db: sqlite3.Connection, kind: str, max_items: int, max_bytes: int,
          after: int) -> list[OutboxItem]:
    items: list[OutboxItem] = []
    total = 0
    rows = db.execute(
        "SELECT seq, kind, body, size, stamp, attempts FROM outbox "
        "WHERE kind = ? AND seq > ? ORDER BY seq LIMIT ?",
        (kind, after, max_items),
    )
    for row in rows:
        item = OutboxItem(*row)
        if items and total + item.size > max_bytes:
            break
        items.append(item)
        total += item.size
    return items


def _seqs(items: list[OutboxItem]) -> str:
    return json.dumps([item.seq for item in items])
