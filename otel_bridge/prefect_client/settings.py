"""Where a Prefect API is and how to reach it, from Prefect's own settings.

One place for what Prefect's clients read, used by everything that talks to
a Prefect server (through this package): the subscription (websocket and
REST), the REST reader and the reverse sink. From the arguments first, then the environment (Prefect's
profiles and .env files are not read):

    PREFECT_API_URL                       http(s)://host[:port]/api
    PREFECT_API_KEY                       Prefect Cloud's key
    PREFECT_API_AUTH_STRING               a self-hosted server's "user:password"
    PREFECT_CLIENT_CUSTOM_HEADERS         a JSON object of extra headers
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY  no certificate check
    PREFECT_API_SSL_CERT_FILE             the CA bundle (default: certifi's)
    PREFECT_CLOUD_API_URL                 what counts as Prefect Cloud
    PREFECT_UI_URL, PREFECT_CLOUD_UI_URL  the UI, for links to a run's page
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

from otel_bridge.prefect_client.errors import PrefectConfigError

__all__ = ["PrefectApi", "events_socket_url", "logs_socket_url", "resolve_api", "ui_url"]

DEFAULT_CLOUD_API_URL = "https://api.prefect.cloud/api/"
# Headers a custom-header setting must not override (Prefect's list).
PROTECTED_HEADERS = frozenset({
    "user-agent", "sec-websocket-key", "sec-websocket-version",
    "sec-websocket-extensions", "sec-websocket-protocol", "connection",
    "upgrade", "host",
})


@dataclass(frozen=True)
class PrefectApi:
    """Where the Prefect API is and how to authenticate to it."""

    url: str  # http(s)://host[:port]/api, without a trailing slash
    api_key: Optional[str] = None
    auth_string: Optional[str] = None
    custom_headers: tuple[tuple[str, str], ...] = ()
    tls_insecure_skip_verify: bool = False
    ssl_cert_file: Optional[str] = None
    cloud: bool = False  # the URL is Prefect Cloud's

    @property
    def ws_token(self) -> Optional[str]:
        """The token of the events websocket's auth frame, as Prefect's
        clients send it: the key to Prefect Cloud; to a self-hosted server
        the auth string, or the key when there is none (an open server
        ignores it, a protected one reports it as invalid)."""
        return self.api_key if self.cloud else (self.auth_string or self.api_key)

    def http_headers(self) -> dict[str, str]:
        """The custom headers and the Authorization header Prefect's client
        sends: to Prefect Cloud the key; to a self-hosted server the auth
        string (Basic) before the key (Bearer). Sent on REST requests and on
        websocket upgrades (proxies may check those)."""
        headers = dict(self.custom_headers)
        if self.auth_string and not self.cloud:
            basic = base64.b64encode(self.auth_string.encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        elif self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context for an https API (and its wss sockets), as
        Prefect's clients make it; None for plain http."""
        if not self.url.startswith("https://"):
            return None
        if self.tls_insecure_skip_verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        cert_file = self.ssl_cert_file
        if not cert_file:
            try:  # Prefect verifies against certifi's bundle by default.
                import certifi

                cert_file = certifi.where()
            except ImportError:
                pass
        return ssl.create_default_context(cafile=cert_file)

    def events_url(self, direction: Literal["in", "out"]) -> str:
        return events_socket_url(self.url, direction)

    def logs_url(self) -> str:
        return logs_socket_url(self.url)


def _socket_base(api_url: str) -> str:
    url = api_url.strip().rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    raise PrefectConfigError(f"PREFECT_API_URL must be an http(s) URL, got {api_url!r}")


def events_socket_url(api_url: str, direction: Literal["in", "out"]) -> str:
    """http(s)://host/api -> ws(s)://host/api/events/in (or out), as Prefect
    makes it."""
    return f"{_socket_base(api_url)}/events/{direction}"


def logs_socket_url(api_url: str) -> str:
    """http(s)://host/api -> ws(s)://host/api/logs/out, as Prefect's logs
    subscriber makes it (prefect/logging/clients.py)."""
    return f"{_socket_base(api_url)}/logs/out"


def resolve_api(
    api_url: Optional[str] = None,
    api_key: Optional[str] = None,
    auth_string: Optional[str] = None,
    *,
    tls_insecure_skip_verify: Optional[bool] = None,
    ssl_cert_file: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
) -> PrefectApi:
    """The arguments given, the rest from the environment (see above).

    Raises PrefectConfigError for what can never work (a missing or non-http
    URL, custom headers that are not a JSON object): a sidecar should fail at
    start with a readable message, not retry."""
    env = os.environ if env is None else env

    def setting(name: str) -> Optional[str]:
        return env.get(name) or None

    url = api_url or setting("PREFECT_API_URL")
    if not url:
        raise PrefectConfigError("no Prefect API URL: pass api_url or set PREFECT_API_URL "
                                 "(e.g. http://127.0.0.1:4200/api)")
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise PrefectConfigError(
            f"Prefect API URL must be http(s)://host[:port]/api, got {url!r}")
    custom: tuple[tuple[str, str], ...] = ()
    raw = setting("PREFECT_CLIENT_CUSTOM_HEADERS")
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise PrefectConfigError("PREFECT_CLIENT_CUSTOM_HEADERS is not a JSON object")
        custom = tuple((str(k), str(v)) for k, v in parsed.items()
                       if str(k).lower() not in PROTECTED_HEADERS)
    if tls_insecure_skip_verify is None:
        tls_insecure_skip_verify = (setting("PREFECT_API_TLS_INSECURE_SKIP_VERIFY") or ""
                                    ).strip().lower() in {"1", "true", "yes", "on", "t", "y"}
    cloud_url = (setting("PREFECT_CLOUD_API_URL") or DEFAULT_CLOUD_API_URL).rstrip("/")
    return PrefectApi(
        url=url,
        api_key=api_key or setting("PREFECT_API_KEY"),
        auth_string=auth_string or setting("PREFECT_API_AUTH_STRING"),
        custom_headers=custom,
        tls_insecure_skip_verify=tls_insecure_skip_verify,
        ssl_cert_file=ssl_cert_file or setting("PREFECT_API_SSL_CERT_FILE"),
        cloud=url.startswith(cloud_url),
    )


def ui_url(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The Prefect UI's address, as Prefect works it out
    (`prefect.settings.models.root.default_ui_url`): PREFECT_UI_URL, else
    from PREFECT_API_URL (Prefect Cloud's API address becomes its UI's,
    `/api` goes, `/accounts/` and `/workspaces/` become singular); None when
    neither is set."""
    env = os.environ if env is None else env
    given = (env.get("PREFECT_UI_URL") or "").strip()
    if given:
        return given.rstrip("/")
    api = (env.get("PREFECT_API_URL") or "").strip().rstrip("/")
    if not api.startswith(("http://", "https://")):
        return None
    cloud_api = (env.get("PREFECT_CLOUD_API_URL") or DEFAULT_CLOUD_API_URL).strip().rstrip("/")
    cloud_ui = (env.get("PREFECT_CLOUD_UI_URL") or "").strip().rstrip("/") or _cloud_ui(cloud_api)
    url = api
    if api.startswith(cloud_api) and cloud_ui:
        url = url.replace(cloud_api, cloud_ui, 1)
    if url.endswith("/api"):
        url = url[:-4]
    url = url.replace("/api/", "/").replace("/accounts/", "/account/")
    return url.replace("/workspaces/", "/workspace/")


def _cloud_ui(cloud_api: str) -> Optional[str]:
    # Prefect's `default_cloud_ui_url`: https://api.prefect.cloud/api -> https://app.prefect.cloud
    if not re.match(r"^https://api[\.\w]*.prefect.[^\.]+/", cloud_api + "/"):
        return None
    url = cloud_api.replace("https://api", "https://app", 1)
    return url[:-4] if url.endswith("/api") else url
