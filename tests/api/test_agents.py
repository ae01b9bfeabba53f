"""Conversation agents served as models: Home Assistant's tools run server-side with the caller's rights."""

from __future__ import annotations

import json

from homeassistant.core import HomeAssistant
from openai import AsyncOpenAI

from .conftest import AGENT_MODEL_ID, ApiServer


async def test_admin_turns_a_light_on_through_an_agent_model(
    hass: HomeAssistant, kitchen_light: str, openai_client: AsyncOpenAI
) -> None:
    completion = await openai_client.chat.completions.create(
        model=AGENT_MODEL_ID, messages=[{"role": "user", "content": "Please turn on the kitchen light"}]
    )
    state = hass.states.get(kitchen_light)
    assert state is not None
    assert state.state == "on"
    choice = completion.choices[0]
    assert choice.message.content == "Turned on the light"  # quick confirmation: Home Assistant's sentence
    # The agent called the tool itself: the client sees the answer, not a tool call to execute.
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.model == AGENT_MODEL_ID
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0


async def test_agent_model_streams_its_answer(
    hass: HomeAssistant, kitchen_light: str, openai_client: AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model=AGENT_MODEL_ID,
        messages=[{"role": "user", "content": "turn on the kitchen light"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Turned on the light"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    state = hass.states.get(kitchen_light)
    assert state is not None
    assert state.state == "on"


async def test_read_only_user_is_refused(
    hass: HomeAssistant, kitchen_light: str, api: ApiServer, read_only_token: str
) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(read_only_token),
        json={"model": AGENT_MODEL_ID, "messages": [{"role": "user", "content": "turn on the kitchen light"}]},
    )
    assert response.status == 200
    body = await response.json()
    # The tool result said "Not allowed for user …" and the model answered from it; nothing was switched.
    assert body["choices"][0]["message"]["content"] == "I am not allowed to do that for you."
    state = hass.states.get(kitchen_light)
    assert state is not None
    assert state.state == "off"


async def test_agent_model_needs_a_final_user_message(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": AGENT_MODEL_ID,
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        },
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"]["param"] == "messages"
    assert "last message" in body["error"]["message"]


async def test_agent_history_with_a_previous_tool_call_is_accepted(
    hass: HomeAssistant, kitchen_light: str, api: ApiServer
) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": AGENT_MODEL_ID,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Is the light on?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "GetLiveContext", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"success": True})},
                {"role": "assistant", "content": "It is off."},
                {"role": "user", "content": "turn on the kitchen light"},
            ],
        },
    )
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "Turned on the light"
    state = hass.states.get(kitchen_light)
    assert state is not None
    assert state.state == "on"
