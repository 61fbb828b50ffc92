"""PrefectEventSink against a real local Prefect server, including a real cut
connection (a TCP proxy in the middle that aborts its sockets mid-batch)."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from support.factories import task_run_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.prefect_client import (
    PrefectAuthFailed,
    PrefectConfigError,
    PrefectRefused,
    PrefectUnavailable,
)
from otel_bridge.sinks.prefect_events import PrefectEventSink
from otel_bridge.sources.prefect_rest import read_events

pytestmark = pytest.mark.integration

AUTH_STRING = "otel:bridge-secret"
BASIC = {"Authorization": "Basic " + base64.b64encode(AUTH_STRING.encode()).decode()}
WIRE_FIELDS = ("id", "event", "occurred", "resource", "related", "payload", "follows")


@pytest.fixture(autouse=True)
def _no_inherited_prefect_config(monkeypatch):
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING",
                 "PREFECT_CLIENT_CUSTOM_HEADERS", "PREFECT_CLOUD_API_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server():
    # Auth on, so that a wrong credential can be tested against the real check.
    with LocalPrefectServer(extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING}) as srv:
        yield srv


def make_events(runs: list[list[str]], start: datetime):
    """Events of one task run per state list, `occurred` near `start`."""
    events = []
    for i, states in enumerate(runs):
        raw = task_run_events(states, flow_run=None, start=start + timedelta(seconds=i * 0.01))
        events += [parse_wire_event(e) for e in raw]
    return events


def stored(server, events, *, expect: int, timeout: float = 30.0) -> list[dict]:
    """The server's stored copies of `events`' resources, once `expect` arrived."""
    ids = sorted({e.resource_id for e in events})
    since = min(e.occurred for e in events) - timedelta(minutes=1)
    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for i in range(0, len(ids), 50):
            found += read_events(server.api_url, since, until, resource_ids=ids[i:i + 50],
                                 headers=BASIC)
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- configuration and failures without a server --------------------------------


def test_missing_api_url_is_a_clear_error():
    with pytest.raises(PrefectConfigError, match="PREFECT_API_URL"):
        PrefectEventSink()


def test_configuration_from_environment(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "https://prefect.example/api/")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "u:p")
    sink = PrefectEventSink()
    assert sink.url == "wss://prefect.example/api/events/in"
    assert sink.api.ws_token == "u:p"
    assert sink.api.http_headers()["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    # Constructor arguments win over the environment.
    assert PrefectEventSink("http://h:1/api", auth_string="x:y").api.ws_token == "x:y"


def test_unreachable_server_fails_within_bounds():
    events = make_events([["Pending", "Running"]], datetime.now(timezone.utc))
    sink = PrefectEventSink(f"http://127.0.0.1:{free_port()}/api",
                            reconnection_attempts=3, backoff=0.05)
    t0 = time.monotonic()
    with sink, pytest.raises(PrefectUnavailable, match="2 of 2 events not confirmed") as info:
        sink.export(events)
    assert time.monotonic() - t0 < 10
    assert info.value.unconfirmed == 2
    assert "Connect" in str(info.value) or "refused" in str(info.value).lower()


def test_oversized_events_are_refused_before_sending():
    small, big = make_events([["Pending", "Running"]], datetime.now(timezone.utc))
    big = big.model_copy(update={"payload": {"blob": "x" * 1_500_000}})
    sink = PrefectEventSink(f"http://127.0.0.1:{free_port()}/api")
    with sink, pytest.raises(PrefectRefused, match="1 events exceed") as info:
        sink.export([small, big])
    assert info.value.unconfirmed == 2 and sink.sent == 0


def test_silent_server_times_out_instead_of_hanging():
    # Accepts TCP (the kernel's backlog) but never answers the upgrade.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        events = make_events([["Pending"]], datetime.now(timezone.utc))
        sink = PrefectEventSink(f"http://127.0.0.1:{port}/api", open_timeout=0.5,
                                reconnection_attempts=1, backoff=0.05)
        t0 = time.monotonic()
        with sink, pytest.raises(PrefectUnavailable, match="not confirmed"):
            sink.export(events)
        assert time.monotonic() - t0 < 10


# -- against a real server ------------------------------------------------------


@pytest.mark.prefect_server
def test_events_arrive_unchanged_and_the_recorder_builds_task_runs(server, monkeypatch):
    runs = [["Pending", "Running", "Completed"],
            ["Pending", "Running", "Failed"],
            ["Pending", "Running", "Retrying", "Completed"],
            ["Pending", "NotReady"]]
    events = make_events(runs, datetime.now(timezone.utc) - timedelta(seconds=30))
    # Configured from the environment, as a CLI would be.
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH_STRING)
    with PrefectEventSink() as sink:
        sink.export(events)
    confirmed_at = time.monotonic()
    assert (sink.sent, sink.resent, sink.reconnects, sink.confirmed) == (len(events), 0, 0, len(events))

    found = stored(server, events, expect=len(events))
    persisted_after = time.monotonic() - confirmed_at
    by_id = {e["id"]: e for e in found}
    assert len(found) == len(by_id) == len(events)
    for event in events:
        sent = event.to_json_dict()
        got = by_id[str(event.id)]
        for field in WIRE_FIELDS:
            if field == "occurred":
                assert parse_wire_event(got).occurred == event.occurred
            else:
                assert got[field] == sent[field], field

    # The task-run recorder turns client-orchestrated events into task runs.
    with httpx.Client(headers=BASIC, timeout=10) as http:
        for states, first in zip(runs, _firsts(events)):
            run_id = first.resource_id.removeprefix("prefect.task-run.")
            expected = [e for e in events if e.resource_id == first.resource_id][-1]
            deadline = time.monotonic() + 20
            while True:
                resp = http.get(f"{server.api_url}/task_runs/{run_id}")
                if resp.status_code == 200 and resp.json()["state_name"] == states[-1]:
                    break
                assert time.monotonic() < deadline, (resp.status_code, resp.text[:300])
                time.sleep(0.2)
            run = resp.json()
            assert run["state_type"] == expected.resource["prefect.state-type"]
            assert run["state_id"] == str(expected.id)
            assert run["flow_run_id"] is None
            assert run["name"] == "add-50d"
    print(f"after confirmation: stored events readable in {persisted_after:.2f}s, "
          f"task runs recorded in {time.monotonic() - confirmed_at:.2f}s")


def _firsts(events):
    seen, out = set(), []
    for e in events:
        if e.resource_id not in seen:
            seen.add(e.resource_id)
            out.append(e)
    return out


@pytest.mark.prefect_server
def test_wrong_credentials_are_a_clear_error_not_a_retry_loop(server):
    events = make_events([["Pending"]], datetime.now(timezone.utc))
    t0 = time.monotonic()
    with PrefectEventSink(server.api_url, auth_string="otel:wrong") as sink:
        with pytest.raises(PrefectAuthFailed, match="Invalid token") as info:
            sink.export(events)
    assert time.monotonic() - t0 < 5
    assert info.value.unconfirmed == 1
    # An API key is offered as the token when there is no auth string.
    with PrefectEventSink(server.api_url, api_key="pnu_wrong") as sink:
        with pytest.raises(PrefectAuthFailed, match="Invalid token"):
            sink.export(events)
    # No credentials at all: the server wants the token.
    with PrefectEventSink(server.api_url) as sink:
        with pytest.raises(PrefectAuthFailed):
            sink.export(events)


class CuttingProxy:
    """A loopback TCP proxy that aborts every open connection (both sides)
    each time the client->server byte count crosses one of `cut_at`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.cut_at: list[int] = []
        self.bytes_up = 0
        self.cuts = 0
        self.connections = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def close(self):
        async def stop():
            self._server.close()
            self._cut_all()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, up=True),
                             self._pipe(up_reader, writer, up=False))
        self._open -= {writer, up_writer}

    async def _pipe(self, reader, writer, *, up: bool):
        try:
            while data := await reader.read(65536):
                if up and self.cut_at and self.bytes_up + len(data) >= self.cut_at[0]:
                    # Forward only part of the chunk: the server sees a torn frame.
                    part = self.cut_at.pop(0) - self.bytes_up
                    writer.write(data[:part])
                    self.bytes_up += part
                    self.cuts += 1
                    self._cut_all()
                    return
                if up:
                    self.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _cut_all(self):
        for w in list(self._open):
            w.transport.abort()  # RST, no goodbye: a real connection loss
        self._open.clear()


@pytest.mark.prefect_server
def test_cut_connections_lose_nothing_and_duplicate_nothing(server):
    proxy = CuttingProxy(int(server.port))
    api_url = f"http://127.0.0.1:{proxy.port}/api"
    start = datetime.now(timezone.utc) - timedelta(seconds=60)
    try:
        with PrefectEventSink(api_url, auth_string=AUTH_STRING, checkpoint_every=50,
                              backoff=0.05) as sink:
            # Calibrate bytes per event (frames are deflate-compressed).
            warmup = make_events([["Pending", "Running", "Completed"]] * 10, start)
            sink.export(warmup)
            per_event = proxy.bytes_up / len(warmup)
            batch = make_events([["Pending", "Running", "Completed"]] * 120, start)  # 360 events
            expected = proxy.bytes_up + per_event * len(batch)
            # Early fractions: the estimate runs high (deflate improves as
            # a connection ages), so late cuts might never be reached.
            proxy.cut_at = [int(proxy.bytes_up + per_event * len(batch) * f) for f in (0.15, 0.4, 0.65)]
            t0 = time.monotonic()
            sink.export(batch)
            elapsed = time.monotonic() - t0
        print(f"{len(batch)} events in {elapsed:.2f}s; cuts={proxy.cuts} "
              f"reconnects={sink.reconnects} resent={sink.resent} "
              f"bytes {proxy.bytes_up} (~{expected:.0f} without resends)")
        assert proxy.cuts >= 2
        # Not == cuts: a cut can land in a reconnect's own handshake.
        assert sink.reconnects >= 1
        assert sink.resent > 0
        assert sink.sent == len(warmup) + len(batch)
        assert sink.confirmed == len(warmup) + len(batch)
    finally:
        proxy.close()

    found = stored(server, batch, expect=len(batch))
    ids = [e["id"] for e in found]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    missing = {str(e.id) for e in batch} - set(ids)
    assert not missing, f"{len(missing)} of {len(batch)} events lost"
    assert len(ids) == len(batch)
