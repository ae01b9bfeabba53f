"""Shared, Home Assistant-free test fixtures.

HA fixtures live in tests/ha/conftest.py and tests/api/conftest.py so engine and native tests stay importable
without touching HA. Note that pytest-homeassistant-custom-component's autouse fixtures still apply to every
test (socket blocking, leftover thread/task/timer checks, asyncio debug mode): see README "Development".
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """Repository root, so tests find project files regardless of the working directory."""
    return REPO_ROOT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """RKLLM_BARE_INSTALL=0 deselects the bare-install test: scripts/test runs it with one line only, not each."""
    if os.environ.get("RKLLM_BARE_INSTALL") != "0":
        return
    deselected = [item for item in items if item.get_closest_marker("bare_install")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("bare_install")]
