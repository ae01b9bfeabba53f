"""The engine sensors: pushed on engine changes, with the units, classes and device users graph by."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components.sensor import ATTR_STATE_CLASS, SensorStateClass
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import ATTR_UNIT_OF_MEASUREMENT, PERCENTAGE, STATE_UNKNOWN, EntityCategory, UnitOfTime
from homeassistant.core import Event, EventStateChangedData, HomeAssistant, callback
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.event import async_track_state_change_event
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.const import DOMAIN
from rkllm_engine.types import ChatMessage, ChatRequest, EngineError, EngineState, Priority
from tests.ha.conftest import entry_data
from tests.ha_shared import device_of
from tests.waits import wait_for_metrics

CONTEXT_LENGTH = 1024
EMULATOR_ENV = {"RKLLM_EMULATOR_SPEED": "20"}
SENSOR_KEYS = (
    "status",
    "health",
    "queue_depth",
    "last_ttft",
    "voice_response_time",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "kv_cache_usage",
    "worker_restarts",
)


def write_model(path: Path, *extra_lines: str) -> Path:
    """An emulator model file (rkllm_native/emulator/MODEL_FORMAT.md) answering every user turn."""
    lines = [
        "rkllm-emulator-model 1",
        "calibration = qwen2.5-1.5b-rk3588",
        "load_time_ms = 200",
        'answer user "*" = The kitchen light is on and the coffee is ready.',
        *extra_lines,
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def setup_entry(hass: HomeAssistant, library: str, model: Path) -> MockConfigEntry:
    """Add and set up an entry for `model` (emulated 20x faster than an RK3588, so throughput figures exist)."""
    data = entry_data(library, model, context_length=CONTEXT_LENGTH, worker_env=EMULATOR_ENV)
    entry = MockConfigEntry(domain=DOMAIN, title="assist", data=data)
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return entry


@pytest.fixture
async def loaded_entry(hass: HomeAssistant, emulator_lib: str, tmp_path: Path) -> AsyncIterator[MockConfigEntry]:
    """An rkllm entry on the emulator library, set up; unloaded afterwards so no worker is left."""
    entry = await setup_entry(hass, emulator_lib, write_model(tmp_path / "assist.model"))
    assert entry.state is ConfigEntryState.LOADED
    yield entry
    await hass.config_entries.async_unload(entry.entry_id)


def sensor_entity_ids(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, str]:
    """Sensor key → entity id, found through the registry by unique id."""
    registry = er.async_get(hass)
    found: dict[str, str] = {}
    for key in SENSOR_KEYS:
        entity_id = registry.async_get_entity_id("sensor", DOMAIN, f"{entry.entry_id}_{key}")
        assert entity_id is not None, f"no sensor {key}"
        found[key] = entity_id
    return found


def record_states(hass: HomeAssistant, entity_ids: list[str]) -> dict[str, list[str]]:
    """Every state each entity is written with from now on, in order."""
    seen: dict[str, list[str]] = {entity_id: [] for entity_id in entity_ids}

    @callback
    def remember(event: Event[EventStateChangedData]) -> None:
        new_state = event.data["new_state"]
        if new_state is not None:
            seen[event.data["entity_id"]].append(new_state.state)

    async_track_state_change_event(hass, entity_ids, remember)
    return seen


def chat(text: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)], priority=Priority.CONVERSATION)


async def test_sensors_are_registered_with_units_classes_and_the_runtime_device(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    entity_ids = sensor_entity_ids(hass, loaded_entry)
    registry = er.async_get(hass)
    device = device_of(hass, loaded_entry.entry_id, loaded_entry.entry_id)
    assert device is not None
    assert device.sw_version == "1.2.3"  # the emulator's v12x runtime version
    for key, entity_id in entity_ids.items():
        registry_entry = registry.async_get(entity_id)
        assert registry_entry is not None
        assert registry_entry.device_id == device.id, key
        assert registry_entry.translation_key == key
        expected_category = None if key in ("status", "health") else EntityCategory.DIAGNOSTIC
        assert registry_entry.entity_category == expected_category, key

    status = hass.states.get(entity_ids["status"])
    assert status is not None
    assert status.state == "idle"
    assert status.attributes["options"] == ["stopped", "loading", "idle", "generating", "error"]
    assert status.attributes["friendly_name"] == "assist Status"

    units: dict[str, Any] = {
        "last_ttft": UnitOfTime.SECONDS,
        "decode_tokens_per_s": "tokens/s",
        "prefill_tokens_per_s": "tokens/s",
        "kv_cache_usage": PERCENTAGE,
        "queue_depth": None,
        "worker_restarts": None,
    }
    for key, unit in units.items():
        state = hass.states.get(entity_ids[key])
        assert state is not None
        assert state.attributes.get(ATTR_UNIT_OF_MEASUREMENT) == unit, key
        expected_class = SensorStateClass.TOTAL_INCREASING if key == "worker_restarts" else SensorStateClass.MEASUREMENT
        assert state.attributes[ATTR_STATE_CLASS] == expected_class, key

    # Nothing generated yet: the figures are unknown, not zero (a zero would pull graphs down).
    for key in ("last_ttft", "decode_tokens_per_s", "prefill_tokens_per_s"):
        state = hass.states.get(entity_ids[key])
        assert state is not None
        assert state.state == STATE_UNKNOWN, key
    queue = hass.states.get(entity_ids["queue_depth"])
    restarts = hass.states.get(entity_ids["worker_restarts"])
    assert queue is not None
    assert restarts is not None
    assert (queue.state, restarts.state) == ("0", "0")


async def test_sensors_follow_a_generation_without_polling(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    entity_ids = sensor_entity_ids(hass, loaded_entry)
    seen = record_states(hass, list(entity_ids.values()))
    engine = loaded_entry.runtime_data.engine

    first = engine.submit(chat("Is the kitchen light on?"))
    second = engine.submit(chat("And the coffee?"))
    await first.collect()
    await second.collect()
    await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.IDLE)
    await hass.async_block_till_done()

    # The NPU slot was busy, then free again; the second request waited in the queue meanwhile.
    assert seen[entity_ids["status"]][0] == "generating"
    assert seen[entity_ids["status"]][-1] == "idle"
    assert "1" in seen[entity_ids["queue_depth"]]
    assert seen[entity_ids["queue_depth"]][-1] == "0"

    metrics = engine.metrics
    assert metrics.last_ttft_s is not None
    assert metrics.decode_tokens_per_s is not None
    assert metrics.prefill_tokens_per_s is not None
    ttft = hass.states.get(entity_ids["last_ttft"])
    decode = hass.states.get(entity_ids["decode_tokens_per_s"])
    prefill = hass.states.get(entity_ids["prefill_tokens_per_s"])
    assert ttft is not None
    assert decode is not None
    assert prefill is not None
    assert float(ttft.state) == pytest.approx(metrics.last_ttft_s, abs=0.001)
    assert float(ttft.state) > 0
    assert float(decode.state) == pytest.approx(metrics.decode_tokens_per_s, abs=0.01)
    assert float(prefill.state) == pytest.approx(metrics.prefill_tokens_per_s, abs=0.1)
    # The emulator runs at 20x the calibrated RK3588 speed (16.7 tok/s decode for qwen2.5-1.5b).
    assert float(decode.state) > 16.7

    # The KV cache holds the last conversation: a share of the 1024-token context, in percent.
    kv_state = hass.states.get(entity_ids["kv_cache_usage"])
    assert kv_state is not None
    assert metrics.kv_cache_tokens is not None
    assert float(kv_state.state) == pytest.approx(100 * metrics.kv_cache_tokens / CONTEXT_LENGTH, abs=0.1)
    assert 0 < float(kv_state.state) <= 100


async def test_restart_sensor_counts_a_worker_crash(hass: HomeAssistant, emulator_lib: str, tmp_path: Path) -> None:
    model = write_model(tmp_path / "crashing.model", "fault = crash_after_tokens:2")
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        entity_ids = sensor_entity_ids(hass, entry)
        seen = record_states(hass, [entity_ids["status"], entity_ids["worker_restarts"]])
        engine = entry.runtime_data.engine
        with pytest.raises(EngineError):
            await engine.submit(chat("Turn on the kitchen light")).collect()
        # The client relaunches the worker after a short backoff.
        await wait_for_metrics(engine, lambda metrics: metrics.restarts >= 1 and metrics.state is EngineState.IDLE)
        await hass.async_block_till_done()
        restarts = hass.states.get(entity_ids["worker_restarts"])
        assert restarts is not None
        assert restarts.state == "1"
        # While the worker came back the status showed it loading, then idle again.
        assert "loading" in seen[entity_ids["status"]]
        assert seen[entity_ids["status"]][-1] == "idle"
    finally:
        await hass.config_entries.async_unload(entry.entry_id)


async def test_status_sensor_reads_stopped_when_the_engine_stops(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    entity_ids = sensor_entity_ids(hass, loaded_entry)
    seen = record_states(hass, [entity_ids["status"]])
    await loaded_entry.runtime_data.engine.stop()
    await hass.async_block_till_done()
    assert seen[entity_ids["status"]] == ["stopped"]
