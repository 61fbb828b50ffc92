"""`otel-bridge serve` settings: flags, then environment, then a YAML file.

Every setting has one name, used as is in the YAML file, upper-cased with
the ``OTEL_BRIDGE_`` prefix in the environment, and with dashes as a flag
(``max_open_runs``: ``max_open_runs: 500``, ``OTEL_BRIDGE_MAX_OPEN_RUNS=500``,
``--max-open-runs 500``). Prefect's connection comes from Prefect's own
variables (``PREFECT_API_URL``, ``PREFECT_API_KEY``) and the OTLP export
from the standard ``OTEL_EXPORTER_OTLP_*`` ones, read by the exporter.

pydantic-settings does the layering (as in Prefect's own settings); a bad
value, from wherever, is one `ConfigError` naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["ConfigError", "ServeSettings", "load_settings"]

ENV_PREFIX = "OTEL_BRIDGE_"
Port = int


class ConfigError(ValueError):
    """A setting is wrong; the message says which and why."""


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True, validate_default=True
    )

    # -- Prefect (the event source of the forward path, the sink of the reverse one)
    prefect_api_url: Optional[str] = Field(
        None,
        validation_alias=AliasChoices("prefect_api_url", "OTEL_BRIDGE_PREFECT_API_URL", "PREFECT_API_URL"),
        description="Prefect's API, e.g. http://127.0.0.1:4200/api",
    )
    prefect_api_key: Optional[SecretStr] = Field(
        None,
        validation_alias=AliasChoices("prefect_api_key", "OTEL_BRIDGE_PREFECT_API_KEY", "PREFECT_API_KEY"),
        description="Prefect Cloud's API key",
    )
    prefect_api_key_file: Optional[Path] = Field(
        None, description="read prefect_api_key from this file (a mounted secret)")
    subscribe: bool = Field(True, description="follow the server's events (needs prefect_api_url)")
    event_prefixes: list[str] = Field(["prefect.task-run.", "prefect.flow-run."],
                                      description="the events to follow, by name prefix")
    backfill_seconds: float = Field(
        600.0, ge=0, description="on a first start, also read events this far back"
    )

    # -- listening
    listen_host: str = Field("127.0.0.1", description="where every endpoint binds")
    http_port: Port = Field(8686, ge=0, le=65535, description="/healthz /readyz /metrics /v1/events")
    push_token: Optional[SecretStr] = Field(
        None, description="bearer token for POST /v1/events; the endpoint is off without one "
                          "(as a flag it shows in ps: prefer the environment or push_token_file)"
    )
    push_token_file: Optional[Path] = Field(
        None, description="read push_token from this file (a mounted secret)")
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0,
                                description="bytes a request may carry, on every endpoint "
                                            "(also once gunzipped)")
    otlp_receiver: bool = Field(False, description="accept OTLP spans for the reverse path")
    otlp_token: Optional[SecretStr] = Field(
        None, description="bearer token the OTLP receiver requires (Authorization header, gRPC "
                          "authorization metadata); required unless listen_host is loopback")
    otlp_token_file: Optional[Path] = Field(
        None, description="read otlp_token from this file (a mounted secret)")
    tls_cert_file: Optional[Path] = Field(
        None, description="PEM certificate (chain): every listener serves TLS with it")
    tls_key_file: Optional[Path] = Field(None, description="PEM private key of tls_cert_file")
    otlp_grpc_port: Port = Field(4317, ge=0, le=65535, description="the OTLP/gRPC receiver")
    otlp_http_port: Port = Field(4318, ge=0, le=65535, description="the OTLP/HTTP receiver")

    # -- Prefect's log lines (README: "Logs")
    logs: bool = Field(
        False, description="also follow Prefect's flow-run and task-run log lines (REST, "
                           "POST /api/logs/filter, and the logs websocket where the server "
                           "streams them) and export each as an OTLP log record on its "
                           "run's span: to OTEL_EXPORTER_OTLP_LOGS_* / _OTLP_*, or logs_file "
                           "with forward_to: file")
    logs_file: Optional[Path] = Field(None, description="OTLP/JSON log lines, with logs and "
                                                        "forward_to: file")
    logs_poll_seconds: float = Field(2.0, gt=0, description="how often to read new log lines")
    logs_websocket: bool = Field(
        True, description="with logs: also subscribe to the logs websocket (/api/logs/out) and "
                          "take the lines it sends at once; REST is polled either way")
    logs_lateness_seconds: float = Field(
        120.0, gt=0, description="a log line the server stores up to this long after its "
                                 "timestamp is still read (it is read a second time then)")

    # -- run metrics (docs/metrics.md)
    metrics: bool = Field(
        False, description="also export run metrics (durations, errors, active and stuck runs, "
                           "by the CI/CD conventions): to OTEL_EXPORTER_OTLP_METRICS_* / _OTLP_* "
                           "every OTEL_METRIC_EXPORT_INTERVAL ms, or metrics_file with forward_to: file")
    metrics_file: Optional[Path] = Field(None, description="OTLP/JSON metric lines, with metrics "
                                                           "and forward_to: file")
    metrics_shard: str = Field(
        "0/1", description="K/N: count only the runs whose span id is K modulo N, for N replicas "
                           "that follow the same server (each K once): their sum is then exact")
    metrics_stuck_late_seconds: float = Field(300.0, gt=0, description="a run Late this long is stuck")
    metrics_stuck_pending_seconds: float = Field(600.0, gt=0,
                                                 description="a run Pending this long is stuck")
    metrics_stuck_running_seconds: float = Field(3600.0, gt=0,
                                                 description="a run Running this long is stuck")

    # -- where things go
    forward_to: Literal["otlp", "file"] = Field(
        "otlp", description="spans to OTLP (the OTEL_EXPORTER_OTLP_* variables) or to a file")
    forward_file: Optional[Path] = Field(None, description="OTLP/JSON lines, with forward_to: file")
    reverse_to: Literal["prefect", "file"] = Field(
        "prefect", description="events made of received spans: to Prefect, or to a file")
    reverse_file: Optional[Path] = Field(None, description="event JSON lines, with reverse_to: file")

    # -- nothing lost
    store_path: Path = Field(
        default_factory=lambda: default_store_path(),
        description="the SQLite store (default: $XDG_STATE_HOME/otel-bridge/store.sqlite3, "
                    "else ~/.local/state/otel-bridge/store.sqlite3)")
    outbox_max_bytes: int = Field(1024**3, gt=0, description="disk held for undelivered output")
    export_batch_items: int = Field(512, gt=0, description="items sent to a sink at a time")
    retry_initial_seconds: float = Field(0.5, gt=0, description="the first wait after a failed "
                                                                "export; it doubles")
    retry_max_seconds: float = Field(30.0, gt=0, description="the longest wait between retries")
    shutdown_grace_seconds: float = Field(20.0, ge=0, description="on SIGTERM, how long to "
                                                                  "deliver what is left")

    # -- assembly (see docs/mapping.md, "Assembly (streams)")
    linger_seconds: float = Field(5.0, ge=0, description="after a run's final state, wait "
                                                         "this long for late states")
    run_timeout_seconds: float = Field(6 * 3600.0, gt=0, description="a run with no event for "
                                                                     "this long is ended")
    max_open_runs: int = Field(10_000, gt=0, description="past this, the least recently active "
                                                         "run is ended")
    max_events_per_run: int = Field(1_000, gt=0, description="events kept per run; the rest "
                                                             "are counted")
    prefect_trace_context: Literal["link", "adopt", "ignore"] = Field(
        "link", description="Prefect's own trace context on task runs: link to it, adopt its "
                            "trace, or ignore it")

    # -- logs
    log_format: Literal["json", "text"] = Field(
        "json", description="one JSON object per line, or text")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="the least a log line must be to be written")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", "forward_to", "reverse_to", "prefect_trace_context",
                     mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("metrics_shard")
    @classmethod
    def _shard(cls, value: str) -> str:
        from otel_bridge.service.run_metrics import Shard

        Shard.parse(value)  # raises ValueError, said with the setting's name
        return value.strip()

    @model_validator(mode="after")
    def _secrets(self) -> "ServeSettings":
        """Secrets from their files; surrounding whitespace stripped (a
        Kubernetes secret file ends in a newline), as the receiving side
        strips what it is sent."""
        for name in _SECRETS:
            value, path = getattr(self, name), getattr(self, f"{name}_file")
            if path is not None:
                if value is not None:
                    raise ValueError(f"{name} and {name}_file are both set: set one")
                try:
                    value = SecretStr(path.read_text())
                except OSError as exc:
                    raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
            if value is not None:
                stripped = value.get_secret_value().strip()
                if not stripped:
                    raise ValueError(f"{name} is empty")
                setattr(self, name, SecretStr(stripped))
        return self

    def secret_values(self) -> list[str]:
        """What no log line may show."""
        return [getattr(self, n).get_secret_value() for n in _SECRETS if getattr(self, n)]

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.forward_to == "file" and self.forward_file is None:
            raise ValueError("forward_to is 'file' but forward_file is not set")
        if self.logs and self.forward_to == "file" and self.logs_file is None:
            raise ValueError("logs with forward_to 'file' needs logs_file")
        if self.metrics and self.forward_to == "file" and self.metrics_file is None:
            raise ValueError("metrics with forward_to 'file' needs metrics_file")
        if self.logs and not self.follows_prefect:
            raise ValueError("logs are read from the Prefect server: set PREFECT_API_URL "
                             "(and keep subscribe on)")
        if self.reverse_to == "file" and self.reverse_file is None:
            raise ValueError("reverse_to is 'file' but reverse_file is not set")
        if self.otlp_receiver and self.reverse_to == "prefect" and not self.prefect_api_url:
            raise ValueError("otlp_receiver sends events to Prefect: set PREFECT_API_URL "
                             "(or reverse_to: file)")
        if self.otlp_receiver and not self.otlp_token and not _is_loopback(self.listen_host):
            raise ValueError(f"the OTLP receiver would take spans from anyone who can reach "
                             f"{self.listen_host}: set otlp_token (or listen on 127.0.0.1)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if not self.prefect_api_url and self.subscribe and not self.push_token and not self.otlp_receiver:
            raise ValueError("nothing to listen to: follow a Prefect server (PREFECT_API_URL or "
                             "--prefect-api-url), take pushed events (--push-token or "
                             "OTEL_BRIDGE_PUSH_TOKEN), or receive OTLP spans (--otlp-receiver)")
        return self

    @property
    def follows_prefect(self) -> bool:
        return self.subscribe and bool(self.prefect_api_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if _yaml_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=_yaml_file),)
        return sources


_yaml_file: Optional[Path] = None


def default_store_path() -> Path:
    """Where a service keeps its state when not told: the XDG state
    directory, not wherever it was started (a container sets
    OTEL_BRIDGE_STORE_PATH to its volume)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "otel-bridge" / "store.sqlite3"
_SECRETS = ("prefect_api_key", "push_token", "otlp_token")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(flags: dict[str, Any], config_file: Optional[str] = None) -> ServeSettings:
    """Flags (only those given) over ``OTEL_BRIDGE_*`` over the YAML file."""
    global _yaml_file
    config_file = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    if config_file and not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist")
    _yaml_file = Path(config_file) if config_file else None
    try:
        return ServeSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except Exception as exc:  # a YAML file that does not parse
        raise ConfigError(f"cannot read {config_file}: {exc}") from None
    finally:
        _yaml_file = None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        if not where:  # a rule across settings
            lines.append("bad settings: " + error["msg"].removeprefix("Value error, "))
            continue
        if error["type"] == "extra_forbidden":
            # A misspelt name may hold a secret (push_tokn: ...): never its value.
            lines.append(f"unknown setting {where!r} (its value is not shown)")
            continue
        shown = "" if where in _SECRETS else f", got {error.get('input')!r}"
        lines.append(
            f"bad setting {where} (flag --{where.replace('_', '-')}, env {ENV_PREFIX}{where.upper()}, "
            f"or `{where}:` in the config file): {error['msg']}{shown}"
        )
    return "; ".join(lines)
