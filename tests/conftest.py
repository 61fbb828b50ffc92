import sys
from pathlib import Path

import pytest

# tests/ modules (factories, support) import each other by plain name.
sys.path.insert(0, str(Path(__file__).parent))

from support import backends  # noqa: E402


# One real Jaeger per test module that asks for it.
@pytest.fixture(scope="module")
def jaeger():
    with backends.jaeger() as j:
        yield j
