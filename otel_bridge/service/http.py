"""The service's own HTTP endpoints: probes, metrics, and event push.

    GET  /healthz     200 while the service works; 503 once it cannot recover
    GET  /readyz      200 while it takes input; 503 starting, stopping, outbox full
    GET  /metrics     Prometheus text format
    POST /v1/events   Prefect events: one JSON event, a JSON array, or JSON lines;
                      `Authorization: Bearer <push_token>`; off without a token

A push answers once its events are on disk. Items that are not valid events
are listed in the answer (`rejected`, with item number, reason and detail)
and the others are taken: 200 when any was taken or the body was empty, 400
when every item was refused, 413 over the body limit, 401 without the token,
503 while the service stops or its span outbox is full (retry later: taking
the events would only drop their spans). Event ids make a
retried push harmless.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from otel_bridge.service.auth import bearer_matches
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import Pipeline
from otel_bridge.sources.event_body import BodyItemRejected, events_from_body

__all__ = ["admin_app"]

logger = logging.getLogger(__name__)

_EVENTS_PER_SLICE = 250  # pushed events taken between two turns of the event loop

PUSH = "push"


class Probes(Protocol):
    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


def admin_app(
    probes: Probes,
    metrics: Metrics,
    pipeline: Pipeline,
    push_token: Optional[str],
    max_body_bytes: int,
    accepting: Callable[[], Optional[str]],
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)

    async def healthz(request: web.Request) -> web.Response:
        ok, details = probes.health()
        return web.json_response(details, status=200 if ok else 503)

    async def readyz(request: web.Request) -> web.Response:
        ok, details = probes.readiness()
        return web.json_response(details, status=200 if ok else 503)

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def push(request: web.Request) -> web.Response:
        if not push_token:
            return _error(404, "the push endpoint is off: set push_token to turn it on")
        supplied = request.headers.get("Authorization", "")
        if not bearer_matches(supplied, push_token):
            pipeline.reject(PUSH, "unauthorized")
            return _error(401, "missing or wrong bearer token",
                          headers={"WWW-Authenticate": 'Bearer realm="otel-bridge"'})
        refusal = accepting()
        if refusal:
            return _error(503, refusal, headers={"Retry-After": "5"})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            pipeline.reject(PUSH, "too_large")
            return _error(413, f"the body is over the limit of {max_body_bytes} bytes")
        items, refused = events_from_body(body)
        for item in refused:
            pipeline.reject(PUSH, item.reason)
        # take_events counts its own refusals. A slice at a time, each its
        # own transaction, the event loop free between two; the answer
        # comes once all are on disk (a crash before it: the sender sends
        # again, and what was in already counts as duplicates).
        accepted = 0
        for start in range(0, len(items), _EVENTS_PER_SLICE):
            if start:
                await asyncio.sleep(0)
            chunk = items[start:start + _EVENTS_PER_SLICE]
            intake = pipeline.take_events([item.event for item in chunk], PUSH,
                                          [item.raw for item in chunk])
            accepted += intake.accepted
            for index, exc in intake.rejected:
                refused.append(BodyItemRejected(chunk[index].number, exc.reason, exc.detail))
        refused.sort(key=lambda r: r.item)
        if refused:
            logger.warning("push: items rejected", extra={
                "accepted": accepted, "rejected": len(refused),
                "first": refused[0].as_json()})
        status = 400 if refused and not accepted else 200
        return web.json_response(
            {"accepted": accepted, "rejected": [r.as_json() for r in refused[:100]],
             "rejected_count": len(refused)},
            status=status)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_post("/v1/events", push)
    return app


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
