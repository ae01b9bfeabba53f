"""The request translation and the event → OpenAI translators, without a server or Home Assistant (fast)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rkllm_engine.output import strip_code_fence
from rkllm_engine.types import (
    Finished,
    Perf,
    TextDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from rkllm_openai.schemas import (
    OpenAIError,
    parse_chat_request,
    parse_completion_request,
)
from rkllm_openai.stream import (
    ChatCompletionTranslator,
    JsonFenceFilter,
    TextCompletionTranslator,
    sse_event,
)

USAGE = Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=6)


def streamed_content(chunks: list[dict[str, Any]]) -> str:
    """The assistant text of parsed chat chunks, joined as a client does (the usage chunk has no choices)."""
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


def finished(reason: Any = "stop", calls: tuple[ToolCall, ...] = ()) -> Finished:
    return Finished(finish_reason=reason, usage=USAGE, perf=Perf(), tool_calls=calls)


def run_filter(pieces: list[str]) -> tuple[list[str], str]:
    fence = JsonFenceFilter()
    emitted = [fence.feed(piece) for piece in pieces]
    return emitted, "".join(emitted) + fence.finish()


@pytest.mark.parametrize(
    "pieces",
    [
        ["```json\n", '{"a": 1}', "\n```"],
        ["`", "``", "json", "\n{", '"a": 1}\n', "`", "``"],
        ["  ```\n", '{"a": 1}', "```  \n"],
        list('```json\n{"a": 1}\n```'),
    ],
)
def test_fence_filter_removes_a_fence_split_anywhere(pieces: list[str]) -> None:
    _, text = run_filter(pieces)
    assert json.loads(text) == {"a": 1}
    assert "`" not in text


def test_fence_filter_leaves_plain_json_and_streams_it_at_once() -> None:
    emitted, text = run_filter(['{"a": ', '"x`y"}'])
    assert emitted == ['{"a": ', '"x`y"}']
    assert text == '{"a": "x`y"}'


def test_fence_filter_releases_held_backticks_that_were_content() -> None:
    _, text = run_filter(["```\n", '{"code": "`', "`", '`"}', "\n```"])
    assert json.loads(text) == {"code": "```"}


@pytest.mark.parametrize("answer", ["", " ", "``", "  `"])
def test_fence_filter_never_loses_text_that_never_decided(answer: str) -> None:
    """An answer too short to tell whether a fence opens is released whole at the end."""
    emitted, text = run_filter([answer])
    assert emitted == [""]
    assert text == answer


def test_json_answer_cut_inside_a_fence_keeps_its_tail_streamed_and_plain() -> None:
    """Cut by max_tokens inside the fence: the held-back backtick was content, so both forms end with it."""
    translator = ChatCompletionTranslator(model="m", json_mode=True)
    chunks = [
        chunk
        for event in (TextDelta("```json\n"), TextDelta('{"code": "a `'), finished("length"))
        for chunk in translator.feed(event)
    ]
    streamed = streamed_content(chunks)
    completion = translator.completion()
    assert streamed == completion["choices"][0]["message"]["content"] == '{"code": "a `'
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_strip_code_fence() -> None:
    assert strip_code_fence('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_code_fence('{"a": 1}') == '{"a": 1}'


def test_chat_translator_same_result_streamed_or_not() -> None:
    events = [
        TextDelta("Sure."),
        ToolCallStart(index=0, id="call_1", name="get_weather"),
        ToolCallArgsDelta(index=0, fragment='{"city": "Paris"}'),
        ToolCallEnd(index=0, arguments='{"city": "Paris"}'),
        finished("tool_calls", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ]
    translator = ChatCompletionTranslator(model="m", include_usage=True)
    chunks = [chunk for event in events for chunk in translator.feed(event)]
    completion = translator.completion()
    message = completion["choices"][0]["message"]
    assert message["content"] == "Sure."
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 6},
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == completion["usage"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert sum("role" in chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]) == 1


def test_chat_translator_null_content_next_to_calls_without_text() -> None:
    translator = ChatCompletionTranslator(model="m")
    for event in (
        ToolCallStart(index=0, id="call_1", name="f"),
        ToolCallArgsDelta(index=0, fragment="{}"),
        ToolCallEnd(index=0, arguments="{}"),
        finished("stop", (ToolCall("call_1", "f", "{}"),)),
    ):
        translator.feed(event)
    assert translator.completion()["choices"][0]["message"]["content"] is None


def test_text_translator_maps_finish_reasons_of_legacy_completions() -> None:
    translator = TextCompletionTranslator(model="m")
    events = translator.feed(TextDelta("abc")) + translator.feed(finished("length"))
    assert [event["choices"][0]["finish_reason"] for event in events] == [None, "length"]
    assert translator.completion()["choices"][0]["text"] == "abc"
    assert "usage" not in events[-1]


def test_sse_event_is_one_line() -> None:
    data = sse_event({"text": "two\nlines"})
    assert data.startswith(b"data: ")
    assert data.endswith(b"\n\n")
    assert data.count(b"\n") == 2


def test_chat_request_translation() -> None:
    parsed = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "stop": "END",
            "temperature": 0.5,
            "repetition_penalty": 1.2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": True},
            "response_format": {"type": "json_object"},
        }
    )
    request = parsed.request
    assert [message.role for message in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].content == "a\nb"
    assert request.messages[2].tool_calls[0].arguments == '{"x": 1}'
    assert request.messages[3].name == "f"
    assert request.max_new_tokens == 20
    assert request.stop == ["END"]
    assert request.sampling.temperature == 0.5
    assert request.sampling.repeat_penalty == 1.2
    assert request.enable_thinking is True
    assert request.json_mode is True
    assert request.tool_choice == "none"
    assert parsed.stream
    assert parsed.include_usage


def test_reasoning_effort_none_wins_over_chat_template_kwargs() -> None:
    parsed = parse_chat_request(
        {
            "messages": [{"role": "user", "content": "x"}],
            "reasoning_effort": "none",
            "chat_template_kwargs": {"enable_thinking": True},
        }
    )
    assert parsed.request.enable_thinking is False


def test_include_usage_needs_stream() -> None:
    parsed = parse_chat_request(
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}
    )
    assert not parsed.include_usage


def test_json_schema_goes_into_the_turn() -> None:
    parsed = parse_chat_request(
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        }
    )
    assert parsed.request.json_mode
    assert parsed.request.dynamic_context is not None
    assert '{"type":"object"}' in parsed.request.dynamic_context


def test_legacy_completion_defaults() -> None:
    parsed = parse_completion_request({"prompt": "Once", "stop": ["a", "b"]})
    assert parsed.request.prompt == "Once"
    assert parsed.request.max_new_tokens == 16
    assert parsed.request.stop == ["a", "b"]


def test_validation_error_names_the_field_not_the_union_branch() -> None:
    with pytest.raises(OpenAIError) as err:
        parse_chat_request({"messages": [{"role": "user", "content": 5}]})
    assert err.value.param == "messages[0].content"
    assert err.value.message.startswith("invalid request: messages[0].content:")
