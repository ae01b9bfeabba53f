"""A client that goes away must not keep the single NPU slot: its generation is aborted or dequeued at once.

The "long story" answer takes seconds to generate in full; the checks wait for the engine's own events (its metrics
listener) and prove the cause, not a duration: an aborted generation is never counted as served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from rkllm_engine.types import ChatMessage, ChatRequest, EngineMetrics, EngineState
from tests.waits import wait_for_metrics

from .conftest import MODEL_ID, ApiServer, runtime_of

LONG_STORY_BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "tell me a long story"}]}




def is_idle(metrics: EngineMetrics) -> bool:
    return metrics.state is EngineState.IDLE and metrics.queue_depth == 0


async def assert_next_request_is_served(api: ApiServer) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        headers=api.auth(),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Are you still there?"}]},
    )
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "You said: Are you still there?"


async def test_disconnect_mid_stream_aborts_the_generation(loaded_entry: Any, api: ApiServer) -> None:
    engine = runtime_of(loaded_entry).engine
    served_before = engine.metrics.requests_served
    response = await api.client.post(
        "/v1/chat/completions", headers=api.auth(), json={**LONG_STORY_BODY, "stream": True}
    )
    assert response.status == 200
    contents = 0
    while contents < 5:
        line = (await response.content.readline()).decode()
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            contents += 1
    assert engine.metrics.state is EngineState.GENERATING
    response.close()  # the client goes away mid-stream

    await wait_for_metrics(engine, is_idle)
    assert engine.metrics.requests_served == served_before  # aborted, not run to its end
    await assert_next_request_is_served(api)
    assert engine.metrics.requests_served == served_before + 1


async def test_disconnect_of_a_plain_request_aborts_the_generation(loaded_entry: Any, api: ApiServer) -> None:
    engine = runtime_of(loaded_entry).engine
    served_before = engine.metrics.requests_served
    request = asyncio.ensure_future(api.client.post("/v1/chat/completions", headers=api.auth(), json=LONG_STORY_BODY))
    await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.GENERATING)
    request.cancel()  # closes the connection before any response byte
    with contextlib.suppress(asyncio.CancelledError):
        await request

    await wait_for_metrics(engine, is_idle)
    assert engine.metrics.requests_served == served_before  # aborted, not run to its end
    await assert_next_request_is_served(api)


async def test_disconnect_while_queued_leaves_the_queue(loaded_entry: Any, api: ApiServer) -> None:
    engine = runtime_of(loaded_entry).engine
    running = engine.submit(ChatRequest(messages=[ChatMessage(role="user", content="tell me a long story")]))
    try:
        await anext(running)
        request = asyncio.ensure_future(
            api.client.post("/v1/chat/completions", headers=api.auth(), json={**LONG_STORY_BODY, "stream": True})
        )
        await wait_for_metrics(engine, lambda metrics: metrics.queue_depth == 1)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await wait_for_metrics(engine, lambda metrics: metrics.queue_depth == 0)
        # The running generation is not disturbed by the queued client leaving.
        assert engine.metrics.state is EngineState.GENERATING
    finally:
        await running.cancel()
    await wait_for_metrics(engine, is_idle)
    await assert_next_request_is_served(api)
