"""Diagnostics download: what a maintainer needs to read a bug report, without secrets or prompts.

Paths stay (they are the usual culprit: wrong library, wrong model); the remote worker's shared secret and
every prompt are redacted, like core's LLM integrations omit `prompt`. Runtime log lines that echo a chat
template or system prompt are redacted too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from homeassistant.components.diagnostics import REDACTED, async_redact_data
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant

from rkllm_native import logparse

from .const import CONF_PROMPT, CONF_WORKER_SECRET
from .data import RkllmRuntimeData

TO_REDACT = {CONF_WORKER_SECRET, CONF_PROMPT}

def redact_log_line(line: str) -> str:
    """Replace the prompt text a runtime line echoes (rkllm_native.logparse knows which); others stay as printed."""
    return logparse.redact_prompt_echo(line, REDACTED)


async def async_get_config_entry_diagnostics(hass: HomeAssistant, entry: ConfigEntry) -> dict[str, Any]:
    """Entry settings, agent subentries, engine metrics, runtime version/profile and recent runtime lines."""
    runtime: RkllmRuntimeData | None = getattr(entry, "runtime_data", None)
    diagnostics: dict[str, Any] = {
        "entry": {
            "title": entry.title,
            "version": entry.version,
            "minor_version": entry.minor_version,
            "state": entry.state.value,
            "data": async_redact_data(dict(entry.data), TO_REDACT),
            "options": async_redact_data(dict(entry.options), TO_REDACT),
        },
        "subentries": [
            {
                "subentry_id": subentry.subentry_id,
                "subentry_type": subentry.subentry_type,
                "title": subentry.title,
                "data": async_redact_data(dict(subentry.data), TO_REDACT),
            }
            for subentry in entry.subentries.values()
        ],
        "runtime": None,
        "metrics": None,
        "recent_log": [],
    }
    if not isinstance(runtime, RkllmRuntimeData):
        # Not loaded (setup failed or in progress): the entry and its repair issues are what there is.
        return diagnostics
    metrics = runtime.engine.metrics
    diagnostics["runtime"] = {
        "model_name": runtime.model_name,
        "model_id": runtime.model_id,
        "runtime_version": runtime.runtime_version,
        "abi_profile": runtime.abi_profile,
    }
    diagnostics["metrics"] = {
        **dataclasses.asdict(metrics),
        "kv_usage": metrics.kv_usage,
        "health": metrics.health,
        "health_reason": metrics.health_reason,
    }
    diagnostics["recent_log"] = [redact_log_line(line) for line in runtime.engine.recent_log()]
    return diagnostics
