"""Every client mistake is a 4xx with the OpenAI error shape; no input can take the NPU slot down with it.

See docs/robustness.md §3, §5, §6.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry

from rkllm_engine.prompting import MAX_TOOL_SCHEMA_DEPTH
from rkllm_engine.types import EngineState
from rkllm_openai.schemas import MAX_BODY_BYTES, MAX_JSON_DEPTH
from tests.engine.test_client import worker_children
from tests.waits import wait_for_metrics

from .conftest import API_MODEL, MODEL_ID, ApiServer, add_entry, runtime_of, sse_chunks, streamed_content, write_model
from .test_errors import assert_openai_error

ENDPOINTS = {
    "/v1/chat/completions": {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}]},
    "/v1/completions": {"model": MODEL_ID, "prompt": "hello", "max_tokens": 16},
}


def weather_tool(name: str = "get_weather", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


async def answered_within(api: ApiServer, seconds: float) -> str:
    """A normal request right after a bad one is answered (the slot is free)."""
    async with asyncio.timeout(seconds):
        response = await api.client.post(
            "/v1/chat/completions", headers=api.auth(), json=ENDPOINTS["/v1/chat/completions"]
        )
        assert response.status == 200
        return str((await response.json())["choices"][0]["message"]["content"])


async def post_raw(api: ApiServer, path: str, body: bytes) -> tuple[int, Any]:
    response = await api.client.post(path, headers={**api.auth(), "Content-Type": "application/json"}, data=body)
    return response.status, await response.json()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_lone_surrogate_is_replaced_and_the_next_request_is_answered(api: ApiServer, stream: bool) -> None:
    """Once, a JSON-escaped lone surrogate held the slot forever: every later request, voice included, hung."""
    body = b'{"model": "%s", "stream": %s, "messages": [{"role": "user", "content": "half \\ud800 emoji"}]}' % (
        MODEL_ID.encode(),
        b"true" if stream else b"false",
    )
    response = await api.client.post(
        "/v1/chat/completions", headers={**api.auth(), "Content-Type": "application/json"}, data=body
    )
    assert response.status == 200
    if stream:
        text = streamed_content(sse_chunks(await response.text()))
    else:
        text = (await response.json())["choices"][0]["message"]["content"]
    assert text == "You said: half \ufffd emoji"
    assert await answered_within(api, 30) == "You said: hello"


@pytest.mark.parametrize("path", list(ENDPOINTS))
async def test_invalid_utf8_is_a_400(api: ApiServer, path: str) -> None:
    body = json.dumps(ENDPOINTS[path]).encode().replace(b"hello", b"half \xed\xa0\x80 emoji")  # an encoded surrogate
    status, error = await post_raw(api, path, body)
    assert status == 400
    assert_openai_error(error, error_type="invalid_request_error", param=None, code="invalid_encoding")
    assert await answered_within(api, 30)


@pytest.mark.parametrize("path", list(ENDPOINTS))
async def test_nul_characters_are_a_400_naming_the_field(api: ApiServer, path: str) -> None:
    body = json.dumps(ENDPOINTS[path]).replace("hello", "hel\\u0000lo").encode()
    status, error = await post_raw(api, path, body)
    assert status == 400
    param = "messages[0].content" if "chat" in path else "prompt"
    assert_openai_error(error, error_type="invalid_request_error", param=param)
    assert "NUL" in error["error"]["message"]


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 10_000])
async def test_json_nested_too_deep_is_a_400_not_a_recursion_error(api: ApiServer, path: str, depth: int) -> None:
    status, error = await post_raw(api, path, b"[" * depth + b"]" * depth)
    assert status == 400
    assert_openai_error(error, error_type="invalid_request_error", param=None, code="invalid_json")
    assert f"more than {MAX_JSON_DEPTH} levels" in error["error"]["message"]


async def test_a_tool_schema_the_runtime_cannot_take_is_a_400_naming_the_tool(api: ApiServer) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_TOOL_SCHEMA_DEPTH + 1):
        deep = {"type": "object", "properties": {"next": deep}}
    body = {**ENDPOINTS["/v1/chat/completions"], "tools": [weather_tool(), weather_tool("deep", deep)]}
    for stream in (False, True):
        response = await api.client.post("/v1/chat/completions", headers=api.auth(), json={**body, "stream": stream})
        assert response.status == 400
        error = await response.json()
        assert_openai_error(error, error_type="invalid_request_error", param="tools[1].function.parameters")
        assert "tools[1] (deep)" in error["error"]["message"]
    assert await answered_within(api, 30)


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("announced", [True, False])
async def test_a_body_over_the_limit_is_an_openai_shaped_413(api: ApiServer, path: str, announced: bool) -> None:
    big = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'

    async def chunks() -> Any:  # no Content-Length: the limit holds for a chunked body too
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    response = await api.client.post(
        path, headers={**api.auth(), "Content-Type": "application/json"}, data=big if announced else chunks()
    )
    assert response.status == 413
    assert response.headers["Content-Type"].startswith("application/json")
    assert_openai_error(await response.json(), error_type="invalid_request_error", param=None, code="request_too_large")


async def test_a_required_tool_choice_after_other_tools_returns_only_the_offered_tool(api: ApiServer) -> None:
    """LangChain's standard chat-model tests: the answer once named a tool from the previous request."""
    first = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Paris weather report"}],
        "tools": [weather_tool()],
    }
    response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=first)
    assert [call["function"]["name"] for call in (await response.json())["choices"][0]["message"]["tool_calls"]] == [
        "get_weather"
    ]
    forced = {**first, "tools": [weather_tool("magic_function_no_args")], "tool_choice": "required"}
    response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=forced)
    assert response.status == 200
    calls = (await response.json())["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["magic_function_no_args"]


# ---------------------------------------------------------------------------------------------------------------
# Bounded shutdown and unload with a stuck run


# Hangs after two tokens; an abort would take effect only after 10 min, so the run ignores it whether it comes
# before or after the hang (no race with the clock).
STUCK = "fault = hang_after_tokens:2\nabort_delay_ms = 600000\n"


async def _stuck(hass: HomeAssistant, emulator_lib: str, tmp_path: Any, serve_http: Any) -> MockConfigEntry:
    """An entry whose run hangs (no callback, abort ignored), with a request stuck in it."""
    entry = add_entry(hass, emulator_lib, write_model(tmp_path, API_MODEL + STUCK))
    assert await hass.config_entries.async_setup(entry.entry_id)
    api: ApiServer = await serve_http()
    body = {**ENDPOINTS["/v1/chat/completions"], "stream": True}
    response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=body)
    async with asyncio.timeout(30):  # the first tokens arrive, then the runtime hangs inside the run
        while not (line := (await response.content.readline()).decode()).startswith('data: {"id"'):
            pass
        while '"content"' not in line:
            line = (await response.content.readline()).decode()
    assert runtime_of(entry).engine.metrics.state is EngineState.GENERATING
    entry.async_on_unload(response.close)
    return entry


async def test_unloading_with_a_stuck_run_takes_at_most_10_s_and_leaves_no_worker(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Any, serve_http: Any
) -> None:
    entry = await _stuck(hass, emulator_lib, tmp_path, serve_http)
    started = time.monotonic()
    async with asyncio.timeout(10):
        assert await hass.config_entries.async_unload(entry.entry_id)
    print(f"\nunload with a stuck run took {time.monotonic() - started:.2f} s")
    assert worker_children() == []


async def test_stopping_home_assistant_with_a_stuck_run_takes_at_most_10_s_and_leaves_no_worker(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Any, serve_http: Any
) -> None:
    entry = await _stuck(hass, emulator_lib, tmp_path, serve_http)
    engine = runtime_of(entry).engine
    started = time.monotonic()
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STOP)
    await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.STOPPED, timeout_s=10)
    print(f"\nstop with a stuck run took {time.monotonic() - started:.2f} s")
    assert worker_children() == []
