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
