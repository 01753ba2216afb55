from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Cluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real ``tether server`` / ``tether worker`` subprocesses, killed at teardown."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
