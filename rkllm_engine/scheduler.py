"""Who runs next, on which NPU slot: a bounded queue in front of one or more runtime contexts, voice first.

A *slot* is one runtime context with its own resident prompt prefix (its own worker process). Every request takes
a `Ticket`: admission is synchronous (a full queue raises `QueueFullError` at once, before an HTTP view sent a
byte), a queued ticket that is cancelled leaves at once, and the running one is only released by its owner once
the run has really ended, so tokens of an aborted run can never overlap the next one (docs/robustness.md §1).

Voice first (docs/architecture.md decision 5, docs/voice.md):
- Admission: a voice request (`Priority.CONVERSATION`) is never refused because of API requests: when the queue is
  full, the newest queued API request that has not started answering its client is refused instead.
- Turn affinity: a voice turn whose round ended with tool calls keeps its slot reserved for its next round (the
  tool results), so the turn costs its own prefills only, never a wait behind API requests.
- Slots: with two or more, slot 0 serves voice turns and the others everything else, so API prompts never evict
  the Assist prefix; among allowed free slots a request goes to the one whose resident prefix it matches.
- Preemption: while a voice turn is active (running, queued or between its rounds) no other request starts and
  the ones running on other slots are paused (their owners hold the runtime in its token callback), then resumed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from .types import (
    EngineMetrics,
    EngineState,
    EngineUnavailableError,
    Perf,
    Priority,
    QueueFullError,
    SlotMetrics,
    SlotState,
)

_LOGGER = logging.getLogger(__name__)

# Slot hold time assumed before any request has finished: a voice command with a warm prefix
# on an RK3588 takes a few seconds (docs/runtime.md §10).
DEFAULT_REQUEST_DURATION_S: Final = 5.0
MIN_RETRY_AFTER_S: Final = 1.0
RECENT_DURATIONS: Final = 20
# How long a voice turn keeps its slot between rounds (Home Assistant runs the tools meanwhile); the turn's owner
# normally ends it sooner (`end_turn`).
TURN_HOLD_S: Final = 15.0

WorkerAvailability = Literal["starting", "ready", "restarting", "failed"]


class TicketState(enum.StrEnum):
    """Where a request stands with respect to the slots."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class Ticket:
    """One admitted request: waits for a slot, holds it, and gives it back exactly once."""

    def __init__(
        self,
        scheduler: Scheduler,
        priority: Priority,
        sequence: int,
        *,
        affinity: str | None = None,
        turn_id: str | None = None,
    ) -> None:
        """Create a queued ticket; only `Scheduler.admit` does this."""
        self._scheduler = scheduler
        self.priority = priority
        self.sequence = sequence
        self.affinity = affinity
        self.turn_id = turn_id
        self.state = TicketState.QUEUED
        self.slot: int | None = None
        self.granted_at: float | None = None
        self.committed = False  # its caller started answering a client: never shed it for a voice request
        self._granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._abort: Callable[[], object] | None = None
        self._abort_requested = False
        self._pause: Callable[[bool], object] | None = None
        self._paused = False

    @property
    def voice(self) -> bool:
        """True for a conversation (voice/Assist) turn."""
        return self.priority is Priority.CONVERSATION

    @property
    def abort_requested(self) -> bool:
        """True once `cancel()` was called while this ticket held the slot."""
        return self._abort_requested

    @property
    def paused(self) -> bool:
        """True while a voice turn holds the NPU and this (non-voice) run waits in its callback."""
        return self._paused

    async def wait_for_slot(self) -> None:
        """Wait until this ticket holds a slot (`self.slot`).

        Raises `EngineUnavailableError` when the scheduler closes while the ticket is queued, `QueueFullError` when
        it is shed for a voice request, and `asyncio.CancelledError` when the ticket (or the waiting task) is
        cancelled; in every case the ticket has left the queue.
        """
        try:
            await self._granted
        except asyncio.CancelledError:
            self._scheduler.drop_queued(self)
            if self.state is TicketState.RUNNING:
                # Granted in the same loop iteration as the cancellation: give the slot back.
                self.release()
            raise

    def commit(self) -> None:
        """The caller started answering its client (an HTTP stream sent its headers): it cannot be refused now."""
        self.committed = True

    def set_abort(self, abort: Callable[[], object]) -> None:
        """Register what `cancel()` does while running (e.g. abort the runtime's run).

        If a cancel already arrived while the owner was starting the run, the callback runs now.
        """
        self._abort = abort
        if self._abort_requested:
            self._run_abort()

    def set_pause(self, pause: Callable[[bool], object]) -> None:
        """Register how the run is paused (`pause(True)`) and resumed (`pause(False)`); applied now if due."""
        self._pause = pause
        if self._paused:
            self._call_pause(True)

    def cancel(self) -> None:
        """Cancel: a queued ticket leaves the queue at once; a running one gets its abort callback.

        The slot of a running ticket stays taken until its owner calls `release()` after the run really ended.
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

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused or self.state is not TicketState.RUNNING:
            return
        self._paused = paused
        if self._pause is not None:
            self._call_pause(paused)

    def _call_pause(self, paused: bool) -> None:
        if self._pause is None:
            return
        try:
            self._pause(paused)
        except Exception:
            _LOGGER.exception("pause callback of a running request failed")

    def grant(self, slot: int) -> None:
        """Mark this ticket as holding `slot` (called by the scheduler)."""
        self.state = TicketState.RUNNING
        self.slot = slot
        self.granted_at = time.monotonic()
        if not self._granted.done():
            self._granted.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Fail a queued ticket with `error` (called by the scheduler when it closes or sheds it)."""
        self.state = TicketState.CANCELLED
        if not self._granted.done():
            self._granted.set_exception(error)
            # The waiter may already be gone (its task was cancelled); don't warn about it.
            self._granted.exception()


@dataclass(slots=True)
class _Slot:
    """The scheduler's view of one runtime context."""

    index: int
    voice: bool  # serves voice turns (slot 0 when there are two or more)
    availability: WorkerAvailability = "starting"
    running: Ticket | None = None
    resident: str | None = None  # affinity key of the prompt prefix resident in its KV cache
    last_used: float = 0.0
    reserved_turn: str | None = None
    reserved_until: float = 0.0

    @property
    def free(self) -> bool:
        return self.availability == "ready" and self.running is None


class Scheduler:
    """The slots, the bounded queue in front of them, and the engine's live metrics.

    Pure asyncio; the engine drives it. `base_state` is what the engine knows about the runtime (LOADING, IDLE,
    ERROR, STOPPED); the published state is GENERATING while any slot runs a request.
    """

    def __init__(self, *, queue_size: int, context_length: int | None = None, slots: int = 1) -> None:
        """Start closed (nothing admitted) until the engine calls `open()`; slot 0 counts as ready."""
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self._queue_size = queue_size
        self._queue: list[Ticket] = []
        self._slots: list[_Slot] = [_Slot(index=0, voice=False, availability="ready")]
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
        self._voice_active = False
        self._reservation_timer: asyncio.TimerHandle | None = None
        if slots > 1:
            self.set_slot_count(slots)

    # -- slots -------------------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        """How many runtime contexts requests are spread over."""
        return len(self._slots)

    def set_slot_count(self, count: int) -> None:
        """Grow (or set) the number of slots; new slots start as `starting` until the engine says they are ready."""
        while len(self._slots) < count:
            self._slots.append(_Slot(index=len(self._slots), voice=False))
        for slot in self._slots:
            slot.voice = slot.index == 0 and count > 1
        self._grant_next()
        self._publish()

    def set_slot_availability(self, index: int, availability: WorkerAvailability) -> None:
        """What the slot's worker is doing: only a `ready` slot is granted."""
        slot = self._slots[index]
        slot.availability = availability
        if availability != "ready":
            slot.resident = None
            slot.reserved_turn = None
        self._grant_next()
        self._publish()

    def set_resident(self, index: int, affinity: str | None) -> None:
        """The prompt prefix now resident in the slot's KV cache (None: not known)."""
        self._slots[index].resident = affinity

    # -- admission ---------------------------------------------------------------------------

    def check_open(self) -> None:
        """Raise `EngineUnavailableError` with the reason when no request is admitted now."""
        if not self._open:
            raise EngineUnavailableError(self._closed_reason)

    def admit(
        self, priority: Priority = Priority.API, *, affinity: str | None = None, turn_id: str | None = None
    ) -> Ticket:
        """Take a place in the queue now, or raise at once (`QueueFullError`/`EngineUnavailableError`).

        A voice request is refused only when voice requests alone fill the queue; when API requests fill it, the
        newest one that has not started answering its client is refused instead (with `QueueFullError`), and if
        every one has, the voice request is admitted beyond the bound.
        """
        self.check_open()
        ticket = Ticket(self, priority, next(self._sequence), affinity=affinity, turn_id=turn_id)
        will_run_now = not self._holding and not self._queue and self._pick_slot(ticket) is not None
        if not will_run_now and len(self._queue) >= self._queue_size:
            if not ticket.voice or sum(1 for queued in self._queue if queued.voice) >= self._queue_size:
                raise self._queue_full()
            self._shed_for_voice()
        self._queue.append(ticket)
        self._grant_next()
        self._publish()
        return ticket

    def _queue_full(self) -> QueueFullError:
        retry_after = self.retry_after_s()
        return QueueFullError(
            f"the request queue is full ({len(self._queue)} waiting for the NPU); retry in {retry_after:.0f} s",
            retry_after_s=retry_after,
        )

    def _shed_for_voice(self) -> None:
        """Refuse the newest queued non-voice request that has not started answering (voice never waits for it)."""
        for queued in reversed(self._queue):
            if not queued.voice and not queued.committed:
                self._queue.remove(queued)
                queued.fail(self._queue_full())
                _LOGGER.info("queue full: refused a queued %s request to admit a voice request", queued.priority.name)
                return

    def retry_after_s(self) -> float:
        """Seconds until a slot is likely free: mean recent duration times the requests ahead per slot (min 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_REQUEST_DURATION_S
        running = sum(1 for slot in self._slots if slot.running is not None)
        ahead = (len(self._queue) + running) / max(1, self._general_slot_count())
        return max(MIN_RETRY_AFTER_S, math.ceil(mean * max(ahead, 1) * 10) / 10)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (not counting running ones)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while any ticket holds a slot."""
        return any(slot.running is not None for slot in self._slots)

    # -- turns ---------------------------------------------------------------------------------

    def reserve_for_turn(self, ticket: Ticket) -> None:
        """The voice round of `ticket` ended with tool calls: keep its slot for the turn's next round."""
        if ticket.turn_id is None or ticket.slot is None:
            return
        slot = self._slots[ticket.slot]
        slot.reserved_turn = ticket.turn_id
        slot.reserved_until = time.monotonic() + TURN_HOLD_S
        self._arm_reservation_timer()

    def end_turn(self, turn_id: str) -> None:
        """The turn is over (its owner answered): its slot is free for anyone."""
        for slot in self._slots:
            if slot.reserved_turn == turn_id:
                slot.reserved_turn = None
        self._arm_reservation_timer()
        self._grant_next()
        self._publish()

    def _arm_reservation_timer(self) -> None:
        if self._reservation_timer is not None:
            self._reservation_timer.cancel()
            self._reservation_timer = None
        deadlines = [slot.reserved_until for slot in self._slots if slot.reserved_turn is not None]
        if deadlines:
            delay = max(0.0, min(deadlines) - time.monotonic())
            self._reservation_timer = asyncio.get_running_loop().call_later(delay, self._expire_reservations)

    def _expire_reservations(self) -> None:
        self._reservation_timer = None
        now = time.monotonic()
        for slot in self._slots:
            if slot.reserved_turn is not None and slot.reserved_until <= now:
                _LOGGER.debug("slot %d: turn %s did not come back in time", slot.index, slot.reserved_turn)
                slot.reserved_turn = None
        self._arm_reservation_timer()
        self._grant_next()
        self._publish()

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Admit requests (the runtime is loaded)."""
        self._open = True
        self._holding = False
        self._grant_next()
        self._publish()

    def hold(self) -> None:
        """Keep admitting but grant no slot; `resume()` undoes it."""
        self._holding = True

    def resume(self) -> None:
        """Grant slots again after `hold()`."""
        self._holding = False
        self._grant_next()
        self._publish()

    def close(self, error: EngineUnavailableError) -> None:
        """Refuse new requests, fail every queued one with `error`, and abort the running ones."""
        self._open = False
        self._closed_reason = str(error)
        queued, self._queue = self._queue, []
        for ticket in queued:
            ticket.fail(error)
        for slot in self._slots:
            slot.reserved_turn = None
            if slot.running is not None:
                slot.running._set_paused(False)
                slot.running.cancel()
        if self._reservation_timer is not None:
            self._reservation_timer.cancel()
            self._reservation_timer = None
        self._voice_active = False
        self._publish()

    async def wait_idle(self) -> None:
        """Wait until no ticket holds a slot (used by shutdown after `close`)."""
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

        `state`, `queue_depth` and the slots' states are always derived by the scheduler, whatever `metrics` says.
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
        if self.busy and self._base_state in (EngineState.IDLE, EngineState.GENERATING):
            return EngineState.GENERATING
        return self._base_state

    def _slot_metrics(self, previous: tuple[SlotMetrics, ...]) -> tuple[SlotMetrics, ...]:
        known = {slot.index: slot for slot in previous}
        result: list[SlotMetrics] = []
        for slot in self._slots:
            state: SlotState
            if slot.availability != "ready":
                state = slot.availability
            elif slot.running is None:
                state = "idle"
            else:
                state = "paused" if slot.running.paused else "generating"
            base = known.get(slot.index) or SlotMetrics(index=slot.index, role="any")
            role: Literal["voice", "general", "any"] = (
                "any" if len(self._slots) == 1 else ("voice" if slot.voice else "general")
            )
            result.append(dataclasses.replace(base, role=role, state=state))
        return tuple(result)

    def _publish(self, metrics: EngineMetrics | None = None) -> None:
        base = self._metrics if metrics is None else metrics
        snapshot = dataclasses.replace(
            base, state=self._state(), queue_depth=len(self._queue), slots=self._slot_metrics(base.slots)
        )
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
        if ticket in self._queue:
            self._queue.remove(ticket)
            ticket.state = TicketState.CANCELLED
            self._grant_next()
            self._publish()

    def release_slot(self, ticket: Ticket) -> None:
        """Free the slot held by `ticket` and grant the next one (called by `Ticket.release`)."""
        for slot in self._slots:
            if slot.running is ticket:
                slot.running = None
                slot.last_used = time.monotonic()
                if ticket.granted_at is not None:
                    self._durations.append(time.monotonic() - ticket.granted_at)
        if not self.busy:
            self._idle.set()
        self._grant_next()
        self._publish()

    def _general_slot_count(self) -> int:
        return sum(1 for slot in self._slots if not slot.voice)

    def _allowed(self, ticket: Ticket) -> list[_Slot]:
        """The slots `ticket` may run on (module docstring, "Slots")."""
        if len(self._slots) == 1:
            return self._slots
        voice_slots = [slot for slot in self._slots if slot.voice]
        general = [slot for slot in self._slots if not slot.voice]
        if ticket.voice:
            # A voice slot that works is worth waiting for (its prefix is resident); else take a general one.
            return voice_slots if any(slot.availability == "ready" for slot in voice_slots) else voice_slots + general
        # Other requests wait for a general slot that works or comes back; they use the voice slot only while
        # no general slot exists yet (still loading) or every one failed.
        if any(slot.availability in ("ready", "restarting") for slot in general):
            return general
        return general + voice_slots

    def _pick_slot(self, ticket: Ticket) -> _Slot | None:
        candidates = [
            slot
            for slot in self._allowed(ticket)
            if slot.free and slot.reserved_turn in (None, ticket.turn_id)
        ]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda slot: (
                slot.reserved_turn is None or slot.reserved_turn != ticket.turn_id,  # its own turn's slot first
                ticket.affinity is None or slot.resident != ticket.affinity,  # then the resident prefix it matches
                slot.resident is not None,  # then an empty slot
                slot.last_used,  # then the least recently used
            ),
        )

    def _rank(self, ticket: Ticket) -> tuple[bool, int, int]:
        continuing = ticket.turn_id is not None and any(slot.reserved_turn == ticket.turn_id for slot in self._slots)
        return (not continuing, int(ticket.priority), ticket.sequence)

    def _update_voice(self) -> None:
        """Voice holds the NPU while a voice request runs, waits, or is between two rounds of its turn."""
        active = len(self._slots) > 1 and (
            any(slot.running is not None and slot.running.voice for slot in self._slots)
            or any(ticket.voice for ticket in self._queue)
            or any(slot.reserved_turn is not None for slot in self._slots)
        )
        self._voice_active = active
        for slot in self._slots:
            if slot.running is not None and not slot.running.voice:
                slot.running._set_paused(active)

    def _grant_next(self) -> None:
        if not self._holding:
            for ticket in sorted(self._queue, key=self._rank):
                if not ticket.voice and len(self._slots) > 1 and self._voice_pending(ticket):
                    continue  # voice holds the NPU: nothing else starts until the turn is over
                slot = self._pick_slot(ticket)
                if slot is None:
                    continue
                self._queue.remove(ticket)
                slot.running = ticket
                if ticket.turn_id is not None and slot.reserved_turn == ticket.turn_id:
                    slot.reserved_turn = None  # the round came back; the engine reserves again after it if needed
                self._idle.clear()
                ticket.grant(slot.index)
        self._update_voice()

    def _voice_pending(self, ticket: Ticket) -> bool:
        return (
            any(slot.running is not None and slot.running.voice for slot in self._slots)
            or any(queued.voice for queued in self._queue)
            or any(slot.reserved_turn is not None for slot in self._slots)
        )
