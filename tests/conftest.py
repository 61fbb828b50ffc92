import sys
from pathlib import Path

import pytest

# The shared helpers (support: factories, helpers, backends, ...) are imported
# by plain name: `from support.helpers import convert`.
sys.path.insert(0, str(Path(__file__).parent))

from support import backends  # noqa: E402


# One real Jaeger per test module that asks for it.
@pytest.fixture(scope="module")
def jaeger():
    with backends.jaeger() as j:
        yield j


# `make unit` (-m "not integration") must leave out every test that starts a
# real Prefect server or a real backend, marked or not as integration itself;
# a test that asks for the real Jaeger above starts a backend.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if "jaeger" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.backend)
        if item.get_closest_marker("prefect_server") or item.get_closest_marker("backend"):
            item.add_marker(pytest.mark.integration)
