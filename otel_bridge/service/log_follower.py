"""`serve`'s follower of Prefect's log lines: REST passes and the logs
websocket (`sources.prefect_logs`) -> dedup by id -> the pipeline's outbox
("log").

Both ways lead to one path: a batch of lines (a REST page, or the frames the
socket sent together) is checked and taken in one transaction with the ids
it brought (the store's ``seen_logs``), so a line that comes both ways is
taken once, by whichever came first. The socket's lines are taken as they
come; the REST passes run all the time, the socket on or off, and they
alone move the marks: a pass's mark is saved once its window is read whole,
and a restart reads again from the marks and passes over the ids it took,
so it neither loses nor repeats a line. Ids are forgotten once the late
pass's mark is past their timestamp: no pass reads them again.

Mode (`LogsMode`, pure): "rest" until the socket proves it delivers, by a
line coming on it; "websocket" from then on; "rest" again when REST takes
lines that the socket, subscribed since before they were logged, has not
sent within a grace and it has sent nothing since they were logged (a
silent socket: a server restarted with the stream off, say), or when it has
been down for the grace. Silence is never taken for "no logs": a server
with default settings accepts the subscription and sends nothing, and then
the mode stays "rest" and REST brings every line. Each change is said in one
log line; the counters say where the lines came from (``live``,
``reconciled``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Optional

import httpx

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import PrefectUnavailable
from otel_bridge.service.pipeline import Pipeline
from otel_bridge.service.store import Store
from otel_bridge.sources.prefect_logs import LogPass, PrefectLogReader, PrefectLogSocket

__all__ = ["MARKS_KEY", "MODES", "REST", "SOURCE", "WEBSOCKET", "LogFollower",
           "LogFollowerStats", "LogsMode", "ModeChange"]

logger = logging.getLogger(__name__)

REST, WEBSOCKET = "rest", "websocket"
MODES = (REST, WEBSOCKET)
MARKS_KEY = "prefect_logs_marks"
SOURCE = "prefect-logs"  # the endpoint label of rejected lines
# The fresh pass reads up to this long before now: a client sends its lines
# every 2 s (PREFECT_LOGGING_TO_API_BATCH_INTERVAL), the server stores them
# at once.
SETTLE_SECONDS = 3.0
# How long the socket has, after REST took a line, to send it too.
GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class ModeChange:
    mode: str
    reason: str


class LogsMode:
    """Which way the log lines come, decided from what each way brought:
    no I/O, no clock (times are Unix seconds, passed in).

    - `live(ids, at)`: the socket sent these lines. A line on the socket is
      the proof that it delivers: "websocket".
    - `reconciled(lines, at, connected_since)`: REST took these lines, (id,
      timestamp): the socket had not sent them. Those logged after the
      socket was subscribed (`margin` later, for clocks apart) are lines it
      should send: each is watched for `grace` seconds.
    - `check(now, connected_since, down_since)`: a watched line the socket
      has not sent is *missed*; missed while the socket sent nothing since
      the line was logged, it is *silent*: "rest" again. So is a socket
      down (`connected_since` None) for `grace` since `down_since`. A line
      missed while other lines came (the server drops lines past a
      subscriber's backlog) leaves the mode: REST brought it.

    Each method returns the `ModeChange` it made, or None.
    """

    def __init__(self, grace: float = GRACE_SECONDS, margin: float = 2.0,
                 max_watched: int = 10_000):
        self.mode = REST
        self.grace, self.margin, self.max_watched = grace, margin, max_watched
        self.last_live: Optional[float] = None  # when the socket last sent a line
        self.missed = 0  # lines the subscribed socket never sent within the grace
        self.silent = 0  # of those, missed while it sent nothing at all
        self._watched: dict[str, tuple[float, float]] = {}  # id -> (timestamp, due)

    @property
    def watched(self) -> int:
        return len(self._watched)

    def live(self, ids: Iterable[str], at: float) -> Optional[ModeChange]:
        for log_id in ids:
            self._watched.pop(log_id, None)
        self.last_live = at if self.last_live is None else max(self.last_live, at)
        return self._to(WEBSOCKET, "lines come on the logs websocket")

    def reconciled(self, lines: Iterable[tuple[str, float]], at: float,
                   connected_since: Optional[float]) -> None:
        if connected_since is None:
            return  # nothing could come on a socket that was not there
        for log_id, timestamp in lines:
            if timestamp >= connected_since + self.margin and len(self._watched) < self.max_watched:
                self._watched.setdefault(log_id, (timestamp, at + self.grace))

    def check(self, now: float, connected_since: Optional[float],
              down_since: Optional[float]) -> Optional[ModeChange]:
        due = [(log_id, timestamp) for log_id, (timestamp, until) in self._watched.items()
               if until <= now]
        silent = 0
        for log_id, timestamp in due:
            del self._watched[log_id]
            self.missed += 1
            if self.last_live is None or self.last_live < timestamp:
                silent += 1
        self.silent += silent
        if silent:
            return self._to(REST, f"REST found {silent} line(s) that the logs websocket, "
                                  f"subscribed, did not send within {self.grace:g} s")
        if connected_since is None and down_since is not None and now - down_since >= self.grace:
            return self._to(REST, f"the logs websocket has been down for {self.grace:g} s")
        return None

    def _to(self, mode: str, reason: str) -> Optional[ModeChange]:
        if mode == self.mode:
            return None
        self.mode = mode
        return ModeChange(mode, reason)


@dataclass
class LogFollowerStats:
    read: int = 0  # lines the server sent, both ways
    taken: int = 0  # put in the outbox: live + reconciled
    live: int = 0  # of those, from the logs websocket
    reconciled: int = 0  # of those, from REST (the socket had not sent them)
    duplicates: int = 0  # sent again (both ways, window edges, the late pass): passed over
    no_run: int = 0  # of no flow run or task run: passed over
    rejected: int = 0  # not log lines
    late: int = 0  # found by the late pass only: stored after the fresh pass went by
    pages: int = 0
    passes: int = 0
    rest_errors: int = 0
    socket_lines: int = 0  # lines the logs websocket sent
    socket_connections: int = 0  # subscriptions made
    socket_failures: int = 0  # connections that failed or were lost
    socket_missed: int = 0  # lines REST took that the subscribed socket never sent
    mode_changes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LogFollower:
    def __init__(self, store: Store, pipeline: Pipeline, reader: PrefectLogReader, *,
                 since: datetime, poll_seconds: float, lateness_seconds: float,
                 socket: Optional[PrefectLogSocket] = None, grace_seconds: float = GRACE_SECONDS,
                 backoff: Backoff = Backoff(), clock: Callable[[], float] = time.time):
        self.store, self.pipeline, self.reader, self.socket = store, pipeline, reader, socket
        self.backoff = backoff
        self.clock = clock
        self._stats = LogFollowerStats()
        self.logs_mode = LogsMode(grace=max(grace_seconds, 2 * poll_seconds))
        self._hinted = False
        fresh, late = self._stored_marks() or (since, since)
        self.fresh = LogPass("fresh", SETTLE_SECONDS, poll_seconds, fresh)
        self.late = LogPass("late", max(lateness_seconds, SETTLE_SECONDS),
                            max(lateness_seconds / 4, poll_seconds), late)

    @property
    def mode(self) -> str:
        """"rest" or "websocket" (see `LogsMode`)."""
        return self.logs_mode.mode

    @property
    def stats(self) -> LogFollowerStats:
        """The counters, the socket's included."""
        if self.socket is not None:
            self._stats.socket_lines = self.socket.lines
            self._stats.socket_connections = self.socket.connections
            self._stats.socket_failures = self.socket.failures
        self._stats.socket_missed = self.logs_mode.missed
        return self._stats

    def _stored_marks(self) -> Optional[tuple[datetime, datetime]]:
        stored = self.store.get_meta(MARKS_KEY)
        if not stored:
            return None
        try:
            marks = json.loads(stored)
            return datetime.fromisoformat(marks["fresh"]), datetime.fromisoformat(marks["late"])
        except (ValueError, KeyError, TypeError):
            logger.warning("the stored marks of Prefect's logs cannot be read: starting afresh",
                           extra={"stored": stored[:200]})
            return None

    @property
    def resumed(self) -> bool:
        return self.store.get_meta(MARKS_KEY) is not None

    async def run(self) -> None:
        """Read until cancelled: REST passes here, the socket beside them.
        Raises `PrefectError` for a REST answer that will not change, or once
        REST has been unreachable as long as `backoff` allows; nothing the
        socket does stops the REST passes."""
        loop = asyncio.get_running_loop()
        live = (asyncio.create_task(self._follow_socket(), name="prefect-logs-socket")
                if self.socket is not None else None)
        failures = 0
        try:
            while True:
                tick = loop.time()
                for p in (self.fresh, self.late):
                    if tick < p.due:
                        continue
                    window = p.window(datetime.now(timezone.utc))
                    if window is not None:
                        try:
                            await self._read(p, *window)
                            failures = 0
                        except (httpx.TransportError, httpx.HTTPStatusError,
                                httpx.DecodingError) as exc:
                            failures = self._failed(exc, failures)
                            break  # this pass again at the next tick
                    p.due = tick + p.every
                self._check_mode()
                await asyncio.sleep(self.backoff.delay(failures) if failures else self.fresh.every)
        finally:
            if live is not None:
                await self.socket.close()
                live.cancel()
                await asyncio.gather(live, return_exceptions=True)
            await self.reader.close()

    def _failed(self, exc: Exception, failures: int) -> int:
        self.stats.rest_errors += 1
        failures += 1
        if self.backoff.exhausted(failures):
            raise PrefectUnavailable.after(f"reading {self.reader.api.url}/logs/filter", failures,
                                           exc) from exc
        logger.warning("reading Prefect's logs failed: retrying", extra={
            "error": f"{type(exc).__name__}: {exc}"[:300], "failures": failures})
        return failures

    async def _read(self, p: LogPass, since: datetime, until: datetime) -> None:
        async for page in self.reader.read_window(since, until):
            self._stats.pages += 1
            with self.store.transaction():
                taken = self._take(page, until, "late" if p is self.late else "fresh")
            if self.socket is not None:
                self.logs_mode.reconciled(taken, self.clock(), self.socket.connected_since)
        # Only a window read whole moves the mark: a failed one is read again.
        p.mark = until
        self._stats.passes += 1
        with self.store.transaction():
            self.store.set_meta(MARKS_KEY, json.dumps(
                {"fresh": self.fresh.mark.isoformat(), "late": self.late.mark.isoformat()}))
            if p is self.late:
                # Behind the late mark, no pass reads a line again; a minute of slack
                # for lines a page boundary or clock rounding puts on the edge.
                self.store.forget_logs_before((p.mark - timedelta(minutes=1)).timestamp())

    async def _follow_socket(self) -> None:
        """The socket's lines, taken as they come. A failure here is
        logged, and the socket followed again after a while: REST goes on."""
        assert self.socket is not None
        while True:
            try:
                async for batch in self.socket.batches():
                    at = self.clock()
                    now = datetime.fromtimestamp(at, timezone.utc)
                    for log in batch:
                        # The server sends `created` null (see sources.prefect_logs):
                        # the line was observed now, as REST's `created` says of its own.
                        if isinstance(log, dict) and log.get("created") is None:
                            log["created"] = now.isoformat()
                    with self.store.transaction():
                        self._take(batch, now, "live")
                    self._said(self.logs_mode.live(
                        (log["id"] for log in batch
                         if isinstance(log, dict) and isinstance(log.get("id"), str)), at))
                return  # closed
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, a store error: REST carries on
                logger.exception("following the logs websocket failed: again in a while")
                await asyncio.sleep(self.backoff.maximum)

    def _check_mode(self) -> None:
        if self.socket is None:
            return
        self._said(self.logs_mode.check(self.clock(), self.socket.connected_since,
                                   self.socket.down_since))
        if self.logs_mode.silent and self.logs_mode.last_live is None and not self._hinted:
            self._hinted = True
            logger.warning(
                "the logs websocket sent none of the lines REST found since it was "
                "subscribed: following by REST only", extra={
                    "logs_mode": self.logs_mode.mode, "lines_missed": self.logs_mode.missed,
                    "hint": "Prefect's server streams logs only with "
                            "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true and "
                            "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true"})

    def _said(self, change: Optional[ModeChange]) -> None:
        if change is None:
            return
        self._stats.mode_changes += 1
        logger.info(f"Prefect's log lines: mode {change.mode}", extra={
            "logs_mode": change.mode, "reason": change.reason,
            "live": self._stats.live, "reconciled": self._stats.reconciled})

    def _take(self, page: list[Any], until: datetime, way: str) -> list[tuple[str, float]]:
        """The lines of a page not taken yet go to the pipeline, their ids
        to the store, in the caller's transaction. `way`: "live" (the
        socket), "fresh" or "late" (the REST passes). Returns the (id,
        timestamp) of the lines taken."""
        self._stats.read += len(page)
        ids = [log["id"] for log in page if isinstance(log, dict) and isinstance(log.get("id"), str)]
        unseen = self.store.unseen_logs(ids)
        new, remembered = [], []
        for log in page:
            log_id = log.get("id") if isinstance(log, dict) else None
            if not isinstance(log_id, str):
                self._stats.rejected += 1
                self.pipeline.reject(SOURCE, "invalid_log")
                logger.warning("a log line from Prefect without an id is passed over",
                               extra={"line": str(log)[:200]})
                continue
            if log_id not in unseen:
                self._stats.duplicates += 1
                continue
            unseen.discard(log_id)  # (the same id twice on one page)
            new.append(log)
            remembered.append((log_id, _stamp(log, until)))
        intake, no_run = self.pipeline.take_logs(new, SOURCE)
        self.store.remember_logs(remembered)
        self._stats.taken += intake.accepted
        if way == "live":
            self._stats.live += intake.accepted
        else:
            self._stats.reconciled += intake.accepted
        self._stats.no_run += no_run
        self._stats.rejected += len(intake.rejected)
        if way == "late":
            self._stats.late += intake.accepted
        for index, exc in intake.rejected[:3]:
            logger.warning("a log line from Prefect is rejected", extra={
                "reason": exc.reason, "detail": exc.detail, "log_id": new[index].get("id")})
        return remembered


def _stamp(log: dict, until: datetime) -> float:
    """The line's timestamp, to forget its id by; the window's end for a
    line whose timestamp cannot be read (rejected, but remembered)."""
    try:
        moment = datetime.fromisoformat(log["timestamp"])
    except (TypeError, KeyError, ValueError):
        return until.timestamp()
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
