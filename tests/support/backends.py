"""Real backends for the test suite: Jaeger v2 (traces), the OpenTelemetry
Collector (built with ocb), Prometheus 3 (metrics) and VictoriaLogs (logs),
all Apache-2.0. Grafana Tempo is not among them: it is AGPL-3.0
and the project runs no AGPL software, not even in tests; where a test stood
for Tempo, a Collector writing what it receives to a file (:func:`file_collector`)
takes its place.

The binaries are built from Go modules at pinned versions by
``scripts/build-backends.sh`` into a cache outside the repo
(``$OTEL_BRIDGE_CACHE``, default ``~/.cache/otel-bridge``); this module runs
that script the first time it needs a binary (a no-op taking milliseconds when
everything is up to date; set ``OTEL_BRIDGE_NO_BUILD=1`` to never run it).

Everything listens on 127.0.0.1 on free ports. No pytest in here: plain
functions and context managers, usable from fixtures or a REPL::

    with jaeger() as j:
        ...send spans to j.otlp_grpc_endpoint / j.otlp_http_traces_url ...
        trace = j.wait_for_trace(trace_id_hex)

    with collector(config_path, env={"JAEGER_OTLP": j.otlp_grpc_endpoint}) as c:
        ...send spans to c.otlp_grpc_endpoint...

    ok, output = validate_collector_config(config_path, env)

    with prometheus() as p:         # OTLP receiver on
        ...send metrics to p.otlp_http_metrics_url (or p.otlp_http_endpoint from a Collector)...
        samples = p.wait_for('cicd_pipeline_run_duration_seconds_count{job="svc"}')

    with victorialogs() as v:
        ...send log records to v.otlp_http_logs_url (or v.otlp_http_endpoint)...
        records = v.wait_for('trace_id:"4bf9..."', min_records=3)

    with file_collector(tmp_path / "copy.jsonl") as c:
        ...send spans to c.otlp_grpc_endpoint...
        spans = wait_for_file_trace(tmp_path / "copy.jsonl", trace_id_hex)

Collector configs get their ports from the environment: ``collector()`` sets
``OTELCOL_OTLP_GRPC_PORT``, ``OTELCOL_OTLP_HTTP_PORT``, ``OTELCOL_HEALTH_PORT``
and ``OTELCOL_METRICS_PORT`` to free ports (unless ``env`` gives them), and
waits for the health_check extension at
``http://127.0.0.1:${OTELCOL_HEALTH_PORT}/``, so a config run through it has::

    extensions:
      health_check:
        endpoint: 127.0.0.1:${env:OTELCOL_HEALTH_PORT}
    receivers:
      otlp:
        protocols:
          grpc: {endpoint: "127.0.0.1:${env:OTELCOL_OTLP_GRPC_PORT}"}
          http: {endpoint: "127.0.0.1:${env:OTELCOL_OTLP_HTTP_PORT}"}
    service:
      extensions: [health_check]
      telemetry:
        metrics: {level: none}   # else it listens on :8888 (or use the port var)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-backends.sh"

JAEGER = "jaeger"
COLLECTOR = "otelcol-bridge"
PROMETHEUS = "prometheus"
VICTORIALOGS = "victoria-logs"

LOOPBACK = "127.0.0.1"

# Environment variables a collector config reads its ports from.
COLLECTOR_PORT_VARS = (
    "OTELCOL_OTLP_GRPC_PORT",
    "OTELCOL_OTLP_HTTP_PORT",
    "OTELCOL_HEALTH_PORT",
    "OTELCOL_METRICS_PORT",
)


class BackendError(RuntimeError):
    """A backend could not be built or did not start."""


class BackendUnavailable(BackendError):
    """A backend binary is not there and could not be built."""


# --------------------------------------------------------------------------
# cache and binaries
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$OTEL_BRIDGE_CACHE`` or ``~/.cache/otel-bridge`` (same rule as the script)."""
    env = os.environ.get("OTEL_BRIDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "otel-bridge"


def bin_dir() -> Path:
    return cache_dir() / "bin"


_build_lock = threading.Lock()
_build_result: tuple[int, str] | None = None


def build_backends(force: bool = False) -> tuple[int, str]:
    """Run scripts/build-backends.sh (once per process unless ``force``).

    Returns (exit code, combined output). The script skips binaries already
    built at the pinned versions, so this is cheap once the cache is warm; from
    a cold cache it takes several minutes.
    """
    global _build_result
    with _build_lock:
        if _build_result is not None and not force:
            return _build_result
        env = dict(os.environ)
        env["OTEL_BRIDGE_CACHE"] = str(cache_dir())
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _build_result = (proc.returncode, proc.stdout)
        return _build_result


def _maybe_build() -> None:
    if os.environ.get("OTEL_BRIDGE_NO_BUILD") == "1":
        return
    build_backends()


def binary(name: str) -> Path:
    """Path of a built binary (``jaeger``, ``otelcol-bridge``), building it
    first if needed. Raises BackendUnavailable when it cannot be had."""
    _maybe_build()
    path = bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    output = (_build_result or (None, ""))[1]
    raise BackendUnavailable(
        f"{path} missing after running {BUILD_SCRIPT}:\n{_tail(output, 40)}"
    )


def binary_version(name: str) -> str | None:
    """The version stamp the build script wrote next to a binary."""
    stamp = bin_dir() / f"{name}.version"
    return stamp.read_text().strip() if stamp.is_file() else None


def jaeger_binary() -> Path:
    return binary(JAEGER)


def collector_binary() -> Path:
    return binary(COLLECTOR)


# --------------------------------------------------------------------------
# ports, HTTP, waiting
# --------------------------------------------------------------------------


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free TCP ports on ``host`` (all sockets held until all are picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, params: Mapping[str, Any] | None = None, timeout: float = 10.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body). Connection errors give status 0."""
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def http_get_json(url: str, params: Mapping[str, Any] | None = None,
                  timeout: float = 10.0) -> tuple[int, Any]:
    """GET and decode JSON; body is None when it is not JSON."""
    status, body = http_get(url, params, timeout, headers={"Accept": "application/json"})
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2,
               what: str = "condition", proc: subprocess.Popen | None = None,
               log_path: Path | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises BackendError on timeout, or at once if ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise BackendError(
                f"process exited with code {proc.returncode} while waiting for {what}"
                + (f"; log {log_path}:\n{_tail_file(log_path)}" if log_path else "")
            )
        if time.monotonic() > deadline:
            raise BackendError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f"; log {log_path}:\n{_tail_file(log_path)}" if log_path else "")
            )
        time.sleep(interval)


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


def _tail_file(path: Path | None, n: int = 30) -> str:
    if path is None or not path.is_file():
        return ""
    return _tail(path.read_text(errors="replace"), n)


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


@dataclass
class BackendProcess:
    """A running backend: its process, work dir (config, data, log) and ports."""

    name: str
    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    config_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log(), n)

    def alive(self) -> bool:
        return self.proc.poll() is None


def _start(name: str, argv: list[str], workdir: Path, config_path: Path,
           env: Mapping[str, str] | None, ports: dict[str, int]) -> BackendProcess:
    log_path = workdir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=full_env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return BackendProcess(name, proc, workdir, log_path, config_path, dict(ports))


def stop_process(bp: BackendProcess, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    proc = bp.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


_PORT_CLASH = ("address already in use", "bind: address")


@contextlib.contextmanager
def _backend(name: str, make: Callable[[Path, dict[str, int]], tuple[list[str], Path, dict[str, str]]],
             port_names: list[str], ready: Callable[[BackendProcess], bool], timeout: float,
             keep_workdir: bool, preset_ports: Mapping[str, int] | None = None,
             attempts: int = 3, stop_timeout: float = 15.0) -> Iterator[BackendProcess]:
    """Start a backend on fresh free ports (retrying on a port clash), wait for
    ``ready``, yield it, stop it and remove its work dir on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=f"otel-bridge-{name}-"))
    bp: BackendProcess | None = None
    try:
        for attempt in range(1, attempts + 1):
            wanted = [p for p in port_names if not (preset_ports and p in preset_ports)]
            ports = dict(zip(wanted, free_ports(len(wanted))))
            ports.update(preset_ports or {})
            argv, config_path, env = make(workdir, ports)
            bp = _start(name, argv, workdir, config_path, env, ports)
            try:
                wait_until(lambda: ready(bp), timeout, what=f"{name} to become ready",
                           proc=bp.proc, log_path=bp.log_path)
                break
            except BackendError:
                stop_process(bp)
                clash = any(s in bp.log().lower() for s in _PORT_CLASH)
                if clash and attempt < attempts:
                    bp.log_path.rename(bp.log_path.with_suffix(f".attempt{attempt}.log"))
                    continue
                raise
        assert bp is not None
        yield bp
    finally:
        if bp is not None:
            stop_process(bp, stop_timeout)
        if keep_workdir or os.environ.get("OTEL_BRIDGE_KEEP_BACKEND_DIRS") == "1":
            pass
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _write_config(path: Path, config: Mapping[str, Any]) -> Path:
    # JSON is YAML: the Go YAML parsers both backends use read it as is.
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _deep_merge(base: dict, extra: Mapping | None) -> dict:
    for k, v in (extra or {}).items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


# --------------------------------------------------------------------------
# Jaeger v2
# --------------------------------------------------------------------------


def jaeger_config(ports: Mapping[str, int], max_traces: int = 100_000) -> dict:
    """Jaeger v2 (v2.13) config: an OpenTelemetry Collector config whose
    extensions jaeger_storage (backends: NAME: memory: ...) and jaeger_query
    (storage.traces: NAME, http/grpc endpoints) provide storage and the query
    API, and whose exporter jaeger_storage_exporter writes to the store."""
    h = LOOPBACK
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": [],
                    "exporters": ["jaeger_storage_exporter"],
                },
            },
            "telemetry": {
                "resource": {"service.name": "jaeger"},
                # The default Prometheus reader listens on :8888 (clashes
                # between instances); the tests do not need internal metrics.
                "metrics": {"level": "none"},
                "logs": {"level": "info"},
            },
        },
        "extensions": {
            "healthcheckv2": {
                "use_v2": True,
                "http": {"endpoint": f"{h}:{ports['health']}"},
            },
            "jaeger_query": {
                "storage": {"traces": "memstore"},
                # Else the query service traces itself and exports those spans
                # over OTLP to localhost:4317 (see jaeger_query's server.go).
                "enable_tracing": False,
                "http": {"endpoint": f"{h}:{ports['query_http']}"},
                "grpc": {"endpoint": f"{h}:{ports['query_grpc']}"},
            },
            "jaeger_storage": {
                "backends": {"memstore": {"memory": {"max_traces": max_traces}}},
            },
        },
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"{h}:{ports['otlp_grpc']}"},
                    "http": {"endpoint": f"{h}:{ports['otlp_http']}"},
                },
            },
        },
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


class JaegerClient:
    """Jaeger's HTTP query API (the UI's /api and the OTLP-shaped /api/v3)."""

    def __init__(self, query_url: str):
        self.query_url = query_url.rstrip("/")

    def services(self) -> list[str]:
        status, body = http_get_json(f"{self.query_url}/api/services")
        return list((body or {}).get("data") or []) if status == 200 else []

    def traces_by_service(self, service: str, *, limit: int = 100, lookback: str = "2h",
                          operation: str | None = None, tags: Mapping[str, str] | None = None) -> list[dict]:
        """``/api/traces?service=...``: a list of Jaeger-model traces (may be empty)."""
        params: dict[str, Any] = {"service": service, "limit": limit, "lookback": lookback}
        if operation:
            params["operation"] = operation
        if tags:
            params["tags"] = json.dumps(dict(tags))
        status, body = http_get_json(f"{self.query_url}/api/traces", params)
        if status != 200:
            return []
        return list((body or {}).get("data") or [])

    def operations(self, service: str) -> list[dict]:
        """``/api/v3/operations?service=...``: the service's operations as
        [{"name", "spanKind"}] (``/api/services/<service>/operations`` gives
        the names alone)."""
        status, body = http_get_json(f"{self.query_url}/api/v3/operations", {"service": service})
        return list((body or {}).get("operations") or []) if status == 200 else []

    def trace(self, trace_id: str | int) -> dict | None:
        """``/api/traces/<hex>``: the Jaeger-model trace, or None when not found."""
        status, body = http_get_json(f"{self.query_url}/api/traces/{_hex_trace_id(trace_id)}")
        if status != 200 or not body or not body.get("data"):
            return None
        return body["data"][0]

    def trace_otlp(self, trace_id: str | int) -> dict | None:
        """``/api/v3/traces/<hex>``: the trace as OTLP/JSON ({"resourceSpans": [...]})."""
        status, body = http_get_json(f"{self.query_url}/api/v3/traces/{_hex_trace_id(trace_id)}")
        if status != 200 or not body:
            return None
        return body.get("result", body)

    def wait_for_trace(self, trace_id: str | int, *, min_spans: int = 1,
                       timeout: float = 20.0) -> dict:
        """Poll until the trace has at least ``min_spans`` spans; returns it."""
        return wait_until(
            lambda: (t := self.trace(trace_id)) and len(t.get("spans", [])) >= min_spans and t,
            timeout, what=f"trace {_hex_trace_id(trace_id)} in Jaeger ({min_spans}+ spans)",
        )

    def wait_for_service(self, service: str, *, min_traces: int = 1,
                         timeout: float = 20.0) -> list[dict]:
        return wait_until(
            lambda: (ts := self.traces_by_service(service)) and len(ts) >= min_traces and ts,
            timeout, what=f"{min_traces}+ traces of service {service!r} in Jaeger",
        )


class _OtlpReceiver:
    """The OTLP endpoints of a backend process, from its port names."""

    process: BackendProcess
    _GRPC_PORT, _HTTP_PORT = "otlp_grpc", "otlp_http"

    @property
    def ports(self) -> dict[str, int]:
        return self.process.ports

    @property
    def otlp_grpc_endpoint(self) -> str:
        """host:port for an OTLP/gRPC exporter (insecure)."""
        return f"{LOOPBACK}:{self.ports[self._GRPC_PORT]}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base URL of the OTLP/HTTP receiver (the Collector's otlp_http exporter form)."""
        return f"http://{LOOPBACK}:{self.ports[self._HTTP_PORT]}"

    @property
    def otlp_http_traces_url(self) -> str:
        """Full /v1/traces URL (the Python OTLPSpanExporter's endpoint form)."""
        return f"{self.otlp_http_endpoint}/v1/traces"


@dataclass
class Jaeger(_OtlpReceiver, JaegerClient):
    process: BackendProcess

    def __post_init__(self) -> None:
        JaegerClient.__init__(self, f"http://{LOOPBACK}:{self.process.ports['query_http']}")

    @property
    def query_grpc_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.ports['query_grpc']}"

    @property
    def health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['health']}/status"


@contextlib.contextmanager
def jaeger(*, max_traces: int = 100_000, timeout: float = 60.0,
           extra_config: Mapping[str, Any] | None = None,
           keep_workdir: bool = False) -> Iterator[Jaeger]:
    """Run Jaeger v2 with in-memory storage on free loopback ports.

    Ready when its healthcheckv2 ``/status`` answers 200 and ``/api/services``
    answers 200. ``extra_config`` is deep-merged into :func:`jaeger_config`.
    """
    exe = jaeger_binary()

    def make(workdir: Path, ports: dict[str, int]):
        cfg = _deep_merge(jaeger_config(ports, max_traces), extra_config)
        path = _write_config(workdir / "jaeger.yaml", cfg)
        return [str(exe), f"--config={path}"], path, {}

    def ready(bp: BackendProcess) -> bool:
        h, q = bp.ports["health"], bp.ports["query_http"]
        return (http_get(f"http://{LOOPBACK}:{h}/status", timeout=2)[0] == 200
                and http_get(f"http://{LOOPBACK}:{q}/api/services", timeout=2)[0] == 200
                and port_open(bp.ports["otlp_grpc"]) and port_open(bp.ports["otlp_http"]))

    with _backend("jaeger", make, ["otlp_grpc", "otlp_http", "query_http", "query_grpc", "health"],
                  ready, timeout, keep_workdir) as bp:
        yield Jaeger(bp)


# --------------------------------------------------------------------------
# OpenTelemetry Collector (otelcol-bridge)
# --------------------------------------------------------------------------


@dataclass
class Collector(_OtlpReceiver):
    process: BackendProcess
    env: dict[str, str]
    _GRPC_PORT, _HTTP_PORT = "OTELCOL_OTLP_GRPC_PORT", "OTELCOL_OTLP_HTTP_PORT"

    @property
    def health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['OTELCOL_HEALTH_PORT']}/"


def _collector_env(env: Mapping[str, str] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (env or {}).items()}


ConfigPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _config_paths(config_path: Any) -> list[Path]:
    if isinstance(config_path, (str, os.PathLike)):
        config_path = [config_path]
    paths = [Path(p).resolve() for p in config_path]
    if not paths:
        raise ValueError("no collector config given")
    return paths


@contextlib.contextmanager
def collector(config_path: ConfigPaths, env: Mapping[str, str] | None = None, *,
              health_path: str | None = "/", timeout: float = 60.0,
              keep_workdir: bool = False) -> Iterator[Collector]:
    """Run ``otelcol-bridge --config=<config_path>`` (one ``--config`` per
    path when given several: the Collector merges them in order, maps key by
    key, lists replaced) with ``env`` added to the
    environment and the ``COLLECTOR_PORT_VARS`` set to free ports (unless
    ``env`` sets them). Ready when the health_check extension at
    ``127.0.0.1:$OTELCOL_HEALTH_PORT<health_path>`` answers 200 (with
    ``health_path=None``: when the OTLP gRPC port accepts connections)."""
    exe = collector_binary()
    configs = _config_paths(config_path)
    user_env = _collector_env(env)
    preset = {k: int(user_env[k]) for k in COLLECTOR_PORT_VARS if k in user_env}

    def make(workdir: Path, ports: dict[str, int]):
        run_env = dict(user_env)
        run_env.update({k: str(v) for k, v in ports.items()})
        return [str(exe), *(f"--config={c}" for c in configs)], configs[0], run_env

    def ready(bp: BackendProcess) -> bool:
        if health_path is None:
            return port_open(bp.ports["OTELCOL_OTLP_GRPC_PORT"])
        return http_get(f"http://{LOOPBACK}:{bp.ports['OTELCOL_HEALTH_PORT']}{health_path}",
                        timeout=2)[0] == 200

    with _backend("otelcol", make, list(COLLECTOR_PORT_VARS), ready, timeout, keep_workdir,
                  preset_ports=preset) as bp:
        run_env = dict(user_env)
        run_env.update({k: str(v) for k, v in bp.ports.items()})
        yield Collector(bp, run_env)


def test_collector_config(exporters: Mapping[str, Any], pipeline: Sequence[str]) -> dict:
    """A Collector config for tests: OTLP receivers, memory_limiter and batch,
    health_check, on the ports of ``COLLECTOR_PORT_VARS``; `exporters` as
    given, the traces pipeline through those named in `pipeline`."""
    return {
        "extensions": {"health_check": {"endpoint": "127.0.0.1:${env:OTELCOL_HEALTH_PORT}"}},
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": "127.0.0.1:${env:OTELCOL_OTLP_GRPC_PORT}"},
            "http": {"endpoint": "127.0.0.1:${env:OTELCOL_OTLP_HTTP_PORT}"},
        }}},
        "processors": {"memory_limiter": {"check_interval": "1s", "limit_mib": 256},
                       "batch": {"timeout": "200ms"}},
        "exporters": dict(exporters),
        "service": {
            "extensions": ["health_check"],
            "telemetry": {"metrics": {"level": "none"}},
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["memory_limiter", "batch"],
                                     "exporters": list(pipeline)}},
        },
    }


# Writes every span it receives to $COPY_FILE, as OTLP/JSON lines (the file
# exporter's format): the receiving end a test reads back.
FILE_EXPORTER = {"file": {"path": "${env:COPY_FILE}", "flush_interval": "100ms"}}


def file_collector(copy_file: Path, env: Mapping[str, str] | None = None,
                   **options: Any) -> contextlib.AbstractContextManager[Collector]:
    """:func:`collector` exporting only to a file (:data:`FILE_EXPORTER`), writing to
    ``copy_file``; ``env`` may preset its ports (to come back on the same ones)."""
    config = _write_config(copy_file.with_name(copy_file.name + ".collector.yaml"),
                           test_collector_config(FILE_EXPORTER, ["file"]))
    return collector(config, {**(env or {}), "COPY_FILE": str(copy_file)}, **options)


def file_spans(copy_file: Path) -> list[dict]:
    """Every span a :func:`file_collector` wrote to ``copy_file`` so far, as
    :func:`otlp_json_spans` gives them (a line being written is skipped)."""
    out: list[dict] = []
    if not copy_file.is_file():
        return out
    for line in copy_file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # the Collector is writing it
        out.extend(otlp_json_spans(doc))
    return out


def wait_for_file_trace(copy_file: Path, trace_id: str | int, *, min_spans: int = 1,
                        timeout: float = 30.0) -> list[dict]:
    """Poll ``copy_file`` until it holds at least ``min_spans`` spans of the
    trace; returns them (each as often as it was received)."""
    want = _hex_trace_id(trace_id)

    def spans() -> list[dict] | None:
        got = [s for s in file_spans(copy_file) if otlp_id_hex(s["traceId"], 16) == want]
        return got if len(got) >= min_spans else None

    return wait_until(spans, timeout, what=f"trace {want} in {copy_file} ({min_spans}+ spans)")


def validate_collector_config(path: ConfigPaths, env: Mapping[str, str] | None = None,
                              timeout: float = 60.0) -> tuple[bool, str]:
    """``otelcol-bridge validate --config=<path>``: (exit code == 0, output);
    several paths are merged as :func:`collector` merges them.

    The ``COLLECTOR_PORT_VARS`` not in ``env`` are set to placeholder ports so
    configs written for :func:`collector` validate as they would run."""
    exe = collector_binary()
    full_env = dict(os.environ)
    full_env.update({k: str(p) for k, p in zip(COLLECTOR_PORT_VARS, range(14317, 14321))})
    full_env.update(_collector_env(env))
    proc = subprocess.run(
        [str(exe), "validate", *(f"--config={c}" for c in _config_paths(path))],
        env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return proc.returncode == 0, proc.stdout


# --------------------------------------------------------------------------
# Prometheus 3 (metrics)
# --------------------------------------------------------------------------


def prometheus_binary() -> Path:
    return binary(PROMETHEUS)


def prometheus_config(otlp: Mapping[str, Any] | None = None) -> dict:
    """Prometheus's config file: no scrape jobs (everything comes in over
    OTLP), and its ``otlp:`` section (``translation_strategy``,
    ``promote_resource_attributes``, ...) as given."""
    return {"global": {"evaluation_interval": "1m"}, "scrape_configs": [],
            "otlp": dict(otlp or {})}


@dataclass
class Prometheus:
    """A running Prometheus with its OTLP receiver on, and a small PromQL client.

    Prometheus takes OTLP over HTTP only (protobuf; no gRPC), at
    ``/api/v1/otlp/v1/metrics``, and only cumulative sums and histograms
    unless a delta feature flag is on."""

    process: BackendProcess

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.process.ports['http']}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base of the OTLP receiver: the Collector's otlp_http ``endpoint``
        form (it appends ``/v1/metrics``)."""
        return f"{self.url}/api/v1/otlp"

    @property
    def otlp_http_metrics_url(self) -> str:
        """Full URL: the Python exporter's ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` form."""
        return f"{self.otlp_http_endpoint}/v1/metrics"

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """Instant query (``/api/v1/query``): the vector's samples as
        ``{"metric": {label: value}, "value": float}``. Raises BackendError
        on an error answer (a bad query), so a typo does not read as "no data"."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        status, body = http_get_json(f"{self.url}/api/v1/query", params)
        if status != 200 or not body or body.get("status") != "success":
            raise BackendError(f"PromQL {promql!r}: HTTP {status}: {body}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise BackendError(f"PromQL {promql!r} gave a {data['resultType']}, not a vector")
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def wait_for(self, promql: str, *, min_series: int = 1, timeout: float = 20.0) -> list[dict]:
        """Poll an instant query until it returns at least ``min_series`` samples."""
        return wait_until(lambda: (r := self.query(promql)) and len(r) >= min_series and r,
                          timeout, what=f"{min_series}+ series of {promql!r} in Prometheus",
                          proc=self.process.proc, log_path=self.process.log_path)


@contextlib.contextmanager
def prometheus(*, otlp: Mapping[str, Any] | None = None, extra_args: Sequence[str] = (),
               timeout: float = 60.0, keep_workdir: bool = False) -> Iterator[Prometheus]:
    """Run Prometheus 3 with ``--web.enable-otlp-receiver`` on a free loopback
    port, its TSDB in a temporary directory. Ready when ``/-/ready`` answers
    200. ``otlp`` is the config file's ``otlp:`` section; ``extra_args`` go on
    the command line (``--enable-feature=otlp-deltatocumulative``, ...)."""
    exe = prometheus_binary()

    def make(workdir: Path, ports: dict[str, int]):
        path = _write_config(workdir / "prometheus.yml", prometheus_config(otlp))
        return [str(exe), f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{ports['http']}",
                "--web.enable-otlp-receiver", *extra_args], path, {}

    def ready(bp: BackendProcess) -> bool:
        return http_get(f"http://{LOOPBACK}:{bp.ports['http']}/-/ready", timeout=2)[0] == 200

    with _backend("prometheus", make, ["http"], ready, timeout, keep_workdir) as bp:
        yield Prometheus(bp)


# --------------------------------------------------------------------------
# VictoriaLogs (logs)
# --------------------------------------------------------------------------


def victorialogs_binary() -> Path:
    return binary(VICTORIALOGS)


@dataclass
class VictoriaLogs:
    """A running VictoriaLogs and a small LogsQL client.

    It takes OTLP logs over HTTP only, as protobuf (JSON is refused), at
    ``/insert/opentelemetry/v1/logs``. A record is stored as flat fields: the
    body as ``_msg``, ``_time``, ``trace_id`` and ``span_id`` in hex,
    ``severity_number`` (a string) and ``severity_text``, ``scope.name`` and
    ``scope.version``, each record attribute and each resource attribute under
    its own name (``log.record.uid``, ``service.name``); the resource
    attributes also make its ``_stream``. The observed time is not kept."""

    process: BackendProcess

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.process.ports['http']}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base of the OTLP receiver: the Collector's otlp_http ``endpoint``
        form (it appends ``/v1/logs``)."""
        return f"{self.url}/insert/opentelemetry"

    @property
    def otlp_http_logs_url(self) -> str:
        """Full URL: the Python exporter's ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` form."""
        return f"{self.otlp_http_endpoint}/v1/logs"

    def flush(self) -> None:
        """Make what was ingested searchable now (else within about a second)."""
        http_get(f"{self.url}/internal/force_flush", timeout=10)

    def query(self, logsql: str, limit: int | None = None) -> list[dict]:
        """``/select/logsql/query``: the matching records, each a dict of its
        fields (all values strings, as VictoriaLogs stores them). Raises
        BackendError on an error answer (a bad query)."""
        self.flush()
        params: dict[str, Any] = {"query": logsql}
        if limit is not None:
            params["limit"] = limit
        status, body = http_get(f"{self.url}/select/logsql/query", params, timeout=30)
        if status != 200:
            raise BackendError(f"LogsQL {logsql!r}: HTTP {status}: {body[:500]!r}")
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]

    def wait_for(self, logsql: str, *, min_records: int = 1, timeout: float = 20.0) -> list[dict]:
        """Poll a query until it returns at least ``min_records`` records."""
        return wait_until(lambda: (r := self.query(logsql)) and len(r) >= min_records and r,
                          timeout, what=f"{min_records}+ records of {logsql!r} in VictoriaLogs",
                          proc=self.process.proc, log_path=self.process.log_path)


@contextlib.contextmanager
def victorialogs(*, retention: str = "100y", extra_args: Sequence[str] = (),
                 timeout: float = 60.0, keep_workdir: bool = False) -> Iterator[VictoriaLogs]:
    """Run VictoriaLogs on a free loopback port, its data in a temporary
    directory. Ready when ``/health`` answers 200.

    ``retention`` is ``-retentionPeriod``: VictoriaLogs drops, with HTTP 200
    and only a warning in its log, every record older than now minus it (7d
    by default), so the tests keep 100 years to take the captures' times."""
    exe = victorialogs_binary()

    def make(workdir: Path, ports: dict[str, int]):
        return [str(exe), f"-storageDataPath={workdir / 'data'}",
                f"-httpListenAddr={LOOPBACK}:{ports['http']}",
                f"-retentionPeriod={retention}", *extra_args], workdir / "data", {}

    def ready(bp: BackendProcess) -> bool:
        return http_get(f"http://{LOOPBACK}:{bp.ports['http']}/health", timeout=2)[0] == 200

    with _backend("victorialogs", make, ["http"], ready, timeout, keep_workdir) as bp:
        yield VictoriaLogs(bp)


def logsql_quote(value: str) -> str:
    """A LogsQL string literal (double quotes, JSON escapes)."""
    return json.dumps(value)


# --------------------------------------------------------------------------
# reading traces back
# --------------------------------------------------------------------------


def _hex_trace_id(trace_id: str | int) -> str:
    return format(trace_id, "032x") if isinstance(trace_id, int) else trace_id.lower()


def jaeger_tags(items: list[dict] | None) -> dict[str, Any]:
    """Jaeger [{"key", "type", "value"}] -> {key: value}."""
    return {t["key"]: t.get("value") for t in items or []}


def jaeger_span(trace: dict, name: str) -> dict:
    """The one span called ``name`` in a Jaeger-model trace."""
    spans = [s for s in trace.get("spans", []) if s.get("operationName") == name]
    if len(spans) != 1:
        raise AssertionError(f"expected one span {name!r}, found {len(spans)} in "
                             f"{[s.get('operationName') for s in trace.get('spans', [])]}")
    return spans[0]


def otlp_id_hex(value: str, nbytes: int) -> str:
    """An OTLP/JSON id as hex: hex already (OTLP/JSON spec, Jaeger /api/v3) or
    base64 (protobuf's own JSON mapping)."""
    if len(value) == 2 * nbytes and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    return base64.b64decode(value).hex()


def otlp_any_value(v: dict) -> Any:
    """Plain Python value of an OTLP/JSON AnyValue."""
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [otlp_any_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: otlp_any_value(kv.get("value", {})) for kv in v["kvlistValue"].get("values", [])}
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    return None


def otlp_attrs(items: list[dict] | None) -> dict[str, Any]:
    return {kv["key"]: otlp_any_value(kv.get("value", {})) for kv in items or []}


_OTLP_SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")


def otlp_span_kind(span: dict) -> str:
    """An OTLP/JSON span's kind as a lowercase name ("server"), as Jaeger's
    span.kind tag writes it, whether the JSON has the enum's number or name."""
    kind = span.get("kind", 0)
    if isinstance(kind, str):
        return kind.removeprefix("SPAN_KIND_").lower()
    return _OTLP_SPAN_KINDS[kind]


def otlp_json_spans(doc: dict) -> list[dict]:
    """Flatten OTLP/JSON traces into span dicts, each with ``resource`` (attrs
    dict) and ``scope`` added."""
    out = []
    for rs in doc.get("resourceSpans") or []:
        resource = otlp_attrs((rs.get("resource") or {}).get("attributes"))
        for ss in rs.get("scopeSpans") or []:
            scope = ss.get("scope") or {}
            for span in ss.get("spans", []):
                out.append({**span, "resource": resource, "scope": scope})
    return out
