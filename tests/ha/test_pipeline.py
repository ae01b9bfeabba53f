"""An Assist pipeline run with text input, end to end through the websocket API, on the real engine."""

from __future__ import annotations

from typing import Any

import pytest
from homeassistant.components.assist_pipeline.pipeline import PipelineEventType
from homeassistant.const import STATE_ON
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.typing import WebSocketGenerator

from tests.ha.conftest import KITCHEN_LIGHT, conversation_subentry

AGENT = "conversation.assist_on_npu"
# Feature-detected: the pipeline forwards the agent's chat-log deltas as `intent-progress` events where it can.
STREAMS_DELTAS = hasattr(PipelineEventType, "INTENT_PROGRESS")


async def _run_pipeline(hass: HomeAssistant, hass_ws_client: WebSocketGenerator, text: str) -> list[dict[str, Any]]:
    """Create a pipeline using our agent, run it from the intent stage with `text`, return its events."""
    assert await async_setup_component(hass, "assist_pipeline", {})
    client = await hass_ws_client(hass)
    await client.send_json_auto_id(
        {
            "type": "assist_pipeline/pipeline/create",
            "conversation_engine": AGENT,
            "conversation_language": "en",
            "language": "en",
            "name": "NPU pipeline",
            "stt_engine": None,
            "stt_language": None,
            "tts_engine": None,
            "tts_language": None,
            "tts_voice": None,
            "wake_word_entity": None,
            "wake_word_id": None,
        }
    )
    created = await client.receive_json()
    assert created["success"], created
    await client.send_json_auto_id(
        {
            "type": "assist_pipeline/run",
            "start_stage": "intent",
            "end_stage": "intent",
            "input": {"text": text},
            "pipeline": created["result"]["id"],
        }
    )
    started = await client.receive_json()
    assert started["success"], started
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] != "run-end":
        message = await client.receive_json(timeout=30)
        events.append(message["event"])
    return events


@pytest.mark.parametrize("subentries", [[conversation_subentry(quick_confirmations=False)]])
@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_text_pipeline_turns_on_the_light_and_streams(
    hass: HomeAssistant, hass_ws_client: WebSocketGenerator
) -> None:
    events = await _run_pipeline(hass, hass_ws_client, "turn on the kitchen light")
    types = [event["type"] for event in events]
    assert types[0] == "run-start"
    assert "error" not in types, events
    intent_end = next(event for event in events if event["type"] == "intent-end")
    response = intent_end["data"]["intent_output"]["response"]
    assert response["speech"]["plain"]["speech"] == "Done, the kitchen light is on."
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON

    if not STREAMS_DELTAS:
        return
    deltas = [event["data"]["chat_log_delta"] for event in events if event["type"] == "intent-progress"]
    assert {"role": "assistant"} in deltas
    calls = [call for delta in deltas for call in delta.get("tool_calls") or ()]
    assert [call["tool_name"].rpartition("__")[2] for call in calls] == ["HassTurnOn"]
    assert any(delta.get("role") == "tool_result" for delta in deltas)
    streamed = [delta["content"] for delta in deltas if delta.get("content")]
    assert len(streamed) > 1, "the answer should arrive in several pieces"
    assert "".join(streamed) == "Done, the kitchen light is on."


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_text_pipeline_speaks_the_quick_confirmation(
    hass: HomeAssistant, hass_ws_client: WebSocketGenerator
) -> None:
    """With quick confirmations (the default) the pipeline gets Home Assistant's sentence as the agent's text."""
    events = await _run_pipeline(hass, hass_ws_client, "turn on the kitchen light")
    assert "error" not in [event["type"] for event in events], events
    intent_end = next(event for event in events if event["type"] == "intent-end")
    assert intent_end["data"]["intent_output"]["response"]["speech"]["plain"]["speech"] == "Turned on the light"
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    if not STREAMS_DELTAS:
        return
    deltas = [event["data"]["chat_log_delta"] for event in events if event["type"] == "intent-progress"]
    tool_result = next(index for index, delta in enumerate(deltas) if delta.get("role") == "tool_result")
    assert "".join(delta.get("content") or "" for delta in deltas[tool_result:]) == "Turned on the light"
