"""The devices of an entry: the runtime + model itself (its sensors), and one per agent (entity.py)."""

from __future__ import annotations

from homeassistant.helpers import device_registry as dr

from .const import DOMAIN
from .data import RkllmConfigEntry, RkllmRuntimeData


def model_description(runtime: RkllmRuntimeData) -> str:
    """The device's model line: the model file and the rkllm-toolkit it was converted with, when reported."""
    if runtime.toolkit_version:
        return f"{runtime.model_name} (rkllm-toolkit {runtime.toolkit_version})"
    return runtime.model_name


def model_source_url(runtime: RkllmRuntimeData) -> str | None:
    """A downloaded model's source page, as the device's link (only web addresses; HA validates the scheme)."""
    source = runtime.model_source
    return source if source and source.startswith(("https://", "http://")) else None


def runtime_device_info(entry: RkllmConfigEntry) -> dr.DeviceInfo:
    """The device of the runtime + model itself (its sensors hang here; each agent has its own device).

    It shows the model and the toolkit that converted it, the runtime version (as the software version) and, for
    a downloaded model, the page it came from.
    """
    runtime = entry.runtime_data
    info = dr.DeviceInfo(
        identifiers={(DOMAIN, entry.entry_id)},
        name=entry.title,
        manufacturer="Rockchip",
        model=model_description(runtime),
        sw_version=runtime.runtime_version,
        entry_type=dr.DeviceEntryType.SERVICE,
    )
    if (source := model_source_url(runtime)) is not None:
        info["configuration_url"] = source
    return info
