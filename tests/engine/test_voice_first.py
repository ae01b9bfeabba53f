"""Voice first on a shared NPU (docs/voice.md): admission, turn affinity, slot routing, pause/resume, honest usage.

Real worker processes + the C emulator; the scheduler's policies also without a worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rkllm_engine.engine import Engine
from rkllm_engine.scheduler import Scheduler, TicketState
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EngineMetrics,
    EngineState,
    Finished,
    Priority,
    QueueFullError,
    TextDelta,
)
from tests.engine.test_engine import (
    ASSIST_RULES,
    EngineFactory,
    assist_request,
    drain,
    make_engine,
    model_file,
    tool_result,
)

__all__ = ["make_engine"]  # the fixture, used by name

STORY = " ".join(f"word{number}" for number in range(120))
API_RULES = ASSIST_RULES + f'answer user "*story*" = {STORY}\n'
OTHER_SYSTEM = "You are a creative writing assistant. Answer with long stories."


def api_request(text: str = "tell me a story", **fields: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("system", OTHER_SYSTEM), ChatMessage("user", text)], **fields)


async def wait_for(engine: Engine, condition: Any, timeout_s: float = 30) -> EngineMetrics:
    """The first published metrics snapshot meeting `condition`."""
    reached: asyncio.Future[EngineMetrics] = asyncio.get_running_loop().create_future()

    def check(metrics: EngineMetrics) -> None:
        if condition(metrics) and not reached.done():
            reached.set_result(metrics)

    remove = engine.add_listener(check)
    try:
        check(engine.metrics)
        return await asyncio.wait_for(reached, timeout_s)
    finally:
        remove()


def run_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if " run: plan " in record.getMessage()]


# ---------------------------------------------------------------------------------------------------------------
# Admission (the scheduler alone)


def open_scheduler(queue_size: int, slots: int = 1) -> Scheduler:
    scheduler = Scheduler(queue_size=queue_size, slots=slots)
    for index in range(slots):
        scheduler.set_slot_availability(index, "ready")
    scheduler.set_base_state(EngineState.IDLE)
    scheduler.open()
    return scheduler


async def test_a_voice_request_is_never_refused_because_of_api_requests() -> None:
    scheduler = open_scheduler(queue_size=3)
    running = scheduler.admit(Priority.API)
    await running.wait_for_slot()
    api = [scheduler.admit(Priority.API) for _ in range(3)]
    with pytest.raises(QueueFullError):
        scheduler.admit(Priority.API)

    voice = scheduler.admit(Priority.CONVERSATION)  # the newest API request makes room
    with pytest.raises(QueueFullError, match="queue is full"):
        await api[-1].wait_for_slot()
    assert api[-1].state is TicketState.CANCELLED
    assert scheduler.queue_depth == 3

    # API requests that already answer their clients (headers sent) are never refused: voice goes beyond the bound.
    for ticket in api[:2]:
        ticket.commit()
    second_voice = scheduler.admit(Priority.CONVERSATION)
    assert scheduler.queue_depth == 4
    # Voice is served first, in arrival order.
    running.release()
    await asyncio.wait_for(voice.wait_for_slot(), 30)
    voice.release()
    await asyncio.wait_for(second_voice.wait_for_slot(), 30)
    second_voice.release()
    for ticket in api[:2]:
        await asyncio.wait_for(ticket.wait_for_slot(), 30)
        ticket.release()


async def test_voice_requests_alone_can_fill_the_queue() -> None:
    scheduler = open_scheduler(queue_size=2)
    running = scheduler.admit(Priority.CONVERSATION)
    await running.wait_for_slot()
    queued = [scheduler.admit(Priority.CONVERSATION) for _ in range(2)]
    with pytest.raises(QueueFullError):
        scheduler.admit(Priority.CONVERSATION)
    for ticket in queued:
        ticket.cancel()
    running.release()


async def test_with_two_slots_api_requests_wait_while_a_voice_turn_is_active() -> None:
    scheduler = open_scheduler(queue_size=8, slots=2)
    api = scheduler.admit(Priority.API, affinity="api")
    await api.wait_for_slot()
    assert api.slot == 1  # slot 0 is the voice slot
    paused: list[bool] = []
    api.set_pause(paused.append)

    voice = scheduler.admit(Priority.CONVERSATION, affinity="assist", turn_id="turn")
    await voice.wait_for_slot()
    assert voice.slot == 0
    assert paused == [True]  # the API run is held while the voice turn runs
    later_api = scheduler.admit(Priority.API, affinity="api")
    assert later_api.state is TicketState.QUEUED

    scheduler.reserve_for_turn(voice)  # round 1 ended with tool calls: the turn is not over
    voice.release()
    assert paused == [True]
    follow_up = scheduler.admit(Priority.CONVERSATION, affinity="assist", turn_id="turn")
    await follow_up.wait_for_slot()
    assert follow_up.slot == 0
    follow_up.release()
    scheduler.end_turn("turn")
    assert paused == [True, False]  # resumed once the turn is over
    api.release()
    await asyncio.wait_for(later_api.wait_for_slot(), 30)
    assert later_api.slot == 1
    later_api.release()


# ---------------------------------------------------------------------------------------------------------------
# The engine with real workers


async def test_a_voice_turn_keeps_its_slot_for_its_tool_results_ahead_of_queued_api_requests(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine(model_file(tmp_path, calibration="qwen2.5-1.5b-rk3588", extra=API_RULES), speed=50)
    voice = assist_request("turn on the kitchen light", turn_id="turn-1")
    round_one = await drain(engine.submit(voice))
    finished = round_one[-1]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "tool_calls"

    # Between the rounds (Home Assistant runs the tool), an API request arrives: it waits for the turn.
    order: list[str] = []
    api_generation = engine.submit(api_request(max_new_tokens=5))

    async def api() -> None:
        await drain(api_generation)
        order.append("api")

    api_task = asyncio.create_task(api())
    await asyncio.sleep(0)  # the API request is queued behind the reserved slot
    assert engine.metrics.queue_depth == 1
    call = finished.tool_calls[0]
    voice.messages += [
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", json.dumps(tool_result("turn_on_ok")), tool_call_id=call.id, name=call.name),
    ]
    text, answer = await engine.submit(voice).collect()
    order.append("voice")
    engine.end_turn("turn-1")
    await asyncio.wait_for(api_task, 60)
    assert text == "Done, the kitchen light is on."
    assert order == ["voice", "api"]
    # Its own prefills only: the tool result continued the resident turn.
    assert answer.perf.prefill_tokens < finished.perf.prefill_tokens / 10


async def test_with_two_slots_an_api_prompt_never_evicts_the_assist_prefix(
    make_engine: EngineFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rkllm_engine.engine")
    engine = await make_engine(
        model_file(tmp_path, calibration="qwen2.5-1.5b-rk3588", extra=API_RULES), profile="v130", speed=200, slots=2
    )
    await wait_for(engine, lambda metrics: [slot.state for slot in metrics.slots] == ["idle", "idle"])
    cold = (await drain(engine.submit(assist_request("turn on the kitchen light"))))[-1]
    assert isinstance(cold, Finished)
    await drain(engine.submit(api_request(max_new_tokens=5)))
    warm = (await drain(engine.submit(assist_request("turn on the kitchen light"))))[-1]
    assert isinstance(warm, Finished)
    assert warm.perf.prefill_tokens < cold.perf.prefill_tokens / 10  # the Assist prefix stayed resident
    lines = run_lines(caplog)
    assert [line.split(" run:")[0] for line in lines] == ["slot 0", "slot 1", "slot 0"]
    assert "plan reset" in lines[1]  # the API prompt took the other slot
    assert "plan rebuild" in lines[2]
    slots = engine.metrics.slots
    assert [slot.role for slot in slots] == ["voice", "general"]
    assert slots[0].tools_loaded[:2] == ("HassTurnOn", "HassTurnOff")
    assert slots[1].tools_loaded == ()
    assert engine.metrics.tools_loaded == slots[0].tools_loaded


async def test_a_voice_turn_pauses_an_api_generation_which_then_completes_in_order(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine(
        model_file(tmp_path, calibration="qwen2.5-1.5b-rk3588", extra=API_RULES), speed=5, slots=2
    )
    await wait_for(engine, lambda metrics: [slot.state for slot in metrics.slots] == ["idle", "idle"])
    states: list[tuple[str, ...]] = []
    engine.add_listener(lambda metrics: states.append(tuple(slot.state for slot in metrics.slots)))

    api_generation = engine.submit(api_request())
    api_events: list[Any] = []

    async def consume() -> None:
        async for event in api_generation:
            api_events.append(event)

    api_task = asyncio.create_task(consume())
    await wait_for(engine, lambda metrics: len(api_events) >= 3)
    voice_events = await drain(engine.submit(assist_request("turn on the kitchen light", turn_id="t")))
    engine.end_turn("t")
    assert isinstance(voice_events[-1], Finished)
    assert ("generating", "paused") in states  # the API run waited in its callback while voice ran
    await asyncio.wait_for(api_task, 120)
    text = "".join(event.text for event in api_events if isinstance(event, TextDelta))
    assert text == STORY  # nothing lost, nothing out of order
    assert isinstance(api_events[-1], Finished)
    assert states[-1] == ("idle", "idle")


# ---------------------------------------------------------------------------------------------------------------
# Honest usage


async def test_usage_counts_what_the_runtime_really_reused_in_every_plan_mode(
    make_engine: EngineFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rkllm_engine.engine")
    engine = await make_engine(
        model_file(tmp_path, calibration="qwen2.5-1.5b-rk3588", extra=API_RULES), profile="v130", speed=200
    )

    async def finished(request: ChatRequest | CompletionRequest) -> Finished:
        event = (await drain(engine.submit(request)))[-1]
        assert isinstance(event, Finished)
        assert event.usage.prompt_tokens == event.perf.prefill_tokens + event.usage.cached_tokens
        return event

    voice = assist_request("turn on the kitchen light")
    reset = await finished(voice)
    assert reset.usage.cached_tokens == 0  # a cold prefix: nothing reused
    call = reset.tool_calls[0]
    voice.messages += [
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", json.dumps(tool_result("turn_on_ok")), tool_call_id=call.id, name=call.name),
    ]
    continued = await finished(voice)
    assert continued.usage.cached_tokens > reset.usage.prompt_tokens  # the whole first round was reused
    rebuild = await finished(assist_request("turn off the kitchen light"))
    assert 1500 < rebuild.usage.cached_tokens < reset.usage.prompt_tokens  # the system prompt and tools only
    switched = await finished(api_request(max_new_tokens=5))
    assert switched.usage.cached_tokens == 0  # another prefix: nothing reused, however much the KV held
    assert switched.usage.prompt_tokens == switched.perf.prefill_tokens
    back = await finished(assist_request("turn on the kitchen light"))
    assert back.usage.cached_tokens == 0  # and back again: the Assist prefix is prefilled in full
    assert back.perf.prefill_tokens >= reset.perf.prefill_tokens - 20
    raw = await finished(CompletionRequest(prompt="Once upon a time", max_new_tokens=3))
    assert raw.usage.cached_tokens == 0
    forced = await finished(assist_request("turn on the kitchen light", tool_choice="required", max_new_tokens=40))
    assert forced.usage.cached_tokens == 0
    modes = [line.split("plan ", 1)[1].split(",", 1)[0] for line in run_lines(caplog)]
    assert modes == ["reset", "continue", "rebuild", "reset", "reset", "raw", "forced"]
