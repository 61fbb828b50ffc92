"""`otel-bridge store check` and `otel-bridge store salvage`: what to do
with a store that is damaged (a disk error, a copy taken mid-write).

`check` opens the file read-only and says what SQLite finds wrong with it
and, table by table, how many rows can be read and how many cannot (a row
whose content is not what the service writes counts as unreadable too).
`salvage` copies every row that can be read into a new store, which
`serve --store-path NEW` can then use, and says what was left behind. A
damaged page hides the rows on it: the copy steps past it, so the count of
what was lost is a lower bound.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from otel_bridge.service.pipeline import decode
from otel_bridge.service.store import Store, read_event, read_event_ids
from otel_bridge.translate.metric_totals import SeriesTotal

__all__ = ["TableReport", "check", "salvage"]

# What each table's rows are read as, and what a readable row must hold.
_TABLES: dict[str, tuple[str, Callable[[tuple], bool]]] = {
    "run_events": ("event_id, run_id, body",
                   lambda r: isinstance(r[1], str) and read_event(r[2]) is not None),
    "finished_runs": ("seq, run_id, event_ids",
                      lambda r: isinstance(r[1], str) and read_event_ids(r[2]) is not None),
    "outbox": ("seq, kind, body, size, stamp, attempts", lambda r: _outbox_item_ok(r[1], r[2])),
    "dead_letters": ("seq, kind, body, reason, at", lambda r: isinstance(r[2], (bytes, str))),
    "seen_logs": ("log_id, stamp", lambda r: isinstance(r[0], str)
                  and isinstance(r[1], (int, float))),
    "counted_runs": ("seq, span_id", lambda r: _hex(r[1])),
    "metric_totals": ("instrument, attributes, total", lambda r: _series_total_ok(r[2])),
    "meta": ("key, value", lambda r: isinstance(r[0], str) and isinstance(r[1], str)),
}


def _hex(text: object) -> bool:
    try:
        int(text, 16)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _series_total_ok(text: object) -> bool:
    try:
        SeriesTotal.from_json(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        return False
    return True


def _outbox_item_ok(kind: object, body: object) -> bool:
    if kind not in ("span", "event", "log") or not isinstance(body, (bytes, str)):
        return False
    try:
        decode(kind, body if isinstance(body, bytes) else body.encode())
    except Exception:  # whatever the body holds, it is not an item
        return False
    return True


@dataclass
class TableReport:
    table: str
    readable: int = 0
    unreadable: int = 0  # rows read but not what the service writes
    damaged_ranges: int = 0  # places where rows could not be read at all


@dataclass
class Report:
    path: Path
    problems: list[str] = field(default_factory=list)  # SQLite's integrity check
    tables: list[TableReport] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems and not any(t.unreadable or t.damaged_ranges
                                             for t in self.tables)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {'no damage found' if self.clean else 'damaged'}"]
        out += [f"  sqlite: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            out.append(f"  sqlite: and {len(self.problems) - 20} more")
        for t in self.tables:
            out.append(f"  {t.table}: {t.readable} rows readable, {t.unreadable} unreadable"
                       + (f", {t.damaged_ranges} damaged places skipped" if t.damaged_ranges
                          else ""))
        return out


def check(path: Path) -> Report:
    """What is wrong with the store at `path`; changes nothing."""
    report = Report(Path(path))
    db = _open_read_only(report.path)
    try:
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check")]
            report.problems = [] if rows == ["ok"] else rows
        except sqlite3.DatabaseError as exc:
            report.problems = [str(exc)]
        for table, (columns, ok) in _TABLES.items():
            table_report = TableReport(table)
            for row in _readable_rows(db, table, columns, table_report):
                if ok(row):
                    table_report.readable += 1
                else:
                    table_report.unreadable += 1
            report.tables.append(table_report)
    finally:
        db.close()
    return report


def salvage(path: Path, new_path: Path) -> Report:
    """Copy what can be read of the store at `path` into a new store at
    `new_path` (which must not exist); the report says what was left."""
    new_path = Path(new_path)
    if new_path.exists():
        raise FileExistsError(f"{new_path} exists: salvage writes a new store")
    report = Report(Path(path))
    source = _open_read_only(report.path)
    target = Store(new_path)
    try:
        with target.transaction():
            for table, (columns, ok) in _TABLES.items():
                table_report = TableReport(table)
                marks = ", ".join("?" * len(columns.split(",")))
                for row in _readable_rows(source, table, columns, table_report):
                    if not ok(row):
                        table_report.unreadable += 1
                        continue
                    target._db.execute(f"INSERT OR IGNORE INTO {table} ({columns}) "
                                       f"VALUES ({marks})", row)
                    table_report.readable += 1
                report.tables.append(table_report)
    finally:
        source.close()
        target.close()
    return report


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no store at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _readable_rows(db: sqlite3.Connection, table: str, columns: str,
                   report: TableReport) -> Iterator[tuple]:
    """Every row that can be read, in rowid order; past a damaged page,
    the read resumes further on (steps that double, 64 tries at most)."""
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (table,)).fetchone() is None:
            return  # a store made before the table was (seen_logs)
    except sqlite3.DatabaseError:
        pass  # the catalogue damaged: the read below says how far it gets
    after, step, tries = -(1 << 63), 1, 0
    while tries < 64:
        try:
            for row in db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? "
                                  f"ORDER BY rowid", (after,)):
                after, step = row[0], 1
                yield row[1:]
            return
        except sqlite3.DatabaseError:
            report.damaged_ranges += 1
            tries += 1
            after, step = after + step, step * 2
