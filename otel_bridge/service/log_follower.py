"""`serve`'s follower of Prefect's log lines: REST passes
(`sources.prefect_logs`) -> dedup by id -> the pipeline's outbox ("log").

Every page is taken in one transaction with the ids it brought (the store's
``seen_logs``), and a pass's mark is saved once its window is read whole: a
restart reads again from the marks and passes over the ids it took, so it
neither loses nor repeats a line. Ids are forgotten once the late pass's
mark is past their timestamp: no pass reads them again.

Mode: REST polling, always (`MODE`). The logs websocket is off on a server
with default settings and then silent, not closed (see
`sources.prefect_logs`); using it where it is on is a follow-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import httpx

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import PrefectUnavailable
from otel_bridge.service.pipeline import Pipeline
from otel_bridge.service.store import Store
from otel_bridge.sources.prefect_logs import LogPass, PrefectLogReader

__all__ = ["MARKS_KEY", "MODE", "SOURCE", "LogFollower", "LogFollowerStats"]

logger = logging.getLogger(__name__)

MODE = "rest"
MARKS_KEY = "prefect_logs_marks"
SOURCE = "prefect-logs"  # the endpoint label of rejected lines
# The fresh pass reads up to this long before now: a client sends its lines
# every 2 s (PREFECT_LOGGING_TO_API_BATCH_INTERVAL), the server stores them
# at once.
SETTLE_SECONDS = 3.0


@dataclass
class LogFollowerStats:
    read: int = 0  # lines the server sent
    taken: int = 0  # put in the outbox
    duplicates: int = 0  # read again (window edges, the late pass): passed over
    no_run: int = 0  # of no flow run or task run: passed over
    rejected: int = 0  # not log lines
    late: int = 0  # found by the late pass only: stored after the fresh pass went by
    pages: int = 0
    passes: int = 0
    rest_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LogFollower:
    def __init__(self, store: Store, pipeline: Pipeline, reader: PrefectLogReader, *,
                 since: datetime, poll_seconds: float, lateness_seconds: float,
                 backoff: Backoff = Backoff()):
        self.store, self.pipeline, self.reader = store, pipeline, reader
        self.backoff = backoff
        self.stats = LogFollowerStats()
        fresh, late = self._stored_marks() or (since, since)
        self.fresh = LogPass("fresh", SETTLE_SECONDS, poll_seconds, fresh)
        self.late = LogPass("late", max(lateness_seconds, SETTLE_SECONDS),
                            max(lateness_seconds / 4, poll_seconds), late)

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
        """Read until cancelled. Raises `PrefectError` for an answer that
        will not change, or once the server has been unreachable as long
        as `backoff` allows."""
        loop = asyncio.get_running_loop()
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
                await asyncio.sleep(self.backoff.delay(failures) if failures else self.fresh.every)
        finally:
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
            self.stats.pages += 1
            with self.store.transaction():
                self._take(page, until, late=p is self.late)
        # Only a window read whole moves the mark: a failed one is read again.
        p.mark = until
        self.stats.passes += 1
        with self.store.transaction():
            self.store.set_meta(MARKS_KEY, json.dumps(
                {"fresh": self.fresh.mark.isoformat(), "late": self.late.mark.isoformat()}))
            if p is self.late:
                # Behind the late mark, no pass reads a line again; a minute of slack
                # for lines a page boundary or clock rounding puts on the edge.
                self.store.forget_logs_before((p.mark - timedelta(minutes=1)).timestamp())

    def _take(self, page: list[Any], until: datetime, late: bool) -> None:
        """The lines of a page not taken yet go to the pipeline, their ids
        to the store, in the caller's transaction."""
        self.stats.read += len(page)
        ids = [log["id"] for log in page if isinstance(log, dict) and isinstance(log.get("id"), str)]
        unseen = self.store.unseen_logs(ids)
        new, remembered = [], []
        for log in page:
            log_id = log.get("id") if isinstance(log, dict) else None
            if not isinstance(log_id, str):
                self.stats.rejected += 1
                self.pipeline.reject(SOURCE, "invalid_log")
                logger.warning("a log line from Prefect without an id is passed over",
                               extra={"line": str(log)[:200]})
                continue
            if log_id not in unseen:
                self.stats.duplicates += 1
                continue
            unseen.discard(log_id)  # (the same id twice on one page)
            new.append(log)
            remembered.append((log_id, _stamp(log, until)))
        intake, no_run = self.pipeline.take_logs(new, SOURCE)
        self.store.remember_logs(remembered)
        self.stats.taken += intake.accepted
        self.stats.no_run += no_run
        self.stats.rejected += len(intake.rejected)
        if late:
            self.stats.late += intake.accepted
        for index, exc in intake.rejected[:3]:
            logger.warning("a log line from Prefect is rejected", extra={
                "reason": exc.reason, "detail": exc.detail, "log_id": new[index].get("id")})


def _stamp(log: dict, until: datetime) -> float:
    """The line's timestamp, to forget its id by; the window's end for a
    line whose timestamp cannot be read (rejected, but remembered)."""
    try:
        moment = datetime.fromisoformat(log["timestamp"])
    except (TypeError, KeyError, ValueError):
        return until.timestamp()
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
