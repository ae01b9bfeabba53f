"""Agent models under pressure: refusals, engine errors, failed turns, keep-alive and disconnects.

An agent turn runs Home Assistant's tool loop server-side, so its failures arrive from a background task; a client
must still get the same OpenAI status codes and error shapes as from the raw model, before any stream byte.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm import http as api_http
from custom_components.rkllm.compat import SUPPORTS_THINKING_DELTA
from custom_components.rkllm.const import CONF_ENABLE_THINKING, DOMAIN
from rkllm_engine.types import ChatMessage, ChatRequest, QueueFullError
from tests.waits import wait_for_metrics

from .conftest import (
    AGENT_MODEL_ID,
    API_MODEL,
    ApiServer,
    agent_subentry,
    entry_data,
    runtime_of,
    sse_chunks,
    streamed_content,
    write_model,
)
from .test_disconnect import is_idle
from .test_errors import assert_openai_error

LONG_STORY = [{"role": "user", "content": "tell me a long story"}]


def agent_body(**fields: Any) -> dict[str, Any]:
    """A chat completion for the agent model."""
    return {"model": AGENT_MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], **fields}


async def add_loaded_entry(hass: HomeAssistant, library: str, model: Path, subentry: dict[str, Any]) -> None:
    """Set up an rkllm entry with the given agent subentry."""
    entry = MockConfigEntry(
        domain=DOMAIN, title=model.stem, data=entry_data(library, model), subentries_data=[subentry]
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()


@pytest.mark.parametrize("stream", [False, True])
async def test_json_response_format_is_refused_for_agent_models(api: ApiServer, stream: bool) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json=agent_body(response_format={"type": "json_object"}, stream=stream),
    )
    assert response.status == 400
    body = await response.json()
    assert_openai_error(body, error_type="invalid_request_error", param="response_format", code="unsupported_parameter")
    assert "raw model" in body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_agent_model_on_a_full_queue_is_429_before_any_body(
    loaded_entry: Any, api: ApiServer, stream: bool
) -> None:
    engine = runtime_of(loaded_entry).engine
    generations: list[Any] = []
    try:
        generations.extend(
            engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")]))
            for _ in range(engine.config.queue_size + 1)
        )
        with pytest.raises(QueueFullError):
            engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="Hi")]))
        response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=agent_body(stream=stream))
        assert response.status == 429
        assert response.headers["Content-Type"].startswith("application/json")
        assert int(response.headers["Retry-After"]) >= 1
        assert_openai_error(
            await response.json(), error_type="rate_limit_error", param=None, code="rate_limit_exceeded"
        )
    finally:
        for generation in generations:
            await generation.cancel()


async def test_agent_model_prompt_longer_than_the_context_is_a_400(api: ApiServer) -> None:
    words = " ".join(f"word{number}" for number in range(6000))
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": AGENT_MODEL_ID, "messages": [{"role": "user", "content": words}]},
    )
    assert response.status == 400
    assert_openai_error(
        await response.json(), error_type="invalid_request_error", param="messages", code="context_length_exceeded"
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_agent_whose_llm_api_is_gone_is_a_500_with_home_assistants_reason(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, stream: bool
) -> None:
    # The integration that provided the agent's LLM API was removed: every turn fails in Home Assistant itself.
    subentry = agent_subentry()
    subentry["data"][CONF_LLM_HASS_API] = ["removed_integration_api"]
    await add_loaded_entry(hass, emulator_lib, write_model(tmp_path), subentry)
    server: ApiServer = await serve_http()
    response = await server.client.post("/v1/chat/completions", headers=server.auth(), json=agent_body(stream=stream))
    assert response.status == 500
    body = await response.json()
    assert_openai_error(body, error_type="server_error", param=None)
    assert "LLM API" in body["error"]["message"]  # Home Assistant's own reason, e.g. "Error preparing LLM API"


@pytest.mark.parametrize("stream", [False, True])
async def test_unexpected_failure_of_an_agent_turn_is_an_openai_500(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    """A bug in the turn (not an HA or engine error) still ends the request with an error, never a hang."""

    async def broken_turn(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("chat_log")

    monkeypatch.setattr(api_http, "async_run_agent", broken_turn)
    with caplog.at_level(logging.ERROR):
        response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=agent_body(stream=stream))
    assert response.status == 500
    body = await response.json()
    assert_openai_error(body, error_type="server_error", param=None)
    assert body["error"]["message"] == "the agent turn failed: KeyError: 'chat_log'"
    assert "agent turn for conversation." in caplog.text


async def test_agent_stream_sends_keepalive_pings_while_queued(
    loaded_entry: Any, api: ApiServer, fast_pings: float
) -> None:
    engine = runtime_of(loaded_entry).engine
    blocker = engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")]))
    try:
        await anext(blocker)  # the blocker holds the NPU slot now
        response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=agent_body(stream=True))
        # Headers go out with the first keep-alive, so a proxy does not time the silent queue wait out.
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = (await response.content.readline()).decode()
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert await response.content.readline() == b"\n"
        assert await response.content.readline() == b": ping\n"
    finally:
        await blocker.cancel()
    rest = (await response.content.read()).decode()
    assert rest.endswith("data: [DONE]\n\n")
    payloads = sse_chunks(rest)
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
    assert streamed_content(payloads)


async def test_disconnect_from_an_agent_stream_frees_the_npu(loaded_entry: Any, api: ApiServer) -> None:
    engine = runtime_of(loaded_entry).engine
    served_before = engine.metrics.requests_served
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": AGENT_MODEL_ID, "messages": LONG_STORY, "stream": True},
    )
    assert response.status == 200
    contents = 0
    while contents < 5:
        line = (await response.content.readline()).decode()
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            contents += 1
    response.close()  # the client goes away while the agent is still talking

    await wait_for_metrics(engine, is_idle)
    assert engine.metrics.requests_served == served_before  # aborted, not run to its end
    answer = await api.client.post("/v1/chat/completions", headers=api.auth(), json=agent_body())
    assert answer.status == 200
    text = (await answer.json())["choices"][0]["message"]["content"]
    assert text.startswith("You said: ")
    assert text.endswith("Hello")


# A model that says something before it calls a tool, and a thinking model, for agents.
TALKATIVE_MODEL = API_MODEL + (
    'answer user "*say a word first*" = One moment.<tool_call>\\n{"name": "{{tool:HassTurnOn}}", '
    '"arguments": {"name": "Kitchen Light"}}\\n</tool_call>\n'
)


@pytest.mark.parametrize("stream", [False, True])
async def test_agent_text_before_and_after_a_tool_call_is_separated(
    hass: HomeAssistant, kitchen_light: str, emulator_lib: str, tmp_path: Path, serve_http: Any, stream: bool
) -> None:
    await add_loaded_entry(hass, emulator_lib, write_model(tmp_path, TALKATIVE_MODEL), agent_subentry())
    server: ApiServer = await serve_http()
    response = await server.client.post(
        "/v1/chat/completions",
        headers=server.auth(),
        json={
            "model": AGENT_MODEL_ID,
            "messages": [{"role": "user", "content": "Kitchen light on please, say a word first"}],
            "stream": stream,
        },
    )
    assert response.status == 200
    if stream:
        payloads = sse_chunks(await response.text())
        text = streamed_content(payloads)
        assert all("tool_calls" not in p["choices"][0]["delta"] for p in payloads)
    else:
        message = (await response.json())["choices"][0]["message"]
        text = message["content"]
        assert "tool_calls" not in message
    assert text == "One moment.\n\nTurned on the light"  # Home Assistant's own confirmation after the call
    state = hass.states.get(kitchen_light)
    assert state is not None
    assert state.state == "on"


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_agent_keeps_reasoning_out_of_the_content(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, stream: bool
) -> None:
    model = write_model(tmp_path, API_MODEL + "thinking = true\nthinking_text = Let me think about this request.\n")
    subentry = agent_subentry()
    subentry["data"][CONF_ENABLE_THINKING] = True
    await add_loaded_entry(hass, emulator_lib, model, subentry)
    server: ApiServer = await serve_http()
    response = await server.client.post("/v1/chat/completions", headers=server.auth(), json=agent_body(stream=stream))
    assert response.status == 200
    if stream:
        deltas = [p["choices"][0]["delta"] for p in sse_chunks(await response.text())]
        content = "".join(delta.get("content") or "" for delta in deltas)
        reasoning = "".join(delta.get("reasoning_content") or "" for delta in deltas)
    else:
        message = (await response.json())["choices"][0]["message"]
        content, reasoning = message["content"], message.get("reasoning_content", "")
    # The emulator echoes the turn's input, which Home Assistant's Assist API prefixes with the time.
    assert content.startswith("You said: ")
    assert content.endswith("Hello")
    assert "think" not in content
    # The chat log carries the agent's thinking only where HA's delta dict has `thinking_content` (not 2025.4).
    assert ("Let me think about this request." in reasoning) is SUPPORTS_THINKING_DELTA
