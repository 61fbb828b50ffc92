"""The Collector configs in collector-config/ on the real Collector.

Every YAML file there (and the collector config embedded in the Kubernetes
ConfigMap) passes the real Collector's ``validate`` with the environment it
documents, tempo.yaml included, and so do sidecar.yaml, prometheus.yaml and
victorialogs.yaml merged into one Collector (one pipeline per signal);
sidecar.yaml runs for real on loopback ports, and otel-bridge's spans sent
through it (by the CLI, as a real process) are read back from both of its
legs. prometheus.yaml and victorialogs.yaml run for real in
test_metrics_logs_backends.py.

Its Tempo leg does not go to Grafana Tempo: Tempo is AGPL-3.0 and the project
runs no AGPL software, not even in tests. It goes over OTLP/gRPC, as it would
to Tempo's distributor, to a second real Collector with gRPC's default 4 MiB
receive limit (as Tempo's), which writes what it gets to a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from support.helpers import ROOT, SAMPLES, convert, convert_to_otlp, load_jsonl
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from support import backends

from otel_bridge.sinks.otlp import MAX_REQUEST_BYTES
from otel_bridge.sinks.sdk import to_readable_spans

# A cold cache builds Jaeger and the Collector from source first.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.backend, pytest.mark.integration]

GRPC_MAX = 4 * 1024 * 1024
CONFIG_DIR = ROOT / "collector-config"
SIDECAR = CONFIG_DIR / "sidecar.yaml"
KUBERNETES = CONFIG_DIR / "kubernetes" / "prefect-worker-sidecars.yaml"
README = CONFIG_DIR / "README.md"

# What a user must set (no default in the configs), with example values.
REQUIRED_ENV = {
    "JAEGER_OTLP_ENDPOINT": "jaeger-collector.observability:4317",
    "TEMPO_OTLP_ENDPOINT": "tempo-distributor.observability:4317",
    "PROMETHEUS_OTLP_ENDPOINT": "http://prometheus.monitoring:9090/api/v1/otlp",
    "VICTORIALOGS_OTLP_ENDPOINT": "http://victorialogs.logging:9428/insert/opentelemetry",
}
# One Collector for every signal: these files merged (`--config` each).
EVERY_SIGNAL = [CONFIG_DIR / "sidecar.yaml", CONFIG_DIR / "prometheus.yaml",
                CONFIG_DIR / "victorialogs.yaml"]
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def yaml_files() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def is_k8s(path: Path) -> bool:
    return any("apiVersion" in d and "kind" in d for d in k8s_docs(path))


def embedded_configs(path: Path) -> dict[str, str]:
    """ConfigMap entries holding a collector config: {"<configmap>/<key>": text}."""
    out = {}
    for doc in k8s_docs(path):
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")) and "pipelines" in text:
                    out[f"{doc['metadata']['name']}/{key}"] = text
    return out


def k8s_container(path: Path, name: str) -> dict:
    for doc in k8s_docs(path):
        if doc.get("kind") == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == name:
                    return c
    raise AssertionError(f"no container {name!r} in {path}")


def container_env(container: dict) -> dict[str, str]:
    """A container's env as the process would see it; secret refs become placeholders."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            env[item["name"]] = "Basic cGxhY2Vob2xkZXI="
    return env


def env_refs(text: str) -> dict[str, str | None]:
    """{VAR: default or None} for every ${env:VAR[:-default]} in a config."""
    return {m.group(1): (m.group(2)[2:] if m.group(2) else None) for m in ENV_REF.finditer(text)}


# ---------------------------------------------------------------- validate


def test_the_expected_files_are_there():
    names = {str(p.relative_to(CONFIG_DIR)) for p in yaml_files()}
    assert {"sidecar.yaml", "jaeger.yaml", "tempo.yaml", "prometheus.yaml", "victorialogs.yaml",
            "kubernetes/prefect-worker-sidecars.yaml"} <= names
    assert README.is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_validates(path, tmp_path):
    if is_k8s(path):
        configs = embedded_configs(path)
        assert configs, f"{path} has no ConfigMap with a collector config"
        env = container_env(k8s_container(path, "otel-collector"))
        for name, text in configs.items():
            extracted = tmp_path / name.replace("/", "__")
            extracted.write_text(text)
            # With exactly the environment the Deployment gives the container.
            ok, output = backends.validate_collector_config(extracted, env)
            assert ok, f"{name}:\n{output}"
    else:
        ok, output = backends.validate_collector_config(path, REQUIRED_ENV)
        assert ok, output


# How the Collector v0.165 says an exporter has no endpoint.
NO_ENDPOINT = {"otlp_grpc": 'requires a non-empty "endpoint"',
               "otlp_http": "at least one endpoint must be specified"}


@pytest.mark.parametrize("path", [CONFIG_DIR / name for name in (
    "sidecar.yaml", "jaeger.yaml", "tempo.yaml", "prometheus.yaml", "victorialogs.yaml")],
    ids=lambda p: p.name)
def test_endpoints_are_required(path):
    """No endpoint default to send data to a wrong place: validate fails
    without them and names the exporter."""
    needed = {k for k, default in env_refs(path.read_text()).items() if default is None}
    assert needed and needed <= set(REQUIRED_ENV)
    env = {k: "" for k in needed}
    ok, output = backends.validate_collector_config(path, env)
    assert not ok
    (exporter,) = {name.split("/")[0] for name in yaml.safe_load(path.read_text())["exporters"]}
    assert NO_ENDPOINT[exporter] in output
    assert f"exporters::{exporter}/" in output


def test_the_files_merge_into_one_collector_for_every_signal():
    """sidecar.yaml + prometheus.yaml + victorialogs.yaml, each a --config:
    one Collector with a traces, a metrics and a logs pipeline, each to its
    own backends, the shared parts (receiver, processors, extension) the same
    in all three so that none overrides another."""
    ok, output = backends.validate_collector_config(EVERY_SIGNAL, REQUIRED_ENV)
    assert ok, output
    docs = [yaml.safe_load(p.read_text()) for p in EVERY_SIGNAL]
    for key in ("extensions", "receivers", "processors"):
        assert all(d[key] == docs[0][key] for d in docs), key
    assert all(d["service"]["telemetry"] == docs[0]["service"]["telemetry"] for d in docs)
    printed = subprocess.run(
        [str(backends.collector_binary()), "print-config",
         *(f"--config={p}" for p in EVERY_SIGNAL)],
        env={**os.environ, **REQUIRED_ENV}, capture_output=True, text=True,
        timeout=60)
    assert printed.returncode == 0, printed.stderr
    pipelines = yaml.safe_load(printed.stdout)["service"]["pipelines"]
    assert {signal: p["exporters"] for signal, p in pipelines.items()} == {
        "traces": ["otlp_grpc/jaeger", "otlp_grpc/tempo"],
        "metrics": ["otlp_http/prometheus"],
        "logs": ["otlp_http/victorialogs"],
    }


def test_a_bad_value_from_the_environment_is_refused():
    env = dict(REQUIRED_ENV, JAEGER_OTLP_INSECURE="maybe")
    ok, output = backends.validate_collector_config(SIDECAR, env)
    assert not ok
    assert "tls.insecure" in output


def test_every_variable_is_documented():
    readme = README.read_text()
    for path in yaml_files():
        for var in env_refs(path.read_text()):
            assert f"`{var}`" in readme, f"{var} (used in {path.name}) is not in {README}"


def collector_docs(path: Path) -> list[dict]:
    """The collector configs in a file: itself, or those its ConfigMap embeds."""
    if is_k8s(path):
        return [yaml.safe_load(t) for t in embedded_configs(path).values()]
    return [yaml.safe_load(path.read_text())]


def test_configs_use_the_current_exporter_names():
    for path in yaml_files():
        exporters = set()
        for doc in collector_docs(path):
            exporters |= {name.split("/")[0] for name in doc["exporters"]}
        assert exporters <= {"otlp_grpc", "otlp_http", "debug", "file"}, (path, exporters)


def test_every_exporter_cuts_requests_under_4_mib():
    """Jaeger's and Tempo's OTLP/gRPC receivers refuse a request over 4 MiB
    whole: every exporter queues by bytes and sends at most 3,000,000 bytes
    (MAX_REQUEST_BYTES, as otel-bridge's own OTLP export) a request. For
    tempo.yaml, which no test runs, this is the check."""
    assert MAX_REQUEST_BYTES < GRPC_MAX
    checked = []
    for path in yaml_files():
        for doc in collector_docs(path):
            for name, exporter in doc["exporters"].items():
                queue = exporter["sending_queue"]
                assert queue["enabled"] is True and queue["sizer"] == "bytes", (path.name, name)
                assert 0 < int(queue["batch"]["max_size"]) <= MAX_REQUEST_BYTES, (path.name, name)
                checked.append((path.name, name))
    assert ("tempo.yaml", "otlp_grpc/tempo") in checked
    assert ("sidecar.yaml", "otlp_grpc/tempo") in checked
    assert ("prometheus.yaml", "otlp_http/prometheus") in checked
    assert ("victorialogs.yaml", "otlp_http/victorialogs") in checked


# ---------------------------------------------------------------- Kubernetes


def test_configmap_is_sidecar_yaml():
    (text,) = embedded_configs(KUBERNETES).values()
    assert yaml.safe_load(text) == yaml.safe_load(SIDECAR.read_text())


def test_kubernetes_wiring():
    docs = {d["kind"]: d for d in k8s_docs(KUBERNETES)}
    assert {"Secret", "ConfigMap", "Deployment"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["prefect-worker", "otel-bridge", "otel-collector"]

    collector = k8s_container(KUBERNETES, "otel-collector")
    # The config file the collector is started with is the mounted ConfigMap key.
    (arg,) = [a for a in collector["args"] if a.startswith("--config=")]
    config_file = Path(arg.split("=", 1)[1])
    (mount,) = [m for m in collector["volumeMounts"] if str(config_file).startswith(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_file.name in configmap["data"]
    # Every variable the config needs is set; secrets come from the Secret.
    env = {e["name"]: e for e in collector["env"]}
    needed = {k for k, d in env_refs(configmap["data"][config_file.name]).items() if d is None}
    assert needed <= set(env)
    secret_keys = set(docs["Secret"]["stringData"])
    for item in [*collector["env"], *k8s_container(KUBERNETES, "otel-bridge")["env"]]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == docs["Secret"]["metadata"]["name"] and ref["key"] in secret_keys
    for name in ("JAEGER_AUTH_HEADER", "TEMPO_AUTH_HEADER"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    # Probes on the health_check port.
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert ports["health"] == 13133 and collector["readinessProbe"]["httpGet"]["port"] == "health"

    bridge = k8s_container(KUBERNETES, "otel-bridge")
    assert bridge["command"] == ["otel-bridge", "serve"]
    benv = {e["name"]: e.get("value") for e in bridge["env"]}
    assert benv["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://localhost:{ports['otlp-grpc']}"
    assert benv["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert "PREFECT_API_URL" in benv
    # Its own settings are valid settings, and the probes hit its port.
    from otel_bridge.service.config import load_settings

    settings_env = {k: v for k, v in benv.items() if k.startswith("OTEL_BRIDGE_") or k == "PREFECT_API_URL"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings_env.items():
            patch.setenv(name, value)
        settings = load_settings({})
    (port,) = bridge["ports"]
    assert port["containerPort"] == settings.http_port
    assert bridge["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert bridge["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    (mount,) = bridge["volumeMounts"]
    assert settings.store_path.parent == Path(mount["mountPath"])


# ---------------------------------------------------------------- for real


def sidecar_env(jaeger, tempo_leg) -> dict[str, str]:
    """sidecar.yaml's environment for loopback: the ports come from
    backends.collector() (OTELCOL_*_PORT), the rest from here."""
    return {
        "OTELCOL_BIND_ADDRESS": backends.LOOPBACK,
        "JAEGER_OTLP_ENDPOINT": jaeger.otlp_grpc_endpoint,
        "JAEGER_OTLP_INSECURE": "true",
        "TEMPO_OTLP_ENDPOINT": tempo_leg.otlp_grpc_endpoint,
        "TEMPO_OTLP_INSECURE": "true",
        "OTELCOL_BATCH_TIMEOUT": "200ms",
    }


@pytest.fixture(scope="module")
def tempo_leg(tmp_path_factory):
    """What sidecar.yaml's Tempo exporter sends to (see the module docstring);
    its file is ``tempo_leg.env["COPY_FILE"]``."""
    with backends.file_collector(tmp_path_factory.mktemp("tempo-leg") / "received.jsonl") as col:
        yield col


@pytest.fixture(scope="module")
def sidecar(jaeger, tempo_leg):
    with backends.collector(SIDECAR, sidecar_env(jaeger, tempo_leg)) as col:
        yield col


def fresh_events(paths: list[Path], out: Path) -> list[dict]:
    """The sample events with every UUID replaced by a new one (consistently),
    so the runs, and so the trace and span ids, are new for each test."""
    mapping: dict[str, str] = {}
    text = "".join(p.read_text() for p in paths)
    text = UUID.sub(lambda m: mapping.setdefault(m.group(0), str(uuid.uuid4())), text)
    out.write_text(text)
    return load_jsonl(out)


def run_convert(events_path: Path, collector, protocol: str, service: str) -> None:
    convert_to_otlp([events_path], collector, protocol, service)


def jaeger_spans(jaeger, trace_hex: str, n: int) -> dict[str, dict]:
    trace = jaeger.wait_for_trace(trace_hex, min_spans=n)
    return {s["spanID"]: dict(s, serviceName=trace["processes"][s["processID"]]["serviceName"])
            for s in trace["spans"]}


def tempo_leg_spans(tempo_leg, trace_hex: str, n: int) -> dict[str, dict]:
    """The trace's spans as the Tempo leg received them, each exactly once."""
    got = backends.wait_for_file_trace(Path(tempo_leg.env["COPY_FILE"]), trace_hex, min_spans=n)
    by_id = {backends.otlp_id_hex(s["spanId"], 8): s for s in got}
    assert len(by_id) == len(got), "a span reached the Tempo leg twice"
    return by_id


def plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_sidecar_forwards_bridge_spans_to_jaeger_and_the_tempo_leg(sidecar, jaeger, tempo_leg,
                                                                   protocol, tmp_path):
    service = f"prefect-sidecar-{uuid.uuid4().hex[:8]}"
    raw = fresh_events(sorted(SAMPLES.glob("*.jsonl")), tmp_path / "events.jsonl")
    expected = convert(raw)
    run_convert(tmp_path / "events.jsonl", sidecar, protocol, service)

    for trace_id in {s.trace_id for s in expected}:
        mine = {s.span_id_hex: s for s in expected if s.trace_id == trace_id}
        trace_hex = format(trace_id, "032x")
        in_jaeger = jaeger_spans(jaeger, trace_hex, len(mine))
        in_tempo = tempo_leg_spans(tempo_leg, trace_hex, len(mine))
        assert set(in_jaeger) == set(mine) == set(in_tempo)
        for span_id, span in mine.items():
            parent = format(span.parent_span_id, "016x") if span.parent_span_id else None
            j = in_jaeger[span_id]
            assert j["operationName"] == span.name
            assert j["serviceName"] == service
            assert [r["spanID"] for r in j["references"] if r["refType"] == "CHILD_OF"] == (
                [parent] if parent else [])
            assert [backends.jaeger_tags(log["fields"])["event"] for log in j["logs"]] == [
                e.name for e in span.events]
            t = in_tempo[span_id]
            assert t["name"] == span.name
            assert t["resource"]["service.name"] == service
            assert (backends.otlp_id_hex(t["parentSpanId"], 8) if t.get("parentSpanId") else None) == parent
            assert backends.otlp_span_kind(t) == span.kind.name.lower()
            # What Tempo would get is otel-bridge's span, attribute for
            # attribute, each state's span event with its own attributes.
            assert backends.otlp_attrs(t["attributes"]) == {
                k: plain(v) for k, v in span.attributes.items()}
            assert [(e["name"], backends.otlp_attrs(e.get("attributes"))) for e in t["events"]] == [
                (e.name, {k: plain(v) for k, v in e.attributes.items()}) for e in span.events]
            assert (t.get("status") or {}).get("message", "") == span.status_message

    log = sidecar.process.log()
    assert "deprecated" not in log.lower(), log
    assert " error " not in log.lower() and "\terror\t" not in log.lower(), log


def test_sidecar_cuts_large_batches_under_the_backends_limit(sidecar, jaeger, tempo_leg, tmp_path):
    """20 failed flow runs, each with a failed task run, all with
    100,000-character state messages: 40 spans of about 200 kB (the message
    in the status and on the Failed span event) in one request of about
    8 MB from the bridge, which the sidecar's receiver takes (64 MiB limit)
    and both its exporters send on in pieces under the 4 MiB gRPC limit of
    Jaeger's receiver and of the Tempo leg's (sent straight to Jaeger it is
    refused: test_backend_behaviour).

    Not more: Tempo's default ingestion rate limit (15 MB/s, burst 20 MB)
    would refuse more at once, without retry info, which the Collector takes
    as permanent (see collector-config/README.md)."""
    service = f"prefect-large-{uuid.uuid4().hex[:8]}"
    template = load_jsonl(SAMPLES / "task_fails.jsonl")
    lines = []
    for i in range(20):
        mapping: dict[str, str] = {}
        text = UUID.sub(lambda m: mapping.setdefault(m.group(0), str(uuid.uuid4())),
                        "\n".join(json.dumps(e) for e in template))
        events = [json.loads(x) for x in text.splitlines()]
        for e in events:
            if e["event"].endswith("Failed"):
                e["resource"]["prefect.state-message"] = f"{i}:" + "x" * 100_000
        lines.extend(events)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    expected = convert(lines)
    assert len(expected) == 40
    # Else nothing here needs cutting.
    assert encode_spans(to_readable_spans(expected, Resource({"service.name": service}))
                        ).ByteSize() > GRPC_MAX
    run_convert(tmp_path / "events.jsonl", sidecar, "grpc", service)
    for trace_id in {s.trace_id for s in expected}:
        n = sum(1 for s in expected if s.trace_id == trace_id)
        trace_hex = format(trace_id, "032x")
        try:
            assert len(jaeger_spans(jaeger, trace_hex, n)) == n
            got = tempo_leg_spans(tempo_leg, trace_hex, n)
        except backends.BackendError as exc:
            raise AssertionError(f"{exc}\ncollector log:\n{sidecar.process.log_tail(20)}") from exc
        # The flow run and its task run both failed with the long message.
        assert [len(s["status"]["message"]) > 100_000 for s in got.values()] == [True] * n


def test_sidecar_health_and_metrics(sidecar):
    status, body = backends.http_get(sidecar.health_url)
    assert status == 200
    assert json.loads(body)["status"] == "Server available"
    status, body = backends.http_get(
        f"http://{backends.LOOPBACK}:{sidecar.ports['OTELCOL_METRICS_PORT']}/metrics")
    assert status == 200
    assert b"otelcol_process_uptime" in body
