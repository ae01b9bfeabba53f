"""`Runtime`: one librkllmrt handle behind a typed, exception-raising Python API (docs/CONTRACT.md, "Binding").

Everything a crash-prone C API needs is handled here and nowhere else: every struct is zero-initialised and
every field set, every buffer the library may read is kept alive, one ctypes callback lives as long as the
handle and never raises into C, and each run's events reach only that run's sink.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from . import abi
from .abi import AbiProfile, CallbackReturn, LLMCallState, ProfileName
from .detect import LibraryIdentity, identify_library
from .errors import (
    InvalidInputError,
    InvalidParameterError,
    LibraryLoadError,
    LoraAdapterFileError,
    ModelFileError,
    PromptCacheFileError,
    RkllmError,
    RuntimeBusyError,
    RuntimeCallError,
    RuntimeInitError,
    RuntimeNotInitializedError,
    UnsupportedOnProfileError,
)

_LOGGER = logging.getLogger(__name__)

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_N_BATCH_MAX: Final = 100  # `E rkllm: The n_batch must be between 1 and 100` (docs/runtime.md Appendix A)
_CPU_COUNT_MAX: Final = 8
_MIROSTAT_MODES: Final = (0, 1, 2)
_DESTROY_WAIT_S: Final = 30.0
_ABORT_ENTRY_WAIT_S: Final = 1.0
_NO_ERROR_TEXT: Final = "librkllmrt reported an error state for this run (no message)"

Role = Literal["user", "tool"]


# ---------------------------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RuntimeParams:
    """Init settings (RKLLMParam + RKLLMExtendParam); defaults are the documented ones (docs/runtime.md §4.5)."""

    model_path: str | Path
    max_context_len: int = 4096
    max_new_tokens: int = 512  # -1 = unlimited
    top_k: int = 40
    top_p: float = 0.9
    temperature: float = 0.8
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    n_keep: int = -1  # -1 = runtime default (keep the system prompt when the context shifts)
    skip_special_token: bool = True
    ignore_eos_token: bool = False  # 1.3.0 only
    base_domain_id: int = 0
    embed_flash: bool = True
    enabled_cpus_num: int = 4
    enabled_cpus_mask: int = 0xF0  # CPU4..CPU7: the big cores of RK3588/RK3576, as the official demos use
    n_batch: int = 1
    use_cross_attn: bool = False


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-run sampling (RKLLMSamplingParam, 1.3.0 only); every field replaces the init value for one run."""

    top_k: int = 40
    top_p: float = 0.9
    temperature: float = 0.8
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    @classmethod
    def from_params(cls, params: RuntimeParams) -> SamplingParams:
        """The init values, so a caller can override a few fields with `dataclasses.replace`."""
        return cls(
            top_k=params.top_k,
            top_p=params.top_p,
            temperature=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            mirostat=params.mirostat,
            mirostat_tau=params.mirostat_tau,
            mirostat_eta=params.mirostat_eta,
        )


@dataclass(frozen=True, slots=True)
class RunInput:
    """One turn for rkllm_run: PROMPT text (wrapped in the chat template by the runtime) or raw TOKEN ids."""

    role: Role
    text: str | None = None
    token_ids: Sequence[int] | None = None
    enable_thinking: bool = False


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Per-run settings (RKLLMInferParam). `sampling`/`max_new_tokens` need ABI v130 (`profile.per_run_sampling`)."""

    keep_history: bool = False
    sampling: SamplingParams | None = None
    max_new_tokens: int = 0  # 0 = the init value
    lora_name: str | None = None
    save_prompt_cache_path: str | None = None


@dataclass(frozen=True, slots=True)
class PerfStat:
    """RKLLMPerfStat of one run, as delivered with the FINISH callback."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float


class RunSink(Protocol):
    """Receives one run's events, on the thread that runs the callback; must be quick and must not block.

    `on_text` returns True to pause the run (the runtime keeps the KV cache). A sink may call `Runtime.abort()`.
    No method is called after `Runtime.run` has returned.
    """

    def on_text(self, text: str, token_id: int) -> bool:
        """Visible decoded text of one or more tokens; True = pause."""
        ...

    def on_finish(self, perf: PerfStat) -> None:
        """The runtime finished this input (FINISH state); `perf` is its statistics."""
        ...

    def on_error(self, message: str) -> None:
        """The runtime reported the ERROR state, with its message when it gave one."""
        ...


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended, after rkllm_run returned.

    - `aborted`: `abort()` was called during this run; the return code is then not an error.
    - `paused`: the sink asked to pause; the KV cache holds the run so far.
    - `perf`: from the FINISH callback, None when there was none (abort, error).
    - `error`: the ERROR state's message when the runtime reported one (then a non-zero return code is not raised).
    """

    return_code: int
    aborted: bool
    paused: bool
    perf: PerfStat | None
    error: str | None


# ---------------------------------------------------------------------------------------------------------------
# Callback routing
# ---------------------------------------------------------------------------------------------------------------


class _RunState:
    """The state of one run as the callback sees it.

    `lock` orders deliveries against abort() and the run's end. It is re-entrant because a sink may call
    `Runtime.abort()` from inside a delivery.
    """

    __slots__ = (
        "abort_requested",
        "closed",
        "decoder",
        "error",
        "last_token_id",
        "lock",
        "native_abort",
        "paused",
        "perf",
        "sink",
        "sink_exception",
        "token",
    )

    def __init__(self, token: int, sink: RunSink, native_abort: Callable[[], object]) -> None:
        self.token = token
        self.sink = sink
        self.native_abort = native_abort
        # errors="replace" substitutes only bytes that can never become valid UTF-8; an incomplete sequence at
        # the end of a fragment stays buffered until the next fragment, or until FINISH flushes it.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.lock = threading.RLock()
        self.closed = False
        self.abort_requested = False
        self.paused = False
        self.perf: PerfStat | None = None
        self.error: str | None = None
        self.last_token_id = -1
        self.sink_exception: BaseException | None = None

    @property
    def silenced(self) -> bool:
        """No more sink calls: the run ended, was aborted, or its sink failed."""
        return self.closed or self.abort_requested or self.sink_exception is not None

    def deliver(self, result: abi.RKLLMResult | None, state: int) -> int:
        """Turn one callback into sink calls; returns the value for the runtime (0 continue, 1 pause)."""
        with self.lock:
            if self.silenced:
                # Not "pause": a paused run makes the next run append to its KV (§4.2), which an abort must not.
                return CallbackReturn.CONTINUE
            try:
                return self._deliver_locked(result, state)
            except Exception as exc:  # noqa: BLE001 - a failing sink aborts the run; run() re-raises it
                self.sink_exception = exc
                self.abort_requested = True
                self.native_abort()
                return CallbackReturn.CONTINUE

    def _deliver_locked(self, result: abi.RKLLMResult | None, state: int) -> int:
        if state == LLMCallState.RKLLM_RUN_NORMAL:
            if result is None or result.text is None:  # text may be NULL (docs/runtime.md §4.2)
                return CallbackReturn.CONTINUE
            self.last_token_id = result.token_id
            piece = self.decoder.decode(result.text, final=False)
            if piece and self.sink.on_text(piece, result.token_id):
                self.paused = True
                return CallbackReturn.PAUSE
            return CallbackReturn.CONTINUE
        if state == LLMCallState.RKLLM_RUN_WAITING:
            # The character is incomplete; the runtime joins it with the next NORMAL text (§4.2).
            return CallbackReturn.CONTINUE
        if state == LLMCallState.RKLLM_RUN_FINISH:
            tail = self.decoder.decode(b"", final=True)
            if tail:
                self.sink.on_text(tail, self.last_token_id)
            self.perf = _perf_from(result)
            self.sink.on_finish(self.perf)
            return CallbackReturn.CONTINUE
        if state == LLMCallState.RKLLM_RUN_ERROR:
            text = None if result is None else result.text
            message = _NO_ERROR_TEXT if not text else " ".join(text.decode("utf-8", errors="replace").split())
            self.error = message
            self.sink.on_error(message)
            return CallbackReturn.CONTINUE
        _LOGGER.debug("ignoring callback state %d", state)
        return CallbackReturn.CONTINUE


def _perf_from(result: abi.RKLLMResult | None) -> PerfStat:
    if result is None:
        return PerfStat(0.0, 0, 0.0, 0, 0.0)
    perf = result.perf
    return PerfStat(
        prefill_time_ms=float(perf.prefill_time_ms),
        prefill_tokens=int(perf.prefill_tokens),
        generate_time_ms=float(perf.generate_time_ms),
        generate_tokens=int(perf.generate_tokens),
        memory_usage_mb=float(perf.memory_usage_mb),
    )


class _CallbackRouter:
    """The target of the Runtime's single ctypes callback: routes by the run's userdata token.

    It holds no reference to the Runtime, so the callback object does not keep the Runtime alive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[int, _RunState] = {}

    def register(self, run: _RunState) -> None:
        with self._lock:
            self._runs[run.token] = run

    def close(self, run: _RunState) -> None:
        """Remove the run; after this returns no delivery for it is in progress or can start."""
        with self._lock:
            self._runs.pop(run.token, None)
        with run.lock:
            run.closed = True

    def __call__(self, result_pointer: Any, userdata: int | None, state: int) -> int:
        """Never raises into C: any failure is logged and the runtime is told to continue."""
        try:
            with self._lock:
                run = self._runs.get(userdata or 0)
            if run is None:
                return int(CallbackReturn.CONTINUE)
            result = result_pointer.contents if result_pointer else None
            return int(run.deliver(result, state))
        except BaseException:  # an exception must never propagate into the C runtime
            _LOGGER.exception("unexpected failure in the librkllmrt result callback")
            return int(CallbackReturn.CONTINUE)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _fill(struct: ctypes.Structure, values: Mapping[str, object]) -> None:
    """Set every field of a zero-initialised struct; a missing or unknown name is a bug, caught here."""
    names = {field_spec[0] for field_spec in struct._fields_}
    missing = names - values.keys()
    unknown = values.keys() - names
    if missing or unknown:
        raise RuntimeError(f"{type(struct).__name__}: unset fields {sorted(missing)}, unknown {sorted(unknown)}")
    for name, value in values.items():
        setattr(struct, name, value)


def _c_string(setting: str, text: str) -> bytes:
    """UTF-8 bytes for a `const char*`; an embedded NUL would silently cut the string in C."""
    if "\x00" in text:
        raise InvalidInputError(f"{setting} contains a NUL character at index {text.index(chr(0))}")
    return text.encode("utf-8")


def _check_int(setting: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameterError(setting, f"must be an integer in {low}..{high}, got {value!r}")


def _check_float(setting: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(setting, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParameterError(setting, f"must be between {low} and {high}, got {value!r}")


def _check_sampling(prefix: str, sampling: SamplingParams | RuntimeParams) -> None:
    _check_int(f"{prefix}top_k", sampling.top_k, 0, _INT32_MAX)
    _check_float(f"{prefix}top_p", sampling.top_p, 0.0, 1.0)
    _check_float(f"{prefix}temperature", sampling.temperature, 0.0, math.inf)
    _check_float(f"{prefix}repeat_penalty", sampling.repeat_penalty, 0.0, math.inf)
    _check_float(f"{prefix}frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)
    _check_float(f"{prefix}presence_penalty", sampling.presence_penalty, -2.0, 2.0)
    if sampling.mirostat not in _MIROSTAT_MODES or isinstance(sampling.mirostat, bool):
        raise InvalidParameterError(f"{prefix}mirostat", f"must be 0 (off), 1 or 2, got {sampling.mirostat!r}")
    _check_float(f"{prefix}mirostat_tau", sampling.mirostat_tau, 0.0, math.inf)
    _check_float(f"{prefix}mirostat_eta", sampling.mirostat_eta, 0.0, math.inf)


def _sampling_values(sampling: SamplingParams | RuntimeParams) -> dict[str, object]:
    return {
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "temperature": sampling.temperature,
        "repeat_penalty": sampling.repeat_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "mirostat": sampling.mirostat,
        "mirostat_tau": sampling.mirostat_tau,
        "mirostat_eta": sampling.mirostat_eta,
    }


def _dlopen_hint(reason: str) -> str:
    """A hint for the dlopen failures users actually hit (docs/runtime.md §9)."""
    if "GLIBC" in reason or "ld-linux" in reason or "symbol not found" in reason:
        return (
            "; librkllmrt needs glibc >= 2.29, libgomp and libstdc++: Home Assistant OS and the official container "
            "are musl-based, so run the rkllm worker on a glibc host and point the integration at it"
        )
    if "wrong ELF class" in reason:
        return "; the library is built for another word size (32-bit armhf vs 64-bit aarch64)"
    if "libgomp" in reason:
        return "; install libgomp1 (GNU OpenMP), which librkllmrt links against"
    return ""


def _readable_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None when it can."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable by this user"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------------------------


class Runtime:
    """One librkllmrt handle. Thread-safe where it matters: `abort()` and `is_running()` from any thread.

    Use it as a context manager, or call `destroy()`; either releases the handle exactly once.
    """

    def __init__(self, library_path: str | Path, profile: ProfileName | None = None) -> None:
        path = Path(library_path)
        self.identity: LibraryIdentity = identify_library(path, profile)
        self.profile: AbiProfile = abi.PROFILES[self.identity.profile]
        self.version: str = self.identity.version
        self.library_path = path
        try:
            self._cdll = ctypes.CDLL(str(path))
        except OSError as exc:
            reason = " ".join(str(exc).split())
            raise LibraryLoadError(path, reason + _dlopen_hint(reason)) from None
        try:
            self._lib = self.profile.bind(self._cdll)
        except AttributeError as exc:
            raise LibraryLoadError(path, f"missing exported function ({exc})") from None
        self._router = _CallbackRouter()
        # The one callback object: it must outlive the handle, so it lives as long as this Runtime.
        self._callback = abi.LLMResultCallback(self._router)
        self._callback_struct: abi.RKLLMCallback | None = None
        if self.profile.callback_struct is not None:
            callbacks = abi.RKLLMCallback()
            _fill(
                callbacks,
                {
                    "result_callback": self._callback,
                    "result_userdata": None,
                    "tokenizer_callback": abi.LLMTokenizerCallback(),  # NULL: the model has its own tokenizer
                    "tokenizer_userdata": None,
                    "embed_callback": abi.LLMGetEmbedCallback(),  # NULL: the model has its own embedding layer
                    "embed_userdata": None,
                },
            )
            self._callback_struct = callbacks
        self._handle: ctypes.c_void_p | None = None
        self._params: RuntimeParams | None = None
        self._run_lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._run_tokens = itertools.count(1)
        self._active_run: _RunState | None = None
        # Every buffer the library may keep a pointer to, kept alive as long as it may read it.
        self._param_struct: ctypes.Structure | None = None
        self._model_path_bytes: bytes | None = None
        self._tools_bytes: tuple[bytes, bytes, bytes] | None = None
        self._template_bytes: tuple[bytes, bytes, bytes] | None = None
        self._prompt_cache_path_bytes: bytes | None = None
        self._lora_adapters: dict[str, tuple[abi.RKLLMLoraAdapter, bytes, bytes]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    @property
    def initialized(self) -> bool:
        """True between a successful init() and destroy()."""
        return self._handle is not None

    @property
    def params(self) -> RuntimeParams | None:
        """The settings of the last successful init()."""
        return self._params

    def init(self, params: RuntimeParams) -> None:
        """Load the model (rkllm_init); raises ModelFileError, InvalidParameterError or RuntimeInitError."""
        with self._lifecycle_lock:
            if self._handle is not None:
                raise RuntimeInitError(
                    f"the runtime is already initialized with {self._model_path_bytes!r}; destroy() it first",
                    model_path=params.model_path,
                )
            model_path = Path(params.model_path)
            problem = _readable_file(model_path)
            if problem is not None:
                raise ModelFileError(model_path, problem)
            self._validate_params(params)
            path_bytes = _c_string("model_path", str(model_path))
            struct = self._build_param_struct(params, path_bytes)
            handle = ctypes.c_void_p()
            if self._callback_struct is not None:
                return_code = self._lib.init(
                    ctypes.byref(handle), ctypes.byref(struct), ctypes.byref(self._callback_struct)
                )
            else:
                return_code = self._lib.init(ctypes.byref(handle), ctypes.byref(struct), self._callback)
            if return_code != 0:
                raise RuntimeInitError(
                    f"rkllm_init failed for model {model_path} (return code {return_code}); the runtime logs the "
                    "reason as an 'E rkllm:' line",
                    model_path=model_path,
                    return_code=return_code,
                )
            if not handle.value:
                # A community report: ret 0 with a NULL handle under NPU out-of-memory (docs/runtime.md §2.4).
                raise RuntimeInitError(
                    f"rkllm_init returned 0 but no handle for model {model_path} (NPU out of memory?)",
                    model_path=model_path,
                    return_code=return_code,
                )
            self._handle = handle
            self._params = params
            self._param_struct = struct
            self._model_path_bytes = path_bytes

    def destroy(self) -> None:
        """Release the handle (rkllm_destroy); aborts a running generation first. Safe to call twice."""
        with self._lifecycle_lock:
            handle = self._handle
            if handle is None:
                return
            self.abort()
            if not self._run_lock.acquire(timeout=_DESTROY_WAIT_S):
                raise RuntimeBusyError(
                    f"cannot destroy the runtime: a run did not end within {_DESTROY_WAIT_S:.0f} s after rkllm_abort"
                )
            try:
                self._handle = None
                return_code = self._lib.destroy(handle)
            finally:
                self._run_lock.release()
            self._tools_bytes = None
            self._template_bytes = None
            self._prompt_cache_path_bytes = None
            self._lora_adapters.clear()
            if return_code != 0:
                raise RuntimeCallError("rkllm_destroy", return_code)

    # -- generation -----------------------------------------------------------------------------------------------

    def run(self, inp: RunInput, opts: RunOptions, sink: RunSink) -> RunOutcome:
        """Run one turn (rkllm_run, blocking, GIL released); events go to `sink` until this returns.

        A non-zero return code raises RuntimeCallError, except after abort() (`aborted=True`) or when the
        runtime already delivered the ERROR state (`error` set, and the sink got on_error).
        """
        handle = self._require_handle()
        params = self._params
        if params is not None and params.n_batch != 1:
            raise InvalidParameterError(
                "n_batch", f"run() passes one input, but the runtime was initialized with {params.n_batch}"
            )
        # The structs and every buffer they point at stay referenced by these locals until rkllm_run returned.
        input_struct, _input_buffers = self._build_input(inp)
        infer_struct, _infer_buffers = self._build_infer_param(opts)
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeBusyError("a run is already in progress on this runtime; runs are one at a time")
        try:
            run = _RunState(next(self._run_tokens), sink, lambda: self._lib.abort(handle))
            self._router.register(run)
            self._active_run = run
            try:
                return_code = self._lib.run(
                    handle, ctypes.byref(input_struct), ctypes.byref(infer_struct), ctypes.c_void_p(run.token)
                )
            finally:
                self._active_run = None
                self._router.close(run)
        finally:
            self._run_lock.release()
        if run.sink_exception is not None:
            raise run.sink_exception
        if return_code != 0 and not run.abort_requested and run.error is None:
            raise RuntimeCallError("rkllm_run", return_code)
        return RunOutcome(
            return_code=return_code,
            aborted=run.abort_requested,
            paused=run.paused,
            perf=run.perf,
            error=run.error,
        )

    def abort(self) -> None:
        """Stop the current run (rkllm_abort) from any thread, the sink included; a no-op when nothing runs.

        The sink gets no further events once this returns. The run ends at the runtime's next token or prefill
        boundary (cooperative, docs/runtime.md §4.3); run() then returns with `aborted=True`.
        """
        run = self._active_run
        handle = self._handle
        if run is None or handle is None:
            return
        with run.lock:  # waits for a delivery in progress on the run's thread
            run.abort_requested = True
        self._wait_for_native_run(run, handle)
        return_code = self._lib.abort(handle)
        if return_code != 0 and self._active_run is run:
            raise RuntimeCallError("rkllm_abort", return_code)

    def _wait_for_native_run(self, run: _RunState, handle: ctypes.c_void_p) -> None:
        """Wait (briefly) until rkllm_run has really started: an abort before that would be forgotten.

        [Inf] rkllm_is_running is 1 while a run is in progress (docs/runtime.md §2.4, I#502). Whether the real
        runtime drops an abort that comes before rkllm_run starts is undocumented; the emulator drops it.
        """
        deadline = time.monotonic() + _ABORT_ENTRY_WAIT_S
        while not run.closed and not self._lib.is_running(handle) and time.monotonic() < deadline:
            time.sleep(0.001)

    def is_running(self) -> bool:
        """True while run() is inside rkllm_run (tracked in Python, so it holds for every runtime version)."""
        return self._active_run is not None

    def native_is_running(self) -> bool:
        """rkllm_is_running: 1 while running [Inf] (the 1.2.x header comment says the opposite, §2.4, I#502)."""
        return bool(self._lib.is_running(self._require_handle()))

    # -- KV cache -------------------------------------------------------------------------------------------------

    def clear_kv_cache(
        self, keep_system_prompt: bool, start_pos: list[int] | None = None, end_pos: list[int] | None = None
    ) -> None:
        """rkllm_clear_kv_cache; ranges (one start/end per batch slot) are valid only while paused (§4.2)."""
        handle = self._require_handle()
        if (start_pos is None) != (end_pos is None):
            raise InvalidParameterError("start_pos/end_pos", "give both ranges or neither")
        if start_pos is None or end_pos is None:
            return_code = self._lib.clear_kv_cache(handle, int(keep_system_prompt), None, None)
        else:
            n_batch = self._n_batch()
            for name, positions in (("start_pos", start_pos), ("end_pos", end_pos)):
                if len(positions) != n_batch:
                    raise InvalidParameterError(
                        name, f"needs {n_batch} entries (one per batch slot), got {len(positions)}"
                    )
                for position in positions:
                    _check_int(name, position, -1, _INT32_MAX)
            starts = (ctypes.c_int * n_batch)(*start_pos)
            ends = (ctypes.c_int * n_batch)(*end_pos)
            return_code = self._lib.clear_kv_cache(handle, int(keep_system_prompt), starts, ends)
        if return_code != 0:
            raise RuntimeCallError("rkllm_clear_kv_cache", return_code)

    def get_kv_cache_size(self) -> list[int]:
        """Tokens in the KV cache, one entry per batch slot."""
        handle = self._require_handle()
        sizes = (ctypes.c_int * self._n_batch())()
        return_code = self._lib.get_kv_cache_size(handle, sizes)
        if return_code != 0:
            raise RuntimeCallError("rkllm_get_kv_cache_size", return_code)
        return list(sizes)

    # -- prompting configuration ----------------------------------------------------------------------------------

    def set_function_tools(self, system_prompt: str, tools_json: str, tool_response_str: str = "tool_response") -> None:
        """rkllm_set_function_tools: `tools_json` is a JSON array of OpenAI function tools (§4.8)."""
        handle = self._require_handle()
        try:
            tools = json.loads(tools_json)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(
                "tools_json", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        if not isinstance(tools, list):
            raise InvalidParameterError(
                "tools_json", f"must be a JSON array of tools, got a JSON {type(tools).__name__}"
            )
        buffers = (
            _c_string("system_prompt", system_prompt),
            _c_string("tools_json", tools_json),
            _c_string("tool_response_str", tool_response_str),
        )
        return_code = self._lib.set_function_tools(handle, *buffers)
        if return_code != 0:
            raise RuntimeCallError(
                "rkllm_set_function_tools", return_code, "the runtime refuses tools when the model has no chat template"
            )
        self._tools_bytes = buffers

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """rkllm_set_chat_template; it disables the built-in template, tools and enable_thinking (§4.7)."""
        handle = self._require_handle()
        buffers = (
            _c_string("system_prompt", system_prompt),
            _c_string("prompt_prefix", prompt_prefix),
            _c_string("prompt_postfix", prompt_postfix),
        )
        return_code = self._lib.set_chat_template(handle, *buffers)
        if return_code != 0:
            raise RuntimeCallError("rkllm_set_chat_template", return_code)
        self._template_bytes = buffers

    def load_prompt_cache(self, path: str | Path) -> None:
        """rkllm_load_prompt_cache: preload a saved prefill state; the runtime matches it from the input start."""
        handle = self._require_handle()
        cache_path = Path(path)
        problem = _readable_file(cache_path)
        if problem is not None:
            raise PromptCacheFileError(cache_path, problem)
        path_bytes = _c_string("prompt cache path", str(cache_path))
        return_code = self._lib.load_prompt_cache(handle, path_bytes)
        if return_code != 0:
            raise RuntimeCallError("rkllm_load_prompt_cache", return_code, f"prompt cache file {cache_path}")
        self._prompt_cache_path_bytes = path_bytes

    def release_prompt_cache(self) -> None:
        """rkllm_release_prompt_cache."""
        return_code = self._lib.release_prompt_cache(self._require_handle())
        if return_code != 0:
            raise RuntimeCallError("rkllm_release_prompt_cache", return_code)
        self._prompt_cache_path_bytes = None

    def load_lora(self, path: str | Path, name: str, scale: float = 1.0) -> None:
        """rkllm_load_lora: load one adapter; runs select it by `name` (RunOptions.lora_name)."""
        handle = self._require_handle()
        adapter_path = Path(path)
        problem = _readable_file(adapter_path)
        if problem is not None:
            raise LoraAdapterFileError(adapter_path, problem)
        if not name:
            raise InvalidParameterError("lora name", "must not be empty")
        _check_float("lora scale", scale, -math.inf, math.inf)
        path_bytes = _c_string("LoRA adapter path", str(adapter_path))
        name_bytes = _c_string("lora name", name)
        adapter = abi.RKLLMLoraAdapter()
        _fill(adapter, {"lora_adapter_path": path_bytes, "lora_adapter_name": name_bytes, "scale": scale})
        return_code = self._lib.load_lora(handle, ctypes.byref(adapter))
        if return_code != 0:
            raise RuntimeCallError("rkllm_load_lora", return_code, f"LoRA adapter {adapter_path}")
        self._lora_adapters[name] = (adapter, path_bytes, name_bytes)

    # -- internals ------------------------------------------------------------------------------------------------

    def _require_handle(self) -> ctypes.c_void_p:
        handle = self._handle
        if handle is None:
            raise RuntimeNotInitializedError("the runtime has no model loaded: call init() first (or it was destroyed)")
        return handle

    def _n_batch(self) -> int:
        return 1 if self._params is None else self._params.n_batch

    def _validate_params(self, params: RuntimeParams) -> None:
        """Refuse obviously bad settings with their name; the library still checks everything else."""
        _check_int("max_context_len", params.max_context_len, 1, _INT32_MAX)
        _check_int("max_new_tokens", params.max_new_tokens, -1, _INT32_MAX)
        _check_int("n_keep", params.n_keep, -1, _INT32_MAX)
        if params.n_keep >= params.max_context_len:
            raise InvalidParameterError(
                "n_keep",
                f"must be less than max_context_len ({params.max_context_len}) or -1, got {params.n_keep}",
            )
        _check_sampling("", params)
        _check_int("base_domain_id", params.base_domain_id, 0, _INT32_MAX)
        _check_int("enabled_cpus_num", params.enabled_cpus_num, 1, _CPU_COUNT_MAX)
        _check_int("enabled_cpus_mask", params.enabled_cpus_mask, 0, (1 << _CPU_COUNT_MAX) - 1)
        if params.enabled_cpus_mask and params.enabled_cpus_mask.bit_count() != params.enabled_cpus_num:
            raise InvalidParameterError(
                "enabled_cpus_mask",
                f"{params.enabled_cpus_mask:#04x} selects {params.enabled_cpus_mask.bit_count()} cores but "
                f"enabled_cpus_num is {params.enabled_cpus_num}",
            )
        _check_int("n_batch", params.n_batch, 1, _N_BATCH_MAX)
        if params.ignore_eos_token and self.profile.name != "v130":
            raise UnsupportedOnProfileError("ignore_eos_token", self.profile.name, self.version)

    def _build_param_struct(self, params: RuntimeParams, path_bytes: bytes) -> ctypes.Structure:
        extend = abi.RKLLMExtendParam()
        _fill(
            extend,
            {
                "base_domain_id": params.base_domain_id,
                "embed_flash": int(params.embed_flash),
                "enabled_cpus_num": params.enabled_cpus_num,
                "enabled_cpus_mask": params.enabled_cpus_mask,
                "n_batch": params.n_batch,
                "use_cross_attn": int(params.use_cross_attn),
                "reserved": (ctypes.c_uint8 * 104)(),
            },
        )
        values: dict[str, object] = {
            "model_path": path_bytes,
            "max_context_len": params.max_context_len,
            "max_new_tokens": params.max_new_tokens,
            "n_keep": params.n_keep,
            **_sampling_values(params),
            "skip_special_token": params.skip_special_token,
            "is_async": False,  # always sync rkllm_run in a worker thread (docs/runtime.md §4.3)
            "extend_param": extend,
        }
        if self.profile.name == "v130":
            values["ignore_eos_token"] = params.ignore_eos_token
        else:
            # Image tag strings of multimodal models; "" for text models (§4.5).
            values.update({"img_start": b"", "img_end": b"", "img_content": b""})
        struct = self.profile.param_struct()
        _fill(struct, values)
        return struct

    def _build_input(self, inp: RunInput) -> tuple[ctypes.Structure, tuple[object, ...]]:
        """The RKLLMInput and every buffer it points at (kept alive by the caller for the call)."""
        if inp.role not in ("user", "tool"):
            raise InvalidInputError(f"role must be 'user' or 'tool', got {inp.role!r}")
        if (inp.text is None) == (inp.token_ids is None):
            raise InvalidInputError("give exactly one of text (PROMPT input) and token_ids (TOKEN input)")
        role_bytes = inp.role.encode("ascii")
        struct = self.profile.input_struct()
        values: dict[str, object] = {"role": role_bytes, "enable_thinking": inp.enable_thinking}
        keepalive: tuple[object, ...]
        if inp.text is not None:
            text_bytes = _c_string("prompt text", inp.text)
            values["input_type"] = abi.RKLLMInputType.RKLLM_INPUT_PROMPT
            _fill(struct, {**values, "input_data": self._union_with("prompt_input", text_bytes)})
            keepalive = (role_bytes, text_bytes)
        else:
            token_ids: list[int] = []
            for index, token_id in enumerate(list[object](inp.token_ids or ())):
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id <= _INT32_MAX:
                    raise InvalidInputError(f"token_ids[{index}] must be a non-negative int32, got {token_id!r}")
                token_ids.append(token_id)
            if not token_ids:
                raise InvalidInputError("token_ids is empty")
            ids = (ctypes.c_int32 * len(token_ids))(*token_ids)
            token_input = abi.RKLLMTokenInput()
            _fill(token_input, {"input_ids": ctypes.cast(ids, ctypes.POINTER(ctypes.c_int32)), "n_tokens": len(ids)})
            values["input_type"] = abi.RKLLMInputType.RKLLM_INPUT_TOKEN
            _fill(struct, {**values, "input_data": self._union_with("token_input", token_input)})
            keepalive = (role_bytes, ids, token_input)
        return struct, keepalive

    def _union_with(self, member: str, value: object) -> ctypes.Union:
        union = self.profile.input_union()
        setattr(union, member, value)
        return union

    def _build_infer_param(self, opts: RunOptions) -> tuple[ctypes.Structure, tuple[object, ...]]:
        """The RKLLMInferParam and the LoRA / prompt-cache / sampling structs it points at."""
        per_run = opts.sampling is not None or opts.max_new_tokens != 0
        if per_run and not self.profile.per_run_sampling:
            feature = "per-run sampling" if opts.sampling is not None else "per-run max_new_tokens"
            raise UnsupportedOnProfileError(feature, self.profile.name, self.version)
        _check_int("max_new_tokens (per run)", opts.max_new_tokens, 0, _INT32_MAX)
        keepalive: list[object] = []
        lora_pointer: object = None
        if opts.lora_name is not None:
            if opts.lora_name not in self._lora_adapters:
                loaded = ", ".join(sorted(self._lora_adapters)) or "none"
                raise InvalidParameterError("lora_name", f"adapter {opts.lora_name!r} is not loaded (loaded: {loaded})")
            lora = abi.RKLLMLoraParam()
            _fill(lora, {"lora_adapter_name": self._lora_adapters[opts.lora_name][2]})
            lora_pointer = ctypes.pointer(lora)
            keepalive.append(lora)
        cache_pointer: object = None
        if opts.save_prompt_cache_path is not None:
            path_bytes = _c_string("save_prompt_cache_path", opts.save_prompt_cache_path)
            cache = abi.RKLLMPromptCacheParam()
            _fill(cache, {"save_prompt_cache": 1, "prompt_cache_path": path_bytes})
            cache_pointer = ctypes.pointer(cache)
            keepalive.extend((cache, path_bytes))
        values: dict[str, object] = {
            "mode": abi.RKLLMInferMode.RKLLM_INFER_GENERATE,
            "lora_params": lora_pointer,
            "prompt_cache_params": cache_pointer,
            "keep_history": int(opts.keep_history),
        }
        if self.profile.per_run_sampling:
            sampling_pointer: object = None
            if opts.sampling is not None:
                _check_sampling("sampling.", opts.sampling)
                sampling = abi.RKLLMSamplingParam()
                _fill(sampling, _sampling_values(opts.sampling))
                sampling_pointer = ctypes.pointer(sampling)
                keepalive.append(sampling)
            values["sampling_params"] = sampling_pointer
            values["max_new_tokens"] = opts.max_new_tokens
        struct = self.profile.infer_param_struct()
        _fill(struct, values)
        return struct, tuple(keepalive)


__all__ = [
    "PerfStat",
    "RkllmError",
    "RunInput",
    "RunOptions",
    "RunOutcome",
    "RunSink",
    "Runtime",
    "RuntimeParams",
    "SamplingParams",
]
