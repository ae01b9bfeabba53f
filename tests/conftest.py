"""Shared, Home Assistant-free test fixtures.

HA fixtures live in tests/ha/conftest.py and tests/api/conftest.py so engine and native tests stay importable
without touching HA. Note that pytest-homeassistant-custom-component's autouse fixtures still apply to every
test (socket blocking, leftover thread/task/timer checks, asyncio debug mode): see README "Development".
"""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """Repository root, so tests find project files regardless of the working directory."""
    return REPO_ROOT
