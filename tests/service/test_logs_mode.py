"""How `serve --logs` decides which way the log lines come (issue #14):
`LogsMode` alone (pure: times passed in), then the follower with a fake
REST reader and a fake socket on a real store (both ways lead to one path:
each line taken once, counted by where it came from)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from support.factories import prefect_log

from otel_bridge.service.log_follower import REST, WEBSOCKET, LogFollower, LogsMode, ModeChange
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import LOG, Pipeline
from otel_bridge.service.store import Store

T0 = 1_000_000.0  # the socket subscribed at T0


def test_the_mode_is_rest_until_a_line_comes_on_the_socket():
    mode = LogsMode(grace=10)
    assert mode.mode == REST
    assert mode.check(T0 + 100, connected_since=T0, down_since=None) is None
    change = mode.live(["a"], at=T0 + 5)
    assert change == ModeChange(WEBSOCKET, "lines come on the logs websocket")
    assert mode.mode == WEBSOCKET
    assert mode.live(["b"], at=T0 + 6) is None  # said once


def test_silence_is_not_taken_for_no_logs_lines_rest_found_and_the_socket_never_sent():
    mode = LogsMode(grace=10)
    mode.live(["a"], at=T0 + 1)
    # REST takes lines logged after the socket subscribed: it should send them.
    mode.reconciled([("b", T0 + 20), ("c", T0 + 21)], at=T0 + 25, connected_since=T0)
    assert mode.watched == 2
    assert mode.check(T0 + 34, connected_since=T0, down_since=None) is None  # within the grace
    change = mode.check(T0 + 35, connected_since=T0, down_since=None)
    assert change is not None and change.mode == REST
    assert "2 line(s)" in change.reason
    assert (mode.missed, mode.silent, mode.watched) == (2, 2, 0)
    # Lines on the socket again: back to websocket.
    assert mode.live(["d"], at=T0 + 40).mode == WEBSOCKET


def test_a_line_the_socket_sends_within_the_grace_is_not_missed():
    mode = LogsMode(grace=10)
    mode.live(["a"], at=T0 + 1)
    mode.reconciled([("b", T0 + 20)], at=T0 + 22, connected_since=T0)
    mode.live(["b"], at=T0 + 23)  # REST was first, the socket came too
    assert mode.check(T0 + 60, connected_since=T0, down_since=None) is None
    assert (mode.missed, mode.mode) == (0, WEBSOCKET)


def test_lines_logged_before_the_socket_subscribed_are_no_evidence():
    mode = LogsMode(grace=10, margin=2)
    mode.live(["a"], at=T0 + 1)
    # Logged before the subscription, or within the margin for clocks apart;
    # or taken while the socket was down.
    mode.reconciled([("b", T0 - 30), ("c", T0 + 1.5)], at=T0 + 5, connected_since=T0)
    mode.reconciled([("d", T0 + 50)], at=T0 + 55, connected_since=None)
    assert mode.watched == 0
    assert mode.check(T0 + 100, connected_since=T0, down_since=None) is None
    assert mode.mode == WEBSOCKET


def test_a_line_dropped_while_others_came_leaves_the_mode():
    # The server drops lines past a subscriber's backlog of 256: REST brings
    # them, and the socket still delivers.
    mode = LogsMode(grace=10)
    mode.reconciled([("dropped", T0 + 20)], at=T0 + 24, connected_since=T0)
    mode.live(["other"], at=T0 + 21)
    assert mode.check(T0 + 40, connected_since=T0, down_since=None) is None
    assert (mode.mode, mode.missed, mode.silent) == (WEBSOCKET, 1, 0)


def test_a_socket_down_for_the_grace_is_rest_and_a_short_drop_is_not():
    mode = LogsMode(grace=10)
    mode.live(["a"], at=T0 + 1)
    assert mode.check(T0 + 15, connected_since=None, down_since=T0 + 10) is None
    change = mode.check(T0 + 20, connected_since=None, down_since=T0 + 10)
    assert change is not None and change.mode == REST and "down" in change.reason


def test_on_a_silent_socket_the_mode_stays_rest_and_the_misses_are_counted():
    # A server with default settings: subscribed, nothing ever comes.
    mode = LogsMode(grace=10)
    mode.reconciled([(f"l{i}", T0 + 20 + i) for i in range(5)], at=T0 + 30, connected_since=T0)
    assert mode.check(T0 + 41, connected_since=T0, down_since=None) is None  # no change: rest
    assert (mode.mode, mode.missed, mode.silent, mode.last_live) == (REST, 5, 5, None)


def test_what_is_watched_is_bounded():
    mode = LogsMode(grace=10, max_watched=3)
    mode.reconciled([(f"l{i}", T0 + 20) for i in range(10)], at=T0 + 30, connected_since=T0)
    assert mode.watched == 3


# -- the follower: fake reader and socket, real store and pipeline ----------------------


class FakeReader:
    """REST: every line "stored" so far whose timestamp is in the window."""

    def __init__(self):
        self.stored: list[dict] = []
        self.closed = False

        class Api:
            url = "http://prefect.invalid/api"
        self.api = Api()

    async def read_window(self, since, until):
        page = [log for log in self.stored
                if since <= datetime.fromisoformat(log["timestamp"]) <= until]
        yield page

    async def close(self):
        self.closed = True


class FakeSocket:
    """The logs websocket: subscribed at once; sends what `send` queues."""

    def __init__(self, clock):
        self.connected_since = clock()
        self.down_since = None
        self.lines = self.connections = self.failures = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def send(self, batch):
        self.queue.put_nowait(batch)

    async def batches(self):
        self.connections += 1
        while True:
            batch = await self.queue.get()
            self.lines += len(batch)
            yield batch

    async def close(self):
        self.closed = True


def _soon() -> datetime:
    """A timestamp the fresh pass (3 s behind now) reaches in half a second:
    after the lines a test stores are in place."""
    return datetime.now(timezone.utc) - timedelta(seconds=2.5)


def _line(at: datetime, **fields) -> dict:
    return prefect_log(timestamp=at.isoformat(), **fields)


def _follower(tmp_path, socket_on: bool):
    store = Store(tmp_path / "store.sqlite3")
    pipeline = Pipeline(store, Metrics())
    reader = FakeReader()
    now = datetime.now(timezone.utc)
    socket = FakeSocket(lambda: now.timestamp() - 60) if socket_on else None
    follower = LogFollower(store, pipeline, reader, socket=socket, since=now - timedelta(minutes=1),
                           poll_seconds=0.05, lateness_seconds=0.2, grace_seconds=0.3)
    return store, reader, socket, follower


async def _until(predicate, seconds=5.0, follower=None):
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, (
            f"timed out: {follower.stats if follower else ''}")
        await asyncio.sleep(0.02)


def test_lines_from_both_ways_are_taken_once_and_counted_by_where_they_came_from(tmp_path):
    store, reader, socket, follower = _follower(tmp_path, socket_on=True)
    t = _soon()
    both = [_line(t), _line(t + timedelta(seconds=0.1))]
    rest_only = _line(t + timedelta(seconds=0.2))  # the socket dropped it

    async def scenario():
        run = asyncio.create_task(follower.run())
        socket.send([dict(log, created=None, updated=None) for log in both])
        await _until(lambda: follower.stats.live == 2)
        assert follower.mode == WEBSOCKET
        reader.stored += both + [rest_only]
        await _until(lambda: follower.stats.reconciled == 1 and follower.stats.passes >= 4,
                     follower=follower)
        socket.send([dict(both[0], created=None)])  # sent again: passed over
        await _until(lambda: follower.stats.socket_lines == 3)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    stats = follower.stats
    assert (stats.taken, stats.live, stats.reconciled) == (3, 2, 1)
    assert stats.duplicates >= 3  # REST read the socket's two again, the socket one again
    assert store.outbox_items(LOG) == 3
    assert store.unseen_logs([log["id"] for log in both + [rest_only]]) == set()
    assert socket.closed and reader.closed
    store.close()


def test_a_silent_socket_leaves_the_mode_rest_and_rest_brings_every_line(tmp_path):
    store, reader, socket, follower = _follower(tmp_path, socket_on=True)
    t = _soon()
    lines = [_line(t + timedelta(seconds=i / 10)) for i in range(4)]

    async def scenario():
        run = asyncio.create_task(follower.run())
        reader.stored += lines
        await _until(lambda: follower.stats.reconciled == 4)
        await _until(lambda: follower.stats.socket_missed == 4)  # the grace went by
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    assert follower.mode == REST
    assert (follower.stats.live, follower.stats.mode_changes) == (0, 0)
    assert store.outbox_items(LOG) == 4
    store.close()


def test_without_a_socket_the_follower_polls_rest_alone(tmp_path):
    store, reader, _, follower = _follower(tmp_path, socket_on=False)
    t = _soon()

    async def scenario():
        run = asyncio.create_task(follower.run())
        reader.stored += [_line(t), _line(t)]
        await _until(lambda: follower.stats.reconciled == 2)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    assert follower.mode == REST and follower.stats.socket_missed == 0
    store.close()


def test_a_live_line_without_created_is_observed_when_it_came(tmp_path):
    store, reader, socket, follower = _follower(tmp_path, socket_on=True)
    line = dict(_line(datetime.now(timezone.utc)), created=None, updated=None)

    async def scenario():
        run = asyncio.create_task(follower.run())
        socket.send([line])
        await _until(lambda: follower.stats.live == 1)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    assert line["created"] is not None  # the receipt time, as REST's is the server's
    store.close()
