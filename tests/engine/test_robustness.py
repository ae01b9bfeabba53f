"""No request can wedge the engine (docs/robustness.md).

Whatever raises, the slot is freed, the caller gets one clean error, and the next request is served. Real worker
process + C emulator.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkllm_engine.client import WorkerClient
from rkllm_engine.engine import Engine
from rkllm_engine.output import OutputParser
from rkllm_engine.prompting import MAX_TOOL_SCHEMA_DEPTH, PromptPlanner
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    EngineError,
    EngineMetrics,
    EngineState,
    GenerationError,
    InvalidRequestError,
    WorkerHungError,
)
from rkllm_engine.watchdog import ProgressWatchdog
from tests.engine.test_client import worker_children
from tests.engine.test_engine import EngineFactory, make_engine, model_file

__all__ = ["make_engine"]  # the fixture, used by name

FAST = {"prefill_tokens_per_s": 100000, "decode_tokens_per_s": 2000}
CANARY = ChatRequest(messages=[ChatMessage("user", "canary")])


def chat(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", text)], **fields)


def function_tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


async def served(engine: Engine, request: ChatRequest = CANARY, timeout_s: float = 30) -> str:
    """The canary: a request that must be answered once the engine has recovered."""
    text, finished = await asyncio.wait_for(engine.submit(request).collect(), timeout_s)
    assert finished.finish_reason in ("stop", "length")
    return text


async def wait_for(engine: Engine, condition: Callable[[EngineMetrics], bool], timeout_s: float = 30) -> float:
    """Wait for a published metrics snapshot meeting `condition`; returns when it came (monotonic)."""
    reached = asyncio.Event()
    seen_at = 0.0

    def check(metrics: EngineMetrics) -> None:
        nonlocal seen_at
        if condition(metrics) and not reached.is_set():
            seen_at = time.monotonic()
            reached.set()

    remove = engine.add_listener(check)
    try:
        check(engine.metrics)
        async with asyncio.timeout(timeout_s):
            await reached.wait()
    finally:
        remove()
    return seen_at


# ---------------------------------------------------------------------------------------------------------------
# Text the runtime cannot take


async def test_lone_surrogates_and_nuls_reach_the_runtime_replaced_and_the_slot_stays_free(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Once, a lone surrogate failed in the frame encoder after the run took the slot, and every later request hung."""
    engine = await make_engine(model_file(tmp_path, default_answer="You said: {{input}}", **FAST))
    text = await served(engine, chat("half an emoji \ud83d and a \x00 NUL"))
    assert text == "You said: half an emoji \ufffd and a \ufffd NUL"
    tools = [{"type": "function", "function": {"name": "t", "description": "bad \udfff", "parameters": {}}}]
    await served(
        engine, ChatRequest(messages=[ChatMessage("system", "sys \ud800"), ChatMessage("user", "x")], tools=tools)
    )
    assert await served(engine) == "You said: canary"
    assert engine.metrics.state is EngineState.IDLE


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec=None), min_size=1, max_size=40))
def test_the_frame_encoder_never_raises_on_any_string(text: str) -> None:
    from rkllm_native import protocol

    frame = protocol.encode_frame({"op": "run", "id": 1, "text": text})
    decoded = protocol.decode_payload(frame[4:])
    assert decoded["text"] == protocol.scrub_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Whatever raises inside a run


def _boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("injected bug")


async def _aboom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("injected bug")


INJECTIONS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "sending the run": (WorkerClient, "_submit_run", _boom),
    "a prep call": (Engine, "_prepare", _aboom),
    "the output parser": (OutputParser, "feed", _boom),
    "the planner after the run": (PromptPlanner, "on_run_finished", _boom),
    "the KV metric refresh": (Engine, "_refresh_kv_metric", _aboom),
}


@pytest.mark.parametrize("where", list(INJECTIONS))
async def test_a_bug_anywhere_in_a_run_costs_one_request_never_the_slot(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    engine = await make_engine(model_file(tmp_path, default_answer="fine", **FAST))
    owner, name, replacement = INJECTIONS[where]
    with monkeypatch.context() as patched:
        patched.setattr(owner, name, replacement)
        if where == "the planner after the run":  # the answer was complete: the caller keeps it, the bug is logged
            assert (await asyncio.wait_for(engine.submit(chat("hi")).collect(), 30))[0] == "fine"
        else:
            with pytest.raises(EngineError, match="injected bug"):
                await asyncio.wait_for(engine.submit(chat("hi")).collect(), 30)
        assert engine.metrics.state is EngineState.IDLE  # the slot is free again
        assert engine.metrics.queue_depth == 0
    assert await served(engine) == "fine"
    assert await served(engine) == "fine"  # and the planner was reset, not left half-updated


# ---------------------------------------------------------------------------------------------------------------
# The no-progress watchdog


async def test_a_hung_run_is_ended_by_the_watchdog_without_any_client_action(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """`hang_after_tokens`: no callback, abort ignored. The watchdog fires, the worker is killed and restarted."""
    model = model_file(tmp_path, fault="hang_after_tokens:5", default_answer="one two three four five six", **FAST)
    engine = await make_engine(model, watchdog_min_s=1.0, abort_grace_s=0.5, speed=1)
    healths: list[str] = []
    engine.add_listener(lambda metrics: healths.append(metrics.health))
    model.write_text(model.read_text().replace("fault = hang_after_tokens:5", "fault = none"))  # for the restart

    started = time.monotonic()
    with pytest.raises(WorkerHungError, match="no progress from the runtime") as hung:
        await asyncio.wait_for(engine.submit(chat("hi")).collect(), 30)
    detected = time.monotonic()
    assert "the run is aborted" in str(hung.value)  # the caller knows at once; the slot waits for the run's end
    await wait_for(engine, lambda metrics: metrics.restarting)  # the abort was ignored: the worker was killed
    assert "did not honour abort" in (engine.metrics.last_error or "")
    assert "degraded" in healths  # the stall showed before the watchdog fired, and the restart after
    assert engine.metrics.watchdog_fired == 1
    freed = await wait_for(engine, lambda metrics: metrics.state is EngineState.IDLE)
    assert engine.metrics.health == "healthy"
    assert await served(engine) == "one two three four five six"
    answered = time.monotonic()
    print(
        f"\nhang: watchdog fired after {detected - started:.2f} s; slot free and worker back "
        f"{max(0.0, freed - detected):.2f} s later; next request answered {answered - detected:.2f} s after detection"
    )


def test_watchdog_bounds_follow_the_measured_rates() -> None:
    unmeasured = ProgressWatchdog(min_s=10, factor=3)
    assert unmeasured.first_token(300).fire_after_s == 30  # 300 tokens at 30 tok/s = 10 s expected, x3
    measured = ProgressWatchdog(min_s=10, factor=3, prefill_tokens_per_s=300, decode_tokens_per_s=16)
    assert measured.first_token(3000).fire_after_s == 30
    assert measured.first_token(3000).stall_after_s == 10
    assert measured.next_token().fire_after_s == 10  # 1/16 s expected: the floor applies
    assert measured.next_token().stall_after_s == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="positive"):
        ProgressWatchdog(min_s=0)


# ---------------------------------------------------------------------------------------------------------------
# Bounded shutdown


async def test_stopping_with_a_hung_run_is_bounded_and_leaves_no_worker(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    # The abort takes effect only after 10 min: hung yet or not when stop() comes, the run ignores it.
    model = model_file(
        tmp_path, fault="hang_after_tokens:2", abort_delay_ms=600000, default_answer="a b c d e f", **FAST
    )
    engine = await make_engine(model, speed=1)  # the default watchdog (10 s) has not fired yet
    generation = engine.submit(chat("hi"))
    events = aiter(generation)
    await asyncio.wait_for(anext(events), 30)  # it runs, then hangs
    started = time.monotonic()
    await asyncio.wait_for(engine.stop(), 10)  # the bound: stop takes at most 10 s
    took = time.monotonic() - started
    assert worker_children() == []
    with pytest.raises(EngineError):
        await asyncio.wait_for(generation.collect(), 30)
    print(f"\nstop with a hung run took {took:.2f} s")


# ---------------------------------------------------------------------------------------------------------------
# Model output checked like client input


ADDER_RULES = (
    'answer user "*add*" = <tool_call>\\n{"name": "my_adder_tool", "arguments": {"a": 1, "b": 2}}\\n</tool_call>\n'
)


async def test_a_forced_tool_choice_after_other_tools_returns_only_offered_names(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """LangChain's standard tests: a `required` request got a call of the previous request's tool."""
    engine = await make_engine(model_file(tmp_path, extra=ADDER_RULES, **FAST))
    _, first = await engine.submit(chat("please add 1 and 2", tools=[function_tool("my_adder_tool")])).collect()
    assert [call.name for call in first.tool_calls] == ["my_adder_tool"]

    magic = [function_tool("magic_function_no_args")]
    for request in (
        chat("please add 1 and 2", tools=magic, tool_choice="required"),
        chat("please add 1 and 2", tools=magic, tool_choice="magic_function_no_args"),
    ):
        _, finished = await engine.submit(request).collect()
        assert [call.name for call in finished.tool_calls] == ["magic_function_no_args"]


async def test_a_call_of_a_tool_that_was_not_offered_is_never_returned(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine(model_file(tmp_path, extra=ADDER_RULES, **FAST))
    tools = [function_tool("get_weather"), function_tool("get_time")]
    text, finished = await engine.submit(chat("please add 1 and 2", tools=tools)).collect()
    assert finished.tool_calls == ()  # auto: handled like a malformed call, as text (docs/robustness.md §5)
    assert "my_adder_tool" in text
    # required: the request demands a call of an offered tool, so the call is repaired to the most similar one.
    _, forced = await engine.submit(chat("please add 1 and 2", tools=tools, tool_choice="required")).collect()
    assert [call.name for call in forced.tool_calls] == ["get_weather"]
    assert await served(engine)  # and the slot is free


def test_a_forced_choice_without_any_call_is_a_clear_error_unless_the_budget_cut_it() -> None:
    from rkllm_engine.output import ParseResult
    from rkllm_engine.prompting import PromptPlanner

    request = chat("hi", tools=[function_tool("get_time")], tool_choice="required")
    plan = PromptPlanner(template_family=None, context_length=4096, default_max_new_tokens=64).plan(request)
    text_only = ParseResult(
        events=[], tool_calls=(), text="It is noon.", reasoning="", stop_matched=False, truncated_call=False
    )
    with pytest.raises(GenerationError, match="tool_choice 'required': the model produced no valid call"):
        Engine._check_result(request, plan, text_only)
    cut = ParseResult(events=[], tool_calls=(), text="", reasoning="", stop_matched=False, truncated_call=True)
    Engine._check_result(request, plan, cut)  # finish_reason "length", as OpenAI's would be


def test_a_call_whose_closing_tag_the_budget_cut_is_still_a_call() -> None:
    parser = OutputParser(
        tools_enabled=True, prefill='<tool_call>\n{"name": "', tool_names=["get_weather"], forced=True
    )
    parser.feed('get_weather", "arguments": {"city": "Paris"}}\n</tool_')
    result = parser.finish()
    assert [(call.name, call.arguments) for call in result.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert not result.truncated_call


@pytest.mark.parametrize(
    ("written", "offered", "repaired"),
    [
        ("functions.get_weather", ["get_weather", "get_time"], "get_weather"),
        ("Get_Weather", ["get_weather", "get_time"], "get_weather"),
        ("get_wether", ["get_weather", "set_alarm"], "get_weather"),
    ],
)
def test_near_misses_are_repaired_to_the_offered_name(written: str, offered: list[str], repaired: str) -> None:
    parser = OutputParser(tools_enabled=True, tool_names=offered)
    parser.feed(f'<tool_call>\n{{"name": "{written}", "arguments": {{}}}}\n</tool_call>')
    result = parser.finish()
    assert [call.name for call in result.tool_calls] == [repaired]


async def test_a_tool_schema_the_runtime_cannot_take_is_refused_at_admission_naming_it(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine(model_file(tmp_path, **FAST))
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_TOOL_SCHEMA_DEPTH + 5):
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [function_tool("fine"), function_tool("deep", deep)]
    with pytest.raises(InvalidRequestError, match=r"tools\[1\] \(deep\) nests") as refused:
        engine.submit(chat("hi", tools=tools))
    assert refused.value.param == "tools[1].function.parameters"
    assert json.dumps(tools)  # the request itself is valid JSON: only the runtime's limit refuses it
    assert await served(engine)


async def test_a_generation_ends_when_its_last_batch_carries_text_and_finished(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Text held back to the end (a "<" may open a tag) comes with Finished in one batch: iteration ends there.

    It once waited forever for an item that never came, and the API response hung.
    """
    engine = await make_engine(model_file(tmp_path, default_answer="<b> bold", **FAST), profile="v130")
    events = await asyncio.wait_for(drain_all(engine.submit(chat("hi", max_new_tokens=1))), 30)
    assert [type(event).__name__ for event in events] == ["TextDelta", "Finished"]
    assert await served(engine)


async def drain_all(generation: Any) -> list[Any]:
    return [event async for event in generation]
