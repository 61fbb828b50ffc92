"""The Prefect client's shared parts without a server: one family of errors,
one reading of an HTTP answer for the REST API and the websocket upgrade
alike. (Against a real server: prefect_client/test_settings,
sinks/test_prefect_events, sources/test_prefect_subscription.)"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from otel_bridge.prefect_client import (
    PrefectAuthFailed,
    PrefectConfigError,
    PrefectError,
    PrefectRefused,
    PrefectUnavailable,
    resolve_api,
)
from otel_bridge.prefect_client.errors import refusal_for_status
from otel_bridge.prefect_client.events_socket import open_events_socket
from otel_bridge.prefect_client.rest import check_response


def test_an_answer_that_will_not_change_is_a_refusal_and_a_server_in_trouble_is_not():
    for status in (500, 502, 503, 408, 429):
        assert refusal_for_status(status, "http://h/api/x") is None
    for status in (401, 403):
        refusal = refusal_for_status(status, "http://h/api/x")
        assert isinstance(refusal, PrefectAuthFailed) and f"HTTP {status}" in str(refusal)
    for status in (400, 404, 410, 301):
        refusal = refusal_for_status(status, "http://h/api/x", "no such path")
        assert type(refusal) is PrefectRefused
        assert f"HTTP {status}: no such path" in str(refusal) and "PREFECT_API_URL" in str(refusal)


def test_rest_answers_are_judged_the_same_way():
    request = httpx.Request("GET", "http://h/api/events/filter")
    check_response(httpx.Response(200, request=request))
    with pytest.raises(PrefectAuthFailed, match=r"HTTP 403\): go away"):
        check_response(httpx.Response(403, text="go away", request=request))
    with pytest.raises(httpx.HTTPStatusError, match="503"):  # worth a retry
        check_response(httpx.Response(503, request=request))


def test_one_family_whatever_the_direction():
    assert issubclass(PrefectAuthFailed, PrefectRefused)
    for error in (PrefectConfigError, PrefectRefused, PrefectUnavailable):
        assert issubclass(error, PrefectError)
    # settings that cannot work are a ValueError too, as the CLI expects
    with pytest.raises(ValueError, match="PREFECT_API_URL"):
        resolve_api(env={})
    cause = ConnectionRefusedError("nobody there")
    gave_up = PrefectUnavailable.after("sending to ws://x", 3, cause, ["e1", "e2"])
    assert str(gave_up) == ("gave up sending to ws://x after 3 failed attempts; last error: "
                            "ConnectionRefusedError: nobody there")
    assert gave_up.unconfirmed == 2
    assert str(PrefectUnavailable.after("x", 1, TimeoutError())).endswith("last error: TimeoutError")


def test_a_bad_events_url_is_a_configuration_error():
    api = resolve_api("http:///api", env={})
    with pytest.raises(PrefectConfigError, match="bad websocket URL"):
        asyncio.run(open_events_socket(api, "out", open_timeout=1))
