"""Fresh events from a real Prefect server, read both ways: live from the
websocket and complete from the REST API.  Checks the readers against each
other and the event shapes the bridge relies on (state sequences, `follows`)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.sources.prefect_rest import read_all_events
from otel_bridge.sources.prefect_ws import PrefectEventStream

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# scenario -> {task name without its 3-character suffix: terminal states}
EXPECTED = {
    "success": {"add": ["Completed", "Completed"]},
    "failure": {"add": ["Completed"], "boom": ["Failed"]},
}


@pytest.fixture(scope="module")
def server():
    # A short persister flush only makes the test quicker; events are unchanged.
    with LocalPrefectServer(
        extra_env={"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5"}
    ) as srv:
        yield srv


async def _run_and_listen(server: LocalPrefectServer, scenario: str):
    frames: list[dict] = []
    since = datetime.now(timezone.utc)
    async with PrefectEventStream(server.api_url, backfill=False) as stream:

        async def listen():
            async for text in stream.frames():
                frames.append(json.loads(text))

        listener = asyncio.create_task(listen())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.prefect_flows.scenarios", scenario,
            cwd=str(REPO), env=server.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 180)
        # Flow-run events come from the server and can trail the process exit;
        # give the live stream a moment to deliver them.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            f["event"]["event"].startswith("prefect.flow-run.") and
            f["event"]["resource"].get("prefect.state-type") in ("COMPLETED", "FAILED")
            for f in frames
        ):
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        listener.cancel()
        try:
            await listener
        except asyncio.CancelledError:
            pass
    return since, frames, output.decode(errors="replace")


def _stored(server, since, want_ids, timeout=30.0):
    """REST events from `since` on, once every id in want_ids is stored."""
    deadline = time.monotonic() + timeout
    while True:
        until = datetime.now(timezone.utc) + timedelta(seconds=1)
        events = read_all_events(server.api_url, since, until)
        if want_ids <= {e["id"] for e in events} or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


@pytest.mark.prefect_server
@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_rest_has_everything_the_websocket_delivered(server, scenario):
    since, frames, output = asyncio.run(_run_and_listen(server, scenario))

    assert all(f["type"] == "event" for f in frames)
    ws_task_ids = {
        f["event"]["id"] for f in frames
        if f["event"]["event"].startswith("prefect.task-run.")
    }
    assert ws_task_ids, f"the websocket delivered no task-run events; scenario output:\n{output}"

    rest = _stored(server, since, ws_task_ids)
    rest_ids = [e["id"] for e in rest]
    assert len(rest_ids) == len(set(rest_ids)), "REST returned an event twice"
    missing = ws_task_ids - set(rest_ids)
    assert not missing, f"REST lacks {len(missing)} task-run events the websocket delivered"

    occurred = [e["occurred"] for e in rest]
    assert occurred == sorted(occurred, key=lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")))

    runs: dict[str, list[dict]] = defaultdict(list)
    for e in rest:
        if e["event"].startswith("prefect.task-run."):
            runs[e["resource"]["prefect.resource.id"]].append(e)

    terminals: dict[str, list[str]] = defaultdict(list)
    for rid, seq in runs.items():
        names = [e["resource"]["prefect.state-name"] for e in seq]
        assert [e["event"] for e in seq] == [f"prefect.task-run.{n}" for n in names]
        assert names[0] == "Pending", f"{rid}: {names}"
        assert names[-1] in ("Completed", "Failed"), f"{rid}: {names}"
        assert names == ["Pending", "Running", names[-1]], f"{rid}: {names}"
        assert seq[-1]["resource"]["prefect.state-type"] == names[-1].upper()
        # Each event of a run follows the one before it; the first follows none.
        assert seq[0].get("follows") is None, f"{rid}: first event follows {seq[0]['follows']}"
        for prev, nxt in zip(seq, seq[1:]):
            assert nxt["follows"] == prev["id"], f"{rid}: {nxt['event']} does not follow {prev['event']}"
        task_name = seq[0]["resource"]["prefect.resource.name"].rsplit("-", 1)[0]
        terminals[task_name].append(names[-1])

    assert {k: sorted(v) for k, v in terminals.items()} == EXPECTED[scenario]

    flow_states = [
        e["resource"]["prefect.state-name"] for e in rest
        if e["event"].startswith("prefect.flow-run.") and "prefect.state-name" in e["resource"]
    ]
    assert flow_states[-1] == ("Failed" if scenario == "failure" else "Completed")
