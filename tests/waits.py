"""Waits on the engine's own events, shared by the engine, API and Home Assistant tests (no HA imports)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rkllm_engine.engine import Engine
from rkllm_engine.types import EngineMetrics


async def wait_for_metrics(engine: Engine, condition: Callable[[EngineMetrics], bool], timeout_s: float = 30) -> None:
    """Wait until the engine publishes metrics meeting `condition` (its listener: no polling, no clock)."""
    reached = asyncio.Event()

    def check(metrics: EngineMetrics) -> None:
        if condition(metrics):
            reached.set()

    remove = engine.add_listener(check)
    try:
        check(engine.metrics)
        await asyncio.wait_for(reached.wait(), timeout_s)
    finally:
        remove()
