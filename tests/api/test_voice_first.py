"""Voice first through Home Assistant (docs/voice.md).

An Assist turn pauses an API stream on another slot, and a full API queue refuses its newest API request, never the
voice command.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant

from custom_components.rkllm.const import CONF_SLOTS
from rkllm_engine.types import ChatMessage, ChatRequest, EngineMetrics, QueueFullError
from tests.waits import wait_for_metrics

from .conftest import LONG_STORY, MODEL_ID, ApiServer, add_entry, runtime_of, sse_chunks, streamed_content, write_model
from .test_errors import assert_openai_error

AGENT_ENTITY = "conversation.living_room"
STORY_BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "tell me a long story"}], "stream": True}


async def converse(hass: HomeAssistant, text: str) -> conversation.ConversationResult:
    return await conversation.async_converse(
        hass, text=text, conversation_id=None, context=Context(), agent_id=AGENT_ENTITY
    )


async def test_an_assist_turn_pauses_an_api_stream_on_the_other_slot_and_its_text_stays_whole(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, kitchen_light: str
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path), **{CONF_SLOTS: "2"})
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    engine = runtime_of(entry).engine
    await wait_for_metrics(engine, lambda metrics: [slot.state for slot in metrics.slots] == ["idle", "idle"])
    api: ApiServer = await serve_http()
    seen: list[EngineMetrics] = []
    engine.add_listener(seen.append)

    response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=STORY_BODY)
    assert response.status == 200
    await wait_for_metrics(engine, lambda metrics: metrics.slots[1].state == "generating")
    result = await converse(hass, "turn on the kitchen light")
    assert result.response.speech["plain"]["speech"]
    assert hass.states.get(kitchen_light).state == "on"
    body = await asyncio.wait_for(response.text(), 120)
    assert streamed_content(sse_chunks(body)) == LONG_STORY[: len(streamed_content(sse_chunks(body)))]
    assert streamed_content(sse_chunks(body)).startswith("Chapter 1 of the long story")
    assert body.rstrip().endswith("data: [DONE]")
    assert any(metrics.slots[1].state == "paused" for metrics in seen), "the API run was never paused"
    health = await (await api.client.get("/health")).json()
    assert [slot["role"] for slot in health["slots"]] == ["voice", "general"]
    assert health["voice_response_s"] is not None


async def test_a_full_api_queue_refuses_its_newest_api_request_not_the_voice_command(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, kitchen_light: str
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path))
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    engine = runtime_of(entry).engine
    api: ApiServer = await serve_http()
    long = ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")])
    running = engine.submit(long)
    queued = [engine.submit(long) for _ in range(engine.config.queue_size)]
    await wait_for_metrics(engine, lambda metrics: metrics.queue_depth == engine.config.queue_size)
    # The API is full: a new API request gets 429 before any byte.
    refused = await api.client.post("/v1/chat/completions", headers=api.auth(), json={**STORY_BODY, "stream": False})
    assert refused.status == 429
    assert_openai_error(await refused.json(), error_type="rate_limit_error", param=None, code="rate_limit_exceeded")
    try:
        # A voice command still gets in: the newest queued API request makes room.
        voice = asyncio.ensure_future(converse(hass, "turn on the kitchen light"))
        await wait_for_metrics(engine, lambda metrics: metrics.queue_depth == engine.config.queue_size)
        with pytest.raises(QueueFullError):
            await queued[-1].collect()
        await running.cancel()  # the story would take a while: voice is next
        result = await asyncio.wait_for(voice, 60)
        assert hass.states.get(kitchen_light).state == "on"
        assert result.response.speech["plain"]["speech"]
    finally:
        for generation in (running, *queued):
            await generation.cancel()
