"""A real, throw-away Prefect server for the demo, the capture script and tests.

`prefect server start` runs as a child process against a sqlite database in a
private temporary PREFECT_HOME, so nothing it does leaks into (or depends on)
the user's own Prefect profile or database.  Prefect does not need to be
importable here: we only run its CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

__all__ = ["LocalPrefectServer", "PrefectServerError", "find_prefect_executable"]


class PrefectServerError(RuntimeError):
    """The server could not be started (the message carries its log tail)."""


def find_prefect_executable() -> str:
    # Prefer the CLI of the interpreter we run under (a venv that has not been
    # "activated" is not on PATH), then fall back to PATH.
    beside = Path(sys.executable).parent / ("prefect.exe" if os.name == "nt" else "prefect")
    if beside.exists():
        return str(beside)
    found = shutil.which("prefect")
    if found:
        return found
    raise PrefectServerError(
        "no `prefect` executable next to %s or on PATH; install prefect==3.9.1"
        % sys.executable
    )


def _free_port(host: str) -> int:
    # Racy by nature (the port is free when we look, not necessarily when the
    # server binds), which is why start() retries on a fresh port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalPrefectServer:
    """Context manager: ``with LocalPrefectServer() as srv: srv.api_url, srv.env()``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        startup_timeout: float = 90.0,
        stop_grace: float = 10.0,
        home: Optional[str] = None,
        extra_env: Optional[dict[str, str]] = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port: Optional[int] = None
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self._home_arg = home
        self._extra_env = dict(extra_env or {})
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.home: Optional[Path] = None
        self.log_path: Optional[Path] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log_file = None

    # -- public ---------------------------------------------------------------

    @property
    def api_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for a child process that runs flows against this server.

        Starts from os.environ minus any PREFECT_* variables (an inherited
        PREFECT_API_URL or PREFECT_PROFILE would silently point the child at
        another server), then adds what points it here.
        """
        if self.home is None:
            raise RuntimeError("server not started")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_HOME": str(self.home),
                # A private profiles file, so the user's active profile is not read.
                "PREFECT_PROFILES_PATH": str(self.home / "profiles.toml"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # Without this a client that cannot reach the API would quietly
                # start its own ephemeral server instead of failing.
                "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
            }
        )
        env.update(self._extra_env)
        return env

    def log_tail(self, n_lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])

    def start(self) -> "LocalPrefectServer":
        if self._home_arg:
            self.home = Path(self._home_arg)
            self.home.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="otel-bridge-prefect-")
            self.home = Path(self._tmp.name)
        self.log_path = self.home / "server.log"

        attempts = 1 if self._requested_port else 3
        last_error: Optional[Exception] = None
        for _ in range(attempts):
            self.port = self._requested_port or _free_port(self.host)
            try:
                self._launch()
                self._wait_healthy()
                return self
            except PrefectServerError as exc:
                last_error = exc
                self._terminate()
                if "address already in use" not in self.log_tail(200).lower():
                    break
        self._cleanup_home()
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        self._terminate()
        self._cleanup_home()

    def __enter__(self) -> "LocalPrefectServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------

    def _server_env(self) -> dict[str, str]:
        assert self.home is not None
        env = self.env()
        # The server process must not think it is a client of some other API.
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
        env.update(
            {
                "PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///"
                + str(self.home / "prefect.db"),
                "PREFECT_SERVER_UI_ENABLED": "false",
                # No prompts, no colours/wrapping tricks in the log we may show.
                "PREFECT_CLI_PROMPT": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _launch(self) -> None:
        assert self.log_path is not None
        self._log_file = open(self.log_path, "ab")
        cmd = [
            find_prefect_executable(),
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--analytics-off",
            "--no-ui",
        ]
        self._proc = subprocess.Popen(
            cmd,
            env=self._server_env(),
            cwd=str(self.home),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own process group: `prefect server start` spawns uvicorn and
            # service workers, and stop() must take all of them down.
            start_new_session=True,
        )

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        url = self.api_url + "/health"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrefectServerError(
                    f"prefect server exited with code {self._proc.returncode} "
                    f"before answering {url}; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        raise PrefectServerError(
            f"prefect server did not answer {url} within {self.startup_timeout:.0f}s; "
            f"log tail:\n{self.log_tail()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    pass
                # Kill the group even if the leader exited: workers may linger.
                _signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=self.stop_grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup_home(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
