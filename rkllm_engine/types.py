"""The engine's contract: requests in, events out, metrics and typed errors.

Both the conversation agent and the OpenAI API speak only these types, so one
mechanism serves both (docs/architecture.md, "one event type flows up").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


class Priority(enum.IntEnum):
    """Lower value is served first: voice/Assist turns go before API clients (docs/voice.md).

    CONVERSATION: a conversation agent's turn (voice or typed Assist): never refused for API traffic, served on
    the voice slot, pauses other generations. API: the OpenAI-compatible API (also its agent models). BACKGROUND:
    work nobody waits for in real time (AI tasks from automations).
    """

    CONVERSATION = 0
    API = 1
    BACKGROUND = 2


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call as the model produced it (or as a client sent it back in history)."""

    id: str
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, OpenAI-shaped but independent of any wire format."""

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # tool name for role="tool"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Per-request sampling; None fields keep the runtime's init values."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


ToolChoice = Literal["auto", "none", "required"] | str  # any other str = the name of a forced tool


@dataclass(slots=True)
class ChatRequest:
    """A chat turn to generate.

    `tools` are OpenAI function tools (`{"type": "function", "function": {...}}`).
    `dynamic_context` is text that changes every request (time, live state); it is
    placed after the static prefix so the prefix can stay resident in the KV cache
    (docs/architecture.md decision 6).
    """

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    enable_thinking: bool = False
    dynamic_context: str | None = None
    priority: Priority = Priority.API
    json_mode: bool = False  # response_format json_object/json_schema: an instruction in the turn; caller validates
    turn_id: str | None = None  # the conversation turn this round belongs to: its rounds keep their slot


@dataclass(slots=True)
class CompletionRequest:
    """A legacy completion: the raw prompt reaches the model with no chat template."""

    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    priority: Priority = Priority.API


# ---------------------------------------------------------------------------
# Events (what `Engine.generate` yields, in order)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Visible assistant text; never retracted later."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Text inside <think>…</think>; never spoken, optionally shown as reasoning."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call began: id and name are final; arguments follow as fragments."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgsDelta:
    """A fragment of the call's arguments JSON; fragments concatenate to valid JSON."""

    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """The call is complete; `arguments` is the whole arguments JSON (an object)."""

    index: int
    arguments: str


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting from the runtime's perf struct."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion, as OpenAI reports it."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Perf:
    """The runtime's RKLLMPerfStat for one run, plus engine-side timing."""

    prefill_time_ms: float = 0.0
    prefill_tokens: int = 0
    generate_time_ms: float = 0.0
    generate_tokens: int = 0
    memory_usage_mb: float = 0.0
    ttft_s: float | None = None  # request admitted → first token, measured by the engine


@dataclass(frozen=True, slots=True)
class Finished:
    """Always the last event of a successful generation."""

    finish_reason: FinishReason
    usage: Usage
    perf: Perf
    tool_calls: tuple[ToolCall, ...] = ()  # the complete calls, in index order


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Finished


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


HealthStatus = Literal["healthy", "degraded", "unhealthy", "loading"]
SlotState = Literal["starting", "idle", "generating", "paused", "restarting", "failed"]


@dataclass(frozen=True, slots=True)
class SlotMetrics:
    """One runtime context ("slot"): what it serves, what it does, which tools are resident in its prefix."""

    index: int
    role: Literal["voice", "general", "any"]
    state: SlotState = "starting"
    tools_loaded: tuple[str, ...] = ()
    kv_cache_tokens: int | None = None


class EngineState(enum.StrEnum):
    """What the NPU slot is doing, for /health and the status sensor."""

    STOPPED = "stopped"
    LOADING = "loading"
    IDLE = "idle"
    GENERATING = "generating"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """A snapshot of live figures; cheap to read, never blocks on the runtime."""

    state: EngineState
    queue_depth: int = 0
    last_ttft_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    kv_cache_tokens: int | None = None
    context_length: int | None = None
    restarts: int = 0
    requests_served: int = 0
    runtime_version: str | None = None
    abi_profile: str | None = None
    driver_version: str | None = None
    platform: str | None = None
    last_error: str | None = None
    tools_loaded: tuple[str, ...] = ()
    consecutive_failures: int = 0  # worker crashes, kills and failed restarts since the last finished run
    restarting: bool = False  # the worker died after it had been ready and is being brought back
    stall: str | None = None  # a run is past its expected time (or the watchdog just ended one): why
    watchdog_fired: int = 0  # runs the no-progress watchdog ended since the engine started
    slots: tuple[SlotMetrics, ...] = ()
    last_voice_response_s: float | None = None  # a conversation turn: command received → first spoken text
    toolkit_version: str | None = None  # rkllm-toolkit version the loaded model was converted with

    @property
    def kv_usage(self) -> float | None:
        """KV cache fill as a fraction of the context (0..1)."""
        if self.kv_cache_tokens is None or not self.context_length:
            return None
        return self.kv_cache_tokens / self.context_length

    @property
    def health(self) -> HealthStatus:
        """One word for /health, the status sensor and diagnostics (docs/robustness.md §4).

        healthy: a request would be served now. degraded: served, but something is wrong right now (a run is
        past its expected time, the watchdog ended one, the worker is restarting). unhealthy: nothing is served
        until someone acts (crash loop, init failure) or the engine is stopped. loading: the first load.
        """
        if self.state in (EngineState.ERROR, EngineState.STOPPED):
            return "unhealthy"
        if self.state is EngineState.LOADING:
            return "degraded" if self.restarting else "loading"
        return "degraded" if self.stall else "healthy"

    @property
    def health_reason(self) -> str | None:
        """Why the health is not `healthy` (None when it is)."""
        health = self.health
        if health == "healthy":
            return None
        if health == "degraded" and self.stall and not self.restarting:
            return self.stall
        if health == "loading":
            return "the model is loading"
        if self.state is EngineState.STOPPED:
            return "the engine is stopped"
        return self.last_error or self.stall or "no reason recorded"


# ---------------------------------------------------------------------------
# Errors (each carries a one-line, specific message)
# ---------------------------------------------------------------------------


class EngineError(Exception):
    """Base of every error the engine raises to its callers."""

    code: str = "engine_error"


class QueueFullError(EngineError):
    """The bounded queue is full; retry after `retry_after_s`."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


UnavailableReason = Literal[
    "unavailable",  # loading, stopped, or failed and restarting: nothing the user set is wrong
    "worker_unreachable",  # no connection, no answer, or a broken handshake
    "secret_refused",  # the remote worker refused (or we have no) shared secret
    "worker_busy",  # the remote worker serves another client
    "worker_start_failed",  # the local worker could not be spawned, or died while loading
    "npu_out_of_memory",  # the runtime could not get NPU memory; another process may free it
    "worker_unverified",  # the remote worker could not prove it knows the shared secret (treated like a wrong one)
    "fingerprint_mismatch",  # the remote worker's TLS certificate is not the pinned one
    "tls_mismatch",  # one side speaks TLS and the other does not (fingerprint set, or missing, in HA)
]
IncompatibleReason = Literal[
    "library_missing",  # librkllmrt is not at the configured path
    "library_unsupported",  # not librkllmrt, wrong CPU, cannot be loaded, or a version rkllm cannot drive
    "profile_mismatch",  # the ABI override is unknown or contradicts the library's version
    "model_invalid",  # the model file is missing/unreadable, or the runtime refused it
    "model_platform_mismatch",  # the model was converted for another SoC
    "init_failed",  # rkllm_init refused the settings (context length, CPU cores …)
    "protocol_mismatch",  # the worker speaks another protocol version (install the same rkllm on both sides)
    "path_not_allowed",  # the worker was not started with this library/model (--library, --model, --models-dir)
]


class EngineUnavailableError(EngineError):
    """Transient: the model is loading or stopped, the worker cannot be reached, or it is restarting.

    `reason` says why in a stable word, so callers (HA setup, the config flow) never match message text;
    retrying later can help for every reason.
    """

    code = "unavailable"

    def __init__(
        self, message: str, reason: UnavailableReason = "unavailable", details: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.reason: UnavailableReason = reason
        self.details: dict[str, str] = dict(details or {})


class RuntimeIncompatibleError(EngineError):
    """Permanent: the library, the model or the worker cannot work with these settings; retrying cannot help.

    `reason` picks the repair or form error; `details` holds the facts behind it (`path`, `version`,
    `runtime_line` - the runtime's own `E rkllm:` line - …) for the repair text.
    """

    code = "runtime_incompatible"

    def __init__(self, message: str, reason: IncompatibleReason, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason: IncompatibleReason = reason
        self.details: dict[str, str] = dict(details or {})


class WorkerCrashedError(EngineError):
    """The worker died (crash, EOF, watchdog kill) while this request was in flight."""

    code = "worker_crashed"


class ContextOverflowError(EngineError):
    """The prompt does not fit the context window."""

    code = "context_length_exceeded"

    def __init__(self, message: str, prompt_tokens: int | None = None, context_length: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class WorkerHungError(EngineError):
    """The no-progress watchdog ended this run: no token, no finish within its bound (docs/robustness.md §2)."""

    code = "worker_hung"


class GenerationError(EngineError):
    """The runtime reported an error state for this run."""

    code = "generation_error"


class InvalidRequestError(EngineError):
    """The request cannot be served as given (e.g. a forced tool that is not offered).

    `param` names the offending part of the request when it is known (`tools[2].function.parameters`), for the
    API's error body.
    """

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
