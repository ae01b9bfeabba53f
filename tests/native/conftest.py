"""Fixtures for the native tests: the emulator library of each ABI profile, without a speed override."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_native.build import emulator_library
from rkllm_native.runtime import Runtime


@pytest.fixture(params=["v12x", "v130"])
def binding_profile(request: pytest.FixtureRequest) -> str:
    """Each binding test runs against both emulator flavours."""
    profile: str = request.param
    return profile


@pytest.fixture
def emulator_lib(binding_profile: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The emulator library of the profile; the model file's `speed` decides timing, not the environment."""
    monkeypatch.delenv("RKLLM_EMULATOR_SPEED", raising=False)
    return emulator_library("v130" if binding_profile == "v130" else "v12x")


@pytest.fixture
def runtime(emulator_lib: Path) -> Iterator[Runtime]:
    """A Runtime on the emulator, destroyed after the test."""
    with Runtime(emulator_lib) as instance:
        yield instance
