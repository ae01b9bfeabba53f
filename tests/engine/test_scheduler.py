"""The scheduler with one slot: order, bound, cancellation and metrics, without a worker."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from rkllm_engine.scheduler import Scheduler, TicketState
from rkllm_engine.types import EngineMetrics, EngineState, EngineUnavailableError, Perf, Priority, QueueFullError


def open_scheduler(queue_size: int) -> Scheduler:
    scheduler = Scheduler(queue_size=queue_size, context_length=4096)
    scheduler.set_base_state(EngineState.IDLE)
    scheduler.open()
    return scheduler


async def test_twenty_concurrent_requests_are_served_by_priority_then_arrival() -> None:
    scheduler = open_scheduler(queue_size=32)
    served: list[tuple[int, int]] = []

    # The first request holds the slot until all others are queued, so order is decided by the queue.
    blocker = scheduler.admit(Priority.BACKGROUND)
    await blocker.wait_for_slot()

    # A fixed, interleaved mix of the three priorities (7 voice, 7 API, 6 background).
    priorities = [list(Priority)[(arrival * 7) % 3] for arrival in range(20)]

    async def request(arrival: int, priority: Priority) -> None:
        ticket = scheduler.admit(priority)
        await ticket.wait_for_slot()
        served.append((int(priority), arrival))
        await asyncio.sleep(0)
        ticket.release()

    tasks = []
    for arrival, priority in enumerate(priorities):
        tasks.append(asyncio.create_task(request(arrival, priority)))
        await asyncio.sleep(0)  # admit in arrival order
    assert scheduler.queue_depth == 20
    blocker.release()
    await asyncio.gather(*tasks)

    assert served == sorted(served), "served out of (priority, arrival) order"
    assert [arrival for priority, arrival in served if priority == Priority.CONVERSATION] == sorted(
        arrival for arrival, p in enumerate(priorities) if p == Priority.CONVERSATION
    )
    assert len(served) == 20
    assert scheduler.queue_depth == 0
    assert not scheduler.busy


async def test_requests_beyond_the_bound_are_rejected_with_retry_after() -> None:
    scheduler = open_scheduler(queue_size=3)
    running = scheduler.admit(Priority.API)
    await running.wait_for_slot()
    queued = [scheduler.admit(Priority.API) for _ in range(3)]

    with pytest.raises(QueueFullError) as excinfo:
        scheduler.admit(Priority.API)
    # No history yet: the default estimate (5 s) times 4 requests ahead.
    assert excinfo.value.retry_after_s == pytest.approx(20.0)
    assert "queue is full" in str(excinfo.value)

    # Finish some requests quickly: the estimate follows the measured durations, never below 1 s.
    running.release()
    for ticket in queued:
        await ticket.wait_for_slot()
        ticket.release()
    blockers = [scheduler.admit(Priority.API) for _ in range(4)]
    with pytest.raises(QueueFullError) as excinfo:
        scheduler.admit(Priority.API)
    assert excinfo.value.retry_after_s == 1.0
    for ticket in blockers:
        ticket.cancel()
    assert scheduler.queue_depth == 0


async def test_retry_after_scales_with_recent_durations() -> None:
    scheduler = open_scheduler(queue_size=1)
    for _ in range(2):
        ticket = scheduler.admit()
        await ticket.wait_for_slot()
        assert ticket.granted_at is not None
        ticket.granted_at -= 3.0  # pretend the run held the slot for 3 s
        ticket.release()
    running = scheduler.admit()
    await running.wait_for_slot()
    scheduler.admit()
    with pytest.raises(QueueFullError) as excinfo:
        scheduler.admit()
    assert excinfo.value.retry_after_s == pytest.approx(6.0, abs=0.2)  # 3 s times (1 queued + 1 running)


async def test_cancelling_a_queued_request_removes_it_at_once() -> None:
    scheduler = open_scheduler(queue_size=4)
    running = scheduler.admit()
    await running.wait_for_slot()
    first = scheduler.admit()
    second = scheduler.admit()
    waiter = asyncio.create_task(first.wait_for_slot())
    await asyncio.sleep(0)

    first.cancel()
    assert scheduler.queue_depth == 1  # removed synchronously, before the waiter even ran
    assert scheduler.metrics.queue_depth == 1
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert first.state is TicketState.CANCELLED

    # A task cancelled while waiting also leaves the queue.
    second_waiter = asyncio.create_task(second.wait_for_slot())
    await asyncio.sleep(0)
    second_waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second_waiter
    assert scheduler.queue_depth == 0

    running.release()
    assert not scheduler.busy  # nobody left to grant


async def test_cancelling_the_running_request_aborts_and_keeps_the_slot_until_released() -> None:
    scheduler = open_scheduler(queue_size=4)
    running = scheduler.admit()
    await running.wait_for_slot()
    aborts: list[str] = []
    running.set_abort(lambda: aborts.append("abort"))
    nxt = scheduler.admit()

    running.cancel()
    running.cancel()  # a second cancel does not abort twice
    assert aborts == ["abort"]
    assert running.abort_requested
    granted = asyncio.create_task(nxt.wait_for_slot())
    await asyncio.sleep(0)  # one loop turn: the waiter runs and blocks; only a release may grant it (no clock)
    assert scheduler.busy, "slot freed before the run ended"
    assert nxt.state is TicketState.QUEUED
    assert not granted.done()

    running.release()  # the run has really ended now
    await asyncio.wait_for(granted, 30)
    assert nxt.state is TicketState.RUNNING


async def test_cancel_before_the_abort_callback_is_set_aborts_when_it_is_set() -> None:
    scheduler = open_scheduler(queue_size=1)
    ticket = scheduler.admit()
    await ticket.wait_for_slot()
    ticket.cancel()
    aborts: list[int] = []
    ticket.set_abort(lambda: aborts.append(1))
    assert aborts == [1]


async def test_a_failing_abort_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    scheduler = open_scheduler(queue_size=1)
    ticket = scheduler.admit()
    await ticket.wait_for_slot()

    def broken_abort() -> None:
        raise RuntimeError("boom")

    ticket.set_abort(broken_abort)
    ticket.cancel()
    assert "abort callback of a running request failed" in caplog.text
    ticket.release()


async def test_closed_scheduler_refuses_and_fails_queued_requests() -> None:
    scheduler = Scheduler(queue_size=4)
    with pytest.raises(EngineUnavailableError, match="not started"):
        scheduler.admit()

    scheduler.set_base_state(EngineState.IDLE)
    scheduler.open()
    running = scheduler.admit()
    await running.wait_for_slot()
    aborted: list[bool] = []
    running.set_abort(lambda: aborted.append(True))
    queued = scheduler.admit()

    scheduler.close(EngineUnavailableError("the engine was stopped"))
    with pytest.raises(EngineUnavailableError, match="stopped"):
        await queued.wait_for_slot()
    assert aborted == [True]
    with pytest.raises(EngineUnavailableError, match="stopped"):
        scheduler.admit()
    running.release()
    await asyncio.wait_for(scheduler.wait_idle(), 30)


async def test_hold_admits_but_grants_only_after_resume() -> None:
    scheduler = open_scheduler(queue_size=2)
    scheduler.hold()
    ticket = scheduler.admit(Priority.CONVERSATION)
    waiter = asyncio.create_task(ticket.wait_for_slot())
    await asyncio.sleep(0)  # one loop turn: the waiter runs and blocks; only resume() may grant it (no clock)
    assert ticket.state is TicketState.QUEUED
    assert not waiter.done()
    scheduler.resume()
    await asyncio.wait_for(waiter, 30)
    ticket.release()


async def test_metrics_follow_state_queue_and_runs_and_listeners_are_notified(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = Scheduler(queue_size=4, context_length=4096)
    seen: list[EngineMetrics] = []

    def broken_listener(_: EngineMetrics) -> None:
        raise ValueError("listener bug")

    scheduler.add_listener(broken_listener)
    unsubscribe = scheduler.add_listener(seen.append)

    scheduler.set_base_state(EngineState.LOADING)
    assert scheduler.metrics.state is EngineState.LOADING
    scheduler.set_base_state(EngineState.IDLE)
    scheduler.open()
    ticket = scheduler.admit()
    await ticket.wait_for_slot()
    assert scheduler.metrics.state is EngineState.GENERATING
    waiting = scheduler.admit()
    assert scheduler.metrics.queue_depth == 1

    scheduler.record_run(
        ttft_s=0.25,
        perf=Perf(prefill_time_ms=500, prefill_tokens=169, generate_time_ms=1000, generate_tokens=17),
    )
    scheduler.update_metrics(dataclasses.replace(scheduler.metrics, kv_cache_tokens=1024, restarts=2))
    metrics = scheduler.metrics
    assert metrics.last_ttft_s == 0.25
    assert metrics.prefill_tokens_per_s == pytest.approx(338)
    assert metrics.decode_tokens_per_s == pytest.approx(17)
    assert metrics.requests_served == 1
    assert metrics.kv_usage == pytest.approx(0.25)
    assert metrics.restarts == 2

    ticket.release()
    await waiting.wait_for_slot()
    waiting.release()
    assert scheduler.metrics.state is EngineState.IDLE
    assert scheduler.metrics.queue_depth == 0

    states = [m.state for m in seen]
    assert states[0] is EngineState.LOADING
    assert EngineState.GENERATING in states
    assert seen[-1].state is EngineState.IDLE
    assert "engine metrics listener" in caplog.text  # the broken listener was logged, others still ran

    count = len(seen)
    scheduler.set_base_state(EngineState.ERROR, last_error="the rkllm worker crashed")
    assert len(seen) == count + 1
    assert seen[-1].state is EngineState.ERROR
    assert seen[-1].last_error == "the rkllm worker crashed"

    unsubscribe()
    scheduler.set_base_state(EngineState.IDLE)
    assert len(seen) == count + 1

    # No change, no notification.
    notified: list[EngineMetrics] = []
    scheduler.add_listener(notified.append)
    scheduler.update_metrics(dataclasses.replace(scheduler.metrics, restarts=2))
    assert notified == []
