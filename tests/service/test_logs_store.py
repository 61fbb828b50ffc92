"""serve's side of the log lines, on a real store: the pipeline puts them in
the outbox as kind "log" and a delivery gets records back; the ids taken are
remembered and forgotten; store check and salvage know the new table."""

from __future__ import annotations

import sqlite3

from support.factories import prefect_log

from otel_bridge.model.logs import LogRecord
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import LOG, Pipeline, decode
from otel_bridge.service.store import Store
from otel_bridge.service.store_repair import check, salvage
from otel_bridge.translate.logs import log_record


def test_log_lines_go_to_the_outbox_and_come_back_as_their_records(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    pipeline = Pipeline(store, Metrics())
    good, of_no_run = prefect_log(), prefect_log(flow_run_id=None, task_run_id=None)
    with store.transaction():
        intake, no_run = pipeline.take_logs([good, prefect_log(level="x"), of_no_run], "test")
    assert (intake.accepted, no_run, [i for i, _ in intake.rejected]) == (1, 1, [1])
    items = store.peek(LOG, 10, 1 << 20)
    assert len(items) == 1
    record = decode(LOG, items[0].body)
    assert isinstance(record, LogRecord) and record == log_record(good)
    store.close()


def test_a_line_in_any_accepted_form_comes_back_as_the_record_it_makes(tmp_path):
    # Checked on the way in only: what the outbox keeps is the checked form,
    # and the record made of it without a second check is the line's record.
    lines = [prefect_log(id=prefect_log()["id"].upper(), timestamp="2026-03-01T11:00:01.25+01:00",
                         created=None),
             prefect_log(timestamp="2026-03-01T10:00:01", worker_id=prefect_log()["id"],
                         level=25, message="ünïcode \u2028 line"),
             prefect_log(task_run_id=None, name="prefect.flow_runs", level=0, message="")]
    store = Store(tmp_path / "store.sqlite3")
    with store.transaction():
        intake, _ = Pipeline(store, Metrics()).take_logs(lines, "test")
    assert intake.accepted == len(lines)
    items = store.peek(LOG, 10, 1 << 20)
    assert [decode(LOG, item.body) for item in items] == [log_record(line) for line in lines]
    store.close()


def test_ids_taken_are_remembered_until_forgotten_by_time(tmp_path):
    store = Store(tmp_path / "store.sqlite3")
    with store.transaction():
        store.remember_logs([("a", 100.0), ("b", 200.0)])
    assert store.unseen_logs(["a", "b", "c"]) == {"c"}
    store.forget_logs_before(150.0)
    assert store.unseen_logs(["a", "b"]) == {"a"}
    store.close()


def test_a_store_with_log_lines_checks_clean_and_salvages_whole(tmp_path):
    path = tmp_path / "store.sqlite3"
    store = Store(path)
    with store.transaction():
        Pipeline(store, Metrics()).take_logs([prefect_log()], "test")
        store.remember_logs([("a", 1.0)])
    store.close()
    assert check(path).clean
    salvage(path, tmp_path / "new.sqlite3")
    new = Store(tmp_path / "new.sqlite3")
    assert new.outbox_items(LOG) == 1 and new.unseen_logs(["a"]) == set()
    new.close()


def test_a_store_made_before_the_log_table_checks_clean(tmp_path):
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE seen_logs")
    assert check(path).clean
