"""Typed runtime data of a loaded rkllm config entry (one engine = one runtime + model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from homeassistant.config_entries import ConfigEntry

from rkllm_engine.engine import Engine


@dataclass
class RkllmRuntimeData:
    """What the platforms and the HTTP views need from a loaded entry."""

    engine: Engine
    model_name: str
    model_id: str  # raw model id for /v1/models: slug of the model file stem
    runtime_version: str | None
    abi_profile: str | None
    toolkit_version: str | None = None  # rkllm-toolkit the model was converted with (the runtime's init line)
    model_source: str | None = None  # where a downloaded model came from (its page or URL)
    # The entry data the engine was started with, to tell engine changes (restart) from agent changes (platforms).
    engine_settings: dict[str, Any] = field(default_factory=dict)
    # The entry's loaded conversation agents by entity id (conversation.py registers them; agent_api lists them).
    # Typed loosely so this module imports no entity module; agent_api narrows with isinstance.
    agents: dict[str, Any] = field(default_factory=dict)


type RkllmConfigEntry = ConfigEntry[RkllmRuntimeData]
