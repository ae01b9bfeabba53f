"""Shared, Home Assistant-free test fixtures.

HA fixtures live in tests/ha/conftest.py and tests/api/conftest.py so engine and native tests stay importable
without touching HA. Note that pytest-homeassistant-custom-component's autouse fixtures still apply to every
test (socket blocking, leftover thread/task/timer checks, asyncio debug mode): see CONTRIBUTING.md
"Test-suite rules".
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """Repository root, so tests find project files regardless of the working directory."""
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def private_emulated_npu() -> Iterator[str]:
    """This test session's emulator runs share an NPU of their own (rkllm_native/emulator/MODEL_FORMAT.md §8.1).

    By default every emulator process of a user shares one emulated NPU, so another engineer's test run on the
    same machine would slow this one's runs down and break its timing checks. Worker processes inherit the name.
    """
    name = f"pytest-{os.getpid()}"
    previous = os.environ.get("RKLLM_EMULATOR_NPU")
    os.environ["RKLLM_EMULATOR_NPU"] = name
    yield name
    if previous is None:
        os.environ.pop("RKLLM_EMULATOR_NPU", None)
    else:
        os.environ["RKLLM_EMULATOR_NPU"] = previous
    Path(f"/dev/shm/rkllm-emu-npu1-{os.getuid()}-{name}").unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def development_machine() -> Iterator[None]:
    """RKLLM_DEVELOP=1: the config flow suggests and accepts the emulator (custom_components/rkllm/develop.py).

    Every Home Assistant test here runs the emulator, as scripts/develop does; a real installation leaves it unset.
    """
    previous = os.environ.get("RKLLM_DEVELOP")
    os.environ["RKLLM_DEVELOP"] = "1"
    yield
    if previous is None:
        os.environ.pop("RKLLM_DEVELOP", None)
    else:
        os.environ["RKLLM_DEVELOP"] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """RKLLM_BARE_INSTALL=0 deselects the bare-install test: scripts/test runs it with one line only, not each."""
    if os.environ.get("RKLLM_BARE_INSTALL") != "0":
        return
    deselected = [item for item in items if item.get_closest_marker("bare_install")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("bare_install")]
