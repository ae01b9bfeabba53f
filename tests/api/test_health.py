"""`/health`: the original API's shape; 200 idle or busy, 503 while loading, without a model, or after a failure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component

from custom_components.rkllm.const import DOMAIN
from rkllm_engine.types import ChatMessage, ChatRequest, EngineState
from tests.waits import wait_for_metrics

from .conftest import API_MODEL, MODEL_ID, ApiServer, add_entry, runtime_of, write_model
from .test_chat import WEATHER_TOOL


async def get_health(api: ApiServer) -> tuple[int, dict[str, Any]]:
    response = await api.client.get("/health")  # no token: probes are public
    return response.status, await response.json()


async def test_idle(api: ApiServer) -> None:
    status, body = await get_health(api)
    assert status == 200
    assert body["status"] == "healthy"
    assert body["generation_status"] == "idle"
    assert body["tools_loaded"] == []
    assert body["model"] == MODEL_ID
    assert body["worker_state"] == "idle"
    assert body["queue_depth"] == 0


async def test_tools_loaded_lists_the_resident_tools(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER_TOOL]},
    )
    assert response.status == 200
    status, body = await get_health(api)
    assert status == 200
    assert body["tools_loaded"] == ["get_weather"]


async def test_generating_is_still_healthy(loaded_entry: Any, api: ApiServer) -> None:
    engine = runtime_of(loaded_entry).engine
    generation = engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")]))
    queued = engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="Hello")]))
    try:
        await anext(generation)
        status, body = await get_health(api)
    finally:
        await generation.cancel()
        await queued.cancel()
    assert status == 200
    assert body["status"] == "healthy"
    assert body["generation_status"] == "generating"
    assert body["queue_depth"] == 1


async def test_loading_is_503_then_healthy(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    model = write_model(tmp_path, API_MODEL.replace("load_time_ms = 0", "load_time_ms = 1500"))
    assert await async_setup_component(hass, DOMAIN, {})
    api: ApiServer = await serve_http()
    entry = add_entry(hass, emulator_lib, model)
    setup = hass.async_create_task(hass.config_entries.async_setup(entry.entry_id))
    statuses: list[tuple[int, str]] = []
    while not setup.done():
        status, body = await get_health(api)
        statuses.append((status, body["status"]))
        await asyncio.sleep(0.05)
    assert await setup
    assert (503, "loading") in statuses
    # 503 until the model is loaded, then 200 for good; the engine can be ready a moment before async_setup
    # returns (platforms are still being forwarded), so a 200 may already show up inside the loop.
    codes = [status for status, _ in statuses]
    ready_from = codes.index(200) if 200 in codes else len(codes)
    assert set(codes[:ready_from]) == {503}
    assert set(codes[ready_from:]) <= {200}
    status, body = await get_health(api)
    assert (status, body["status"]) == (200, "healthy")


async def test_no_entry_is_503_unhealthy(hass: HomeAssistant, serve_http: Any) -> None:
    assert await async_setup_component(hass, DOMAIN, {})
    api: ApiServer = await serve_http()
    status, body = await get_health(api)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["generation_status"] == "idle"
    assert body["tools_loaded"] == []
    assert "no RKLLM model" in body["error"]


async def test_runtime_that_fails_to_load_is_503_unhealthy(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path, API_MODEL + "fault = init_fail\n"))
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    api: ApiServer = await serve_http()
    status, body = await get_health(api)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert "failed to set up" in body["error"]


async def test_worker_crash_is_503_until_the_worker_is_back(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path, API_MODEL + "fault = crash_after_tokens:3\n"))
    assert await hass.config_entries.async_setup(entry.entry_id)
    api: ApiServer = await serve_http()
    engine = runtime_of(entry).engine
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "tell me a long story"}]},
    )
    assert response.status == 500
    assert (await response.json())["error"]["code"] == "worker_crashed"
    status, body = await get_health(api)
    assert status == 503
    # Restarting: nothing is served right now, but nobody has to act either.
    assert body["status"] == "degraded"
    assert "crashed (signal 11 SIGSEGV)" in body["error"]
    assert body["worker_state"] != "idle"

    await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.IDLE)
    status, body = await get_health(api)
    assert (status, body["status"]) == (200, "healthy")
    assert body["restarts"] == 1
