"""PrefectSubscription against a real Prefect server running a real 500-task flow.

Ground truth is the server itself: the task runs of the flow run from
/api/task_runs/filter, and their stored state events from /api/events/filter.
Every one of those events must come out of the subscription exactly once,
also when the websocket is cut in the middle of the flow.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from support.relay import relay

from otel_bridge.backoff import Backoff
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.prefect_client import PrefectRefused, PrefectUnavailable, resolve_api
from otel_bridge.sources.prefect_rest import read_all_events
from otel_bridge.sources.prefect_subscription import PrefectSubscription
from otel_bridge.sources.prefect_ws import parse_occurred

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 500

@pytest.fixture(scope="module")
def server():
    # Default persister settings (flush every 5 s): the settle delay must cope.
    with LocalPrefectServer() as srv:
        yield srv


class CuttableProxy:
    """A loopback TCP proxy whose connections a test can cut, and which can
    refuse new ones for a while (a network outage, not a server restart)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.cuts = 0
        self._transports: set[asyncio.BaseTransport] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "CuttableProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        self.cuts += 1
        for t in list(self._transports):
            t.abort()
        self._transports.clear()

    async def _handle(self, reader, writer) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports.update({writer.transport, up_writer.transport})
        try:
            await asyncio.gather(relay(reader, up_writer, abort=True),
                                 relay(up_reader, writer, abort=True))
        except asyncio.CancelledError:
            pass  # the event loop is closing under us at the end of a test
        finally:
            self._transports.difference_update({writer.transport, up_writer.transport})


def _task_runs_of(api_url: str, flow_run_name: str) -> list[dict]:
    """The flow run's task runs, once the server has recorded all of them.

    Task runs reach the API through the server's task-run recorder, which
    consumes the events: it trails the flow by seconds, more under load.
    """
    deadline = time.monotonic() + 120
    while True:
        runs = _read_task_runs(api_url, flow_run_name)
        if (
            len(runs) >= N_TASKS and all(r["state_type"] == "COMPLETED" for r in runs)
        ) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def _read_task_runs(api_url: str, flow_run_name: str) -> list[dict]:
    with httpx.Client(timeout=30) as http:
        runs = http.post(
            f"{api_url}/flow_runs/filter",
            json={"flow_runs": {"name": {"any_": [flow_run_name]}}},
        ).json()
        assert len(runs) == 1, runs
        task_runs: list[dict] = []
        while True:
            page = http.post(
                f"{api_url}/task_runs/filter",
                json={
                    "flow_runs": {"id": {"any_": [runs[0]["id"]]}},
                    "limit": 200,
                    "offset": len(task_runs),
                },
            ).json()
            task_runs += page
            if len(page) < 200:
                return task_runs


def _stored_task_run_events(api_url: str, since: datetime, run_ids: set[str]) -> list[dict]:
    """The server's stored events of these task runs, once each run has a
    terminal one stored (persisting trails the flow by a few seconds)."""
    deadline = time.monotonic() + 90
    while True:
        events = read_all_events(
            api_url,
            since - timedelta(seconds=5),
            datetime.now(timezone.utc) + timedelta(seconds=5),
            event_prefixes=["prefect.task-run."],
        )
        ours = [e for e in events if e["resource"]["prefect.resource.id"] in run_ids]
        done = {
            e["resource"]["prefect.resource.id"]
            for e in ours
            if e["resource"].get("prefect.state-type") == "COMPLETED"
        }
        if done >= run_ids or time.monotonic() > deadline:
            return ours
        time.sleep(1)


async def _run_flow_under_subscription(server, sub_url: str, on_live=None) -> dict:
    """Run the big flow while a subscription runs; return what it delivered."""
    name = f"big-map-{uuid.uuid4().hex[:8]}"
    since = datetime.now(timezone.utc)
    delivered: list[dict] = []
    arrival: dict[str, float] = {}
    lag: dict[str, float] = {}  # seconds from `occurred` to delivery
    sub = PrefectSubscription(
        sub_url,
        since=since,
        reconcile_interval=1.0,
        settle_delay=6.0,
        backoff=Backoff(initial=0.2, maximum=2.0),
    )
    async with sub:

        async def consume():
            async for event in sub:
                delivered.append(event)
                arrival[event["id"]] = time.monotonic()
                lag[event["id"]] = (
                    datetime.now(timezone.utc) - parse_occurred(event["occurred"])
                ).total_seconds()
                if on_live is not None:
                    await on_live(sub)

        consumer = asyncio.create_task(consume())
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.prefect_flows.big_map", str(N_TASKS), name,
            cwd=str(REPO), env=server.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 300)
        flow_done = time.monotonic()
        assert proc.returncode == 0, output.decode(errors="replace")[-3000:]

        task_runs = await asyncio.to_thread(_task_runs_of, server.api_url, name)
        run_ids = {f"prefect.task-run.{r['id']}" for r in task_runs}
        stored = await asyncio.to_thread(_stored_task_run_events, server.api_url, since, run_ids)
        want = {e["id"] for e in stored}

        # Wait until the subscription has delivered all of them (or time out).
        deadline = time.monotonic() + 120
        while not want <= set(arrival) and time.monotonic() < deadline:
            assert not consumer.done(), consumer.exception()
            await asyncio.sleep(0.5)
        stats = sub.stats
        last = max((arrival[i] for i in want if i in arrival), default=flow_done)
    consumer.cancel()
    return dict(
        task_runs=task_runs, run_ids=run_ids, stored=stored, want=want,
        delivered=delivered, stats=stats, flow_seconds=flow_done - started,
        catch_up_seconds=last - flow_done, output=output.decode(errors="replace"),
        lags=sorted(lag[i] for i in want if i in lag),
    )


def _check_complete_and_once(result: dict) -> None:
    task_runs, run_ids, stored = result["task_runs"], result["run_ids"], result["stored"]
    assert len(task_runs) == N_TASKS
    assert all(r["state_type"] == "COMPLETED" for r in task_runs)

    # The server's own record: every run that ran has its three state events.
    per_run = Counter(e["resource"]["prefect.resource.id"] for e in stored)
    assert set(per_run) == run_ids
    assert all(n >= 3 for n in per_run.values()), per_run.most_common()[-3:]

    counts = Counter(e["id"] for e in result["delivered"])
    twice = [i for i, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} events delivered more than once"
    missing = result["want"] - set(counts)
    assert not missing, (
        f"{len(missing)} of {len(result['want'])} stored task-run events never "
        f"delivered; stats {result['stats']}"
    )
    for e in result["delivered"]:
        assert e["event"].startswith(("prefect.task-run.", "prefect.flow-run."))


def _report(label: str, result: dict) -> None:
    s, lags = result["stats"], result["lags"] or [float("nan")]
    print(
        f"\n[{label}] {len(result['task_runs'])} task runs, {len(result['want'])} task-run "
        f"events stored; delivered {len(result['delivered'])} events: live {s.live}, "
        f"reconciled {s.reconciled} (by a late pass {s.reconciled_late}), late {s.late}, duplicates suppressed {s.duplicates}, "
        f"reconnects {s.reconnects}, REST pages {s.rest_pages}, REST errors {s.rest_errors}, "
        f"ids remembered {s.remembered_ids}; flow {result['flow_seconds']:.1f}s, last event "
        f"delivered {result['catch_up_seconds']:.1f}s after the flow process exited; "
        f"occurred->delivered median {lags[len(lags) // 2]:.1f}s, max {lags[-1]:.1f}s"
    )


@pytest.mark.prefect_server
@pytest.mark.timeout(420)
def test_500_task_flow_every_state_event_once(server):
    result = asyncio.run(_run_flow_under_subscription(server, server.api_url))
    _report("500 tasks", result)
    _check_complete_and_once(result)
    s = result["stats"]
    assert s.live > 0 and s.live + s.reconciled == len(result["delivered"])


@pytest.mark.prefect_server
@pytest.mark.timeout(420)
def test_websocket_cut_mid_flow_loses_nothing(server):
    async def scenario():
        proxy = await CuttableProxy(server.port).start()
        # Live events delivered before each cut: early enough that a loaded
        # machine, whose live stream drops more, still gets both mid-flow.
        cuts_at = [50, 150]

        async def outage():
            # Cut everything (websocket and any REST read in flight) and stay
            # unreachable for 3 s, so events pass us by meanwhile.
            proxy.refusing = True
            proxy.cut()
            await asyncio.sleep(3)
            proxy.refusing = False

        outages = []

        async def on_event(sub):
            if cuts_at and sub.stats.live >= cuts_at[0]:
                cuts_at.pop(0)
                outages.append(asyncio.create_task(outage()))

        try:
            return await _run_flow_under_subscription(
                server, f"http://127.0.0.1:{proxy.port}/api", on_live=on_event
            ), proxy.cuts
        finally:
            await proxy.close()

    result, cuts = asyncio.run(scenario())
    _report("500 tasks, websocket cut twice", result)
    assert cuts == 2, "the flow ended before the cuts could happen"
    assert result["stats"].reconnects >= 2
    _check_complete_and_once(result)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _first_event(sub: PrefectSubscription, timeout: float):
    async with sub:
        async for event in sub:
            return event


def test_a_paged_read_asks_for_each_next_page_at_our_own_url():
    from otel_bridge.prefect_client.rest import page_requests

    flt = {"occurred": {"since": "a", "until": "b"}}
    requests = page_requests("https://us/api", flt, 50)
    assert next(requests) == ("POST", "https://us/api/events/filter",
                              {"json": {"filter": flt, "limit": 50}})
    # the server names itself as it was reached (wrong behind a proxy): only its token is used
    page = {"events": [], "next_page": "http://internal:4200/api/events/filter/next?page-token=T1"}
    assert requests.send(page) == ("GET", "https://us/api/events/filter/next",
                                   {"params": {"page-token": "T1"}})
    with pytest.raises(StopIteration):
        requests.send({"events": [], "next_page": None})


@pytest.mark.timeout(60)
def test_dead_server_gives_up_after_bounded_attempts():
    sub = PrefectSubscription(
        f"http://127.0.0.1:{_dead_port()}/api",
        backoff=Backoff(initial=0.1, maximum=0.5, max_attempts=4),
        reconcile_interval=0.2,
        settle_delay=0.5,
    )
    started = time.monotonic()
    with pytest.raises(PrefectUnavailable, match="gave up .* after 4 failed attempts"):
        asyncio.run(asyncio.wait_for(_first_event(sub, 30), 30))
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_dead_server_unbounded_keeps_retrying_with_capped_delay_and_stops_cleanly():
    async def scenario():
        sub = PrefectSubscription(
            f"http://127.0.0.1:{_dead_port()}/api",
            backoff=Backoff(initial=0.05, maximum=0.4),
            reconcile_interval=0.2,
            settle_delay=0.5,
        )
        async with sub:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(anext(sub.__aiter__()), 4)
            stream = sub._stream
            assert stream is not None and stream.connections == 0
            # Capped at 0.4 s: at least ~8 attempts in 4 s, not a stuck wait.
            assert stream.connect_failures >= 6, stream.connect_failures
            assert sub.stats.rest_errors >= 5
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3

    asyncio.run(scenario())


@pytest.mark.prefect_server
@pytest.mark.timeout(60)
def test_wrong_url_is_a_clear_error_not_a_retry_loop(server):
    # A live server, but not its API path: the answer will not change.
    root = server.api_url[: -len("/api")] + "/not-the-api"
    sub = PrefectSubscription(root, reconcile_interval=0.2, settle_delay=0.5)
    with pytest.raises(PrefectRefused, match="HTTP 4"):
        asyncio.run(asyncio.wait_for(_first_event(sub, 20), 20))


def test_no_url_is_a_clear_error():
    with pytest.raises(ValueError, match="PREFECT_API_URL"):
        resolve_api(env={})
    with pytest.raises(ValueError, match="http"):
        resolve_api("localhost:4200/api", env={})
    api = resolve_api(env={"PREFECT_API_URL": "http://h:1/api/", "PREFECT_API_KEY": "k"})
    assert (api.url, api.ws_token, api.http_headers()) == (
        "http://h:1/api", "k", {"Authorization": "Bearer k"},
    )
