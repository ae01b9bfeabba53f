"""Diagnostics: enough to read a bug report (paths, versions, metrics, runtime lines), never secrets or prompts."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components.diagnostics import REDACTED
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import get_diagnostics_for_config_entry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rkllm.const import DOMAIN
from custom_components.rkllm.diagnostics import redact_log_line
from rkllm_engine.types import ChatMessage, ChatRequest
from tests.ha.conftest import conversation_subentry, entry_data

AGENT_PROMPT = "Speak like a pirate. The front door code is 4711."
SYSTEM_SECRET = "The alarm PIN is 0815."
HASS_TURN_ON = {
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on a device",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
    },
}


@pytest.fixture
def subentries() -> list[dict[str, Any]]:
    """One agent whose instructions hold something private."""
    return [conversation_subentry(prompt=AGENT_PROMPT)]


async def download(hass: HomeAssistant, client: ClientSessionGenerator, entry: MockConfigEntry) -> dict[str, Any]:
    """Diagnostics exactly as the UI downloads them (through the HTTP API, so they must serialise)."""
    assert await async_setup_component(hass, "diagnostics", {})
    result: dict[str, Any] = await get_diagnostics_for_config_entry(hass, client, entry)
    return result


async def test_loaded_entry_reports_runtime_metrics_and_log_without_prompts(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, loaded_entry: MockConfigEntry
) -> None:
    engine = loaded_entry.runtime_data.engine
    # A forced tool call makes the runtime print its chat template, system prompt included (rkllm_set_chat_template).
    request = ChatRequest(
        messages=[
            ChatMessage(role="system", content=SYSTEM_SECRET),
            ChatMessage(role="user", content="turn on the kitchen light"),
        ],
        tools=[HASS_TURN_ON],
        tool_choice="HassTurnOn",
    )
    await engine.submit(request).collect()
    assert any(SYSTEM_SECRET in line for line in engine.recent_log()), "the runtime should have echoed the prompt"

    diagnostics = await download(hass, hass_client, loaded_entry)

    dumped = json.dumps(diagnostics)
    assert AGENT_PROMPT not in dumped
    assert SYSTEM_SECRET not in dumped
    assert diagnostics["subentries"][0]["data"]["prompt"] == REDACTED
    assert diagnostics["subentries"][0]["subentry_type"] == "conversation"
    assert diagnostics["subentries"][0]["data"]["llm_hass_api"] == ["assist"]
    # Paths are what a maintainer needs most: wrong library, wrong model.
    data = diagnostics["entry"]["data"]
    assert data["library_path"] == loaded_entry.data["library_path"]
    assert data["model_path"] == loaded_entry.data["model_path"]
    assert diagnostics["entry"]["state"] == "loaded"
    assert diagnostics["runtime"] == {
        "model_name": Path(loaded_entry.data["model_path"]).stem,
        "model_id": loaded_entry.runtime_data.model_id,
        "runtime_version": "1.2.3",
        "abi_profile": "v12x",
    }
    metrics = diagnostics["metrics"]
    assert metrics["runtime_version"] == "1.2.3"
    assert metrics["requests_served"] == 1
    assert metrics["state"] in ("idle", "generating")
    assert metrics["context_length"] == 4096
    log = diagnostics["recent_log"]
    assert any(line.startswith("I rkllm: rkllm-runtime version: 1.2.3") for line in log)
    assert f"I rkllm: system_prompt: {REDACTED}" in log


@pytest.mark.usefixtures("socket_enabled")
async def test_entry_whose_worker_is_unreachable_downloads_with_its_secret_redacted(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, emulator_lib: str, assist_model: Path
) -> None:
    # A remote worker that is not running: the entry waits for it, which is when users download diagnostics.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    remote = entry_data(
        emulator_lib,
        assist_model,
        worker="remote",
        worker_host="127.0.0.1",
        worker_port=closed_port,
        worker_secret="correct-horse-battery-staple",
    )
    entry = MockConfigEntry(domain=DOMAIN, title="remote board", data=remote)
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_RETRY

    try:
        diagnostics = await download(hass, hass_client, entry)
    finally:
        await hass.config_entries.async_unload(entry.entry_id)

    assert "correct-horse-battery-staple" not in json.dumps(diagnostics)
    assert diagnostics["entry"]["data"]["worker_secret"] == REDACTED
    assert diagnostics["entry"]["data"]["worker_host"] == "127.0.0.1"
    assert diagnostics["entry"]["state"] == "setup_retry"
    assert diagnostics["runtime"] is None
    assert diagnostics["metrics"] is None
    assert diagnostics["recent_log"] == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("I rkllm: system_prompt: <|im_start|>system secret", f"I rkllm: system_prompt: {REDACTED}"),
        ("I rkllm: prompt_prefix: <|im_start|>user\\n", f"I rkllm: prompt_prefix: {REDACTED}"),
        ("I rkllm: prompt_postfix: <|im_end|>", f"I rkllm: prompt_postfix: {REDACTED}"),
        # Lines without prompt text stay exactly as printed.
        ("I rkllm: loading rkllm model from /models/q.rkllm", "I rkllm: loading rkllm model from /models/q.rkllm"),
        ("I rkllm: reset chat template:", "I rkllm: reset chat template:"),
        (
            "E rkllm: Failed to set function tools, possibly because the chat_template is empty.",
            "E rkllm: Failed to set function tools, possibly because the chat_template is empty.",
        ),
    ],
)
def test_log_lines_that_echo_prompts_are_redacted(line: str, expected: str) -> None:
    assert redact_log_line(line) == expected
