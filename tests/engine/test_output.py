"""Tests for the incremental output parser (rkllm_engine/output.py)."""

from __future__ import annotations

import itertools
import json
import random
import re
import zlib
from typing import Any

import pytest

from rkllm_engine.output import OutputParser, ParseResult, new_tool_call_id
from rkllm_engine.types import (
    Event,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

WEATHER_CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
APPENDIX_B_4 = "Sure." + WEATHER_CALL
APPENDIX_B_5 = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>'
)


def sequential_ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run_chunks(chunks: list[str], **kwargs: Any) -> tuple[list[Event], ParseResult]:
    kwargs.setdefault("new_call_id", sequential_ids())
    parser = OutputParser(**kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    result = parser.finish()
    events += result.events
    return events, result


def run_chars(output: str, **kwargs: Any) -> tuple[list[Event], ParseResult]:
    return run_chunks(list(output), **kwargs)


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def reasoning_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def calls_of(events: list[Event]) -> list[tuple[int, str, dict[str, Any]]]:
    return [
        (
            e.index,
            next(s.name for s in events if isinstance(s, ToolCallStart) and s.index == e.index),
            json.loads(e.arguments),
        )
        for e in events
        if isinstance(e, ToolCallEnd)
    ]


def shape(events: list[Event]) -> list[tuple[Any, ...]]:
    """Events with consecutive text/reasoning merged and call ids left out: what must not depend on chunking."""
    merged: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, TextDelta | ReasoningDelta):
            kind = type(event).__name__
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + event.text)
            else:
                merged.append((kind, event.text))
        elif isinstance(event, ToolCallStart):
            merged.append(("start", event.index, event.name))
        elif isinstance(event, ToolCallArgsDelta):
            if merged and merged[-1][0] == "args" and merged[-1][1] == event.index:
                merged[-1] = ("args", event.index, merged[-1][2] + event.fragment)
            else:
                merged.append(("args", event.index, event.fragment))
        elif isinstance(event, ToolCallEnd):
            merged.append(("end", event.index, event.arguments))
    return merged


def check_call_discipline(events: list[Event]) -> None:
    """Each call: one start (id/name once), fragments that join to the end's arguments (a JSON object), one end."""
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    assert len({s.id for s in starts}) == len(starts)
    for start in starts:
        position = events.index(start)
        rest = events[position + 1 :]
        end = next(e for e in rest if isinstance(e, ToolCallEnd) and e.index == start.index)
        fragments = "".join(e.fragment for e in rest[: rest.index(end)] if isinstance(e, ToolCallArgsDelta))
        assert fragments == end.arguments
        assert isinstance(json.loads(end.arguments), dict)


# --- the OpenAI conformance cases (docs/openai-api.md Appendix B) ----------------------------------------------------


def test_tool_call_after_text_one_char_at_a_time() -> None:
    events, result = run_chars(APPENDIX_B_4, tools_enabled=True)
    assert text_of(events) == "Sure."
    assert all("<" not in e.text for e in events if isinstance(e, TextDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather")]
    check_call_discipline(events)
    assert json.loads(result.tool_calls[0].arguments) == {"city": "Paris"}
    assert result.text == "Sure."
    assert not result.truncated_call
    assert not result.malformed_calls


def test_parallel_calls_get_indexes_and_max_tool_calls_keeps_the_first() -> None:
    events, result = run_chars(APPENDIX_B_5, tools_enabled=True)
    assert calls_of(events) == [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "Europe/Paris"})]
    assert text_of(events) == ""
    check_call_discipline(events)

    events, result = run_chars(APPENDIX_B_5 + "\nAll done.", tools_enabled=True, max_tool_calls=1)
    assert calls_of(events) == [(0, "get_weather", {"city": "Paris"})]
    assert [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.text == ""


def test_stop_string_split_across_chunks_never_leaks() -> None:
    parser = OutputParser(tools_enabled=False, stop=["END"])
    emitted = parser.feed("Hello E") + parser.feed("N")
    assert text_of(emitted) == "Hello "
    matched_before_the_end = parser.stop_matched
    emitted += parser.feed("D and more")
    assert (matched_before_the_end, parser.stop_matched) == (False, True)
    assert parser.feed("ignored") == []
    result = parser.finish()
    emitted += result.events
    assert text_of(emitted) == "Hello "
    assert result.text == "Hello "
    assert result.stop_matched


def test_partial_stop_at_the_end_is_released_as_text() -> None:
    events, result = run_chars("The answer is EN", tools_enabled=False, stop=["END"])
    assert text_of(events) == "The answer is EN"
    assert not result.stop_matched


def test_stop_that_completes_first_wins() -> None:
    # "bc" completes before "abcd" does, whatever the chunking.
    for chunks in (["abcd"], list("abcd"), ["ab", "cd"]):
        events, result = run_chunks(chunks, tools_enabled=False, stop=["abcd", "bc"])
        assert text_of(events) == "a"
        assert result.stop_matched


def test_stop_inside_a_call_cuts_it_off() -> None:
    events, result = run_chars("Ok " + WEATHER_CALL, tools_enabled=True, stop=["Paris"])
    assert calls_of(events) == []
    assert text_of(events) == "Ok "
    assert result.truncated_call
    assert result.stop_matched


# --- hold-back of partial tags ----------------------------------------------------------------------------------


def test_partial_tool_call_tag_is_held_back_until_known() -> None:
    parser = OutputParser(tools_enabled=True, new_call_id=sequential_ids())
    assert text_of(parser.feed("Hello <tool_")) == "Hello "
    assert parser.feed('call>\n{"name": "x"') == []
    later = parser.feed("}\n</tool_call>")
    assert [type(e) for e in later] == [ToolCallStart, ToolCallArgsDelta, ToolCallEnd]


def test_partial_tag_that_never_completes_is_plain_text() -> None:
    parser = OutputParser(tools_enabled=True)
    assert text_of(parser.feed("a <tool")) == "a "
    assert text_of(parser.feed("box> b")) == "<toolbox> b"
    parser.feed(" and <thi")
    result = parser.finish()
    assert text_of(result.events) == "<thi"
    assert result.text == "a <toolbox> b and <thi"


def test_tags_are_text_when_tools_are_disabled() -> None:
    events, result = run_chars(APPENDIX_B_4, tools_enabled=False)
    assert text_of(events) == APPENDIX_B_4
    assert result.tool_calls == ()


# --- think blocks ---------------------------------------------------------------------------------------------------


def test_think_block_becomes_reasoning_and_following_whitespace_is_dropped() -> None:
    events, result = run_chars("<think>\nThe user greets me.\n</think>\n\nHello!", tools_enabled=True)
    assert reasoning_of(events) == "\nThe user greets me.\n"
    assert text_of(events) == "Hello!"
    assert result.reasoning == "\nThe user greets me.\n"
    assert result.text == "Hello!"


def test_output_starting_inside_a_think_block() -> None:
    events, _ = run_chars("planning</think> Hi", tools_enabled=False, in_think=True)
    assert reasoning_of(events) == "planning"
    assert text_of(events) == "Hi"


def test_stray_think_close_is_not_shown() -> None:
    events, _ = run_chars("</think>\n\nHi there", tools_enabled=False)
    assert text_of(events) == "Hi there"


def test_think_then_tool_call() -> None:
    output = "<think>I should check the weather.</think>\n" + WEATHER_CALL
    events, result = run_chars(output, tools_enabled=True)
    assert reasoning_of(events) == "I should check the weather."
    assert text_of(events) == ""
    assert [c.name for c in result.tool_calls] == ["get_weather"]


def test_unclosed_think_block_is_all_reasoning() -> None:
    events, result = run_chars("<think>still thinking </thi", tools_enabled=False)
    assert reasoning_of(events) == "still thinking </thi"
    assert result.text == ""


# --- call formats -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "name", "arguments"),
    [
        ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}\n</tool_call>', "f", {"a": [1, 2]}),
        ('<tool_call>{"name": "f", "parameters": {"a": true}}</tool_call>', "f", {"a": True}),
        ('<tool_call>{"name": "GetLiveContext"}</tool_call>', "GetLiveContext", {}),
        ('<tool_call>{"name": "f", "arguments": ""}</tool_call>', "f", {}),
        ('<tool_call>\n{"name": "f", "arguments": {"t": "a}b\\"c"}}\n', "f", {"t": 'a}b"c'}),  # no closing tag
        (
            "<tool_call>\n<function=HassLightSet>\n<parameter=name>\nKitchen Light\n</parameter>\n"
            '<parameter=brightness>\n40\n</parameter>\n<parameter=domain>\n["light"]\n</parameter>\n'
            "</function>\n</tool_call>",
            "HassLightSet",
            {"name": "Kitchen Light", "brightness": 40, "domain": ["light"]},
        ),
        (
            "<function=HassTurnOff><parameter=name>Garage Door</parameter></function>",
            "HassTurnOff",
            {"name": "Garage Door"},
        ),
        ('<function=f>{"a": 1}</function>', "f", {"a": 1}),
        (
            '<tool_call>{"name": "intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}</tool_call>',
            "intent__HassTurnOn",
            {"name": "Kitchen Light"},
        ),
    ],
)
def test_call_formats(output: str, name: str, arguments: dict[str, Any]) -> None:
    events, result = run_chars(output, tools_enabled=True)
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [(name, arguments)]
    assert text_of(events) == ""
    check_call_discipline(events)


def test_missing_closing_tag_before_the_next_call() -> None:
    output = '<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    _, result = run_chars(output, tools_enabled=True)
    assert [c.name for c in result.tool_calls] == ["a", "b"]


def test_call_cut_off_by_the_end_of_output_is_never_emitted() -> None:
    events, result = run_chars(
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"ci', tools_enabled=True
    )
    assert [e for e in events if isinstance(e, ToolCallStart | ToolCallArgsDelta | ToolCallEnd)] == []
    assert text_of(events) == "Let me check."
    assert result.truncated_call
    assert result.tool_calls == ()


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>',
        '<tool_call>{"name": "f"} trailing</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
        "<tool_call><function=f><parameter=a>1</parameter>junk</function></tool_call>",
    ],
)
def test_malformed_call_is_shown_as_text_and_reported(block: str) -> None:
    events, result = run_chars("Before " + block + " after", tools_enabled=True)
    assert result.tool_calls == ()
    assert result.malformed_calls == [block]
    assert text_of(events) == "Before " + block + " after"


def test_text_between_calls_is_released_and_text_after_the_last_is_dropped() -> None:
    output = "Sure. " + WEATHER_CALL + "\nAlso the time:\n" + WEATHER_CALL.replace("get_weather", "get_time") + " Done!"
    events, result = run_chars(output, tools_enabled=True)
    assert shape(events)[0] == ("TextDelta", "Sure. ")
    assert [s[0] for s in shape(events)] == ["TextDelta", "start", "args", "end", "TextDelta", "start", "args", "end"]
    assert result.text == "Sure. \nAlso the time:\n"


def test_whitespace_between_calls_is_not_text() -> None:
    _, result = run_chars(WEATHER_CALL + "\n\n" + WEATHER_CALL, tools_enabled=True)
    assert result.text == ""
    assert len(result.tool_calls) == 2


# --- prefill ------------------------------------------------------------------------------------------------------


def test_required_prefill_continues_inside_the_call() -> None:
    events, result = run_chars(
        'HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>',
        tools_enabled=True,
        prefill='<tool_call>\n{"name": "',
    )
    assert calls_of(events) == [(0, "HassTurnOn", {"name": "Kitchen Light"})]
    assert result.text == ""


def test_named_prefill_only_needs_the_arguments() -> None:
    events, result = run_chars(
        '{"city": "Paris"}}\n</tool_call>',
        tools_enabled=True,
        prefill='<tool_call>\n{"name": "get_weather", "arguments": ',
    )
    assert calls_of(events) == [(0, "get_weather", {"city": "Paris"})]
    assert result.text == ""


def test_prefilled_call_without_an_end_is_truncated() -> None:
    events, result = run_chars(
        '{"city": "Par', tools_enabled=True, prefill='<tool_call>\n{"name": "get_weather", "arguments": '
    )
    assert events == []
    assert result.truncated_call


# --- misc ---------------------------------------------------------------------------------------------------------


def test_default_call_ids_look_like_openai_ids_and_are_unique() -> None:
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    parser = OutputParser(tools_enabled=True)
    parser.feed(APPENDIX_B_5)
    result = parser.finish()
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in result.tool_calls)


def test_misuse_gives_clear_errors() -> None:
    parser = OutputParser(tools_enabled=False)
    parser.finish()
    with pytest.raises(RuntimeError, match=r"feed\(\) called after finish\(\)"):
        parser.feed("x")
    with pytest.raises(RuntimeError, match="called twice"):
        parser.finish()
    with pytest.raises(ValueError, match="max_tool_calls must be None or >= 0, got -1"):
        OutputParser(tools_enabled=True, max_tool_calls=-1)


def test_max_tool_calls_zero_keeps_text_before_and_drops_the_rest() -> None:
    events, result = run_chars("Hi " + WEATHER_CALL + " bye", tools_enabled=True, max_tool_calls=0)
    assert text_of(events) == "Hi "
    assert result.tool_calls == ()


# --- property: chunking never changes the result -------------------------------------------------------------------

CORPUS: list[tuple[str, dict[str, Any]]] = [
    (APPENDIX_B_4, {"tools_enabled": True}),
    (APPENDIX_B_5, {"tools_enabled": True}),
    (APPENDIX_B_5 + "\ntrailing words", {"tools_enabled": True, "max_tool_calls": 1}),
    ("Bonjour, ça va ? 😀 Grüße aus Köln — 你好世界", {"tools_enabled": True}),
    (
        "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. STOP und weiter",
        {"tools_enabled": False, "stop": ["STOP"]},
    ),
    ("Answer: 42\n\nUser: next question", {"tools_enabled": False, "stop": ["\n\nUser:", "\nUser:"]}),
    ("<think>Überlegung: 温度?</think>\n\n" + WEATHER_CALL + "\n", {"tools_enabled": True}),
    ("<think>a</think>  b <think>c</think>d", {"tools_enabled": False}),
    ("reasoning only</think>\nVisible 🎉", {"tools_enabled": True, "in_think": True}),
    ("Text <tool_call>{broken</tool_call> more <tool_ca", {"tools_enabled": True}),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call> inside?"}}', {"tools_enabled": True}),
    (
        "<tool_call><function=HassTurnOn><parameter=name>Küche</parameter></function></tool_call>after",
        {"tools_enabled": True},
    ),
    ('x<function=f>{"a": "ß"}</function>y<function=g><parameter=n>1', {"tools_enabled": True}),
    (
        'HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>',
        {"tools_enabled": True, "prefill": '<tool_call>\n{"name": "'},
    ),
    (
        '{"name": "Kitchen Light"}}\n</tool_call>ignored',
        {"tools_enabled": True, "prefill": '<tool_call>\n{"name": "intent__HassTurnOn", "arguments": '},
    ),
    (
        'one <tool_call>{"name": "a"}</tool_call> two <tool_call>{"name": "b"}</tool_call> three',
        {"tools_enabled": True},
    ),
    ("stop inside <think>reasoning ENDX</think>", {"tools_enabled": False, "stop": ["ENDX"]}),
    ("aaab", {"tools_enabled": False, "stop": ["aab", "ab"]}),
    ("<<<tool_call>>>", {"tools_enabled": True}),
    ("</think></think><think><think></think>", {"tools_enabled": True}),
]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks: list[str] = []
    position = 0
    while position < len(text):
        size = rng.choice((1, 1, 2, 3, 5, 8, 13))
        chunks.append(text[position : position + size])
        position += size
    return chunks


@pytest.mark.parametrize(("output", "kwargs"), CORPUS)
def test_chunking_never_changes_the_result(output: str, kwargs: dict[str, Any]) -> None:
    whole_events, whole = run_chunks([output], **kwargs)
    expected = shape(whole_events)
    check_call_discipline(whole_events)
    rng = random.Random(zlib.crc32(output.encode()))  # deterministic: the same chunkings on every run
    chunkings = [list(output), *(random_chunks(output, rng) for _ in range(40))]
    for chunks in chunkings:
        events, result = run_chunks(chunks, **kwargs)
        assert shape(events) == expected, chunks
        check_call_discipline(events)
        assert result.text == whole.text == text_of(whole_events)
        assert result.reasoning == whole.reasoning
        assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
        assert (result.stop_matched, result.truncated_call, result.malformed_calls) == (
            whole.stop_matched,
            whole.truncated_call,
            whole.malformed_calls,
        )
        for stop in kwargs.get("stop", ()):
            assert stop not in result.text
