"""The Engine facade end to end: real worker process + C emulator, fast emulated speeds."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from rkllm_engine.client import WorkerState
from rkllm_engine.engine import Engine, EngineConfig, default_cpu_mask
from rkllm_engine.scheduler import Scheduler
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ContextOverflowError,
    EngineMetrics,
    EngineState,
    EngineUnavailableError,
    Event,
    Finished,
    InvalidRequestError,
    Priority,
    QueueFullError,
    RuntimeIncompatibleError,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    WorkerCrashedError,
)
from rkllm_native.build import emulator_library
from tests.waits import wait_for_metrics

ASSIST_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "assist"
ASSIST_DUMP = ASSIST_DATA / "assist_dump_2026.2.3.json"
TOOL_RESULTS = ASSIST_DATA / "tool_results_2026.2.3.json"
LONG_ANSWER = " ".join(f"alpha{i}" for i in range(400))
SECOND_ANSWER = "Beta reply."

ASSIST_RULES = (
    'answer tool "*action_done*Kitchen Light*" = Done, the kitchen light is on.\n'
    'answer user "*turn on*kitchen light*" = <tool_call>\\n'
    '{"name": "{{tool:HassTurnOn}}", "arguments": {"name": "Kitchen Light"}}\\n</tool_call>\n'
)


def model_file(directory: Path, *, extra: str = "", **keys: object) -> Path:
    """An emulator model file (rkllm_native/emulator/MODEL_FORMAT.md) with the given keys and rules."""
    lines = ["rkllm-emulator-model 1", "load_time_ms = 5"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    path = directory / "test.model"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra))
    return path


EngineFactory = Callable[..., Awaitable[Engine]]




@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """Start engines on the emulator; every one is stopped at teardown (no process, thread or task left)."""
    engines: list[Engine] = []

    async def factory(model: Path, *, profile: str = "v12x", speed: float = 1.0, **config: Any) -> Engine:
        engine = Engine(
            EngineConfig(
                library_path=str(emulator_library(profile)),  # type: ignore[arg-type]
                model_path=str(model),
                env={"RKLLM_EMULATOR_SPEED": str(speed)},
                restart_backoff_s=(0.05,),
                **config,
            )
        )
        engines.append(engine)
        await engine.start()
        return engine

    yield factory
    for engine in engines:
        await engine.stop()


def tool_result(name: str) -> Any:
    """A real tool result Home Assistant produced (fixture file)."""
    return json.loads(TOOL_RESULTS.read_text())[name]


def assist_request(text: str, **fields: Any) -> ChatRequest:
    dump = json.loads(ASSIST_DUMP.read_text())
    system = dump["default_instructions"] + dump["api_prompt"]
    return ChatRequest(
        messages=[ChatMessage("system", system), ChatMessage("user", text)],
        tools=dump["tools"],
        priority=Priority.CONVERSATION,
        **fields,
    )


async def drain(generation: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in generation]


def visible_text(events: list[Event]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


@pytest.mark.parametrize("profile", ["v12x", "v130"])
async def test_assist_turn_streams_a_tool_call_with_usage_then_continues_warm(
    make_engine: EngineFactory, tmp_path: Path, profile: str
) -> None:
    engine = await make_engine(
        model_file(tmp_path, calibration="qwen2.5-1.5b-rk3588", extra=ASSIST_RULES), profile=profile, speed=200
    )
    request = assist_request("turn on the kitchen light")
    events = await drain(engine.submit(request))

    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    fragments = "".join(e.fragment for e in events if isinstance(e, ToolCallArgsDelta))
    assert [s.name for s in starts] == ["HassTurnOn"]
    assert starts[0].id.startswith("call_")
    assert json.loads(fragments) == {"name": "Kitchen Light"}
    assert ends[0].arguments == fragments
    assert events.index(starts[0]) < events.index(ends[0]) < len(events) - 1
    assert visible_text(events) == ""  # the <tool_call> markup never leaks as text
    cold = events[-1]
    assert isinstance(cold, Finished)
    assert cold.finish_reason == "tool_calls"
    assert cold.tool_calls[0].name == "HassTurnOn"
    assert cold.usage.prompt_tokens > 1500  # the real Assist prompt with its tools
    assert cold.usage.prompt_tokens == cold.perf.prefill_tokens + cold.usage.cached_tokens
    assert cold.usage.completion_tokens == cold.perf.generate_tokens > 0
    assert cold.perf.ttft_s is not None
    assert cold.perf.ttft_s > 0
    assert engine.metrics.tools_loaded[:2] == ("HassTurnOn", "HassTurnOff")

    # The tool result continues the resident conversation: only the new turn is prefilled.
    call = cold.tool_calls[0]
    result = tool_result("turn_on_ok")
    request.messages += [
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", json.dumps(result), tool_call_id=call.id, name=call.name),
    ]
    text, follow_up = await engine.submit(request).collect()
    assert text == "Done, the kitchen light is on."
    assert follow_up.finish_reason == "stop"
    assert follow_up.perf.prefill_tokens < cold.perf.prefill_tokens / 10
    assert follow_up.usage.cached_tokens > cold.usage.prompt_tokens

    # A new voice command (new conversation, same static prefix) is warm too.
    again = (await drain(engine.submit(assist_request("turn on the kitchen light"))))[-1]
    assert isinstance(again, Finished)
    assert again.finish_reason == "tool_calls"
    assert again.perf.prefill_tokens < cold.perf.prefill_tokens / 10
    assert again.perf.ttft_s is not None  # shorter than cold's because of the prefill above (not timed: load)
    metrics = engine.metrics
    assert metrics.requests_served == 3
    assert metrics.state is EngineState.IDLE
    assert metrics.kv_cache_tokens is not None
    assert metrics.kv_cache_tokens > 1500
    assert metrics.abi_profile == profile


async def test_cancelling_the_running_request_frees_the_slot_within_one_token(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    # 20 tokens/s at speed 1: one emulated token is 50 ms of real time.
    model = model_file(
        tmp_path,
        prefill_tokens_per_s=100000,
        decode_tokens_per_s=20,
        extra=f'answer user "second" = {SECOND_ANSWER}\ndefault_answer = {LONG_ANSWER}\n',
    )
    engine = await make_engine(model, speed=1)
    cancelled = False
    freed_after_cancel: list[EngineMetrics] = []

    def on_change(metrics: EngineMetrics) -> None:
        if cancelled and metrics.queue_depth == 0 and metrics.state is EngineState.GENERATING:
            freed_after_cancel.append(metrics)

    engine.add_listener(on_change)
    first = engine.submit(ChatRequest(messages=[ChatMessage("user", "tell me a long story")]))
    first_delta = await anext(first)
    assert isinstance(first_delta, TextDelta)
    assert first_delta.text == "alpha0"  # the first emulator token (MODEL_FORMAT.md §5)
    second = engine.submit(ChatRequest(messages=[ChatMessage("user", "second")], priority=Priority.CONVERSATION))
    await wait_for_metrics(engine, lambda metrics: metrics.queue_depth == 1)

    cancelled = True
    await first.cancel()
    # Order, not duration: by the time cancel() returns, the queued request already holds the slot.
    assert freed_after_cancel, "the queued request did not get the slot when the cancel returned"
    assert [e async for e in first] == []  # a cancelled generation just ends

    events = await drain(second)
    assert visible_text(events) == SECOND_ANSWER  # no token of the aborted run reached it
    assert isinstance(events[-1], Finished)


async def test_cancelling_the_consuming_task_aborts_and_a_queued_request_leaves_at_once(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    model = model_file(
        tmp_path,
        prefill_tokens_per_s=100000,
        decode_tokens_per_s=50,
        extra=f'answer user "second" = {SECOND_ANSWER}\ndefault_answer = {LONG_ANSWER}\n',
    )
    engine = await make_engine(model, speed=1)
    started = asyncio.Event()

    async def consume() -> None:
        async with engine.submit(ChatRequest(messages=[ChatMessage("user", "story")])) as generation:
            async for _ in generation:
                started.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    queued = engine.submit(ChatRequest(messages=[ChatMessage("user", "queued")]))
    async with queued:
        assert engine.metrics.queue_depth == 1
    assert engine.metrics.queue_depth == 0  # leaving the context while queued dequeues it at once

    consumer.cancel()  # like aiohttp cancelling a handler whose client went away
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert engine.metrics.state is EngineState.IDLE  # aborted and the slot freed before the task ended
    text, finished = await engine.submit(ChatRequest(messages=[ChatMessage("user", "second")])).collect()
    assert text == SECOND_ANSWER
    assert finished.finish_reason == "stop"


async def test_stop_strings_never_leak_even_across_tokens(make_engine: EngineFactory, tmp_path: Path) -> None:
    model = model_file(
        tmp_path,
        prefill_tokens_per_s=100000,
        decode_tokens_per_s=2000,
        extra='answer user "code" = The code is 42. END OF STORY and then much more text follows here.\n'
        f'answer user "second" = {SECOND_ANSWER}\n',
    )
    engine = await make_engine(model, speed=1)
    events = await drain(engine.submit(ChatRequest(messages=[ChatMessage("user", "code?")], stop=["END OF"])))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == "The code is 42. "
    assert not any("END" in d for d in deltas)
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "stop"
    # The run was aborted at the stop string, and its tail never reaches the next request.
    text, _ = await engine.submit(ChatRequest(messages=[ChatMessage("user", "second")])).collect()
    assert text == SECOND_ANSWER


@pytest.mark.parametrize("profile", ["v12x", "v130"])
async def test_max_new_tokens_ends_with_length_on_both_abis(
    make_engine: EngineFactory, tmp_path: Path, profile: str
) -> None:
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, default_answer=LONG_ANSWER)
    engine = await make_engine(model, profile=profile, max_new_tokens=256)
    text, finished = await engine.submit(
        ChatRequest(messages=[ChatMessage("user", "long please")], max_new_tokens=5)
    ).collect()
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 5
    assert text == "alpha0 alpha1 alpha2 alpha3 alpha4"  # emulator tokens: "alpha0", " alpha1", …, " alpha4"
    text, finished = await engine.submit(ChatRequest(messages=[ChatMessage("user", "long please")])).collect()
    assert finished.finish_reason == "length"  # the init budget (256 tokens) ends it
    assert finished.usage.completion_tokens == 256


async def test_worker_crash_gives_a_clean_error_and_the_next_request_succeeds(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, fault="crash_after_tokens:3")
    engine = await make_engine(model, speed=1)
    # The worker read the faulty file at init; the restarted worker will read this healthy one.
    model.write_text(model.read_text().replace("fault = crash_after_tokens:3", "default_answer = Back again."))

    with pytest.raises(WorkerCrashedError, match="SIGSEGV"):
        await engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")])).collect()
    text, finished = await asyncio.wait_for(
        engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")])).collect(), 30
    )
    assert text == "Back again."
    assert finished.finish_reason == "stop"
    assert engine.metrics.restarts == 1
    assert engine.metrics.state is EngineState.IDLE


async def test_a_request_granted_during_a_restart_is_released_at_once_when_cancelled() -> None:
    """A cancel ends the wait of a request that holds the slot while the worker restarts.

    The narrow race: the slot was granted just before the worker crashed, so the run waits for the restart
    (backoff + model load); a cancel (client gone, `Generation.cancel`, `Engine.stop`) must end that wait.
    """
    scheduler = Scheduler(queue_size=2)
    scheduler.open()
    ticket = scheduler.admit(Priority.API)
    await ticket.wait_for_slot()
    waiting_started = asyncio.Event()

    class RestartingClient:
        state = WorkerState.RESTARTING

        async def wait_ready(self, timeout_s: float) -> None:
            waiting_started.set()
            await asyncio.sleep(timeout_s)  # a restart that takes far longer than the test's wait below

    waiting = asyncio.create_task(Engine._wait_for_worker(RestartingClient(), ticket))  # type: ignore[arg-type]
    await asyncio.wait_for(waiting_started.wait(), 30)
    ticket.cancel()
    # The worker's wait_ready would sleep the whole restart timeout; ending at all means the cancel ended it.
    assert await asyncio.wait_for(waiting, 30) is False
    ticket.release()


async def test_completion_request_reaches_the_model_raw(make_engine: EngineFactory, tmp_path: Path) -> None:
    model = model_file(
        tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, default_answer="You said: {{input}}"
    )
    engine = await make_engine(model, speed=1)
    text, finished = await engine.submit(CompletionRequest(prompt="Once upon a time")).collect()
    assert text == "You said: Once upon a time"
    # Emulator tokens of the bare prompt: "Once", " upon", " a", " time" — no template around it.
    assert finished.usage.prompt_tokens == 4
    assert finished.finish_reason == "stop"

    _, chat = await engine.submit(ChatRequest(messages=[ChatMessage("user", "Once upon a time")])).collect()
    assert chat.usage.prompt_tokens > finished.usage.prompt_tokens + 10  # the chat template adds its markers


async def test_admission_errors_are_immediate_and_stop_cleans_up(make_engine: EngineFactory, tmp_path: Path) -> None:
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=50, default_answer=LONG_ANSWER)
    engine = await make_engine(model, speed=1, queue_size=1)

    with pytest.raises(InvalidRequestError, match="not in tools"):
        engine.submit(ChatRequest(messages=[ChatMessage("user", "x")], tool_choice="NoSuchTool"))
    running = engine.submit(ChatRequest(messages=[ChatMessage("user", "one")]))
    await anext(running)
    queued = engine.submit(ChatRequest(messages=[ChatMessage("user", "two")]))
    with pytest.raises(QueueFullError) as excinfo:
        engine.submit(ChatRequest(messages=[ChatMessage("user", "three")]))
    assert excinfo.value.retry_after_s >= 1

    await engine.stop()
    with pytest.raises(EngineUnavailableError, match="stopped"):
        await queued.collect()
    with pytest.raises(EngineUnavailableError, match="stopped"):
        await drain(running)
    with pytest.raises(EngineUnavailableError):
        engine.submit(ChatRequest(messages=[ChatMessage("user", "late")]))
    assert engine.metrics.state is EngineState.STOPPED


async def test_start_reads_the_model_file_off_the_event_loop(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Home Assistant reports file I/O inside its event loop as a bug of the integration."""
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, default_answer="Hi.")
    loop_thread = threading.get_ident()
    opened_on_loop: list[str] = []
    real_open = Path.open

    def tracking_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == model and threading.get_ident() == loop_thread:
            opened_on_loop.append(str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", tracking_open)
    engine = await make_engine(model, speed=1)
    assert opened_on_loop == []
    # The header was still read: the emulator file is a ChatML model, so a tool call can be forced.
    _, finished = await engine.submit(assist_request("turn on the kitchen light", tool_choice="HassTurnOn")).collect()
    assert [call.name for call in finished.tool_calls] == ["HassTurnOn"]


async def test_start_failure_is_one_clear_error(tmp_path: Path) -> None:
    model = model_file(tmp_path, fault="init_fail")
    engine = Engine(EngineConfig(library_path=str(emulator_library("v12x")), model_path=str(model)))
    with pytest.raises(RuntimeIncompatibleError, match="init_fail") as refused:
        await engine.start()
    assert refused.value.reason == "init_failed"  # the runtime refused the model: retrying cannot help
    assert engine.metrics.state is EngineState.ERROR
    assert engine.metrics.last_error is not None
    with pytest.raises(EngineUnavailableError, match="could not be loaded"):
        engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")]))
    await engine.stop()


def test_config_and_cpu_mask_defaults() -> None:
    assert default_cpu_mask(4, "RK3588") == 0xF0  # the big cores CPU4-7
    assert default_cpu_mask(2, "rk3576") == 0x30
    assert default_cpu_mask(8, "RK3588") == 0xFF
    assert default_cpu_mask(4, "RK3562") == 0x0F
    assert default_cpu_mask(4, None) == 0x0F
    with pytest.raises(ValueError, match="cpu_cores must be between 1 and 8"):
        EngineConfig(library_path="x", model_path="y", cpu_cores=9)
    with pytest.raises(ValueError, match="cpu_mask 0x3 enables 2 CPUs but cpu_cores is 4"):
        EngineConfig(library_path="x", model_path="y", cpu_mask=0x3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        EngineConfig(library_path="x", model_path="y", context_length=512, max_new_tokens=512)


async def test_prompt_longer_than_the_context_is_a_context_overflow(make_engine: EngineFactory, tmp_path: Path) -> None:
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, max_context_limit=256)
    engine = await make_engine(model, speed=1, context_length=256, max_new_tokens=32)
    with pytest.raises(ContextOverflowError) as excinfo:
        await engine.submit(ChatRequest(messages=[ChatMessage("user", "word " * 300)])).collect()
    assert excinfo.value.context_length == 256
    assert excinfo.value.prompt_tokens is not None
    assert excinfo.value.prompt_tokens > 256
    text, finished = await engine.submit(ChatRequest(messages=[ChatMessage("user", "short")])).collect()
    assert finished.finish_reason == "stop"
    assert text.startswith("I am the RKLLM emulator")


async def test_a_crash_loop_makes_the_engine_unavailable_until_it_is_started_again(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    model = model_file(tmp_path, prefill_tokens_per_s=100000, decode_tokens_per_s=2000, fault="crash_after_tokens:1")
    engine = await make_engine(model, speed=1)
    healthy = model.read_text().replace("fault = crash_after_tokens:1", "default_answer = Recovered.")
    model.write_text(model.read_text().replace("crash_after_tokens:1", "init_fail"))  # every restart fails
    errors: list[str] = []
    engine.add_listener(lambda m: errors.append(m.last_error or "") if m.state is EngineState.ERROR else None)

    with pytest.raises(WorkerCrashedError):
        await engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")])).collect()
    await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.ERROR)
    assert "init_fail" in (engine.metrics.last_error or "")
    with pytest.raises(EngineUnavailableError, match="in a row"):
        engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")]))
    assert errors

    model.write_text(healthy)
    await engine.start()  # what a repair / config entry reload does
    assert engine.metrics.state is EngineState.IDLE
    text, _ = await engine.submit(ChatRequest(messages=[ChatMessage("user", "hi")])).collect()
    assert text == "Recovered."
