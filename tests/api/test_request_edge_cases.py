"""Less common requests a client can send, and failures the server must still answer in OpenAI's shape.

Every token route refuses a missing key the same way; a history the engine cannot answer is a 400 before any byte;
`response_format` is best effort; a bug inside the server is a 500 `server_error`, never a hang or a bare traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from openai import AsyncOpenAI

from rkllm_engine.types import Event

from .conftest import MODEL_ID, ApiServer, runtime_of, sse_chunks, streamed_content
from .test_errors import TOOL, USER_HELLO, assert_openai_error

TOKEN_ROUTES = [
    ("POST", "/v1/chat/completions", {"messages": USER_HELLO}),
    ("POST", "/v1/", {"messages": USER_HELLO}),
    ("POST", "/v1/completions", {"prompt": "Once upon a time"}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL_ID}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), TOKEN_ROUTES)
async def test_every_openai_route_answers_401_without_a_valid_key(
    loaded_entry: Any, api: ApiServer, method: str, path: str, body: dict[str, Any] | None
) -> None:
    engine = runtime_of(loaded_entry).engine
    served_before = engine.metrics.requests_served
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = await api.client.request(method, path, headers=headers, json=body)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert_openai_error(
            await response.json(), error_type="invalid_request_error", param=None, code="invalid_api_key"
        )
    assert engine.metrics.requests_served == served_before  # nothing ran for an unauthenticated client


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "system", "content": "You are terse."}], "no user or tool message"),
        ([*USER_HELLO, {"role": "assistant", "content": "Hi!"}], "the last message is an assistant message"),
    ],
)
async def test_history_the_model_cannot_answer_is_a_400_before_any_byte(
    api: ApiServer, messages: list[dict[str, Any]], problem: str, stream: bool
) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": messages, "stream": stream},
    )
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    assert_openai_error(body, error_type="invalid_request_error", param=None, code="invalid_value")
    assert problem in body["error"]["message"]


async def test_history_with_a_refusal_part_and_a_tool_result_without_id_is_accepted(api: ApiServer) -> None:
    """Lenient like llama.cpp: an earlier refusal is history text, and a tool result may come without its call id."""
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [
                {"role": "user", "content": "Help me with something dangerous"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
                {"role": "user", "content": "How is it outside?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "name": "get_weather", "content": "cloudy, 14 C"},
            ],
            "tools": [TOOL],
        },
    )
    assert response.status == 200
    choice = (await response.json())["choices"][0]
    assert choice["finish_reason"] == "stop"
    # No rule of the test model matches, so it echoes the history it read: both messages reached the model.
    answer = choice["message"]["content"]
    assert "Assistant: I cannot help with that." in answer
    assert "Tool result (get_weather): cloudy, 14 C" in answer


async def test_validation_error_names_at_most_five_fields(api: ApiServer) -> None:
    invalid = {
        "temperature": 9,
        "top_p": 9,
        "top_k": -1,
        "repeat_penalty": 0,
        "frequency_penalty": 9,
        "presence_penalty": 9,
    }
    response = await api.client.post(
        "/v1/chat/completions", headers=api.auth(), json={"messages": USER_HELLO, **invalid}
    )
    assert response.status == 400
    body = await response.json()
    message = body["error"]["message"]
    named = [field for field in invalid if f"{field}:" in message]
    assert len(named) == 5
    assert body["error"]["param"] == named[0]
    assert_openai_error(body, error_type="invalid_request_error", param=named[0], code="invalid_value")


# ---------------------------------------------------------------------------------------------------------------------
# response_format: best effort (the runtime has no grammar)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_json_schema_without_a_schema_still_gets_a_bare_json_answer(api: ApiServer, stream: bool) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "give me json about the sky"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "anything"}},
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


@pytest.mark.parametrize("stream", [False, True])
async def test_answer_that_is_not_json_is_delivered_unchanged_and_logged(
    api: ApiServer, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    with caplog.at_level(logging.WARNING):
        response = await api.client.post(
            "/v1/chat/completions",
            headers=api.auth(),
            json={
                "model": MODEL_ID,
                "messages": USER_HELLO,
                "response_format": {"type": "json_object"},
                "stream": stream,
            },
        )
        assert response.status == 200
        if stream:
            payloads = sse_chunks(await response.text())
            text = streamed_content(payloads)
            assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            text = (await response.json())["choices"][0]["message"]["content"]
    # Delivered as the model wrote it (the engine's JSON instruction is echoed by the test model), not an error.
    assert text.startswith("You said: Hello")
    assert "response_format asked for JSON but the model's answer is not valid JSON" in caplog.text


async def test_tool_call_in_json_mode_is_returned_without_a_json_warning(
    openai_client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        completion = await openai_client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[TOOL],  # type: ignore[list-item]
            response_format={"type": "json_object"},
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]  # type: ignore[union-attr]
    assert "not valid JSON" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# A bug inside the server
# ---------------------------------------------------------------------------------------------------------------------


class _BrokenGeneration:
    """A generation whose event stream fails with an error that is not an EngineError (a bug, not a refusal)."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> _BrokenGeneration:
        return self

    async def __anext__(self) -> Event:
        raise ValueError("the parser met a state it does not know")

    async def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_unexpected_failure_is_an_openai_500_and_logged(
    loaded_entry: Any,
    api: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    stream: bool,
) -> None:
    generation = _BrokenGeneration()
    monkeypatch.setattr(runtime_of(loaded_entry).engine, "submit", lambda _request: generation)
    body = {"messages": USER_HELLO} if path.endswith("chat/completions") else {"prompt": "Once upon a time"}
    with caplog.at_level(logging.ERROR):
        response = await api.client.post(path, headers=api.auth(), json={**body, "stream": stream})
    # The failure came before the first event: even a stream gets a status, not an in-band error.
    assert response.status == 500
    payload = await response.json()
    assert_openai_error(payload, error_type="server_error", param=None)
    assert payload["error"]["message"] == "the request failed: ValueError: the parser met a state it does not know"
    assert "request failed unexpectedly" in caplog.text
    assert generation.cancelled  # the slot is released even though the request failed
