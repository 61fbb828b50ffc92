"""Prefect's connection settings, read in one place (`otel_bridge.prefect_client`)
and honoured by everything that talks to a Prefect server: the reverse sink,
the subscription's websocket and REST reads, the REST reader. The end-to-end
test puts a real Prefect server (with an auth string) behind a TLS gateway
with its own certificate authority that lets through only requests carrying
a custom header."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.factories import task_run_events
from support.helpers import self_signed_certificate
from support.relay import relay

from otel_bridge.prefect_client import (
    PrefectAuthFailed,
    PrefectConfigError,
    events_socket_url,
    resolve_api,
)
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.sinks.prefect_events import PrefectEventSink
from otel_bridge.sources.prefect_rest import read_all_events
from otel_bridge.sources.prefect_subscription import PrefectSubscription

pytestmark = pytest.mark.integration

AUTH_STRING = "admin:s3cret"
GATE = ("X-Gateway-Token", "let-me-in")


def test_settings_come_from_arguments_then_prefects_variables():
    env = {
        "PREFECT_API_URL": "https://prefect.example/api/",
        "PREFECT_API_AUTH_STRING": "u:p",
        "PREFECT_API_KEY": "k",
        "PREFECT_CLIENT_CUSTOM_HEADERS": json.dumps({"X-A": "1", "Host": "evil", "X-B": 2}),
        "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "true",
    }
    api = resolve_api(env=env)
    assert api.url == "https://prefect.example/api" and not api.cloud
    basic = "Basic " + base64.b64encode(b"u:p").decode()
    # custom headers, never a protected one; the auth string before the key
    assert api.http_headers() == {"X-A": "1", "X-B": "2", "Authorization": basic}
    assert api.ws_token == "u:p"
    assert api.events_url("in") == "wss://prefect.example/api/events/in"
    context = api.ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    # arguments win
    given = resolve_api("http://h:1/api", api_key="other", auth_string=None, env={
        "PREFECT_API_KEY": "k"})
    assert (given.url, given.ws_token, given.http_headers()) == (
        "http://h:1/api", "other", {"Authorization": "Bearer other"})
    assert given.ssl_context() is None  # plain http


def test_prefect_cloud_gets_the_key():
    api = resolve_api(env={
        "PREFECT_API_URL": "https://api.prefect.cloud/api/accounts/a/workspaces/w",
        "PREFECT_API_KEY": "pnu_x", "PREFECT_API_AUTH_STRING": "u:p"})
    assert api.cloud and api.ws_token == "pnu_x"
    assert api.http_headers() == {"Authorization": "Bearer pnu_x"}
    assert resolve_api(env={"PREFECT_API_URL": "https://cloud.internal/api/x",
                            "PREFECT_CLOUD_API_URL": "https://cloud.internal/api"}).cloud


def test_settings_that_cannot_work_are_one_clear_error():
    with pytest.raises(PrefectConfigError, match="PREFECT_API_URL"):
        resolve_api(env={})
    with pytest.raises(PrefectConfigError, match="http"):
        resolve_api("localhost:4200/api", env={})
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(PrefectConfigError, match="PREFECT_CLIENT_CUSTOM_HEADERS"):
            resolve_api("http://h/api", env={"PREFECT_CLIENT_CUSTOM_HEADERS": bad})
    with pytest.raises(PrefectConfigError):
        events_socket_url("ftp://h/api", "out")


class TlsGateway:
    """A loopback TLS gateway to a Prefect server: a connection goes through
    only if its first request carries the gateway's header (HTTP 403
    otherwise), as a company proxy in front of a self-hosted Prefect would."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.passed = self.refused = 0
        self.port = 0

    async def start(self) -> "TlsGateway":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._server.close()

    async def _handle(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if f"\r\n{GATE[0]}: {GATE[1]}\r\n".lower().encode() not in head.lower():
            self.refused += 1
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self.passed += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        up_writer.write(head)
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer),
                             return_exceptions=True)


@pytest.mark.prefect_server
@pytest.mark.timeout(300)
def test_sink_subscription_and_rest_reach_prefect_behind_tls_and_a_gateway(tmp_path, monkeypatch):
    cert, key = self_signed_certificate(tmp_path)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_TLS_INSECURE_SKIP_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH_STRING)
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("PREFECT_CLIENT_CUSTOM_HEADERS", json.dumps(dict([GATE])))
    start = datetime.now(timezone.utc)
    events = [parse_wire_event(e) for e in task_run_events(
        ["Pending", "Running", "Completed"], flow_run=None, start=start)]
    wanted = {str(e.id) for e in events}

    with LocalPrefectServer(extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING}) as server:

        async def scenario():
            gateway = await TlsGateway(server.port, cert, key).start()
            url = f"https://127.0.0.1:{gateway.port}/api"
            got: set[str] = set()
            async with PrefectSubscription(url, reconcile_interval=0.5, settle_delay=1.0,
                                           since=start - timedelta(seconds=5)) as sub:
                def send():  # the sink runs its own event loop: another thread
                    with PrefectEventSink(url) as sink:
                        sink.export(events)
                await asyncio.to_thread(send)

                async def collect():
                    async for event in sub:
                        got.add(event["id"])
                        if wanted <= got:
                            return
                await asyncio.wait_for(collect(), 60)
                for _ in range(120):  # and its REST passes go through the gateway too
                    if sub.stats.rest_pages > 0:
                        break
                    await asyncio.sleep(0.25)
                stats = sub.stats
            # without the gateway's header: refused, a clear HTTP error
            monkeypatch.delenv("PREFECT_CLIENT_CUSTOM_HEADERS")
            with pytest.raises(PrefectAuthFailed, match="HTTP 403"):
                await asyncio.to_thread(read_all_events, url, start - timedelta(minutes=1),
                                        datetime.now(timezone.utc) + timedelta(minutes=1))
            # with it, the REST reader gets them all too, once the server has
            # persisted them (the live stream is ahead of its database)
            monkeypatch.setenv("PREFECT_CLIENT_CUSTOM_HEADERS", json.dumps(dict([GATE])))
            stored: set[str] = set()
            for _ in range(60):
                stored = {e["id"] for e in await asyncio.to_thread(
                    read_all_events, url, start - timedelta(minutes=1),
                    datetime.now(timezone.utc) + timedelta(minutes=1))}
                if wanted <= stored:
                    break
                await asyncio.sleep(0.5)
            await gateway.close()
            return gateway, got, stats, stored

        gateway, got, stats, stored = asyncio.run(scenario())
    assert wanted <= got and wanted <= stored
    assert stats.rest_pages > 0  # REST through the gateway, not only the websocket
    # the sink's socket, the subscription's socket and its REST client at least
    assert gateway.passed >= 3 and gateway.refused == 1
