"""A damaged store: a clear error naming the file and what to do, rows that
cannot be read passed over and counted, `store check` and `store salvage`."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import FIXTURES, events, load_jsonl

from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import SPAN, Pipeline
from otel_bridge.service.store import Store, StoreError
from otel_bridge.service.store_repair import check, salvage
from otel_bridge.translate.assembler import AssemblerOptions


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def a_store(path: Path) -> tuple[int, int]:
    """A store with closed runs (spans in the outbox) and open ones;
    returns (open runs, outbox spans)."""
    clock = Clock()
    store = Store(path)
    pipeline = Pipeline(store, Metrics(), AssemblerOptions(linger_seconds=1), clock=clock)
    for name in ("retries-immediate", "nested-tasks", "mapped", "failure"):
        pipeline.take_events(events(load_jsonl(FIXTURES / f"{name}.jsonl")), "test")
    clock.now = 2.0
    pipeline.tick()
    pipeline.take_events(events(load_jsonl(FIXTURES / "success.jsonl"))[:4], "test")
    counts = pipeline.assembler.open_runs, store.outbox_items(SPAN)
    store.close()
    return counts


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_bridge", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_row_that_is_not_what_the_store_writes_is_passed_over_and_counted(tmp_path):
    path = tmp_path / "store.sqlite3"
    open_runs, _ = a_store(path)
    db = sqlite3.connect(path)
    db.execute("UPDATE run_events SET body = '{broken' WHERE rowid = (SELECT MIN(rowid) FROM run_events)")
    db.execute("UPDATE finished_runs SET event_ids = 'nope' WHERE seq = (SELECT MIN(seq) FROM finished_runs)")
    db.commit()
    db.close()
    store = Store(path)
    pipeline = Pipeline(store, Metrics())  # restores: once a traceback, the service down
    assert store.unreadable_rows == 2
    assert 0 < pipeline.assembler.open_runs <= open_runs
    store.close()
    result = cli("store", "check", str(path))
    assert result.returncode == 1, result.stdout
    assert "run_events:" in result.stdout and "1 unreadable" in result.stdout


def _damage_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    pages = len(data) // page
    assert pages > 8
    for p in range(pages // 2, pages // 2 + 1):
        data[p * page:(p + 1) * page] = b"\xa5" * page
    path.write_bytes(bytes(data))


def test_damage_in_the_middle_of_the_file_is_a_clear_error_and_salvage_recovers_the_rest(tmp_path):
    path = tmp_path / "store.sqlite3"
    a_store(path)
    db = sqlite3.connect(path)
    db.execute("VACUUM")  # every page in use, none free
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and all in the main file
    db.close()
    _damage_the_middle(path)

    with pytest.raises(StoreError) as error:
        store = Store(path)
        Pipeline(store, Metrics())
    message = str(error.value)
    assert str(path) in message and "store check" in message and "store salvage" in message

    report = check(path)
    assert not report.clean and report.problems
    result = cli("store", "check", str(path))
    assert result.returncode == 1 and "damaged" in result.stdout

    new = tmp_path / "salvaged.sqlite3"
    result = cli("store", "salvage", str(path), str(new))
    assert result.returncode == 0 and "salvaged into" in result.stdout, result.stderr
    assert "damaged places skipped" in result.stdout or "unreadable" in result.stdout
    assert check(new).clean
    store = Store(new)
    pipeline = Pipeline(store, Metrics())  # serve can use it
    assert store.outbox_items(SPAN) + pipeline.assembler.open_runs > 0
    store.close()
    assert cli("store", "salvage", str(path), str(new)).returncode == 2  # never over a store


def test_a_healthy_store_checks_clean_and_salvages_whole(tmp_path):
    path = tmp_path / "store.sqlite3"
    open_runs, spans = a_store(path)
    assert check(path).clean
    assert cli("store", "check", str(path)).returncode == 0
    new = tmp_path / "copy.sqlite3"
    report = salvage(path, new)
    assert report.clean
    store = Store(new)
    pipeline = Pipeline(store, Metrics())
    assert (pipeline.assembler.open_runs, store.outbox_items(SPAN)) == (open_runs, spans)
