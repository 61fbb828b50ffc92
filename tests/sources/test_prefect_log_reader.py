"""The REST reader of Prefect's log lines: pages by timestamp, and what a
server in trouble or a refusal raises (the follower retries the one and
stops on the other). The happy path runs against a real Prefect server in
tests/end_to_end/test_serve_logs_to_collector.py; the answers a real server
will not give on demand come from an aiohttp server speaking its format."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from aiohttp import web
from support.factories import prefect_log

from otel_bridge.prefect_client import PrefectAuthFailed, PrefectRefused
from otel_bridge.sources.prefect_logs import PrefectLogReader

NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)


async def _read_with(answers: list, page_size: int = 2):
    """Serve the answers in turn at /api/logs/filter; read one window."""
    bodies = []

    async def logs_filter(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        status, payload = answers.pop(0)
        if isinstance(payload, (bytes, str)):
            return web.Response(status=status, body=payload)
        return web.json_response(payload, status=status)

    app = web.Application()
    app.router.add_post("/api/logs/filter", logs_filter)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    reader = PrefectLogReader(f"http://127.0.0.1:{port}/api", page_size=page_size)
    try:
        pages = [page async for page in reader.read_window(NOW - timedelta(minutes=1), NOW)]
        return pages, bodies
    finally:
        await reader.close()
        await runner.cleanup()


def _lines(n: int, start: int = 0) -> list[dict]:
    return [prefect_log(message=f"line {i}", timestamp=(NOW - timedelta(seconds=50 - i)).isoformat())
            for i in range(start, start + n)]


def test_pages_are_read_until_a_short_one_from_the_last_timestamp():
    first, second = _lines(2), _lines(1, 2)
    pages, bodies = asyncio.run(_read_with([(200, first), (200, second)]))
    assert pages == [first, second]
    assert bodies[1]["logs"]["timestamp"]["after_"].startswith(first[-1]["timestamp"][:19])
    assert all(body["limit"] == 2 for body in bodies)


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_a_server_in_trouble_raises_a_status_error_to_retry(status):
    with pytest.raises(httpx.HTTPStatusError) as caught:
        asyncio.run(_read_with([(status, {"detail": "busy"})]))
    assert caught.value.response.status_code == status


@pytest.mark.parametrize("status, error", [(401, PrefectAuthFailed), (403, PrefectAuthFailed),
                                           (404, PrefectRefused), (302, PrefectRefused)])
def test_a_refusal_raises_what_will_not_change(status, error):
    with pytest.raises(error):
        asyncio.run(_read_with([(status, {"detail": "no"})]))


@pytest.mark.parametrize("payload", [b"<html>not json</html>", {"logs": []}])
def test_an_answer_that_is_not_a_page_is_a_decoding_error(payload):
    with pytest.raises(httpx.DecodingError):
        asyncio.run(_read_with([(200, payload)]))


def test_nothing_listening_is_a_transport_error():
    async def read():
        reader = PrefectLogReader("http://127.0.0.1:9/api", http_timeout=5)
        try:
            return [page async for page in reader.read_window(NOW - timedelta(minutes=1), NOW)]
        finally:
            await reader.close()

    with pytest.raises(httpx.TransportError):
        asyncio.run(read())
