"""Chat completions through the official `openai` SDK: plain, streamed, usage, tools, tool_choice, stop, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from homeassistant.core import HomeAssistant
from openai import AsyncOpenAI, BadRequestError
from openai.types.chat import ChatCompletion

from .conftest import API_MODEL, MODEL_ID, ApiServer, add_entry, sse_chunks, streamed_content, write_model

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        "strict": True,
    },
}


async def test_plain_completion_has_the_openai_shape(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello there"}]},
    )
    assert response.status == 200
    body = await response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL_ID
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "You said: Hello there", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)


async def test_sdk_non_stream(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "again"}]},
        ],
        max_completion_tokens=64,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        user="someone",
        metadata={"purpose": "test"},
        reasoning_effort="none",
    )
    assert completion.choices[0].message.content == "You said: Hello\nagain"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL_ID


async def test_sdk_stream_deltas_follow_the_openai_discipline(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hello stream"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:])
    assert len({chunk.id for chunk in chunks}) == 1
    assert len({chunk.created for chunk in chunks}) == 1
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices[0].finish_reason]
    assert finish_reasons == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "You said: Hello stream"
    assert all(chunk.usage is None for chunk in chunks)


async def test_raw_stream_framing(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "stream": True},
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers
    text = await response.text()
    events = [line for line in text.split("\n") if line]
    assert all(line.startswith(("data: ", ":")) for line in events)
    assert events[-1] == "data: [DONE]"
    assert text.endswith("data: [DONE]\n\n")
    payloads = [json.loads(line[6:]) for line in events[:-1] if line.startswith("data: ")]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {}
    assert [p["choices"][0]["finish_reason"] for p in payloads].count("stop") == 1
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


async def test_stream_include_usage_sends_one_usage_chunk_last(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Count my tokens"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert usage_chunks == [chunks[-1]]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_tool_call_not_streamed(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_call_streamed_accumulates_in_the_sdk(openai_client: AsyncOpenAI) -> None:
    async with openai_client.chat.completions.stream(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:
        contents: list[str] = []
        async for event in stream:
            if event.type == "content.delta":
                contents.append(event.delta)
        final = await stream.get_final_completion()
    assert "".join(contents) == "Sure."
    assert "<tool_" not in "".join(contents)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_streamed_tool_call_deltas_carry_index_and_name_once(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "weather in two cities please"}],
            "tools": [WEATHER_TOOL],
            "stream": True,
        },
    )
    payloads = sse_chunks(await response.text())
    entries = [entry for p in payloads for entry in p["choices"][0]["delta"].get("tool_calls", [])]
    assert all(isinstance(entry["index"], int) for entry in entries)
    assert sorted({entry["index"] for entry in entries}) == [0, 1]
    for index in (0, 1):
        mine = [entry for entry in entries if entry["index"] == index]
        named = [entry for entry in mine if "name" in entry["function"]]
        assert len(named) == 1
        assert named[0] is mine[0]
        assert named[0]["type"] == "function"
        assert sum("id" in entry for entry in mine) == 1
        arguments = "".join(entry["function"].get("arguments", "") for entry in mine)
        assert json.loads(arguments) == {"city": ["Paris", "Berlin"][index]}
    assert payloads[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_parallel_tool_calls_false_keeps_the_first_call(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "weather in two cities please"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        parallel_tool_calls=False,
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [json.loads(call.function.arguments) for call in calls] == [{"city": "Paris"}]


async def test_tool_round_trip_answers_from_the_tool_result(openai_client: AsyncOpenAI) -> None:
    first = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    [call] = first.choices[0].message.tool_calls or []
    second = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[misc]
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny", "temp": 21})},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"


async def test_tool_choice_none_answers_with_text(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert "weather in Paris" in (choice.message.content or "")


async def test_tool_choice_auto_lets_the_model_decide(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Hello there"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="auto",
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "You said: Hello there"


async def final_completion(client: AsyncOpenAI, request: dict[str, Any], *, stream: bool) -> ChatCompletion:
    """The completion as the SDK assembles it, from a streamed run (read to the end) or a plain one."""
    if not stream:
        return await client.chat.completions.create(**request)
    async with client.chat.completions.stream(**request) as events:
        async for _ in events:
            pass
        return await events.get_final_completion()


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_required_forces_a_call(openai_client: AsyncOpenAI, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Paris weather report"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "required",
    }
    choice = (await final_completion(openai_client, request, stream=stream)).choices[0]
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_named_calls_that_tool_and_finishes_with_stop(
    openai_client: AsyncOpenAI, stream: bool
) -> None:
    request: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "What time is it? Also the weather in Paris"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }
    choice = (await final_completion(openai_client, request, stream=stream)).choices[0]
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_time"
    assert isinstance(json.loads(call.function.arguments), dict)
    # OpenAI parity (docs/openai-api.md §2.4): a named tool choice finishes with "stop".
    assert choice.finish_reason == "stop"


async def test_empty_tools_list_means_no_tools(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}], tools=[], tool_choice="auto"
    )
    assert completion.choices[0].message.content == "You said: Hello"
    with pytest.raises(BadRequestError) as err:
        await openai_client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}], tools=[], tool_choice="required"
        )
    assert err.value.param == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_is_not_returned(api: ApiServer, stream: bool) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "say the stop words"}],
            "stop": ["STOP"],
            "stream": stream,
        },
    )
    assert response.status == 200
    if stream:
        payloads = sse_chunks(await response.text())
        text = streamed_content(payloads)
        finish = payloads[-1]["choices"][0]["finish_reason"]
    else:
        body = await response.json()
        text = body["choices"][0]["message"]["content"]
        finish = body["choices"][0]["finish_reason"]
    assert text == "one two "
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_json_response_format_strips_the_code_fence(api: ApiServer, stream: bool) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "give me json about the sky"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "sky",
                    "schema": {"type": "object", "properties": {"color": {"type": "string"}}},
                },
            },
            "stream": stream,
        },
    )
    assert response.status == 200
    if stream:
        payloads = sse_chunks(await response.text())
        text = streamed_content(payloads)
    else:
        text = (await response.json())["choices"][0]["message"]["content"]
    assert json.loads(text) == {"color": "blue", "count": 3}


async def test_max_tokens_cuts_with_length(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=5
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert (completion.choices[0].message.content or "").startswith("Chapter")


async def test_v1_alias_serves_chat_completions(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/", headers=api.auth(), json={"model": MODEL_ID, "messages": [{"role": "user", "content": "alias"}]}
    )
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "You said: alias"


async def test_body_without_content_type_is_parsed(api: ApiServer) -> None:
    payload = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "curl -d"}]})
    response = await api.client.post(
        "/v1/chat/completions",
        headers={**api.auth(), "Content-Type": "application/x-www-form-urlencoded"},
        data=payload,
    )
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "You said: curl -d"


async def test_unknown_model_is_served_by_the_raw_model(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.model == MODEL_ID
    assert completion.choices[0].message.content == "You said: Hello"


@pytest.fixture
async def thinking_api(hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any) -> ApiServer:
    """A Qwen3-style model that thinks when the request enables thinking."""
    model = write_model(tmp_path, API_MODEL + "thinking = true\nthinking_text = Let me think about this request.\n")
    entry = add_entry(hass, emulator_lib, model)
    assert await hass.config_entries.async_setup(entry.entry_id)
    server: ApiServer = await serve_http()
    return server


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_goes_to_reasoning_content_not_content(thinking_api: ApiServer, stream: bool) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hello thinker"}],
        "chat_template_kwargs": {"enable_thinking": True},
        "stream": stream,
    }
    response = await thinking_api.client.post("/v1/chat/completions", headers=thinking_api.auth(), json=body)
    assert response.status == 200
    if stream:
        payloads = sse_chunks(await response.text())
        deltas = [p["choices"][0]["delta"] for p in payloads]
        content = "".join(delta.get("content") or "" for delta in deltas)
        reasoning = "".join(delta.get("reasoning_content") or "" for delta in deltas)
    else:
        message = (await response.json())["choices"][0]["message"]
        content, reasoning = message["content"], message["reasoning_content"]
    assert content == "You said: Hello thinker"
    assert "Let me think about this request." in reasoning
    assert "<think>" not in content

    # reasoning_effort "none" turns thinking off (what conformance tools send by default).
    response = await thinking_api.client.post(
        "/v1/chat/completions",
        headers=thinking_api.auth(),
        json={**body, "stream": False, "reasoning_effort": "none"},
    )
    message = (await response.json())["choices"][0]["message"]
    assert message["content"] == "You said: Hello thinker"
    assert "reasoning_content" not in message


async def test_cors_allows_browser_clients(api: ApiServer) -> None:
    origin = "http://chat.example.org"
    preflight = await api.client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    response = await api.client.get("/v1/models", headers={**api.auth(), "Origin": origin})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
