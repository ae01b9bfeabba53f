"""Sensors that graph the NPU engine: status, queue, latency, throughput, KV cache fill and worker restarts.

Every value comes from the engine's metrics snapshot, pushed through `Engine.add_listener`: the engine knows
when something changed, so nothing polls (and a sensor write never waits on the runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import PERCENTAGE, EntityCategory, UnitOfTime
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.entity_platform import AddEntitiesCallback
from homeassistant.helpers.typing import StateType

from rkllm_engine.types import EngineMetrics, EngineState, HealthStatus

from .data import RkllmConfigEntry
from .device import runtime_device_info

# Values are pushed by the engine; there is no update call to serialise.
PARALLEL_UPDATES = 0

TOKENS_PER_SECOND = "tokens/s"


def _kv_cache_percent(metrics: EngineMetrics) -> float | None:
    """KV fill in percent of the configured context (None until the runtime reported a size)."""
    usage = metrics.kv_usage
    return None if usage is None else round(usage * 100, 1)


def _rounded(value: float | None, digits: int) -> float | None:
    """Round for the state machine: a graph does not need 15 digits, and equal values skip a write."""
    return None if value is None else round(value, digits)


@dataclass(frozen=True, kw_only=True)
class RkllmSensorEntityDescription(SensorEntityDescription):
    """A sensor and how its value is read from one metrics snapshot."""

    value_fn: Callable[[EngineMetrics], StateType]


SENSORS: tuple[RkllmSensorEntityDescription, ...] = (
    RkllmSensorEntityDescription(
        key="status",
        translation_key="status",
        device_class=SensorDeviceClass.ENUM,
        options=[state.value for state in EngineState],
        value_fn=lambda metrics: metrics.state.value,
    ),
    RkllmSensorEntityDescription(
        key="health",
        translation_key="health",
        device_class=SensorDeviceClass.ENUM,
        options=list(get_args(HealthStatus)),
        # The same word /health answers; the reason is in /health, the repair issues and the diagnostics.
        value_fn=lambda metrics: metrics.health,
    ),
    RkllmSensorEntityDescription(
        key="queue_depth",
        translation_key="queue_depth",
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda metrics: metrics.queue_depth,
    ),
    RkllmSensorEntityDescription(
        key="last_ttft",
        translation_key="last_ttft",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.SECONDS,
        suggested_display_precision=2,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda metrics: _rounded(metrics.last_ttft_s, 3),
    ),
    RkllmSensorEntityDescription(
        key="voice_response_time",
        translation_key="voice_response_time",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.SECONDS,
        suggested_display_precision=2,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        # What a person waited for: command received → first spoken text of the turn, all its rounds included.
        value_fn=lambda metrics: _rounded(metrics.last_voice_response_s, 3),
    ),
    RkllmSensorEntityDescription(
        key="decode_tokens_per_s",
        translation_key="decode_tokens_per_s",
        native_unit_of_measurement=TOKENS_PER_SECOND,
        suggested_display_precision=1,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda metrics: _rounded(metrics.decode_tokens_per_s, 2),
    ),
    RkllmSensorEntityDescription(
        key="prefill_tokens_per_s",
        translation_key="prefill_tokens_per_s",
        native_unit_of_measurement=TOKENS_PER_SECOND,
        suggested_display_precision=0,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda metrics: _rounded(metrics.prefill_tokens_per_s, 1),
    ),
    RkllmSensorEntityDescription(
        key="kv_cache_usage",
        translation_key="kv_cache_usage",
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=0,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_kv_cache_percent,
    ),
    RkllmSensorEntityDescription(
        key="worker_restarts",
        translation_key="worker_restarts",
        # A counter that starts at 0 with every engine: TOTAL_INCREASING treats that drop as a reset.
        state_class=SensorStateClass.TOTAL_INCREASING,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda metrics: metrics.restarts,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: RkllmConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """Add the engine sensors of one runtime (they belong to the entry, not to an agent subentry)."""
    async_add_entities(RkllmSensor(entry, description) for description in SENSORS)


class RkllmSensor(SensorEntity):
    """One engine figure, written whenever the engine publishes a snapshot where it changed."""

    entity_description: RkllmSensorEntityDescription
    _attr_has_entity_name = True
    _attr_should_poll = False

    def __init__(self, entry: RkllmConfigEntry, description: RkllmSensorEntityDescription) -> None:
        self.entity_description = description
        self._engine = entry.runtime_data.engine
        self._attr_unique_id = f"{entry.entry_id}_{description.key}"
        self._attr_device_info = runtime_device_info(entry)
        self._attr_native_value = description.value_fn(self._engine.metrics)

    async def async_added_to_hass(self) -> None:
        """Subscribe to the engine; the listener is removed with the entity."""
        await super().async_added_to_hass()
        self.async_on_remove(self._engine.add_listener(self._handle_metrics))
        # A change between __init__ and now would otherwise wait for the next one.
        self._attr_native_value = self.entity_description.value_fn(self._engine.metrics)

    @callback
    def _handle_metrics(self, metrics: EngineMetrics) -> None:
        """Write the state only when this sensor's value changed (the engine publishes many snapshots)."""
        value = self.entity_description.value_fn(metrics)
        if value == self._attr_native_value:
            return
        self._attr_native_value = value
        self.async_write_ha_state()
