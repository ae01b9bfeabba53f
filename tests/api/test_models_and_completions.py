"""`/v1/models`, `/v1/models/{id}`, legacy `/v1/completions`, and Home Assistant `llama_cpp`'s setup probe."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from homeassistant.core import HomeAssistant
from openai import AsyncOpenAI, NotFoundError

from custom_components.rkllm import http as rkllm_http
from rkllm_native.build import emulator_library

from .conftest import AGENT_MODEL_ID, CONTEXT_LENGTH, LONG_STORY, MODEL_ID, ApiServer, add_entry, write_model

STORY_OPENING = "Once upon a time"
STORY_REST = "there was a tiny NPU that answered every prompt."


async def test_models_lists_the_raw_model_and_the_agents(api: ApiServer) -> None:
    response = await api.client.get("/v1/models", headers=api.auth())
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    ids = [model["id"] for model in body["data"]]
    assert ids == [MODEL_ID, AGENT_MODEL_ID]
    for model in body["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] == "rkllm"
        assert model["max_model_len"] == CONTEXT_LENGTH
        assert isinstance(model["created"], int)
        assert model["created"] <= time.time()  # a Unix time (when the entry loaded: see the next test)


async def test_created_is_the_load_time(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path))
    before = int(time.time())
    assert await hass.config_entries.async_setup(entry.entry_id)
    after = int(time.time())
    api: ApiServer = await serve_http()
    # The API's clock jumps an hour ahead (no sleep): a later listing must still report the load time.
    real_time = time.time
    monkeypatch.setattr(rkllm_http, "time", SimpleNamespace(time=lambda: real_time() + 3600))
    body = await (await api.client.get("/v1/models", headers=api.auth())).json()
    assert before <= body["data"][0]["created"] <= after


async def test_retrieve_model_and_404_for_unknown(openai_client: AsyncOpenAI) -> None:
    model = await openai_client.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID
    assert model.owned_by == "rkllm"
    agent = await openai_client.models.retrieve(AGENT_MODEL_ID)
    assert agent.id == AGENT_MODEL_ID
    with pytest.raises(NotFoundError) as err:
        await openai_client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
    assert err.value.param == "model"
    listed = [item.id async for item in openai_client.models.list()]
    assert listed == [MODEL_ID, AGENT_MODEL_ID]


async def test_completion_defaults_to_16_tokens(openai_client: AsyncOpenAI) -> None:
    # The long story is hundreds of tokens, so only the default limit can end this completion.
    completion = await openai_client.completions.create(model=MODEL_ID, prompt="tell me a long story")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert LONG_STORY.startswith(choice.text)
    assert len(choice.text) < len(LONG_STORY)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 16


async def test_completion_raw_prompt_to_the_end(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.completions.create(
        model=MODEL_ID, prompt=[STORY_OPENING], max_tokens=100, stop=None
    )
    assert completion.choices[0].text == STORY_REST
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL_ID


async def test_completion_stream_uses_text_completion_objects(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "prompt": STORY_OPENING,
            "max_tokens": 100,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in (await response.text()).split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(event["object"] == "text_completion" for event in events)
    assert len({event["id"] for event in events}) == 1
    usage_event = events[-1]
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] > 0
    choices = [event["choices"][0] for event in events[:-1]]
    assert "".join(choice["text"] for choice in choices) == STORY_REST
    assert [choice["finish_reason"] for choice in choices if choice["finish_reason"]] == ["stop"]
    assert choices[-1]["finish_reason"] == "stop"


async def test_completion_stream_through_the_sdk(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(model=MODEL_ID, prompt=STORY_OPENING, max_tokens=100, stream=True)
    events = [event async for event in stream]
    assert "".join(event.choices[0].text for event in events) == STORY_REST
    assert all(event.usage is None for event in events)


async def test_agent_model_is_not_a_legacy_completion_model(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/completions", headers=api.auth(), json={"model": AGENT_MODEL_ID, "prompt": "Hello"}
    )
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "model"


# Home Assistant's own `llama_cpp` integration (2026.9+) validates a server this way before it creates an entry
# (docs/home-assistant.md §1.1): list the models, then one tiny chat completion carrying a dummy tool, plain and
# streamed.
PROBE_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROBE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "test_function",
            "description": "Test function.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]


async def run_llama_cpp_probe(openai_client: AsyncOpenAI) -> None:
    """The probe's three calls; raises what the integration would turn into a setup error."""
    models = [model.id async for model in openai_client.models.list()]
    model = models[0]
    assert model == MODEL_ID
    completion = await openai_client.chat.completions.create(
        model=model,
        messages=PROBE_MESSAGES,  # type: ignore[arg-type]
        tools=PROBE_TOOLS,  # type: ignore[arg-type]
        max_tokens=3,
    )
    assert completion.choices[0].finish_reason in {"length", "stop", "tool_calls"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 3
    stream = await openai_client.chat.completions.create(
        model=model,
        messages=PROBE_MESSAGES,  # type: ignore[arg-type]
        tools=PROBE_TOOLS,  # type: ignore[arg-type]
        max_tokens=3,
        stream=True,
    )
    finish_reasons = [event.choices[0].finish_reason async for event in stream if event.choices]
    assert [reason for reason in finish_reasons if reason] == [completion.choices[0].finish_reason]


async def test_llama_cpp_setup_probe_passes(openai_client: AsyncOpenAI) -> None:
    await run_llama_cpp_probe(openai_client)


async def test_llama_cpp_setup_probe_passes_on_the_v12x_runtime(
    hass: HomeAssistant, tmp_path: Path, serve_http: Any
) -> None:
    # v1.2.x has no per-run max_new_tokens: the engine enforces max_tokens=3 itself.
    entry = add_entry(hass, str(emulator_library("v12x")), write_model(tmp_path))
    assert await hass.config_entries.async_setup(entry.entry_id)
    api: ApiServer = await serve_http()
    client = AsyncOpenAI(base_url=api.base_url, api_key=api.token, max_retries=0)
    try:
        await run_llama_cpp_probe(client)
    finally:
        await client.close()
