"""Runtime faults through the API and through Assist, and how long until the next request is served.

The caller's result, /health, the sensors and the repair issue are checked for each (docs/robustness.md).

Each fault is the emulator's (rkllm_native/emulator/MODEL_FORMAT.md §10). The running worker keeps the faulty
model it loaded; the file is fixed on disk at once, so the restarted worker (or the retried entry) is healthy.
The timings are printed (run with -s) for the issue's note; nothing asserts on them but generous bounds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import intent
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.const import CONF_WATCHDOG_S, DOMAIN
from custom_components.rkllm.repairs import issue_id_for
from rkllm_engine.types import EngineMetrics, EngineState
from tests.waits import wait_for_metrics

from .conftest import API_MODEL, MODEL_ID, ApiServer, add_entry, runtime_of, sse_chunks, write_model
from .test_errors import assert_openai_error

AGENT_ENTITY = "conversation.living_room"
STORY = "tell me a long story"


def faulty(fault: str) -> str:
    return API_MODEL + f"fault = {fault}\n"


async def ask_api(api: ApiServer, *, stream: bool) -> tuple[int, Any]:
    """One raw-model request; the parsed body (or the SSE chunks and the raw text for a stream)."""
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": STORY}], "stream": stream},
    )
    if stream and response.status == 200:
        return response.status, await asyncio.wait_for(response.text(), 60)
    return response.status, await response.json()


async def ask_assist(hass: HomeAssistant, text: str = STORY) -> conversation.ConversationResult:
    return await conversation.async_converse(
        hass, text=text, conversation_id=None, context=Context(), agent_id=AGENT_ENTITY
    )


def speech(result: conversation.ConversationResult) -> str:
    return str(result.response.speech["plain"]["speech"])


async def health(api: ApiServer) -> tuple[int, dict[str, Any]]:
    response = await api.client.get("/health")
    return response.status, await response.json()


def sensor_state(hass: HomeAssistant, entry: MockConfigEntry, key: str) -> str | None:
    entity_id = er.async_get(hass).async_get_entity_id("sensor", DOMAIN, f"{entry.entry_id}_{key}")
    state = hass.states.get(entity_id) if entity_id else None
    return state.state if state else None


async def setup_with(hass: HomeAssistant, emulator_lib: str, model: Path, **data: Any) -> MockConfigEntry:
    entry = add_entry(hass, emulator_lib, model, **data)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return entry


def in_band_error(body: str) -> dict[str, Any]:
    """The error chunk of a stream that failed after its headers (then `data: [DONE]`)."""
    errors = [chunk["error"] for chunk in sse_chunks(body) if "error" in chunk]
    assert len(errors) == 1, body
    assert body.rstrip().endswith("data: [DONE]")
    return errors[0]


async def served_after(api: ApiServer, started: float) -> float:
    """Seconds from `started` until the next request was answered."""
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["choices"][0]["message"]["content"] == "You said: still there?"
    return time.monotonic() - started


def report(name: str, **seconds: float) -> None:
    figures = ", ".join(f"{key} {value:.2f} s" for key, value in seconds.items())
    print(f"\nfault {name}: {figures}")


@pytest.mark.parametrize("stream", [False, True])
async def test_crash_mid_answer_through_the_api(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, stream: bool
) -> None:
    model = write_model(tmp_path, faulty("crash_after_tokens:3"))
    entry = await setup_with(hass, emulator_lib, model)
    api: ApiServer = await serve_http()
    engine = runtime_of(entry).engine
    write_model(tmp_path, API_MODEL)
    states: list[str] = []
    engine.add_listener(lambda metrics: states.append(metrics.health))

    started = time.monotonic()
    status, body = await ask_api(api, stream=stream)
    detected = time.monotonic()
    if stream:
        assert status == 200
        assert in_band_error(body)["code"] == "worker_crashed"
    else:
        assert status == 500
        assert_openai_error(body, error_type="server_error", param=None, code="worker_crashed")
    assert "degraded" in states  # restarting: not served right now, nobody has to act
    await wait_for_metrics(engine, lambda metrics: metrics.health == "healthy")
    freed = time.monotonic()
    code, state = await health(api)
    assert (code, state["status"], state["restarts"], state["consecutive_failures"]) == (200, "healthy", 1, 1)
    assert sensor_state(hass, entry, "health") == "healthy"
    assert sensor_state(hass, entry, "worker_restarts") == "1"
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id_for("worker_crash_loop", entry.entry_id)) is None
    answered = await served_after(api, detected)
    report(
        f"crash_after_tokens (stream={stream})",
        detection=detected - started,
        slot_free=freed - detected,
        next_served=answered,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hang_is_ended_by_the_watchdog_through_the_api(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, stream: bool
) -> None:
    model = write_model(tmp_path, faulty("hang_after_tokens:3"))
    entry = await setup_with(hass, emulator_lib, model, **{CONF_WATCHDOG_S: 1})
    api: ApiServer = await serve_http()
    engine = runtime_of(entry).engine
    write_model(tmp_path, API_MODEL)
    stalls: list[EngineMetrics] = []
    engine.add_listener(lambda metrics: stalls.append(metrics) if metrics.stall else None)

    started = time.monotonic()
    request = asyncio.ensure_future(ask_api(api, stream=stream))
    # While the run is silent, /health already says so: degraded, with the reason.
    await wait_for_metrics(engine, lambda metrics: metrics.stall is not None)
    code, state = await health(api)
    assert (code, state["status"]) == (503, "degraded")
    assert "produced nothing" in state["error"] or "watchdog" in state["error"]
    status, body = await request
    detected = time.monotonic()
    if stream:
        assert status == 200
        error = in_band_error(body)
    else:
        assert status == 503
        assert_openai_error(body, error_type="unavailable_error", param=None, code="worker_hung")
        error = body["error"]
    assert error["code"] == "worker_hung"
    assert "no progress from the runtime" in error["message"]
    await wait_for_metrics(engine, lambda metrics: metrics.health == "healthy")
    freed = time.monotonic()
    assert engine.metrics.watchdog_fired == 1
    assert sensor_state(hass, entry, "health") == "healthy"
    answered = await served_after(api, detected)
    report(
        f"hang_after_tokens (stream={stream}, watchdog 1 s)",
        detection=detected - started,
        slot_free=freed - detected,
        next_served=answered,
    )


async def test_a_runtime_error_fails_one_request_and_the_worker_keeps_serving(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    entry = await setup_with(hass, emulator_lib, write_model(tmp_path, faulty("error_after_tokens:3")))
    api: ApiServer = await serve_http()
    started = time.monotonic()
    status, body = await ask_api(api, stream=False)
    detected = time.monotonic()
    assert status == 500
    assert_openai_error(body, error_type="server_error", param=None, code="generation_error")
    assert "emulated fault: runtime error after 3 generated tokens" in body["error"]["message"]
    code, state = await health(api)
    assert (code, state["status"], state["restarts"]) == (200, "healthy", 0)
    assert sensor_state(hass, entry, "health") == "healthy"
    write_model(tmp_path, API_MODEL)
    await hass.config_entries.async_reload(entry.entry_id)  # the loaded worker keeps the faulty model
    await hass.async_block_till_done()
    reloaded = time.monotonic()
    answered = await served_after(api, reloaded)
    report("error_after_tokens", detection=detected - started, next_served_after_reload=answered)


async def test_init_failure_is_an_error_state_with_a_repair_that_retries(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    model = write_model(tmp_path, faulty("init_fail"))
    entry = await setup_with(hass, emulator_lib, model)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert await async_setup_component(hass, "repairs", {})
    api: ApiServer = await serve_http()
    status, body = await ask_api(api, stream=False)
    assert status == 503
    assert_openai_error(body, error_type="unavailable_error", param=None, code="model_not_loaded")
    code, state = await health(api)
    assert (code, state["status"]) == (503, "unhealthy")
    assert "emulated init failure" in state["error"]
    assert hass.states.get(AGENT_ENTITY) is None  # no agent for Assist while the model is not loaded
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id_for("model_load_failed", entry.entry_id))
    assert issue is not None
    assert issue.is_fixable
    assert "emulated init failure" in (issue.translation_placeholders or {})["error"]

    # The user fixes the model, then retries from the repair.
    write_model(tmp_path, API_MODEL)
    started = time.monotonic()
    fix = {"handler": DOMAIN, "issue_id": issue.issue_id}
    response = await api.client.post("/api/repairs/issues/fix", headers=api.auth(), json=fix)
    flow = await response.json()
    response = await api.client.post(f"/api/repairs/issues/fix/{flow['flow_id']}", headers=api.auth(), json={})
    assert (await response.json())["type"] == "create_entry"
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue.issue_id) is None
    code, state = await health(api)
    assert (code, state["status"]) == (200, "healthy")
    answered = await served_after(api, started)
    assert speech(await ask_assist(hass, "hello")).endswith("hello")
    report("init_fail", retry_to_served=answered)


async def test_a_crash_loop_puts_the_entry_in_an_error_state_until_retried(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    """Every restart fails (the model now fails to load): the engine gives up, the entry shows the error."""
    model = write_model(tmp_path, faulty("crash_after_tokens:1"))
    entry = await setup_with(hass, emulator_lib, model)
    api: ApiServer = await serve_http()
    engine = runtime_of(entry).engine
    write_model(tmp_path, faulty("init_fail"))
    gave_up = asyncio.Event()
    engine.add_listener(lambda metrics: gave_up.set() if metrics.state is EngineState.ERROR else None)

    _, body = await ask_api(api, stream=False)
    assert body["error"]["code"] == "worker_crashed"
    async with asyncio.timeout(60):
        await gave_up.wait()
    failed = engine.metrics
    assert failed.health == "unhealthy"
    assert "restarting" not in (failed.last_error or "")
    assert f"failed {failed.consecutive_failures} times in a row" in (failed.last_error or "")
    await hass.async_block_till_done()  # the tracker reloads the entry into its error state
    assert entry.state is ConfigEntryState.SETUP_ERROR
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id_for("worker_crash_loop", entry.entry_id))
    assert issue is not None
    placeholders = issue.translation_placeholders or {}
    # The same numbers as /health had at the moment it gave up.
    assert placeholders["failures"] == str(failed.consecutive_failures)
    assert placeholders["restarts"] == str(failed.restarts)
    code, state = await health(api)
    assert (code, state["status"]) == (503, "unhealthy")
    assert "failed" in state["error"]

    write_model(tmp_path, API_MODEL)  # the user fixes the model and reloads the entry
    started = time.monotonic()
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    answered = await served_after(api, started)
    await hass.async_block_till_done()
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue.issue_id) is None
    report("crash loop", reload_to_served=answered)


@pytest.mark.parametrize(
    ("fault", "spoken"),
    [
        ("crash_after_tokens:3", "The language model process crashed while answering; it is restarting. Try again"),
        ("hang_after_tokens:3", "The language model stopped responding and was restarted. Try again"),
        ("error_after_tokens:3", "The language model failed to answer: "),
    ],
)
async def test_faults_through_assist_are_spoken_errors_and_the_next_command_works(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, fault: str, spoken: str
) -> None:
    model = write_model(tmp_path, faulty(fault))
    entry = await setup_with(hass, emulator_lib, model, **{CONF_WATCHDOG_S: 1})
    api: ApiServer = await serve_http()
    engine = runtime_of(entry).engine
    write_model(tmp_path, API_MODEL)
    started = time.monotonic()
    result = await ask_assist(hass)
    detected = time.monotonic()
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result).startswith(spoken)
    if fault.startswith("error"):
        await hass.config_entries.async_reload(entry.entry_id)  # the loaded worker keeps the faulty model
        await hass.async_block_till_done()
        engine = runtime_of(entry).engine
    await wait_for_metrics(engine, lambda metrics: metrics.health == "healthy")
    freed = time.monotonic()
    code, state = await health(api)
    assert (code, state["status"]) == (200, "healthy")
    assert speech(await ask_assist(hass, "hello")).endswith("hello")
    answered = time.monotonic()
    report(
        f"{fault} through Assist",
        detection=detected - started,
        healthy_again=freed - detected,
        next_command_answered=answered - detected,
    )
