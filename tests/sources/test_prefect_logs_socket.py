"""`PrefectLogSocket` against a small server speaking Prefect 3.9.1's logs
websocket protocol (prefect/server/api/logs.py): the subprotocol, the auth
and filter messages it sends, the batches of `log` frames it yields, and
that it reconnects after a drop and after a refusal, never giving up."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.server import serve

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import resolve_api
from otel_bridge.sources.prefect_logs import PrefectLogSocket

FAST = Backoff(initial=0.01, maximum=0.05, jitter=0, max_attempts=1)


class FakeLogsServer:
    """/api/logs/out: auth, then filter, then what the test scripts per
    connection (a list of frames to send, then "drop", "refuse", or stay)."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.received: list[list] = []  # per connection: the messages the client sent
        self.subprotocols: list = []
        self.paths: list[str] = []
        self.port = 0

    async def handler(self, ws):
        self.paths.append(ws.request.path)
        self.subprotocols.append(ws.subprotocol)
        messages = [json.loads(await ws.recv())]
        self.received.append(messages)
        script = self.scripts.pop(0) if self.scripts else ["stay"]
        if script == ["refuse"]:
            await ws.close(1008, "Invalid token")
            return
        await ws.send(json.dumps({"type": "auth_success"}))
        messages.append(json.loads(await ws.recv()))
        for step in script:
            if step == "drop":
                ws.transport.abort()
                return
            if step == "stay":
                await asyncio.Future()
            await ws.send(json.dumps(step))
        await asyncio.Future()

    async def __aenter__(self):
        self._server = await serve(self.handler, "127.0.0.1", 0, subprotocols=["prefect"])
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self._server.close()


def log_frame(n: int) -> dict:
    return {"type": "log", "log": {"id": f"id-{n}", "created": None, "message": f"line {n}"}}


async def _collect(socket: PrefectLogSocket, lines: int, seconds: float = 10.0) -> list[list]:
    batches: list[list] = []

    async def read():
        async for batch in socket.batches():
            batches.append(batch)
            if sum(map(len, batches)) >= lines:
                return

    await asyncio.wait_for(read(), seconds)
    await socket.close()
    return batches


def _socket(server: FakeLogsServer, **options) -> PrefectLogSocket:
    api = resolve_api(f"http://127.0.0.1:{server.port}/api", env={"PREFECT_API_AUTH_STRING": "u:p"})
    return PrefectLogSocket(api, backoff=FAST, **options)


def test_it_authenticates_subscribes_to_every_line_and_yields_the_log_objects():
    async def scenario():
        async with FakeLogsServer([[log_frame(1), {"type": "other"}, log_frame(2)]]) as server:
            socket = _socket(server)
            batches = await _collect(socket, 2)
            return server, socket, batches

    server, socket, batches = asyncio.run(scenario())
    assert server.paths == ["/api/logs/out"] and server.subprotocols == ["prefect"]
    assert server.received[0] == [{"type": "auth", "token": "u:p"},
                                  {"type": "filter", "filter": {}}]
    lines = [line for batch in batches for line in batch]
    assert [line["id"] for line in lines] == ["id-1", "id-2"]  # the other frame passed over
    assert (socket.connections, socket.lines) == (1, 2)


def test_frames_that_come_together_are_one_batch():
    async def scenario():
        async with FakeLogsServer([[log_frame(n) for n in range(5)]]) as server:
            return await _collect(_socket(server, gather_seconds=0.5), 5)

    batches = asyncio.run(scenario())
    assert [len(b) for b in batches] == [5]


def test_it_reconnects_after_a_drop_and_a_refusal_with_no_attempt_limit():
    # max_attempts=1 in FAST: the socket does not heed it (REST decides).
    async def scenario():
        scripts = [[log_frame(1), "drop"], ["refuse"], ["refuse"], [log_frame(2)]]
        async with FakeLogsServer(scripts) as server:
            socket = _socket(server)
            states = []
            batches = await _collect(socket, 2)
            states.append((socket.connected_since, socket.down_since is not None))
            return server, socket, batches, states

    server, socket, batches, states = asyncio.run(scenario())
    assert [line["id"] for batch in batches for line in batch] == ["id-1", "id-2"]
    assert len(server.received) == 4
    assert socket.connections == 2 and socket.failures == 3  # a drop, two refusals
    assert states == [(None, True)]  # closed: down
