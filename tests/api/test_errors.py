"""Errors users meet, each with its status code and an OpenAI-shaped body.

400 validation (docs/openai-api.md Appendix B), 401 with ban accounting, 429 on a full queue, 503 without a model,
context overflow, errors after the stream started, and keep-alive pings.
"""

from __future__ import annotations

import json
import logging
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import persistent_notification
from homeassistant.components.http import ban
from homeassistant.components.http.ban import KEY_FAILED_LOGIN_ATTEMPTS
from homeassistant.core import HomeAssistant, callback
from homeassistant.setup import async_setup_component
from openai import APIError, AsyncOpenAI, AuthenticationError, BadRequestError, InternalServerError

from custom_components.rkllm.const import DOMAIN
from rkllm_engine.types import ChatMessage, ChatRequest, QueueFullError
from rkllm_openai import schemas as openai_schemas

from .conftest import (
    AGENT_MODEL_ID,
    API_MODEL,
    MODEL_ID,
    ApiServer,
    add_entry,
    runtime_of,
    sse_chunks,
    streamed_content,
    write_model,
)

SCHEMAS_LOGGER = openai_schemas.__name__  # where the request models log what they ignore

USER_HELLO = [{"role": "user", "content": "Hello"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}

# (body, expected param) — every 400 of docs/openai-api.md Appendix B and §1, on /v1/chat/completions.
CHAT_400_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"messages": USER_HELLO, "n": 2}, "n"),
    ({"messages": USER_HELLO, "logprobs": True}, "logprobs"),
    ({"messages": USER_HELLO, "top_logprobs": 2}, "top_logprobs"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        },
        "messages[0].content[1]",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
            ]
        },
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
        "messages[0].content[0]",
    ),
    (
        {"messages": USER_HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"messages": USER_HELLO, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": USER_HELLO, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"messages": USER_HELLO, "tools": [], "tool_choice": "required"}, "tool_choice"),
    (
        {"messages": USER_HELLO, "tools": [], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
    ),
    ({"messages": USER_HELLO, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": USER_HELLO, "tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    (
        {"messages": USER_HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {}}},
        "tool_choice.function.name",
    ),
    ({"messages": USER_HELLO, "tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    (
        {"messages": USER_HELLO, "tools": [{"type": "function", "function": {"name": "get weather!"}}]},
        "tools[0].function.name",
    ),
    ({"messages": USER_HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER_HELLO, "temperature": 3}, "temperature"),
    ({"messages": USER_HELLO, "top_p": -0.5}, "top_p"),
    ({"model": MODEL_ID}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [*USER_HELLO, {"role": "assistant", "content": None}, *USER_HELLO]}, "messages[1].content"),
    ({"messages": USER_HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": USER_HELLO, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": USER_HELLO, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": USER_HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "system"}, *USER_HELLO]}, "messages[0].content"),
    ({"messages": [{"role": "developer", "content": None}, *USER_HELLO]}, "messages[0].content"),
    (
        {
            "messages": [
                *USER_HELLO,
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom", "function": {"name": "f"}}]},
                *USER_HELLO,
            ]
        },
        "messages[1].tool_calls[0].type",
    ),
    (
        {
            "messages": [
                *USER_HELLO,
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]},
                {"role": "tool", "tool_call_id": "c1"},
            ]
        },
        "messages[2].content",
    ),
    ({"messages": [{"role": "function", "name": "f", "content": "42"}, *USER_HELLO]}, "messages[0].role"),
    (
        {
            "messages": USER_HELLO,
            "tools": [TOOL],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        },
        "tool_choice.type",
    ),
    ({"messages": USER_HELLO, "tools": [TOOL], "tool_choice": {"type": "custom", "custom": {}}}, "tool_choice.type"),
    ({"messages": USER_HELLO, "modalities": ["text", "audio"]}, "modalities"),
]

COMPLETION_400_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"prompt": "Hi", "echo": True}, "echo"),
    ({"prompt": "Hi", "suffix": "x"}, "suffix"),
    ({"prompt": "Hi", "best_of": 2}, "best_of"),
    ({"prompt": "Hi", "logprobs": 1}, "logprobs"),
    ({"prompt": "Hi", "n": 2}, "n"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"model": MODEL_ID}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
]


def assert_openai_error(body: Any, *, error_type: str, param: str | None, code: str | None = None) -> None:
    """All four keys, a one-line message, and the expected values."""
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "\n" not in error["message"]
    assert error["type"] == error_type
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["code"] is None or isinstance(error["code"], str)


async def test_every_validation_error_is_a_400_naming_the_param(api: ApiServer) -> None:
    problems: list[str] = []
    for path, cases in (("/v1/chat/completions", CHAT_400_CASES), ("/v1/completions", COMPLETION_400_CASES)):
        for body, param in cases:
            response = await api.client.post(path, headers=api.auth(), json={"model": MODEL_ID, **body})
            payload = await response.json()
            if response.status != 400 or payload.get("error", {}).get("param") != param:
                problems.append(f"{path} {body}: {response.status} {payload}")
                continue
            assert_openai_error(payload, error_type="invalid_request_error", param=param)
    assert not problems, "\n".join(problems)


async def test_ignored_fields_are_accepted_with_a_log_line(api: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    """docs/openai-api.md §1.6: ignored fields get a debug line; a non-empty logit_bias (it changes results) warns."""
    caplog.set_level(logging.DEBUG, logger=SCHEMAS_LOGGER)
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Hello", "name": "alice"}],
            "seed": 1,
            "user": "u",
            "metadata": {"k": "v"},
            "store": False,
            "service_tier": "auto",
            "reasoning_effort": "low",
            "logit_bias": {"42": 5},
            "prediction": None,
            "stream_options": None,
            "n": 1,
            "mirostat": 2,
        },
    )
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "You said: Hello"
    logged = [(record.levelno, record.getMessage()) for record in caplog.records if record.name == SCHEMAS_LOGGER]
    assert (logging.WARNING, "logit_bias is not supported by the RKLLM runtime and was ignored") in logged
    [ignored] = [message for level, message in logged if message.startswith("fields present in the request but")]
    for field in ("seed", "user", "metadata", "store", "service_tier", "mirostat"):
        assert field in ignored.split(": ", 1)[1].split(", "), (field, ignored)


async def test_an_empty_logit_bias_is_no_warning(api: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    """An empty logit_bias changes nothing (clients send `{}` by default): no warning for it."""
    caplog.set_level(logging.DEBUG, logger=SCHEMAS_LOGGER)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "logit_bias": {}}
    response = await api.client.post("/v1/chat/completions", headers=api.auth(), json=body)
    assert response.status == 200
    assert not [record for record in caplog.records if "logit_bias" in record.getMessage()]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"", "empty")],
)
async def test_invalid_json_body_is_an_openai_400(api: ApiServer, data: bytes, expected: str) -> None:
    response = await api.client.post(
        "/v1/chat/completions", headers={**api.auth(), "Content-Type": "application/json"}, data=data
    )
    assert response.status == 400
    body = await response.json()
    assert_openai_error(body, error_type="invalid_request_error", param=None, code="invalid_json")
    assert expected in body["error"]["message"]


async def test_validation_error_message_is_bounded(api: ApiServer) -> None:
    huge = "x" * 20_000  # 2 MB in all: under the body limit, so validation answers
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"messages": [{"role": huge, "content": huge}] * 50, "temperature": huge, "top_p": huge},
    )
    assert response.status == 400
    body = await response.json()
    assert len(body["error"]["message"]) < 1500


async def test_unknown_route_is_404(api: ApiServer) -> None:
    response = await api.client.post("/v1/embeddings", headers=api.auth(), json={"input": "x"})
    assert response.status == 404


async def test_agent_model_refuses_client_tools(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(BadRequestError) as err:
        await openai_client.chat.completions.create(
            model=AGENT_MODEL_ID,
            messages=[{"role": "user", "content": "Hello"}],
            tools=[TOOL],  # type: ignore[list-item]
        )
    assert err.value.param == "tools"
    assert "server-side" in err.value.message


# ---------------------------------------------------------------------------------------------------------------------
# 401 and ban accounting
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def http_with_login_threshold(hass: HomeAssistant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HA's http with IP banning after 2 failed logins, set up before the rkllm entry.

    The ban list goes to tmp_path: the test config dir of the HA test plugin is shared by every test.
    """
    monkeypatch.setattr(ban, "IP_BANS_FILE", str(tmp_path / "ip_bans.yaml"))
    assert await async_setup_component(hass, "http", {"http": {"login_attempts_threshold": 2}})


async def test_missing_or_wrong_token_is_an_openai_401_counted_as_failed_login(
    hass: HomeAssistant, http_with_login_threshold: None, api: ApiServer, tmp_path: Path
) -> None:
    failed = hass.http.app[KEY_FAILED_LOGIN_ATTEMPTS]
    titles: list[str | None] = []

    @callback
    def notified(_kind: Any, items: dict[str, Any]) -> None:
        titles.extend(item["title"] for item in items.values())

    unsubscribe = persistent_notification.async_register_callback(hass, notified)
    response = await api.client.post("/v1/chat/completions", json={"messages": USER_HELLO})
    await hass.async_block_till_done()
    unsubscribe()
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(await response.json(), error_type="invalid_request_error", param=None, code="invalid_api_key")
    assert failed[ip_address("127.0.0.1")] == 1
    assert "Login attempt failed" in titles

    response = await api.client.get("/v1/models", headers={"Authorization": "Bearer not-a-token"})
    assert response.status == 401
    # The threshold is reached: HA's ban middleware now refuses this address entirely.
    response = await api.client.get("/v1/models", headers=api.auth())
    assert response.status == 403
    assert (tmp_path / "ip_bans.yaml").read_text().count("127.0.0.1") == 1


async def test_sdk_without_valid_key_raises_authentication_error(api: ApiServer) -> None:
    client = AsyncOpenAI(base_url=api.base_url, api_key="wrong", max_retries=0)
    try:
        with pytest.raises(AuthenticationError) as err:
            await client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}])
    finally:
        await client.close()
    assert err.value.code == "invalid_api_key"


async def test_health_is_public_and_not_a_failed_login(hass: HomeAssistant, api: ApiServer) -> None:
    response = await api.client.get("/health")
    assert response.status == 200
    assert not hass.http.app[KEY_FAILED_LOGIN_ATTEMPTS]


# ---------------------------------------------------------------------------------------------------------------------
# 429, 503, overflow, in-band errors, keep-alive
# ---------------------------------------------------------------------------------------------------------------------


def long_request() -> ChatRequest:
    """A request that holds the NPU slot for ~2.5 s."""
    return ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")])


@pytest.mark.parametrize("stream", [False, True])
async def test_full_queue_answers_429_with_retry_after_before_any_body(
    hass: HomeAssistant, loaded_entry: Any, api: ApiServer, stream: bool
) -> None:
    engine = runtime_of(loaded_entry).engine
    generations: list[Any] = []
    try:
        # One request runs and the queue fills up; the next admission is refused.
        generations.extend(engine.submit(long_request()) for _ in range(engine.config.queue_size + 1))
        with pytest.raises(QueueFullError):
            engine.submit(long_request())
        response = await api.client.post(
            "/v1/chat/completions",
            headers=api.auth(),
            json={"model": MODEL_ID, "messages": USER_HELLO, "stream": stream},
        )
        assert response.status == 429
        assert response.headers["Content-Type"].startswith("application/json")
        assert int(response.headers["Retry-After"]) >= 1
        assert_openai_error(
            await response.json(), error_type="rate_limit_error", param=None, code="rate_limit_exceeded"
        )
    finally:
        for generation in generations:
            await generation.cancel()


async def test_no_loaded_model_is_503_with_retry_after(hass: HomeAssistant, serve_http: Any) -> None:
    assert await async_setup_component(hass, DOMAIN, {})
    server: ApiServer = await serve_http()
    response = await server.client.post("/v1/chat/completions", headers=server.auth(), json={"messages": USER_HELLO})
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert_openai_error(await response.json(), error_type="unavailable_error", param=None, code="model_not_loaded")
    models = await (await server.client.get("/v1/models", headers=server.auth())).json()
    assert models == {"object": "list", "data": []}


@pytest.mark.parametrize("stream", [False, True])
async def test_stopped_engine_is_503_with_retry_after_before_any_body(
    loaded_entry: Any, api: ApiServer, stream: bool
) -> None:
    await runtime_of(loaded_entry).engine.stop()
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": USER_HELLO, "stream": stream},
    )
    assert response.status == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert int(response.headers["Retry-After"]) >= 1
    assert_openai_error(await response.json(), error_type="unavailable_error", param=None, code="model_not_loaded")
    health = await api.client.get("/health")
    assert health.status == 503
    assert (await health.json())["status"] == "unhealthy"


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_longer_than_the_context_is_a_400_before_streaming(api: ApiServer, stream: bool) -> None:
    words = " ".join(f"word{number}" for number in range(6000))
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": words}], "stream": stream},
    )
    assert response.status == 400
    body = await response.json()
    assert_openai_error(body, error_type="invalid_request_error", param="messages", code="context_length_exceeded")
    # The next request is served normally.
    response = await api.client.post(
        "/v1/chat/completions", headers=api.auth(), json={"model": MODEL_ID, "messages": USER_HELLO}
    )
    assert response.status == 200


@pytest.fixture
async def failing_api(hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any) -> ApiServer:
    """A model whose runtime reports an error state after 3 generated tokens of every run."""
    model = write_model(tmp_path, API_MODEL + "fault = error_after_tokens:3\n", stem="failing-model")
    entry = add_entry(hass, emulator_lib, model)
    assert await hass.config_entries.async_setup(entry.entry_id)
    server: ApiServer = await serve_http()
    return server


async def test_error_after_the_stream_started_goes_in_band(failing_api: ApiServer) -> None:
    response = await failing_api.client.post(
        "/v1/chat/completions",
        headers=failing_api.auth(),
        json={"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True},
    )
    assert response.status == 200
    lines = [line for line in (await response.text()).split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert_openai_error(error, error_type="server_error", param=None, code="generation_error")
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"

    client = AsyncOpenAI(base_url=failing_api.base_url, api_key=failing_api.token, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="failing-model", messages=[{"role": "user", "content": "tell me a long story"}], stream=True
        )
        with pytest.raises(APIError):
            async for _ in stream:
                pass
        with pytest.raises(InternalServerError):
            await client.chat.completions.create(
                model="failing-model", messages=[{"role": "user", "content": "tell me a long story"}]
            )
    finally:
        await client.close()


async def test_keepalive_pings_while_queued(loaded_entry: Any, api: ApiServer, fast_pings: float) -> None:
    engine = runtime_of(loaded_entry).engine
    blocker = engine.submit(long_request())
    try:
        assert isinstance(await anext(blocker), object)  # the blocker holds the NPU slot now
        response = await api.client.post(
            "/v1/chat/completions",
            headers=api.auth(),
            json={"model": MODEL_ID, "messages": USER_HELLO, "stream": True},
        )
        assert response.status == 200
        first = (await response.content.readline()).decode()
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert await response.content.readline() == b"\n"
        assert await response.content.readline() == b": ping\n"
    finally:
        await blocker.cancel()
    rest = (await response.content.read()).decode()
    assert rest.endswith("data: [DONE]\n\n")
    payloads = sse_chunks(rest)
    assert streamed_content(payloads) == "You said: Hello"
