"""What a user installs: the wheel, into a fresh virtual environment, far
from the source tree; and the sdist, with what the README points at."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
import urllib.request
import venv
from pathlib import Path

import pytest
from support.helpers import FIXTURES
from support.backends import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return out


def test_the_sdist_carries_the_docs_the_configurations_the_examples_and_the_container_build(built):
    (sdist,) = built.glob("*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    # Every page the README links to, so that an sdist reads as the repo does.
    docs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    assert "docs/architecture.md" in docs
    for wanted in ("collector-config/sidecar.yaml", "collector-config/tempo.yaml",
                   "examples/minimal_engine.py", "Dockerfile", "README.md",
                   "scripts/train-event-dictionary.py",
                   "otel_bridge/translate/prefect-events.zdict", *docs):
        assert wanted in names, wanted


@pytest.mark.timeout(600)
def test_the_wheel_installs_into_a_fresh_environment_and_runs(built, tmp_path):
    (wheel,) = built.glob("*.whl")
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True,
                   timeout=500)
    bridge = str(env_dir / "bin" / "otel-bridge")
    away = tmp_path / "elsewhere"  # no source tree to import from by accident
    away.mkdir()
    version = subprocess.run([bridge, "--version"], capture_output=True, text=True, cwd=away)
    assert version.stdout.strip() == "otel-bridge 0.1.0"
    where = subprocess.run([str(python), "-c", "import otel_bridge; print(otel_bridge.__file__)"],
                           capture_output=True, text=True, cwd=away).stdout
    assert str(env_dir) in where
    converted = subprocess.run([bridge, "convert", str(FIXTURES / "retries-immediate.jsonl"),
                                "--to", "tree"], capture_output=True, text=True, cwd=away)
    assert converted.returncode == 0 and "flaky_then_ok" in converted.stdout, converted.stderr
    port = free_port()
    serve = subprocess.Popen([bridge, "serve", "--push-token", "a-token", "--http-port", str(port),
                              "--store-path", str(tmp_path / "store.sqlite3")], cwd=away,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert serve.poll() is None, serve.stderr.read()
                assert time.monotonic() < deadline, "serve did not answer /healthz"
                time.sleep(0.2)
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
