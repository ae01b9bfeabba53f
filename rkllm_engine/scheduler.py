"""One NPU slot, a bounded priority queue in front of it, and the live metrics of both.

The NPU runs one generation at a time (DESIGN.md decision 5), so every request takes a
`Ticket`: admission is synchronous (a full queue raises `QueueFullError` at once, before an
HTTP view has sent a byte), the slot is granted by (priority, arrival), a queued ticket that is
cancelled leaves the queue at once, and the running one is only released by its owner once the
run has really ended, so tokens of an aborted run can never overlap the next one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable

from .types import EngineMetrics, EngineState, EngineUnavailableError, Perf, Priority, QueueFullError

_LOGGER = logging.getLogger(__name__)

# Slot hold time assumed before any request has finished: a voice command with a warm prefix
# on an RK3588 takes a few seconds (rkllm-runtime.md §10).
DEFAULT_REQUEST_DURATION_S = 5.0
MIN_RETRY_AFTER_S = 1.0
RECENT_DURATIONS = 20


class TicketState(enum.StrEnum):
    """Where a request stands with respect to the slot."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class Ticket:
    """One admitted request: waits for the slot, holds it, and gives it back exactly once."""

    def __init__(self, scheduler: Scheduler, priority: Priority, sequence: int) -> None:
        """Create a queued ticket; only `Scheduler.admit` does this."""
        self._scheduler = scheduler
        self.priority = priority
        self.sequence = sequence
        self.state = TicketState.QUEUED
        self.granted_at: float | None = None
        self._granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._abort: Callable[[], object] | None = None
        self._abort_requested = False

    def __lt__(self, other: Ticket) -> bool:
        """Order the heap by priority, then by arrival."""
        return (self.priority, self.sequence) < (other.priority, other.sequence)

    @property
    def abort_requested(self) -> bool:
        """True once `cancel()` was called while this ticket held the slot."""
        return self._abort_requested

    async def wait_for_slot(self) -> None:
        """Wait until this ticket holds the slot.

        Raises `EngineUnavailableError` when the scheduler closes while the ticket is queued,
        and `asyncio.CancelledError` when the ticket (or the waiting task) is cancelled; in both
        cases the ticket has left the queue.
        """
        try:
            await self._granted
        except asyncio.CancelledError:
            self._scheduler.drop_queued(self)
            if self.state is TicketState.RUNNING:
                # Granted in the same loop iteration as the cancellation: give the slot back.
                self.release()
            raise

    def set_abort(self, abort: Callable[[], object]) -> None:
        """Register what `cancel()` does while running (e.g. abort the runtime's run).

        If a cancel already arrived while the owner was starting the run, the callback runs now.
        """
        self._abort = abort
        if self._abort_requested:
            self._run_abort()

    def cancel(self) -> None:
        """Cancel: a queued ticket leaves the queue at once; a running one gets its abort callback.

        The slot of a running ticket stays taken until its owner calls `release()` after the run
        really ended.
        """
        if self.state is TicketState.QUEUED:
            self._scheduler.drop_queued(self)
            if not self._granted.done():
                self._granted.cancel()
        elif self.state is TicketState.RUNNING and not self._abort_requested:
            self._abort_requested = True
            if self._abort is not None:
                self._run_abort()

    def release(self) -> None:
        """The run has ended: free the slot and grant the next ticket (idempotent)."""
        if self.state is not TicketState.RUNNING:
            return
        self.state = TicketState.DONE
        self._scheduler.release_slot(self)

    def _run_abort(self) -> None:
        abort, self._abort = self._abort, None
        if abort is None:
            return
        try:
            abort()
        except Exception:
            _LOGGER.exception("abort callback of a running request failed")

    def grant(self) -> None:
        """Mark this ticket as holding the slot (called by the scheduler)."""
        self.state = TicketState.RUNNING
        self.granted_at = time.monotonic()
        if not self._granted.done():
            self._granted.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Fail a queued ticket with `error` (called by the scheduler when it closes)."""
        self.state = TicketState.CANCELLED
        if not self._granted.done():
            self._granted.set_exception(error)
            # The waiter may already be gone (its task was cancelled); don't warn about it.
            self._granted.exception()


class Scheduler:
    """The single slot, its bounded (priority, arrival) queue, and the engine's live metrics.

    Pure asyncio; the engine drives it. `base_state` is what the engine knows about the runtime
    (LOADING, IDLE, ERROR, STOPPED); the published state is GENERATING while the slot is held.
    """

    def __init__(self, *, queue_size: int, context_length: int | None = None) -> None:
        """Start closed (nothing admitted) until the engine calls `open()`."""
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self._queue_size = queue_size
        self._heap: list[Ticket] = []
        self._running: Ticket | None = None
        self._sequence = itertools.count()
        self._open = False
        self._closed_reason = "the engine is not started"
        self._holding = False
        self._durations: collections.deque[float] = collections.deque(maxlen=RECENT_DURATIONS)
        self._base_state = EngineState.STOPPED
        self._metrics = EngineMetrics(state=EngineState.STOPPED, context_length=context_length)
        self._listeners: list[Callable[[EngineMetrics], None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission ---------------------------------------------------------------------------

    def check_open(self) -> None:
        """Raise `EngineUnavailableError` with the reason when no request is admitted now."""
        if not self._open:
            raise EngineUnavailableError(self._closed_reason)

    def admit(self, priority: Priority = Priority.API) -> Ticket:
        """Take a place in the queue now, or raise at once (`QueueFullError`/`EngineUnavailableError`)."""
        self.check_open()
        slot_free_now = self._running is None and not self._holding and not self._heap
        if not slot_free_now and len(self._heap) >= self._queue_size:
            retry_after = self.retry_after_s()
            raise QueueFullError(
                f"the request queue is full ({len(self._heap)} waiting for the NPU); retry in {retry_after:.0f} s",
                retry_after_s=retry_after,
            )
        ticket = Ticket(self, priority, next(self._sequence))
        heapq.heappush(self._heap, ticket)
        self._grant_next()
        self._publish()
        return ticket

    def retry_after_s(self) -> float:
        """Seconds until a slot is likely free: mean recent duration times the requests ahead (min 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_REQUEST_DURATION_S
        ahead = len(self._heap) + (1 if self._running is not None else 0)
        return max(MIN_RETRY_AFTER_S, math.ceil(mean * max(ahead, 1) * 10) / 10)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the slot (not counting the running one)."""
        return len(self._heap)

    @property
    def busy(self) -> bool:
        """True while a ticket holds the slot."""
        return self._running is not None

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Admit requests (the runtime is loaded)."""
        self._open = True
        self._holding = False
        self._grant_next()
        self._publish()

    def hold(self) -> None:
        """Keep admitting but grant no slot (the worker restarts); `resume()` undoes it."""
        self._holding = True

    def resume(self) -> None:
        """Grant slots again after `hold()`."""
        self._holding = False
        self._grant_next()
        self._publish()

    def close(self, error: EngineUnavailableError) -> None:
        """Refuse new requests, fail every queued one with `error`, and abort the running one."""
        self._open = False
        self._closed_reason = str(error)
        queued, self._heap = self._heap, []
        for ticket in queued:
            ticket.fail(error)
        if self._running is not None:
            self._running.cancel()
        self._publish()

    async def wait_idle(self) -> None:
        """Wait until no ticket holds the slot (used by shutdown after `close`)."""
        await self._idle.wait()

    # -- metrics -------------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineMetrics:
        """The current snapshot (immutable)."""
        return self._metrics

    def add_listener(self, listener: Callable[[EngineMetrics], None]) -> Callable[[], None]:
        """Call `listener(metrics)` on every change; returns the function that unsubscribes."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def set_base_state(self, state: EngineState, *, last_error: str | None = None) -> None:
        """Record what the engine knows about the runtime (LOADING, IDLE, ERROR, STOPPED)."""
        self._base_state = state
        self._publish(
            self._metrics if last_error is None else dataclasses.replace(self._metrics, last_error=last_error)
        )

    def update_metrics(self, metrics: EngineMetrics) -> None:
        """Publish new metric fields (e.g. `dataclasses.replace(scheduler.metrics, restarts=2)`).

        `state` and `queue_depth` are always derived by the scheduler, whatever `metrics` says.
        """
        self._publish(metrics)

    def record_run(self, *, ttft_s: float | None, perf: Perf) -> None:
        """Fold one finished run into the metrics: TTFT, prefill/decode rates, requests served."""
        prefill_rate = perf.prefill_tokens / (perf.prefill_time_ms / 1000) if perf.prefill_time_ms > 0 else None
        decode_rate = perf.generate_tokens / (perf.generate_time_ms / 1000) if perf.generate_time_ms > 0 else None
        metrics = self._metrics
        self._publish(
            dataclasses.replace(
                metrics,
                last_ttft_s=ttft_s if ttft_s is not None else metrics.last_ttft_s,
                prefill_tokens_per_s=prefill_rate if prefill_rate is not None else metrics.prefill_tokens_per_s,
                decode_tokens_per_s=decode_rate if decode_rate is not None else metrics.decode_tokens_per_s,
                requests_served=metrics.requests_served + 1,
                stall=None,  # a run got to its end: whatever stalled before is over
                consecutive_failures=0,  # and the worker works: a crash streak ends (as in the worker client)
            )
        )

    # -- internals -----------------------------------------------------------------------------

    def _state(self) -> EngineState:
        if self._running is not None and self._base_state in (EngineState.IDLE, EngineState.GENERATING):
            return EngineState.GENERATING
        return self._base_state

    def _publish(self, metrics: EngineMetrics | None = None) -> None:
        base = self._metrics if metrics is None else metrics
        snapshot = dataclasses.replace(base, state=self._state(), queue_depth=len(self._heap))
        if snapshot == self._metrics:
            return
        self._metrics = snapshot
        for listener in list(self._listeners):
            try:
                listener(snapshot)
            except Exception:
                _LOGGER.exception("engine metrics listener %r failed", listener)

    def drop_queued(self, ticket: Ticket) -> None:
        """Remove a queued ticket (called by `Ticket.cancel` and a cancelled waiter)."""
        if ticket in self._heap:
            self._heap.remove(ticket)
            heapq.heapify(self._heap)
            ticket.state = TicketState.CANCELLED
            self._publish()

    def release_slot(self, ticket: Ticket) -> None:
        """Free the slot held by `ticket` and grant the next one (called by `Ticket.release`)."""
        if self._running is ticket:
            self._running = None
            self._idle.set()
            if ticket.granted_at is not None:
                self._durations.append(time.monotonic() - ticket.granted_at)
        self._grant_next()
        self._publish()

    def _grant_next(self) -> None:
        if self._running is not None or self._holding:
            return
        while self._heap:
            ticket = heapq.heappop(self._heap)
            if ticket.state is TicketState.QUEUED:
                self._running = ticket
                self._idle.clear()
                ticket.grant()
                return
