"""Home Assistant fixtures and builders that tests/ha and tests/api both use.

Not a conftest: tests/conftest.py stays free of Home Assistant, so the two HA conftests import these fixtures by
name (pytest registers every fixture a conftest module holds, imported or not).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.components.light import ColorMode, LightEntity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import setup_test_component_platform

from custom_components.rkllm.const import (
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_CPU_CORES,
    CONF_LIBRARY_PATH,
    CONF_MODEL_PATH,
    CONF_NPU_DOMAIN_ID,
    CONF_PLATFORM,
    CONF_SLOTS,
    CONF_WORKER,
    DOMAIN,
)

KITCHEN_LIGHT = "light.kitchen_light"


def device_of(hass: HomeAssistant, identifier: str, config_entry_id: str) -> dr.DeviceEntry | None:
    """The entry's device with the identifier (rkllm, identifier).

    2026.10+ deprecates `async_get_device(identifiers=…)` (identifiers are unique per config entry only) in favour
    of the per-entry lookup; older releases only have the global one.
    """
    registry = dr.async_get(hass)
    by_identifier = getattr(registry, "async_get_device_by_identifier", None)
    if by_identifier is not None:
        device: dr.DeviceEntry | None = by_identifier((DOMAIN, identifier), config_entry_id)
        return device
    return registry.async_get_device(identifiers={(DOMAIN, identifier)})


def flow_input(library: str, model: Path | str, **overrides: Any) -> dict[str, Any]:
    """The config flow's user step as a user fills it in (a local worker on an RK3588); the entry stores the same."""
    data: dict[str, Any] = {
        CONF_LIBRARY_PATH: library,
        CONF_MODEL_PATH: str(model),
        CONF_PLATFORM: "rk3588",
        CONF_CONTEXT_LENGTH: 4096,
        CONF_CPU_CORES: 4,
        CONF_NPU_DOMAIN_ID: 0,
        CONF_ABI_PROFILE: "auto",
        CONF_SLOTS: "1",  # one runtime context per test entry; the slot tests ask for more
        CONF_WORKER: "local",
    }
    data.update(overrides)
    return data


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Load custom_components/rkllm."""


@pytest.fixture(autouse=True)
async def setup_homeassistant(hass: HomeAssistant) -> None:
    """`conversation` needs the exposed-entities store of `homeassistant` (docs/toolchain.md)."""
    assert await async_setup_component(hass, "homeassistant", {})


@pytest.fixture(autouse=True)
async def unload_rkllm_entries(hass: HomeAssistant) -> AsyncGenerator[None]:
    """Unload every rkllm entry a test left loaded, so its worker stops before the cleanup checks run."""
    yield
    for entry in hass.config_entries.async_entries(DOMAIN):
        if entry.state in (ConfigEntryState.LOADED, ConfigEntryState.SETUP_RETRY):
            await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()


class KitchenLight(LightEntity):
    """A real light entity: turning it on changes its state, as a user would see it."""

    _attr_name = "Kitchen Light"
    _attr_unique_id = "kitchen-light"
    _attr_color_mode = ColorMode.ONOFF
    _attr_supported_color_modes = {ColorMode.ONOFF}  # noqa: RUF012 - HA's attribute convention
    _attr_is_on = False
    _attr_should_poll = False

    async def async_turn_on(self, **kwargs: Any) -> None:
        """Switch on."""
        self._attr_is_on = True
        self.async_write_ha_state()

    async def async_turn_off(self, **kwargs: Any) -> None:
        """Switch off."""
        self._attr_is_on = False
        self.async_write_ha_state()


@pytest.fixture
async def kitchen_light(hass: HomeAssistant) -> str:
    """A light named Kitchen Light, off, exposed to Assist, with the intents that control it."""
    setup_test_component_platform(hass, "light", [KitchenLight()])
    assert await async_setup_component(hass, "light", {"light": {"platform": "test"}})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "conversation", {})
    await hass.async_block_till_done()
    async_expose_entity(hass, "conversation", KITCHEN_LIGHT, True)
    state = hass.states.get(KITCHEN_LIGHT)
    assert state is not None
    assert state.state == "off"
    return KITCHEN_LIGHT
