"""The engine facade: requests in, events out, one NPU slot, one worker.

The Home Assistant glue and the OpenAI views talk to `Engine` only (docs/CONTRACT.md). It joins
the scheduler (who runs next), the prompt planner (what to send so the static prefix stays
resident in the KV cache), the worker client (the runtime in its own process) and the output
parser (text pieces → text, reasoning and tool-call events).

Decisions made here, documented once:
- Usage: `prompt_tokens` = tokens prefilled by this run + tokens reused from the KV cache
  (the KV length just before a `keep_history` run; 0 for `keep_history=0` runs, whose reuse the
  runtime only logs). `cached_tokens` = the reused part. `completion_tokens` = the runtime's
  generated-token count, or the pieces we received when an aborted run reported no perf.
- TTFT is measured from the moment the request got the NPU slot to its first visible event
  (text, reasoning or a tool call), so queueing time is not counted.
- `max_new_tokens`: on the v130 ABI it is passed per run; on v1.2.x the runtime only knows the
  init value, so a smaller per-request budget is enforced here by aborting after that many
  pieces. Reaching the budget gives `finish_reason="length"` (a call cut off there is never
  emitted: the parser only emits complete calls).
- `finish_reason`: "tool_calls" when calls were emitted, except "stop" for a named
  `tool_choice` (OpenAI parity, docs/openai-api.md §2.4); "stop" for a matched stop string or a
  natural end; "length" when the token budget ended the run.
- After any run that did not end naturally (stop string, budget abort, cancel, error, crash)
  the planner is invalidated: the KV cache then holds a partial turn, so the next request
  rebuilds its prefix (docs/runtime.md §4.3, "after an abort with keep_history=1").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from rkllm_native import logparse
from rkllm_native.errors import RkllmError
from rkllm_native.soc import local_soc

from .client import (
    InitSpec,
    RunFinished,
    RunStream,
    RuntimeInfo,
    TextPiece,
    WorkerClient,
    WorkerLocation,
    WorkerState,
    start_error_from_binding,
)
from .output import OutputParser, ParseResult
from .prompting import ClearKV, PromptPlan, PromptPlanner, SetChatTemplate, SetFunctionTools, template_family
from .scheduler import Scheduler, Ticket
from .types import (
    ChatRequest,
    CompletionRequest,
    EngineError,
    EngineMetrics,
    EngineState,
    EngineUnavailableError,
    Event,
    Finished,
    FinishReason,
    GenerationError,
    Perf,
    Sampling,
    TextDelta,
    Usage,
    WorkerHungError,
)
from .watchdog import DEFAULT_FACTOR, DEFAULT_MIN_S, ProgressWatchdog, SilenceBound

__all__ = [
    "Engine",
    "EngineConfig",
    "Generation",
    "WorkerLocation",
    "default_cpu_mask",
    "probe_worker",
    "runtime_params",
    "start_error",
]

_LOGGER = logging.getLogger(__name__)

# Init-time sampling defaults of Rockchip's official servers (docs/runtime.md §4.5): top_k=1 is
# effectively greedy, which keeps small models' tool calls stable.
DEFAULT_TOP_K: Final = 1
DEFAULT_TOP_P: Final = 0.9
DEFAULT_TEMPERATURE: Final = 0.8
DEFAULT_REPEAT_PENALTY: Final = 1.1
DEFAULT_MIROSTAT_TAU: Final = 5.0
DEFAULT_MIROSTAT_ETA: Final = 0.1
INIT_SAMPLING: Final[dict[str, float | int]] = {
    "top_k": DEFAULT_TOP_K,
    "top_p": DEFAULT_TOP_P,
    "temperature": DEFAULT_TEMPERATURE,
    "repeat_penalty": DEFAULT_REPEAT_PENALTY,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
# Platforms with big.LITTLE clusters whose big cores are CPU4-CPU7 (docs/runtime.md §4.5).
BIG_CORE_PLATFORMS: Final = frozenset({"RK3588", "RK3576"})
MAX_CPU_CORES: Final = 8
MAX_SLOTS: Final = 4
TOOL_RESPONSE_TAG: Final = "tool_response"
STOPPED_MESSAGE: Final = "the engine was stopped"
WORKER_READY_TIMEOUT_S: Final = 120.0
# After the worker client stopped (which kills a hung worker), the serving tasks end at once; this only bounds a bug.
STOP_TASKS_TIMEOUT_S: Final = 5.0
# `slots: auto` adds a second runtime context when free memory holds the model once more plus this (docs/voice.md).
AUTO_SLOT_HEADROOM_MB: Final = 1024
AUTO_MAX_SLOTS: Final = 2
PAUSED_RECHECK_S: Final = 1.0
HUNG_RUN_ABORTED: Final = "the run is aborted (the worker is restarted if it hangs)"


@dataclass
class EngineConfig:
    """Everything needed to start one runtime + model (one config entry in Home Assistant)."""

    library_path: str
    model_path: str
    profile: str | None = None  # None = detect from the library file
    context_length: int = 4096
    max_new_tokens: int = 512
    cpu_cores: int = 4
    cpu_mask: int | None = None  # None = default_cpu_mask(cpu_cores, platform)
    npu_domain_id: int = 0
    platform: str | None = None  # e.g. "RK3588"; None = read the local device tree (local worker only)
    worker: WorkerLocation = field(default_factory=WorkerLocation)
    queue_size: int = 8
    abort_grace_s: float = 5.0
    restart_backoff_s: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30)
    env: dict[str, str] = field(default_factory=dict)  # extra env for a local worker (e.g. RKLLM_EMULATOR_SPEED)
    watchdog_min_s: float = DEFAULT_MIN_S  # a silent run is ended after max(this, factor * its expected step time)
    watchdog_factor: float = DEFAULT_FACTOR
    slots: int | None = 1  # runtime contexts, each its own worker and resident prefix; None = auto (docs/voice.md)

    def __post_init__(self) -> None:
        """Reject settings the runtime would refuse later with a less specific message."""
        if not 1 <= self.cpu_cores <= MAX_CPU_CORES:
            raise ValueError(f"cpu_cores must be between 1 and {MAX_CPU_CORES}, got {self.cpu_cores}")
        if self.cpu_mask is not None and self.cpu_mask.bit_count() != self.cpu_cores:
            raise ValueError(
                f"cpu_mask {self.cpu_mask:#x} enables {self.cpu_mask.bit_count()} CPUs but cpu_cores is "
                f"{self.cpu_cores}; they must match"
            )
        if self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if not 0 < self.max_new_tokens < self.context_length:
            raise ValueError(
                f"max_new_tokens must be between 1 and context_length-1 ({self.context_length - 1}), "
                f"got {self.max_new_tokens}"
            )
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        ProgressWatchdog(min_s=self.watchdog_min_s, factor=self.watchdog_factor)  # raises on a bad setting
        if self.slots is not None and not 1 <= self.slots <= MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS} (or None for auto), got {self.slots}")


def local_platform() -> str | None:
    """The SoC of this machine from the device tree (e.g. "RK3588"), or None when unknown (`rkllm_native.soc`)."""
    soc = local_soc()
    return soc.upper() if soc is not None else None


def default_cpu_mask(cpu_cores: int, platform: str | None) -> int:
    """CPU mask for `enabled_cpus_mask`: the big cores CPU4… first on RK3588/RK3576, else CPU0… first.

    The official demos use CPU4-CPU7 on RK3588/RK3576 and CPU0-CPU3 elsewhere (docs/runtime.md §4.5);
    asking for more cores than the big cluster has on those chips takes all cores from CPU0.
    """
    if platform is not None and platform.upper() in BIG_CORE_PLATFORMS and cpu_cores <= 4:
        return ((1 << cpu_cores) - 1) << 4
    return (1 << cpu_cores) - 1


def runtime_params(config: EngineConfig, platform: str | None) -> dict[str, Any]:
    """The init-time `RKLLMParam` values for the worker (field names of the binding's RuntimeParams)."""
    mask = config.cpu_mask if config.cpu_mask is not None else default_cpu_mask(config.cpu_cores, platform)
    return {
        "max_context_len": config.context_length,
        "max_new_tokens": config.max_new_tokens,
        **INIT_SAMPLING,
        "mirostat": 0,
        "mirostat_tau": DEFAULT_MIROSTAT_TAU,
        "mirostat_eta": DEFAULT_MIROSTAT_ETA,
        "n_keep": -1,  # runtime default: keep the system prompt when the window shifts (§4.5)
        "skip_special_token": True,
        "ignore_eos_token": False,
        "base_domain_id": config.npu_domain_id,
        "embed_flash": True,  # the official demos keep the embedding table in flash to save RAM (§4.5)
        "enabled_cpus_num": config.cpu_cores,
        "enabled_cpus_mask": mask,
        "n_batch": 1,
        "use_cross_attn": False,
    }


def _sampling_dict(sampling: Sampling) -> dict[str, float | int] | None:
    """Per-run sampling for the v130 ABI, or None when the request sets nothing.

    `RKLLMSamplingParam` replaces every sampling value for the run, so fields the request leaves
    as None are filled with our init values (never the header's defaults).
    """
    overrides = {name: value for name, value in dataclasses.asdict(sampling).items() if value is not None}
    return {**INIT_SAMPLING, **overrides} if overrides else None


def _offered_tools(request: ChatRequest | CompletionRequest, plan: PromptPlan) -> tuple[tuple[str, ...] | None, bool]:
    """The tool names a call may use, and whether the request forces a call (rule 6 in `rkllm_engine.output`)."""
    if not isinstance(request, ChatRequest) or not plan.tools_enabled:
        return None, False
    if plan.forced_tool is not None:
        return (plan.forced_tool,), True
    names = _tool_names(json.dumps(request.tools))
    return names, request.tool_choice == "required"


def _log_run(slot: int, plan: PromptPlan, finished: Finished) -> None:
    """One debug line per run: where it ran, how the prompt reached the runtime, and what it cost."""
    usage, perf = finished.usage, finished.perf
    decode = perf.generate_tokens / (perf.generate_time_ms / 1000) if perf.generate_time_ms > 0 else None
    _LOGGER.debug(
        "slot %d run: plan %s, prompt %d tokens (%d prefilled, %d cached), TTFT %s, decode %s, %d tokens, %s",
        slot,
        plan.mode,
        usage.prompt_tokens,
        perf.prefill_tokens,
        usage.cached_tokens,
        f"{perf.ttft_s:.2f} s" if perf.ttft_s is not None else "-",
        f"{decode:.1f} tok/s" if decode is not None else "-",
        usage.completion_tokens,
        finished.finish_reason,
    )


def _tool_names(tools_json: str) -> tuple[str, ...]:
    """Names of the tools in an OpenAI tools JSON array (for the `tools_loaded` metric)."""
    try:
        tools = json.loads(tools_json)
    except ValueError:
        return ()
    names: list[str] = []
    if isinstance(tools, list):
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str):
                names.append(name)
    return tuple(names)


def start_error(err: RkllmError) -> EngineError:
    """The typed error (RuntimeIncompatibleError/EngineUnavailableError with its `reason`) for a binding error.

    Home Assistant checks local files in its own process before spawning a worker; this gives those failures the
    same type and `reason` as the worker's failed `init` reply, so one mapping serves both.
    """
    return start_error_from_binding(err)


async def probe_worker(
    location: WorkerLocation,
    timeout_s: float = 10.0,
    *,
    library_path: str | None = None,
    model_path: str | None = None,
) -> None:
    """Check a remote worker without loading anything (connect, TLS pin, mutual handshake, hello, allow-list).

    For the config flow, before an entry exists. Raises EngineUnavailableError (worker_unreachable,
    secret_refused, worker_unverified, fingerprint_mismatch, tls_mismatch, worker_busy) or
    RuntimeIncompatibleError (protocol_mismatch, path_not_allowed).
    """
    await WorkerClient.probe(location, timeout_s, library_path=library_path, model_path=model_path)


@dataclass(frozen=True, slots=True)
class _RunAccount:
    """What the engine counted during a run, for the Finished event."""

    pieces: int
    cached_tokens: int
    runtime_budget: int
    budget_hit: bool
    ttft_s: float | None


@dataclass(slots=True)
class _Consumed:
    """What the engine saw of a run's pieces."""

    pieces: int = 0
    budget_hit: bool = False
    first_event_at: float | None = None


class _SilenceWatch:
    """One run's silence: publishes a stall once the run is past its expected time, fires at the watchdog bound.

    A fired watchdog's stall stays published after the run (health `degraded`) until a later run finishes or a
    fresh worker is ready (docs/robustness.md §2, §4).
    """

    def __init__(self, engine: Engine, bound: SilenceBound) -> None:
        self._engine = engine
        self._bound = bound
        self._since = time.monotonic()
        self._stalled = False
        self._paused = False
        self.fired: str | None = None

    def wait_s(self) -> float:
        """Seconds until the next threshold (stall, then fire) is reached."""
        if self._paused:
            return PAUSED_RECHECK_S
        elapsed = time.monotonic() - self._since
        threshold = self._bound.fire_after_s if self._stalled else self._bound.stall_after_s
        return max(0.0, threshold - elapsed)

    def on_silence(self) -> bool:
        """A threshold passed without progress: publish the stall, or fire (returns True once, when it fires)."""
        if self._paused:
            self._since = time.monotonic()
            return False
        elapsed = time.monotonic() - self._since
        expected = f"expected about {self._bound.expected_s:.1f} s"
        if elapsed + 1e-3 >= self._bound.fire_after_s:
            self.fired = (
                f"no progress from the runtime for {elapsed:.0f} s ({expected}, watchdog bound "
                f"{self._bound.fire_after_s:.0f} s)"
            )
            _LOGGER.warning("watchdog: %s; aborting the run", self.fired)
            self._engine._set_stall(f"the watchdog ended a run: {self.fired}", fired=True)
            return True
        self._stalled = True
        self._engine._set_stall(f"a run has produced nothing for {elapsed:.1f} s ({expected})")
        return False

    def set_paused(self, paused: bool) -> None:
        """A paused run is silent on purpose: the watch does not count while it waits (docs/robustness.md §2)."""
        self._paused = paused
        self._since = time.monotonic()
        if paused and self._stalled and self.fired is None:
            self._stalled = False
            self._engine._set_stall(None)

    def on_progress(self, bound: SilenceBound) -> None:
        """A token arrived: the silence starts over with the bound of the next step."""
        self._since = time.monotonic()
        self._bound = bound
        if self._stalled:
            self._stalled = False
            self._engine._set_stall(None)

    def close(self) -> None:
        """The run ended: a plain stall is over; a fired watchdog stays visible."""
        if self._stalled and self.fired is None:
            self._engine._set_stall(None)


class _End:
    """Sentinel: the generation ended without a Finished event (it was cancelled)."""


_END: Final = _End()
_Item = list[Event] | BaseException | _End


class Generation:
    """One submitted request: an async iterator of events and an async context manager.

    The request waits in the queue, then streams; iteration ends after `Finished`. Leaving the
    context early (or cancelling the task that iterates) cancels it: a queued request leaves the
    queue, a running one is aborted and the slot is freed once the run has really ended.
    After `cancel()` iteration simply stops (no `Finished`).
    """

    def __init__(self, ticket: Ticket, task: asyncio.Task[None], items: asyncio.Queue[_Item]) -> None:
        """Wrap the serving task created by `Engine.submit` and the queue it fills."""
        self._ticket = ticket
        self._task = task
        self._items = items
        self._pending: collections.deque[Event] = collections.deque()
        self._done = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cancel()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if not self._pending:
            if self._done:
                raise StopAsyncIteration
            try:
                item = await self._items.get()
            except asyncio.CancelledError:
                await self._cancel_and_wait()
                raise
            if not isinstance(item, list):
                self._done = True
                if isinstance(item, BaseException):
                    raise item
                raise StopAsyncIteration
            self._pending.extend(item)
        event = self._pending.popleft()
        if isinstance(event, Finished):  # wherever it sits in its batch: nothing follows it
            self._done = True
        return event

    def commit(self) -> None:
        """The caller started answering its client (e.g. sent HTTP headers): a voice request must not shed it."""
        self._ticket.commit()

    async def cancel(self) -> None:
        """Stop this request: dequeue it, or abort its run and wait until the run has ended.

        After the generation delivered its end (Finished, or an error such as the watchdog's) there is nothing to
        wait for: the engine finishes the run's clean-up itself, bounded by its abort watchdog.
        """
        if not self._done:
            await self._cancel_and_wait()
        self._done = True
        self._pending.clear()

    async def collect(self) -> tuple[str, Finished]:
        """Consume the whole generation: the visible text and the `Finished` event."""
        parts: list[str] = []
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return "".join(parts), event
        raise GenerationError("the generation was cancelled before it finished")

    async def _cancel_and_wait(self) -> None:
        if self._task.done():
            return
        self._ticket.cancel()
        # Shielded: a second cancellation of the caller stops the waiting (and propagates), not the
        # clean-up, which then finishes in the background (bounded by the worker's abort watchdog).
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.done():
                raise
        except Exception:  # the serving task reports its errors through the queue
            _LOGGER.debug("generation task ended with an error after cancel", exc_info=True)


@dataclass(slots=True)
class _Slot:
    """One runtime context: its worker (a process with its own runtime handle) and its prompt planner."""

    index: int
    client: WorkerClient
    planner: PromptPlanner
    tools_loaded: tuple[str, ...] = ()
    kv_tokens: int | None = None


class Engine:
    """The LLM on the NPU as an asyncio service (see module docstring for the decisions)."""

    def __init__(self, config: EngineConfig) -> None:
        """Prepare the engine; nothing is spawned before `start()`."""
        self.config = config
        self._scheduler = Scheduler(queue_size=config.queue_size, context_length=config.context_length)
        self._slots: list[_Slot] = []
        self._spec: InitSpec | None = None
        self._family: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._grow_task: asyncio.Task[None] | None = None
        self._worker_slots = MAX_SLOTS  # how many contexts the worker side can hold (a remote worker's --slots)
        self._started = False
        self._stopping = False

    # -- public API ------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineMetrics:
        """A snapshot of the live figures (never blocks)."""
        return self._scheduler.metrics

    def add_listener(self, cb: Callable[[EngineMetrics], None]) -> Callable[[], None]:
        """Call `cb(metrics)` on every state/metric change; returns the unsubscribe function."""
        return self._scheduler.add_listener(cb)

    def recent_log(self) -> list[str]:
        """The runtime's last log lines (I/W/E rkllm: …) of every slot's worker, for diagnostics and repairs."""
        lines: list[str] = []
        for slot in reversed(self._slots):  # the first slot's lines last: it is the one setup and repairs follow
            lines.extend(slot.client.recent_log)
        return lines

    def end_turn(self, turn_id: str) -> None:
        """A conversation turn is over: the slot kept for its next round is free (docs/voice.md)."""
        self._scheduler.end_turn(turn_id)

    def record_voice_response(self, seconds: float) -> None:
        """A conversation turn's first spoken text came `seconds` after the command (the voice response sensor)."""
        self._scheduler.update_metrics(dataclasses.replace(self._scheduler.metrics, last_voice_response_s=seconds))

    async def start(self) -> None:
        """Spawn (or connect to) the worker and load the model; raises `EngineError` subclasses.

        The first slot is loaded before this returns; more slots (`EngineConfig.slots`) load in the background
        while the first one already serves. Also the way back after the worker failed for good (state ERROR).
        """
        if self._started:
            return
        config = self.config
        await self._stop_slots()  # a worker that failed for good: shut it down before a new one
        self._stopping = False
        self._scheduler.close(EngineUnavailableError("the model is still loading"))
        self._scheduler.set_base_state(EngineState.LOADING)
        platform = config.platform or (local_platform() if config.worker.host is None else None)
        # The model file's header is read in a thread: file I/O in the event loop stalls every other task
        # (Home Assistant reports it as a bug of the integration).
        self._family = await asyncio.get_running_loop().run_in_executor(None, template_family, config.model_path)
        self._spec = InitSpec(
            library_path=config.library_path,
            model_path=config.model_path,
            profile=config.profile,
            params=runtime_params(config, platform),
        )
        self._scheduler.set_slot_count(1)
        try:
            first, info = await self._start_slot(0)
        except BaseException as err:
            self._scheduler.close(EngineUnavailableError(f"the model could not be loaded: {err}"))
            self._scheduler.set_base_state(EngineState.ERROR, last_error=str(err))
            await self._stop_slots()
            raise
        self._scheduler.update_metrics(
            dataclasses.replace(
                self._scheduler.metrics,
                runtime_version=info.version,
                abi_profile=info.profile,
                driver_version=info.driver_version,
                platform=info.platform or platform,
                toolkit_version=info.toolkit_version,
                restarts=first.client.restarts,
                last_error=None,
                tools_loaded=(),
            )
        )
        self._started = True
        self._scheduler.set_slot_availability(0, "ready")
        self._scheduler.set_base_state(EngineState.IDLE)
        self._scheduler.open()
        self._worker_slots = info.worker_slots if config.worker.remote else MAX_SLOTS
        wanted = self._wanted_slots(info)
        if wanted > 1:
            self._grow(wanted)

    async def stop(self) -> None:
        """Fail queued requests, abort the running ones, shut the workers down; leave nothing behind.

        Bounded whatever the runtime does: each worker client gives a running run a short grace to honour its
        abort, then kills the worker (docs/robustness.md §6); the serving tasks end as their runs end.
        """
        self._stopping = True
        self._scheduler.close(EngineUnavailableError(STOPPED_MESSAGE))
        if self._grow_task is not None:
            self._grow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._grow_task
            self._grow_task = None
        await self._stop_slots()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=STOP_TASKS_TIMEOUT_S)
            for task in late:
                _LOGGER.error("a generation task did not end after the worker stopped; cancelling it")
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._started = False
        self._scheduler.update_metrics(dataclasses.replace(self._scheduler.metrics, stall=None, restarting=False))
        self._scheduler.set_base_state(EngineState.STOPPED)

    def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        """Admit a request now (or raise `QueueFullError`/`EngineUnavailableError`/`InvalidRequestError`)."""
        self._scheduler.check_open()  # not started, stopped, or failed: the reason, before any validation
        if not self._slots:
            raise EngineUnavailableError("the engine is not started (the model is not loaded)")
        # Validate now, so an HTTP view can answer 400 before any byte; plan again when a slot is granted,
        # because the resident KV state may change while this request waits.
        planner = self._slots[0].planner
        planner.plan(request)
        ticket = self._scheduler.admit(
            request.priority,
            affinity=planner.affinity_key(request),
            turn_id=request.turn_id if isinstance(request, ChatRequest) else None,
        )
        items: asyncio.Queue[_Item] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self._serve(request, ticket, items.put_nowait), name="rkllm-generation"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Generation(ticket, task, items)

    # -- slots -------------------------------------------------------------------------------

    def _wanted_slots(self, info: RuntimeInfo) -> int:
        """Slots to run now: the configured count, capped by a remote worker's `--slots`.

        `auto` starts with one and decides after the first run (`_maybe_grow_auto`).
        """
        if self.config.slots is None:
            return 1
        if self.config.worker.remote and self.config.slots > info.worker_slots:
            _LOGGER.warning(
                "slots = %d, but the remote worker serves %d runtime context(s) (start it with --slots %d); using %d",
                self.config.slots,
                info.worker_slots,
                self.config.slots,
                info.worker_slots,
            )
            return info.worker_slots
        return self.config.slots

    async def _start_slot(self, index: int) -> tuple[_Slot, RuntimeInfo]:
        """Spawn (or connect to) one worker and load the model in it."""
        if self._spec is None:
            raise EngineUnavailableError("the engine is not started")
        config = self.config
        client = WorkerClient(
            config.worker,
            env=config.env,
            on_state=functools.partial(self._on_worker_state, index),
            restart_backoff_s=config.restart_backoff_s,
            abort_grace_s=config.abort_grace_s,
        )
        planner = PromptPlanner(
            template_family=self._family,
            context_length=config.context_length,
            default_max_new_tokens=config.max_new_tokens,
        )
        slot = _Slot(index=index, client=client, planner=planner)
        self._slots.append(slot)
        try:
            info = await client.start(self._spec)
        except BaseException:
            self._slots.remove(slot)
            with contextlib.suppress(Exception):
                await client.stop()
            raise
        return slot, info

    def _grow(self, count: int) -> None:
        """Load slots up to `count` in the background, one after another (two loads at once only compete)."""
        if self._grow_task is not None and not self._grow_task.done():
            return
        self._scheduler.set_slot_count(count)
        self._grow_task = asyncio.get_running_loop().create_task(self._load_slots(count), name="rkllm-slots")

    async def _load_slots(self, count: int) -> None:
        for index in range(len(self._slots), count):
            self._scheduler.set_slot_availability(index, "starting")
            started = time.monotonic()
            try:
                await self._start_slot(index)
            except EngineError as err:
                _LOGGER.warning("slot %d could not load the model (%s); serving with %d slot(s)", index, err, index)
                self._scheduler.set_slot_availability(index, "failed")
                return
            if self._stopping:
                return
            _LOGGER.info("slot %d loaded in %.1f s", index, time.monotonic() - started)
            self._scheduler.set_slot_availability(index, "ready")
            self._publish_slot(self._slots[index])

    def _maybe_grow_auto(self, perf: Perf) -> None:
        """`slots: auto`: after the first run, add a second slot when free memory holds the model once more.

        The model's size is the runtime's own figure (`perf.memory_usage_mb`); free memory is what the worker's
        host reports (docs/voice.md §2). [Inf] On Rockchip boards the NPU's memory is system RAM, so
        MemAvailable is the budget both copies share.
        """
        if self.config.slots is not None or len(self._slots) != 1 or self._grow_task is not None:
            return
        if self._worker_slots < AUTO_MAX_SLOTS or perf.memory_usage_mb <= 0:
            return
        self._grow_task = asyncio.get_running_loop().create_task(self._grow_if_memory(perf.memory_usage_mb))

    async def _grow_if_memory(self, model_mb: float) -> None:
        try:
            reply = await self._slots[0].client.call("stats")
        except EngineError:
            return
        available = reply.get("mem_available")
        needed_mb = model_mb + AUTO_SLOT_HEADROOM_MB
        if not isinstance(available, int) or available / (1024 * 1024) < needed_mb:
            _LOGGER.info(
                "slots auto: one slot (a second copy of the model needs %.0f MB, %s MB are available)",
                needed_mb,
                "unknown" if not isinstance(available, int) else f"{available / (1024 * 1024):.0f}",
            )
            return
        _LOGGER.info(
            "slots auto: %.0f MB available, loading a second copy of the model (%.0f MB)", available / 2**20, model_mb
        )
        self._grow_task = None
        self._grow(AUTO_MAX_SLOTS)

    async def _stop_slots(self) -> None:
        slots, self._slots = self._slots, []
        await asyncio.gather(*(slot.client.stop() for slot in slots), return_exceptions=True)

    def _publish_slot(self, slot: _Slot) -> None:
        """The slot's tools and KV fill in the metrics (the first slot's are the engine's own figures)."""
        metrics = self._scheduler.metrics
        slots = tuple(
            dataclasses.replace(entry, tools_loaded=slot.tools_loaded, kv_cache_tokens=slot.kv_tokens)
            if entry.index == slot.index
            else entry
            for entry in metrics.slots
        )
        if slot.index == 0:
            metrics = dataclasses.replace(metrics, tools_loaded=slot.tools_loaded, kv_cache_tokens=slot.kv_tokens)
        self._scheduler.update_metrics(dataclasses.replace(metrics, slots=slots))

    # -- worker supervision ------------------------------------------------------------------

    def _on_worker_state(self, index: int, state: WorkerState) -> None:
        """Follow one slot's worker: hold that slot while it restarts; the engine fails when the first one does."""
        slot = next((candidate for candidate in self._slots if candidate.index == index), None)
        if slot is None:
            return  # still starting (not in the list yet) or already stopped
        clients = [candidate.client for candidate in self._slots]
        restarts = sum(client.restarts for client in clients)
        failures = max((client.consecutive_failures for client in clients), default=0)
        restarting = any(client.state is WorkerState.RESTARTING for client in clients)
        metrics = dataclasses.replace(
            self._scheduler.metrics, restarts=restarts, consecutive_failures=failures, restarting=restarting
        )
        if state is WorkerState.RESTARTING:
            slot.planner.invalidate()
            slot.tools_loaded, slot.kv_tokens = (), None
            self._scheduler.update_metrics(dataclasses.replace(metrics, last_error=slot.client.last_error))
            self._scheduler.set_slot_availability(index, "restarting")
            self._publish_slot(slot)
            if self._started and not any(c.state is WorkerState.READY for c in clients):
                self._scheduler.set_base_state(EngineState.LOADING)
        elif state is WorkerState.READY and self._started and not self._stopping:
            if not restarting:
                metrics = dataclasses.replace(metrics, stall=None)  # a fresh worker: whatever hung is gone
            self._scheduler.update_metrics(metrics)
            self._scheduler.set_slot_availability(index, "ready")
            self._scheduler.set_base_state(EngineState.IDLE)
        elif state is WorkerState.FAILED and not self._stopping:
            reason = slot.client.last_error or self.last_problem() or "no reason recorded"
            if index != 0:
                _LOGGER.warning("slot %d failed and is not restarted any more: %s", index, reason)
                self._scheduler.update_metrics(metrics)
                self._scheduler.set_slot_availability(index, "failed")
                return
            self._scheduler.close(EngineUnavailableError(reason))
            self._scheduler.update_metrics(dataclasses.replace(metrics, restarting=False, stall=None))
            self._scheduler.set_base_state(EngineState.ERROR, last_error=reason)
            self._started = False  # FAILED is terminal for the client: the owner recovers with start()

    def last_problem(self) -> str | None:
        """The runtime's most recent error (or warning) line, or the worker's crash report: a one-line reason."""
        return logparse.last_problem_line(self.recent_log(), crash_reports=True)

    # -- one request -------------------------------------------------------------------------

    async def _serve(
        self, request: ChatRequest | CompletionRequest, ticket: Ticket, emit: Callable[[_Item], None]
    ) -> None:
        """Wait for the slot, run the request, and hand every event (or the error) to `emit`."""
        try:
            await ticket.wait_for_slot()
        except asyncio.CancelledError:
            emit(_END)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # the ticket was cancelled while queued: it already left the queue
        except EngineError as err:
            emit(err)
            return
        # The ticket holds the slot now. This is the one place that gives it back: every way out of the run
        # (a result, an engine error, a bug, a cancellation) passes the `finally`, which frees the slot first and
        # then hands the caller exactly one outcome; `_execute` resets the planner on every way out but success.
        outcome: _Item | None = _END
        answered = False

        def emit_run_events(item: _Item) -> None:
            nonlocal answered
            terminal = isinstance(item, BaseException) or (
                isinstance(item, list) and any(isinstance(event, Finished) for event in item)
            )
            answered = answered or terminal
            emit(item)

        try:
            finished = await self._execute(request, ticket, emit_run_events)
        except asyncio.CancelledError:
            raise
        except WorkerHungError as err:
            outcome = err
        except EngineError as err:
            outcome = EngineUnavailableError(STOPPED_MESSAGE) if self._stopping else err
        except Exception as err:  # a bug costs this request, never the slot
            _LOGGER.exception("generation failed unexpectedly")
            outcome = GenerationError(f"the generation failed: {type(err).__name__}: {err}")
        else:
            if finished:
                outcome = None  # Finished was emitted with the run's last events
            elif self._stopping:
                outcome = EngineUnavailableError(STOPPED_MESSAGE)
        finally:
            ticket.release()
            if outcome is not None and not answered:  # after Finished the caller has its one outcome
                emit(outcome)

    async def _execute(
        self, request: ChatRequest | CompletionRequest, ticket: Ticket, emit: Callable[[_Item], None]
    ) -> bool:
        """Run one request on the slot it holds; False when it was cancelled before it finished."""
        slot = next((candidate for candidate in self._slots if candidate.index == ticket.slot), None)
        if slot is None:
            raise EngineUnavailableError(STOPPED_MESSAGE)
        client, planner = slot.client, slot.planner
        granted_at = ticket.granted_at or time.monotonic()
        if client.state is not WorkerState.READY and not await self._wait_for_worker(client, ticket):
            return False
        plan = planner.plan(request)
        completed = False
        try:
            cached_tokens = await self._prepare(client, plan)
            self._update_tools_loaded(slot, plan, request)
            if ticket.abort_requested:
                return False
            result = await self._generate(slot, request, plan, ticket, granted_at, cached_tokens, emit)
            if result is None:
                return False
            parse_result, natural_end = result
            if natural_end:
                planner.on_run_finished(plan, parse_result)
                completed = True
                if parse_result.tool_calls and ticket.voice:
                    self._scheduler.reserve_for_turn(ticket)  # its tool results come back to this slot next
            return True
        finally:
            self._scheduler.set_resident(slot.index, planner.resident_key if completed else None)
            if not completed:
                planner.invalidate()

    @staticmethod
    async def _wait_for_worker(client: WorkerClient, ticket: Ticket) -> bool:
        """The slot was granted while the worker restarts: wait for it; False if the request is cancelled meanwhile.

        A restart can take a backoff plus a model load; a cancelled request (client gone, `Generation.cancel`,
        `Engine.stop`) must not sit through it holding the slot. A worker that fails for good raises.
        """
        waiting = asyncio.ensure_future(client.wait_ready(WORKER_READY_TIMEOUT_S))
        ticket.set_abort(waiting.cancel)
        try:
            await waiting
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if ticket.abort_requested and (current is None or not current.cancelling()):
                return False
            raise
        return True

    async def _prepare(self, client: WorkerClient, plan: PromptPlan) -> int:
        """Apply the plan's prep ops; return the tokens the run will reuse from the KV cache."""
        for op in plan.prep:
            if isinstance(op, SetFunctionTools):
                await client.call(
                    "set_function_tools",
                    system_prompt=op.system_prompt,
                    tools_json=op.tools_json,
                    tool_response_str=TOOL_RESPONSE_TAG,
                )
            elif isinstance(op, SetChatTemplate):
                await client.call(
                    "set_chat_template",
                    system_prompt=op.system_prompt,
                    prompt_prefix=op.prefix,
                    prompt_postfix=op.postfix,
                )
            elif isinstance(op, ClearKV):
                await client.call("clear_kv_cache", keep_system_prompt=op.keep_system_prompt)
        if not plan.turn.keep_history or plan.mode == "reset":
            return 0  # a new prefix reuses nothing, whatever the KV still counts of the old one (docs/voice.md §5)
        return await self._kv_size(client) or 0

    async def _kv_size(self, client: WorkerClient) -> int | None:
        reply = await client.call("get_kv_cache_size")
        sizes = reply.get("sizes")
        if isinstance(sizes, list) and sizes and isinstance(sizes[0], int):
            return sizes[0]
        return None

    async def _generate(
        self,
        slot: _Slot,
        request: ChatRequest | CompletionRequest,
        plan: PromptPlan,
        ticket: Ticket,
        granted_at: float,
        cached_tokens: int,
        emit: Callable[[_Item], None],
    ) -> tuple[ParseResult, bool] | None:
        """Stream one run through the parser and emit its events; returns (parse result, ended naturally)."""
        client = slot.client
        per_run = client.info is not None and client.info.profile == "v130"
        budget = request.max_new_tokens or self.config.max_new_tokens
        budget = max(1, min(budget, self.config.context_length - 1))
        enforce_budget = not per_run and budget < self.config.max_new_tokens
        runtime_budget = budget if per_run else self.config.max_new_tokens
        sampling = _sampling_dict(request.sampling) if per_run else None
        if not per_run and request.sampling != Sampling():
            _LOGGER.debug("per-request sampling ignored: the v1.2.x runtime only has init-time sampling")
        stream: RunStream = client.run(
            plan.turn.role,
            plan.turn.text,
            keep_history=plan.turn.keep_history,
            enable_thinking=plan.turn.enable_thinking,
            sampling=sampling,
            max_new_tokens=budget if per_run and request.max_new_tokens else 0,
        )
        abort_task: asyncio.Task[None] | None = None

        def abort_run() -> None:
            nonlocal abort_task
            if abort_task is None:
                abort_task = asyncio.get_running_loop().create_task(stream.abort(), name="rkllm-abort")

        ticket.set_abort(abort_run)
        single_call = isinstance(request, ChatRequest) and not request.parallel_tool_calls
        offered, forced = _offered_tools(request, plan)
        parser = OutputParser(
            tools_enabled=plan.tools_enabled,
            stop=request.stop,
            prefill=plan.prefill,
            max_tool_calls=1 if single_call else None,
            tool_names=offered,
            forced=forced,
        )
        watch = _SilenceWatch(self, self._watchdog().first_token(plan.estimated_prompt_tokens - cached_tokens))

        def pause_run(paused: bool) -> None:
            """A voice turn holds the NPU: hold this run in its token callback (docs/voice.md §3)."""
            watch.set_paused(paused)
            stream.pause(paused)

        ticket.set_pause(pause_run)
        try:
            seen = await self._consume(stream, parser, watch, emit, abort_run, budget if enforce_budget else None)
        except asyncio.CancelledError:
            await self._abort_after_cancel(stream, abort_task)
            raise
        except EngineError as err:
            if watch.fired is not None:  # the run failed because the watchdog killed its worker
                raise WorkerHungError(f"{watch.fired}; {err}") from err
            raise
        finally:
            watch.close()
            if abort_task is not None:
                with contextlib.suppress(Exception):
                    await abort_task
        if watch.fired is not None:
            raise WorkerHungError(f"{watch.fired}; the run was aborted")
        if ticket.abort_requested and not parser.stop_matched and not seen.budget_hit:
            return None  # cancelled by the caller (or by stop()): nothing more to report
        parse_result = parser.finish()
        first_event_at = seen.first_event_at
        if first_event_at is None and parse_result.events:
            first_event_at = time.monotonic()
        ttft_s = first_event_at - granted_at if first_event_at is not None else None
        finished = self._finished_event(
            request,
            plan,
            parse_result,
            stream.finished,
            _RunAccount(seen.pieces, cached_tokens, runtime_budget, seen.budget_hit, ttft_s),
        )
        self._check_result(request, plan, parse_result)
        self._scheduler.record_run(ttft_s=ttft_s, perf=finished.perf)
        _log_run(slot.index, plan, finished)
        # Before Finished: once the caller has it, the slot is released without another await.
        await self._refresh_kv_metric(slot)
        emit([*parse_result.events, finished])
        self._maybe_grow_auto(finished.perf)
        natural_end = stream.finished is not None and not stream.finished.aborted
        return parse_result, natural_end

    async def _consume(
        self,
        stream: RunStream,
        parser: OutputParser,
        watch: _SilenceWatch,
        emit: Callable[[_Item], None],
        abort_run: Callable[[], None],
        budget: int | None,
    ) -> _Consumed:
        """Feed the run's pieces to the parser and emit its events, under the silence watch.

        Stops taking pieces (and aborts the run) at a matched stop string, at `budget` pieces, or when the
        watchdog fires; the run's end (finish, error) ends the loop.
        """
        seen = _Consumed()
        stopping = False
        pieces_left = aiter(stream)
        pending: asyncio.Future[TextPiece] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(pieces_left))
                done, _ = await asyncio.wait({pending}, timeout=None if stopping else watch.wait_s())
                if not done:
                    if watch.on_silence():  # the watchdog fired: abort; the client kills the worker if it ignores it
                        stopping = True
                        abort_run()
                        # The caller learns it now, within the watchdog's bound; the slot stays held until the run
                        # has really ended (abort honoured, or the worker killed after its grace).
                        emit(WorkerHungError(f"{watch.fired}; {HUNG_RUN_ABORTED}"))
                    continue
                arrived, pending = pending, None
                try:
                    piece = arrived.result()
                except StopAsyncIteration:
                    return seen
                if stopping:
                    continue  # the abort is on its way; these tokens belong to nobody
                watch.on_progress(self._watchdog().next_token())
                seen.pieces += 1
                events = parser.feed(piece.text)
                if events:
                    if seen.first_event_at is None:
                        seen.first_event_at = time.monotonic()
                    emit(events)
                if parser.stop_matched:
                    stopping = True
                    abort_run()
                elif budget is not None and seen.pieces >= budget:
                    stopping = seen.budget_hit = True
                    abort_run()
        except asyncio.CancelledError:
            if pending is not None:
                pending.cancel()
            raise

    def _finished_event(
        self,
        request: ChatRequest | CompletionRequest,
        plan: PromptPlan,
        parse_result: ParseResult,
        run_end: RunFinished | None,
        account: _RunAccount,
    ) -> Finished:
        """The Finished event: finish reason, usage and perf of one run (rules in the module docstring)."""
        perf = run_end.perf if run_end is not None else Perf()
        aborted = run_end is None or run_end.aborted
        length_hit = account.budget_hit or (not aborted and perf.generate_tokens >= account.runtime_budget)
        completion_tokens = perf.generate_tokens if perf.generate_tokens or not account.pieces else account.pieces
        prefill_tokens = perf.prefill_tokens
        cached_tokens = account.cached_tokens
        if run_end is not None and run_end.kv_reused is not None and not plan.turn.keep_history:
            # A run from a fresh prompt: the runtime said itself how much of it the KV already held (docs/voice.md §5).
            cached_tokens = run_end.kv_reused
        if aborted and prefill_tokens == 0:
            # [Inf] no FINISH (so no perf) after an abort (docs/runtime.md §4.3): use the planner's estimate.
            prefill_tokens = max(0, plan.estimated_prompt_tokens - cached_tokens)
        return Finished(
            finish_reason=self._finish_reason(request, parse_result, length_hit=length_hit),
            usage=Usage(
                prompt_tokens=prefill_tokens + cached_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached_tokens,
            ),
            perf=dataclasses.replace(perf, ttft_s=account.ttft_s),
            tool_calls=parse_result.tool_calls,
        )

    def _watchdog(self) -> ProgressWatchdog:
        """The watchdog's bounds from the user's settings and the latest measured rates."""
        metrics = self._scheduler.metrics
        return ProgressWatchdog(
            min_s=self.config.watchdog_min_s,
            factor=self.config.watchdog_factor,
            prefill_tokens_per_s=metrics.prefill_tokens_per_s,
            decode_tokens_per_s=metrics.decode_tokens_per_s,
        )

    def _set_stall(self, stall: str | None, *, fired: bool = False) -> None:
        """Publish (or clear) the stall that makes the health `degraded`."""
        metrics = self._scheduler.metrics
        fired_count = metrics.watchdog_fired + (1 if fired else 0)
        if metrics.stall != stall or fired:
            self._scheduler.update_metrics(dataclasses.replace(metrics, stall=stall, watchdog_fired=fired_count))

    async def _abort_after_cancel(self, stream: RunStream, abort_task: asyncio.Task[None] | None) -> None:
        """The serving task itself was cancelled mid-run: abort and wait for the run to end."""
        try:
            if abort_task is None:
                await stream.abort()
            else:
                await abort_task
        except Exception as err:  # noqa: BLE001 - we are unwinding a cancellation; log and go on
            _LOGGER.warning("abort after cancellation failed: %s", err)

    @staticmethod
    def _finish_reason(
        request: ChatRequest | CompletionRequest, result: ParseResult, *, length_hit: bool
    ) -> FinishReason:
        if result.tool_calls:
            named = isinstance(request, ChatRequest) and request.tool_choice not in ("auto", "none", "required")
            return "stop" if named else "tool_calls"
        if result.stop_matched:
            return "stop"
        if length_hit:
            return "length"
        return "stop"

    @staticmethod
    def _check_result(request: ChatRequest | CompletionRequest, plan: PromptPlan, result: ParseResult) -> None:
        """Log what the model got wrong; a forced tool choice without a call of an offered tool is an error."""
        for name in result.unknown_calls:
            _LOGGER.warning("the model called %r, a tool this request did not offer; the call was not returned", name)
        for raw in result.malformed_calls:
            _LOGGER.warning("the model wrote a tool call that is not a valid call; returned as text: %.200s", raw)
        if not isinstance(request, ChatRequest) or result.tool_calls or result.truncated_call:
            return  # a call cut off by the token budget ends with finish_reason "length", as OpenAI's would
        if request.tool_choice not in ("auto", "none") and request.tools:
            wrote = f"; it called {', '.join(map(repr, result.unknown_calls))}" if result.unknown_calls else ""
            raise GenerationError(
                f"tool_choice {request.tool_choice!r}: the model produced no valid call of an offered tool "
                f"(plan {plan.mode}{wrote})"
            )

    async def _refresh_kv_metric(self, slot: _Slot) -> None:
        try:
            slot.kv_tokens = await self._kv_size(slot.client)
        except EngineError:
            return
        self._publish_slot(slot)

    def _update_tools_loaded(self, slot: _Slot, plan: PromptPlan, request: ChatRequest | CompletionRequest) -> None:
        """A slot's `tools_loaded` = names of the tools in its resident static prefix."""
        tools: tuple[str, ...] | None = None
        for op in plan.prep:
            if isinstance(op, SetFunctionTools):
                tools = _tool_names(op.tools_json)
            elif isinstance(op, SetChatTemplate):
                forced_tools = request.tools if isinstance(request, ChatRequest) and plan.mode == "forced" else []
                tools = _tool_names(json.dumps(forced_tools))
        if tools is not None:
            slot.tools_loaded = tools
            self._publish_slot(slot)
