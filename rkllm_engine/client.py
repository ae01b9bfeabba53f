"""Async client of the rkllm worker process: spawn or connect, stream runs, and restart the worker when it dies.

The runtime lives in its own process so a native crash cannot take Home Assistant down
(docs/architecture.md decision 2); this module is the only place that knows that process exists. It turns a dead
worker into a typed error for the run in flight, restarts it with backoff, and kills it when an abort is not
honoured in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import rkllm_native
from rkllm_engine.types import (
    ContextOverflowError,
    EngineError,
    EngineUnavailableError,
    GenerationError,
    IncompatibleReason,
    InvalidRequestError,
    Perf,
    RuntimeIncompatibleError,
    Sampling,
    UnavailableReason,
    WorkerCrashedError,
)
from rkllm_native import channel, logparse, protocol
from rkllm_native import errors as native_errors

_LOGGER = logging.getLogger(__name__)

RECENT_LOG_LINES: Final = 200
STOP_TIMEOUT_S: Final = 5.0
# How long `stop()` lets a run in flight honour its abort before the worker is killed: shutting Home Assistant
# down or unloading the entry must stay bounded even when the runtime hangs (docs/robustness.md §6).
STOP_ABORT_GRACE_S: Final = 3.0
EXIT_WAIT_S: Final = 3.0
REMOTE_GRACE_MARGIN_S: Final = 1.0
WORKER_MODULE: Final = "rkllm_native.worker"


@dataclass(frozen=True, slots=True)
class WorkerLocation:
    """Where the worker runs: a local child process (host None) or a remote worker on HOST:PORT.

    `tls_fingerprint` (`AB:CD:…`, SHA-256 of the worker's certificate) turns on TLS and pins that certificate.
    """

    host: str | None = None
    port: int | None = None
    secret: str | None = None
    tls_fingerprint: str | None = None

    @property
    def remote(self) -> bool:
        """True for a worker on another host or in another container."""
        return self.host is not None

    def describe(self) -> str:
        """How error messages name this worker."""
        if self.host is None:
            return "local child process"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InitSpec:
    """Everything needed to load the runtime; kept so a restarted worker loads the same thing."""

    library_path: str
    model_path: str
    profile: str | None
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """What the loaded runtime reported about itself (docs/runtime.md Appendix A init lines)."""

    version: str
    profile: str
    driver_version: str | None
    platform: str | None
    max_context_limit: int | None
    pid: int | None
    toolkit_version: str | None = None  # the model's converter (`I rkllm: rkllm-toolkit version: …`)
    worker_slots: int = 1  # runtime contexts the worker serves at once (a remote worker's `--slots`)


@dataclass(frozen=True, slots=True)
class WorkerHello:
    """What a worker said about itself in the handshake (see `WorkerClient.probe`)."""

    protocol_version: int
    pid: int | None
    initialized: bool  # a remote worker keeps its runtime loaded between clients
    python: str | None


@dataclass(frozen=True, slots=True)
class TextPiece:
    """One decoded piece of generated text, as the runtime's callback delivered it."""

    text: str
    token_id: int


@dataclass(frozen=True, slots=True)
class RunFinished:
    """How a run ended: perf from the runtime, and whether it was aborted or paused."""

    perf: Perf
    aborted: bool
    paused: bool
    # The runtime's own `kv cache matches n / m` figures for a run that started from a fresh prompt, if printed.
    kv_reused: int | None = None
    prompt_tokens: int | None = None


class WorkerState(enum.StrEnum):
    """Supervision state, surfaced to HA as availability and repairs."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"


def package_root() -> str:
    """The directory that holds `rkllm_native`, so the child imports the same copy (vendored or not)."""
    return str(Path(rkllm_native.__file__).resolve().parent.parent)


def describe_exit(returncode: int | None) -> str:
    """'signal 11 SIGSEGV' or 'exit code 3': what a user or a bug report needs."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} {name}"
    return f"exit code {returncode}"


def c_text(text: str) -> str:
    """Text the runtime can take: it reads C strings, where a NUL would silently end the text early.

    The API refuses NULs with a 400; anything else that reaches the worker (Home Assistant's own text, tool
    results) has them replaced by U+FFFD (docs/robustness.md §3). Lone surrogates are replaced by the frame
    encoder (`protocol.scrub_text`).
    """
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def sampling_to_dict(sampling: Sampling | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Per-run sampling for the wire; None fields keep the runtime's init values."""
    if sampling is None:
        return None
    values = dataclasses.asdict(sampling) if isinstance(sampling, Sampling) else dict(sampling)
    kept = {key: value for key, value in values.items() if value is not None}
    return kept or None


# Binding error codes (rkllm_native.errors) that no retry can fix, by the reason HA acts on.
_INCOMPATIBLE_CODES: Final[dict[str, IncompatibleReason]] = {
    native_errors.LibraryNotFoundError.code: "library_missing",
    native_errors.LibraryLoadError.code: "library_unsupported",
    native_errors.LibraryArchitectureError.code: "library_unsupported",
    native_errors.NotRkllmLibraryError.code: "library_unsupported",
    native_errors.UnsupportedRuntimeError.code: "library_unsupported",
    native_errors.UnknownRuntimeVersionError.code: "library_unsupported",
    native_errors.VersionUndetectableError.code: "library_unsupported",
    native_errors.InvalidProfileError.code: "profile_mismatch",
    native_errors.ProfileMismatchError.code: "profile_mismatch",
    native_errors.ModelFileError.code: "model_invalid",
}
_PROBLEM_REASONS: Final[dict[str, IncompatibleReason]] = {
    protocol.PROBLEM_PLATFORM_MISMATCH: "model_platform_mismatch",
    protocol.PROBLEM_MODEL_REFUSED: "model_invalid",
}


def start_error(code: str, message: str, facts: Mapping[str, str]) -> EngineError:
    """The typed error for a failed library/model load, from the binding's `code` and the worker's facts.

    Everything is permanent (RuntimeIncompatibleError) except running out of NPU memory, which another
    process may free (EngineUnavailableError, reason "npu_out_of_memory").
    """
    details = {str(key): str(value) for key, value in facts.items()}
    details["code"] = code
    problem = details.get(protocol.FACT_RUNTIME_PROBLEM)
    if problem == protocol.PROBLEM_NPU_OUT_OF_MEMORY:
        return EngineUnavailableError(message, reason="npu_out_of_memory", details=details)
    reason = _INCOMPATIBLE_CODES.get(code) or _PROBLEM_REASONS.get(problem or "") or "init_failed"
    return RuntimeIncompatibleError(message, reason=reason, details=details)


def start_error_from_binding(err: native_errors.RkllmError) -> EngineError:
    """The same typed error for a binding error raised in this process (HA checks local files before spawning)."""
    return start_error(err.code, err.message, protocol.error_facts(err))


def _error_from_reply(error: Mapping[str, Any], op: str) -> EngineError:
    """Map a failed reply's kind onto the engine's typed errors."""
    kind = str(error.get("kind", ""))
    message = str(error.get("message") or f"worker op '{op}' failed")
    if kind == protocol.KIND_CONTEXT_OVERFLOW:
        return ContextOverflowError(message, _opt_int(error.get("prompt_tokens")), _opt_int(error.get("max_context")))
    if kind in (protocol.KIND_BAD_REQUEST, protocol.KIND_INVALID_INPUT, protocol.KIND_UNSUPPORTED):
        return InvalidRequestError(message)
    if kind == protocol.KIND_INIT_FAILED:
        facts = error.get("facts")
        return start_error(str(error.get("code", "")), message, facts if isinstance(facts, dict) else {})
    if kind == protocol.KIND_VERSION_MISMATCH:
        return RuntimeIncompatibleError(message, reason="protocol_mismatch")
    if kind in (protocol.KIND_BUSY, protocol.KIND_NOT_INITIALIZED):
        return EngineUnavailableError(message)
    if kind == protocol.KIND_PATH_NOT_ALLOWED:
        facts = error.get("facts")
        details = {str(key): str(value) for key, value in facts.items()} if isinstance(facts, dict) else {}
        return RuntimeIncompatibleError(message, reason="path_not_allowed", details=details)
    return GenerationError(message)


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _perf_from_dict(raw: object) -> Perf:
    values = raw if isinstance(raw, dict) else {}

    def number(key: str) -> float:
        value = values.get(key, 0)
        return float(value) if isinstance(value, int | float) else 0.0

    return Perf(
        prefill_time_ms=number("prefill_time_ms"),
        prefill_tokens=int(number("prefill_tokens")),
        generate_time_ms=number("generate_time_ms"),
        generate_tokens=int(number("generate_tokens")),
        memory_usage_mb=number("memory_usage_mb"),
    )


class _Session:
    """One connection to one worker process (or one remote session); replaced wholesale on restart."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        process: asyncio.subprocess.Process | None,
        *,
        sealer: channel.FrameSealer | None = None,
        opener: channel.FrameOpener | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.process = process
        # A remote session's frames carry MACs (rkllm_native.channel); the local socketpair's do not.
        self.sealer = sealer
        self.opener = opener
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.streams: dict[int, RunStream] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.stderr_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.intentional = False  # stop(): EOF is expected, not a crash
        self.kill_reason: str | None = None  # set by the watchdog before it kills
        self.pid: int | None = None if process is None else process.pid

    def send(self, message: dict[str, Any]) -> None:
        """Queue one frame; a message that cannot be framed is the request's fault, never the connection's."""
        if self.closed.is_set() or self.writer.is_closing():
            raise EngineUnavailableError("the connection to the rkllm worker is closed")
        try:
            # Sealed (tag + sequence number) on a remote session; a frame that fails here consumes no number.
            frame = channel.encode(message, self.sealer)
        except protocol.ProtocolError as err:
            raise InvalidRequestError(f"the request is too large for the worker channel: {err}") from err
        except (TypeError, ValueError) as err:
            raise InvalidRequestError(f"the request cannot be encoded for the worker: {err}") from err
        self.writer.write(frame)


class RunStream:
    """Async iterator of one run's `TextPiece`s; `finished` is set when it ends normally.

    The run is sent when iteration starts (waiting for the previous run to leave the slot). Each run has its
    own queue, so pieces of an aborted run can never leak into the next one (docs/runtime.md §8 item 5).
    """

    def __init__(self, client: WorkerClient, run_id: int, request: dict[str, Any]) -> None:
        self._client = client
        self.run_id = run_id
        self._request = request
        self._queue: asyncio.Queue[TextPiece | RunFinished | EngineError] = asyncio.Queue()
        self._started = False
        self._holds_slot = False
        self._aborting = False
        self._done = asyncio.Event()
        self._session: _Session | None = None
        self._paused = False
        self._log_mark = 0
        self.finished: RunFinished | None = None
        self.error: EngineError | None = None

    @property
    def done(self) -> bool:
        """True once the run finished, failed or was aborted."""
        return self._done.is_set()

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> TextPiece:
        if not self._started and not self._done.is_set():
            await self._start()
        while True:
            if self._queue.empty() and self._done.is_set():
                return self._end()
            try:
                item = await self._queue.get()
            except asyncio.CancelledError:
                # The consumer went away (client disconnect, task cancel): free the slot behind its back.
                self._client._spawn(self.abort())
                raise
            if isinstance(item, TextPiece):
                if self._aborting:
                    continue
                return item
            self._queue.put_nowait(item)  # keep the terminal item so every later __anext__ ends the same way
            return self._end()

    def _end(self) -> TextPiece:
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    async def _start(self) -> None:
        self._started = True
        try:
            await self._client._acquire_slot(self)
        except BaseException:
            self._finish_locally()
            raise
        self._holds_slot = True
        if self._done.is_set():  # aborted while waiting for the slot
            self._release()
            return
        # From here on every way out ends the run (and so releases the client's slot): whatever `_submit_run`
        # raises, a bug included, becomes this run's one error instead of a slot held forever.
        try:
            self._client._submit_run(self)
        except EngineError as err:
            self._fail(err)
        except Exception as err:  # a bug must cost one request, not the slot
            _LOGGER.exception("sending run %s to the rkllm worker failed", self.run_id)
            self._fail(GenerationError(f"the run could not be sent to the worker: {type(err).__name__}: {err}"))
        except BaseException:
            self._fail(EngineUnavailableError("the run was cancelled while it was being sent"))
            raise

    def pause(self, paused: bool) -> None:
        """Hold the run in the runtime's token callback (`True`) or let it go on (`False`); no reply is awaited.

        The worker blocks in the callback, so the runtime computes nothing for this run meanwhile and another
        runtime context has the NPU to itself (docs/voice.md §3). A run not sent yet, or already over, ignores it.
        """
        self._paused = paused
        session = self._session
        if session is None or self._done.is_set():
            return  # not sent yet: `_submit_run` sends the pause right after the run
        op = protocol.OP_PAUSE if paused else protocol.OP_RESUME
        with contextlib.suppress(EngineError, OSError):
            session.send(protocol.request(op, next(self._client._request_ids), run=self.run_id))

    async def abort(self) -> None:
        """Stop the run; if the worker does not stop it within abort_grace_s, kill and restart the worker."""
        if self._done.is_set():
            return
        self._aborting = True
        if self._session is None:  # never sent: nothing to stop in the worker
            self._finish_locally()
            return
        await self._client._abort_run(self)

    # -- called by the client ---------------------------------------------

    def _deliver(self, item: TextPiece) -> None:
        if not self._done.is_set() and not self._aborting:
            self._queue.put_nowait(item)

    def _finish(self, finished: RunFinished) -> None:
        if self._done.is_set():
            return
        self.finished = finished
        self._close(finished)

    def _fail(self, error: EngineError) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._close(error)

    def _finish_locally(self) -> None:
        """End a run that never reached the worker (aborted or cancelled while waiting for the slot)."""
        self._finish(RunFinished(perf=Perf(), aborted=True, paused=False))

    def _close(self, terminal: RunFinished | EngineError) -> None:
        if self._aborting:  # drop pieces still queued: the caller asked to stop
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(terminal)
        self._done.set()
        self._release()

    def _release(self) -> None:
        if self._session is not None:
            self._session.streams.pop(self.run_id, None)
        if self._holds_slot:
            self._holds_slot = False
            self._client._release_slot(self)

    async def _wait_done(self, limit_s: float | None) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                await self._done.wait()
        except TimeoutError:
            return False
        return True


class WorkerClient:
    """Spawns (or connects to) the worker, speaks its protocol, and supervises it.

    Supervision: when the worker dies (crash, exit, lost connection) the run in flight fails with
    WorkerCrashedError naming the signal or exit code, the state goes RESTARTING, and the worker is relaunched
    after `restart_backoff_s[failures - 1]` with the same InitSpec. `max_consecutive_failures` crashes or failed
    restarts within `failure_window_s` (a finished run resets the count) make the state FAILED, which is terminal
    until `start()` is called again (HA raises a repair). Watchdog: an abort not honoured within `abort_grace_s`
    kills a local worker (SIGKILL); for a remote one the connection is dropped and the remote worker, which got
    the same grace with the abort, exits itself so its service manager restarts it.
    """

    def __init__(
        self,
        location: WorkerLocation,
        *,
        env: Mapping[str, str] | None = None,
        on_log: Callable[[str], None] | None = None,
        on_state: Callable[[WorkerState], None] | None = None,
        restart_backoff_s: Sequence[float] = (0.5, 1, 2, 5, 10, 30),
        abort_grace_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        python: str = sys.executable,
        max_consecutive_failures: int = 5,
        failure_window_s: float = 300.0,
        call_timeout_s: float = 60.0,
    ) -> None:
        if not restart_backoff_s:
            raise ValueError("restart_backoff_s needs at least one delay")
        self.location = location
        self._env = dict(env or {})
        self._on_log = on_log
        self._on_state = on_state
        self._backoff = tuple(float(delay) for delay in restart_backoff_s)
        self.abort_grace_s = abort_grace_s
        self.connect_timeout_s = connect_timeout_s
        self._python = python
        self._max_failures = max_consecutive_failures
        self._failure_window_s = failure_window_s
        self._call_timeout_s = call_timeout_s
        self.state = WorkerState.STOPPED
        self.restarts = 0
        self.info: RuntimeInfo | None = None
        self.last_error: str | None = None
        self._recent_log: deque[str] = deque(maxlen=RECENT_LOG_LINES)
        self._log_count = 0
        self._spec: InitSpec | None = None
        self._session: _Session | None = None
        self._failures: deque[float] = deque()
        self._request_ids = itertools.count(1)
        self._run_ids = itertools.count(1)
        self._slot = asyncio.Lock()
        self._restart_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._state_changed = asyncio.Event()
        self._stopping = False

    # -- public properties ------------------------------------------------

    @property
    def recent_log(self) -> list[str]:
        """The last runtime and worker lines, for diagnostics and repairs."""
        return list(self._recent_log)

    @property
    def consecutive_failures(self) -> int:
        """Crashes and failed restarts since the last run that finished, within the failure window."""
        self._prune_failures()
        return len(self._failures)

    # -- lifecycle ----------------------------------------------------------

    async def start(self, spec: InitSpec) -> RuntimeInfo:
        """Spawn or connect, then hello + init.

        Raises EngineUnavailableError when a retry may help (its `reason`: worker_unreachable, secret_refused,
        worker_busy, worker_start_failed, npu_out_of_memory) and RuntimeIncompatibleError when it cannot
        (library, model or protocol; see `start_error`).
        """
        if self.state in (WorkerState.READY, WorkerState.STARTING, WorkerState.RESTARTING):
            raise EngineError(f"the rkllm worker client is already {self.state}; call stop() first")
        if self._restart_task is not None:  # a finished restart loop from before FAILED
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart_task
            self._restart_task = None
        await self._close_session(kill=True)
        self._spec = spec
        self._stopping = False
        self._failures.clear()
        self.last_error = None
        self._set_state(WorkerState.STARTING)
        try:
            info = await self._launch(spec)
        except BaseException as err:
            self.last_error = str(err)
            self._set_state(WorkerState.FAILED if isinstance(err, EngineError) else WorkerState.STOPPED)
            raise
        self._set_state(WorkerState.READY)
        return info

    @classmethod
    async def probe(
        cls,
        location: WorkerLocation,
        timeout_s: float = 10.0,
        *,
        library_path: str | None = None,
        model_path: str | None = None,
    ) -> WorkerHello:
        """Check a remote worker without loading anything: connect (TLS), mutual handshake, hello, close.

        The config flow uses it to tell a wrong host, secret, fingerprint or busy worker apart before an entry
        exists; given `library_path`/`model_path`, it also asks whether the worker's allow-list holds them (the
        files themselves are checked by the setup that follows). Each step waits at most `timeout_s`. Raises
        EngineUnavailableError (worker_unreachable, secret_refused, worker_unverified, fingerprint_mismatch,
        tls_mismatch, worker_busy) or RuntimeIncompatibleError (protocol_mismatch, path_not_allowed).
        """
        if not location.remote:
            raise ValueError("probe() checks a remote worker; this location is the local child process")
        client = cls(location, connect_timeout_s=timeout_s)
        where = location.describe()
        session = await client._connect_remote()
        session.reader_task = asyncio.get_running_loop().create_task(client._read_loop(session))
        try:
            async with asyncio.timeout(timeout_s):
                reply = await client._request(session, protocol.OP_HELLO, {"version": protocol.PROTOCOL_VERSION})
                if library_path is not None or model_path is not None:
                    paths = {"library_path": library_path, "model_path": model_path}
                    await client._request(session, protocol.OP_CHECK_PATHS, paths)
        except TimeoutError as err:
            raise EngineUnavailableError(
                f"remote rkllm worker {where} did not answer the hello within {timeout_s:g}s",
                reason="worker_unreachable",
                details={"worker": where},
            ) from err
        except WorkerCrashedError as err:
            raise EngineUnavailableError(
                f"remote rkllm worker {where} closed the connection during the hello",
                reason="worker_unreachable",
                details={"worker": where},
            ) from err
        finally:
            await client._close(session, kill=False)
            await client.stop()
        return WorkerHello(
            protocol_version=_opt_int(reply.get("version")) or 0,
            pid=_opt_int(reply.get("pid")),
            initialized=reply.get("initialized") is True,
            python=_opt_str(reply.get("python")),
        )

    async def stop(self, abort_grace_s: float = STOP_ABORT_GRACE_S) -> None:
        """Shut the worker down and wait for it; leaves no process, task or connection behind.

        Bounded even when the runtime hangs: a run in flight gets `abort_grace_s` to honour its abort, then the
        worker is killed (local) or the connection dropped (remote), so unloading or stopping Home Assistant
        never waits on the NPU.
        """
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart_task
            self._restart_task = None
        session = self._session
        kill = False
        if session is not None:
            session.intentional = True
            streams = list(session.streams.values())
            for stream in streams:
                with contextlib.suppress(EngineError):
                    session.send(protocol.request(protocol.OP_ABORT, next(self._request_ids), run=stream.run_id))
            if streams:
                try:
                    async with asyncio.timeout(abort_grace_s):
                        await asyncio.gather(*(stream._wait_done(None) for stream in streams))
                except TimeoutError:
                    kill = True
            if not kill:
                with contextlib.suppress(EngineError, TimeoutError, OSError):
                    async with asyncio.timeout(STOP_TIMEOUT_S / 2):
                        await self._request(session, protocol.OP_SHUTDOWN, {})
        await self._close_session(kill=kill)
        if self._background:
            _, late = await asyncio.wait(list(self._background), timeout=EXIT_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._set_state(WorkerState.STOPPED)

    async def wait_ready(self, timeout_s: float | None = None) -> RuntimeInfo:
        """Wait for READY (e.g. after a restart); raises EngineUnavailableError if stopped, failed or late."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.state != WorkerState.READY:
                    if self.state in (WorkerState.STOPPED, WorkerState.FAILED):
                        raise EngineUnavailableError(self._unavailable_message())
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError as err:
            raise EngineUnavailableError(
                f"the rkllm worker is still {self.state} after {timeout_s:g}s; {self.last_error or 'no error recorded'}"
            ) from err
        if self.info is None:
            raise EngineUnavailableError("the rkllm worker is ready but reported no runtime info")
        return self.info

    # -- requests -----------------------------------------------------------

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request/reply op (not `run`, which streams: use `run()`)."""
        if op in (protocol.OP_RUN, protocol.OP_AUTH) or op not in protocol.OPS:
            raise InvalidRequestError(f"op {op!r} cannot be sent with call(); use run() for generation")
        session = self._ready_session()
        args = {key: c_text(value) if isinstance(value, str) else value for key, value in args.items()}
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await self._request(session, op, args)
        except TimeoutError:
            message = f"the rkllm worker did not answer '{op}' within {self._call_timeout_s:g}s; worker killed"
            await self._kill(session, message)
            raise WorkerCrashedError(message + "; restarting") from None

    def run(
        self,
        role: str,
        text: str,
        *,
        keep_history: bool,
        enable_thinking: bool,
        sampling: Sampling | Mapping[str, Any] | None = None,
        max_new_tokens: int = 0,
    ) -> RunStream:
        """Prepare a run; it starts when the stream is first iterated. Raises at once if the worker is down."""
        self._ready_session()
        if role not in ("user", "tool"):
            raise InvalidRequestError(f"run role must be 'user' or 'tool', got {role!r}")
        run_id = next(self._run_ids)
        request = {
            "run": run_id,
            "role": role,
            "text": c_text(text),
            "enable_thinking": enable_thinking,
            "keep_history": keep_history,
            "sampling": sampling_to_dict(sampling),
            "max_new_tokens": max_new_tokens,
        }
        return RunStream(self, run_id, request)

    # -- internals: state --------------------------------------------------

    def _set_state(self, state: WorkerState) -> None:
        if state == self.state:
            return
        self.state = state
        self._state_changed.set()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                _LOGGER.exception("on_state callback failed for %s", state)

    def _unavailable_message(self) -> str:
        if self.state == WorkerState.READY:
            return "the rkllm worker is ready"
        reason = f": {self.last_error}" if self.last_error else ""
        if self.state == WorkerState.FAILED:
            return self.last_error or "the rkllm worker failed to start"
        if self.state == WorkerState.STOPPED:
            return "the rkllm worker is not running (stopped)"
        return f"the rkllm worker is {self.state}{reason}"

    def _ready_session(self) -> _Session:
        session = self._session
        if self.state != WorkerState.READY or session is None or session.closed.is_set():
            raise EngineUnavailableError(self._unavailable_message())
        return session

    def _spawn(self, coro: Any) -> None:
        """Run a coroutine in the background and keep a reference, so stop() can wait for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _add_log(self, line: str) -> None:
        self._recent_log.append(line)
        self._log_count += 1
        if self._on_log is not None:
            try:
                self._on_log(line)
            except Exception:  # a broken listener must not look like a broken worker connection
                _LOGGER.exception("on_log callback failed")

    def _lines_since(self, mark: int) -> list[str]:
        missing = self._log_count - mark
        if missing <= 0:
            return []
        return list(self._recent_log)[-missing:]

    # -- internals: launching ---------------------------------------------

    async def _launch(self, spec: InitSpec) -> RuntimeInfo:
        """Spawn or connect, authenticate, hello, init; the session becomes current only on success."""
        session = await (self._connect_remote() if self.location.remote else self._spawn_local(spec))
        session.reader_task = asyncio.get_running_loop().create_task(self._read_loop(session))
        try:
            reply = await self._handshake(session, spec)
        except BaseException as err:
            await self._close(session, kill=True)
            lost = isinstance(err, WorkerCrashedError | OSError) or (
                isinstance(err, EngineUnavailableError) and err.reason == "unavailable" and not self._stopping
            )
            if lost:
                # Died or dropped the connection while starting: a fresh attempt may work (HA retries later).
                raise self._start_lost(err) from err
            raise
        self._session = session
        self.info = RuntimeInfo(
            version=str(reply.get("version", "")),
            profile=str(reply.get("profile", "")),
            driver_version=_opt_str(reply.get("driver_version")),
            platform=_opt_str(reply.get("platform")),
            max_context_limit=_opt_int(reply.get("max_context_limit")),
            pid=_opt_int(reply.get("pid")),
            toolkit_version=_opt_str(reply.get("toolkit_version")),
            worker_slots=_opt_int(reply.get("worker_slots")) or 1,
        )
        return self.info

    def _start_lost(self, err: BaseException) -> EngineUnavailableError:
        """The transient error for a worker that went away during hello or init, with its last runtime line."""
        details = {"worker": self.location.describe()}
        last_line = logparse.last_problem_line(list(self._recent_log), levels="E")
        if last_line:
            details[protocol.FACT_RUNTIME_LINE] = last_line
        reason: UnavailableReason = "worker_unreachable" if self.location.remote else "worker_start_failed"
        message = str(err)
        if not isinstance(err, EngineError):
            message = f"the rkllm worker ({self.location.describe()}) closed the connection while starting: {err}"
        return EngineUnavailableError(message, reason=reason, details=details)

    async def _handshake(self, session: _Session, spec: InitSpec) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                hello = await self._request(session, protocol.OP_HELLO, {"version": protocol.PROTOCOL_VERSION})
        except TimeoutError as err:
            raise EngineUnavailableError(
                f"the rkllm worker ({self.location.describe()}) did not answer within {self.connect_timeout_s:g}s",
                reason="worker_unreachable" if self.location.remote else "worker_start_failed",
                details={"worker": self.location.describe()},
            ) from err
        # No timeout: loading a model takes from seconds to minutes; a dying worker still ends the wait.
        reply = await self._request(
            session,
            protocol.OP_INIT,
            {
                "library_path": spec.library_path,
                "model_path": spec.model_path,
                "profile": spec.profile,
                "params": spec.params,
            },
        )
        return {**reply, "worker_slots": hello.get("slots")}

    async def _spawn_local(self, spec: InitSpec) -> _Session:
        """Spawn the child worker; it may open only this spec's library and model (the allow-list runs here too)."""
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, **self._env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH", "")) if p)
        try:
            process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                WORKER_MODULE,
                "--fd",
                str(child_sock.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--library",
                spec.library_path,
                "--model",
                spec.model_path,
                pass_fds=(child_sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as err:
            parent_sock.close()
            raise EngineUnavailableError(
                f"cannot start the rkllm worker with {self._python}: {err}", reason="worker_start_failed"
            ) from err
        finally:
            child_sock.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        except OSError as err:
            parent_sock.close()
            process.kill()
            await process.wait()
            raise EngineUnavailableError(
                f"cannot talk to the rkllm worker: {err}", reason="worker_start_failed"
            ) from err
        session = _Session(reader, writer, process)
        if process.stderr is not None:
            session.stderr_task = asyncio.get_running_loop().create_task(self._stderr_loop(process.stderr))
        return session

    def _remote_error(self, message: str, reason: UnavailableReason) -> EngineUnavailableError:
        """A transient remote failure; `reason` lets the config flow put it on the right field."""
        return EngineUnavailableError(message, reason=reason, details={"worker": self.location.describe()})

    async def _connect_remote(self) -> _Session:
        """Connect (TLS with the pinned certificate when a fingerprint is set) and run the mutual handshake."""
        where = self.location.describe()
        if not self.location.secret:
            raise self._remote_error(
                f"remote rkllm worker {where} needs a shared secret; none is configured", "secret_refused"
            )
        fingerprint = self.location.tls_fingerprint
        tls = channel.client_tls_context() if fingerprint else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.location.host, self.location.port, ssl=tls)
        except TimeoutError as err:
            raise self._remote_error(
                f"remote rkllm worker {where} did not accept a connection within {self.connect_timeout_s:g}s",
                "worker_unreachable",
            ) from err
        except ConnectionRefusedError as err:
            raise self._remote_error(
                f"remote rkllm worker {where} refused the connection (is the worker running and listening there?)",
                "worker_unreachable",
            ) from err
        except OSError as err:
            if tls is not None and isinstance(err, ssl.SSLError | ConnectionResetError):
                # A worker without --tls-cert closes on our ClientHello (or answers with a plain frame).
                problem = err.reason if isinstance(err, ssl.SSLError) else None
                raise self._remote_error(
                    f"TLS handshake with remote rkllm worker {where} failed ({problem or err}): was the worker started "
                    "with --tls-cert and --tls-key? Without them, clear the TLS fingerprint",
                    "tls_mismatch",
                ) from err
            raise self._remote_error(
                f"cannot reach remote rkllm worker {where}: {err.strerror or err}", "worker_unreachable"
            ) from err
        sock = writer.get_extra_info("socket")
        if sock is not None:
            protocol.enable_keepalive(sock)  # a board that lost power ends the session instead of hanging it
        try:
            if fingerprint:
                self._check_fingerprint(writer, fingerprint, where)
            async with asyncio.timeout(self.connect_timeout_s):
                sealer, opener = await self._authenticate(reader, writer, where)
        except BaseException as err:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if isinstance(err, TimeoutError):
                raise self._remote_error(
                    f"remote rkllm worker {where} did not complete the handshake", "worker_unreachable"
                ) from err
            if isinstance(err, (OSError, protocol.ProtocolError)):
                raise self._remote_error(
                    f"remote rkllm worker {where} broke the handshake: {err}", "worker_unreachable"
                ) from err
            raise
        return _Session(reader, writer, None, sealer=sealer, opener=opener)

    def _check_fingerprint(self, writer: asyncio.StreamWriter, expected: str, where: str) -> None:
        """The pin: the worker's certificate must be the one whose fingerprint the user entered."""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not channel.fingerprint_matches(expected, der):
            presented = channel.fingerprint_of_der(der) if der else "none"
            raise self._remote_error(
                f"remote rkllm worker {where} presented a TLS certificate with fingerprint {presented}, not the pinned "
                f"{expected}: enter the fingerprint the worker printed at start (or someone else answers there)",
                "fingerprint_mismatch",
            )

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> tuple[channel.FrameSealer, channel.FrameOpener]:
        """Mutual handshake (rkllm_native.channel): prove the secret, then check the worker's proof before anything.

        Nothing but the handshake is sent, and no frame is trusted, until the worker proved it knows the secret;
        then every frame carries a MAC under this session's keys.
        """
        client_nonce = channel.new_nonce()
        channel.write_frame(writer, channel.client_hello(client_nonce), None)
        await writer.drain()
        challenge = await channel.read_frame(reader, None)
        if challenge is not None and challenge.get("ev") == protocol.EV_TLS_REQUIRED:
            raise self._remote_error(
                f"remote rkllm worker {where} speaks TLS only: enter the certificate fingerprint it printed at start",
                "tls_mismatch",
            )
        if challenge is None or challenge.get("ev") != protocol.EV_CHALLENGE:
            raise self._remote_error(
                f"remote rkllm worker {where} did not send an authentication challenge", "worker_unreachable"
            )
        version = challenge.get("version")
        if version != protocol.PROTOCOL_VERSION:
            raise RuntimeIncompatibleError(
                f"remote rkllm worker {where} speaks protocol {version!r}, this client {protocol.PROTOCOL_VERSION}; "
                "install the same rkllm version on both sides",
                reason="protocol_mismatch",
                details={"worker": where},
            )
        keys = channel.derive_keys(
            self.location.secret or "", protocol.PROTOCOL_VERSION, client_nonce, channel.nonce_of(challenge)
        )
        channel.write_frame(writer, {"op": protocol.OP_AUTH, "proof": keys.client_proof.hex()}, None)
        await writer.drain()
        answer = await channel.read_frame(reader, None)
        if answer is None or answer.get("ev") == protocol.EV_AUTH_FAILED:
            raise self._remote_error(f"remote rkllm worker {where} refused the secret", "secret_refused")
        if answer.get("ev") != protocol.EV_AUTH_OK:
            raise self._remote_error(
                f"remote rkllm worker {where} answered {answer.get('ev')!r} to the secret", "worker_unreachable"
            )
        if not channel.proof_matches(keys.worker_proof, answer.get("proof")):
            _LOGGER.warning("The rkllm worker at %s could not prove it knows the shared secret; disconnected", where)
            raise self._remote_error(
                f"remote rkllm worker {where} could not prove it knows the shared secret (another secret there, or "
                "another program answering at this address)",
                "worker_unverified",
            )
        sealer = channel.FrameSealer(keys.client_to_worker)
        opener = channel.FrameOpener(keys.worker_to_client, "worker")
        admitted = await channel.read_frame(reader, opener)
        if admitted is not None and admitted.get("ev") == protocol.EV_BUSY:
            raise self._remote_error(f"remote rkllm worker {where} is busy: another client is connected", "worker_busy")
        if admitted is None or admitted.get("ev") != protocol.EV_READY:
            raise self._remote_error(
                f"remote rkllm worker {where} closed the connection right after the handshake", "worker_unreachable"
            )
        return sealer, opener

    # -- internals: reading -----------------------------------------------

    async def _request(self, session: _Session, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        request_id = next(self._request_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future
        try:
            session.send(protocol.request(op, request_id, **args))
            # A lost connection is seen by the read loop too, which fails `future` naming it (exit code, last line).
            with contextlib.suppress(ConnectionError, OSError):
                await session.writer.drain()
            reply = await future
        finally:
            session.pending.pop(request_id, None)
        if not reply.get("ok"):
            error = reply.get("error")
            raise _error_from_reply(error if isinstance(error, dict) else {}, op)
        return {key: value for key, value in reply.items() if key not in ("ev", "id", "ok")}

    async def _read_loop(self, session: _Session) -> None:
        problem: str | None = None
        try:
            while True:
                message = await channel.read_frame(session.reader, session.opener)
                if message is None:
                    break
                self._dispatch(session, message)
        except protocol.ProtocolError as err:
            # A tampered, replayed, truncated or oversized frame: nothing more from this connection is trusted.
            _LOGGER.warning("Closing the connection to the rkllm worker (%s): %s", self.location.describe(), err)
            problem = f"protocol error: {err}"
        except (ConnectionError, OSError) as err:
            problem = f"connection error: {err}"
        session.closed.set()
        self._spawn(self._connection_lost(session, problem))

    def _dispatch(self, session: _Session, message: dict[str, Any]) -> None:
        event = message.get("ev")
        if event == protocol.EV_REPLY:
            future = session.pending.get(message.get("id", -1))
            if future is not None and not future.done():
                future.set_result(message)
        elif event == protocol.EV_TEXT:
            stream = session.streams.get(message.get("run", -1))
            if stream is not None:  # events of finished or aborted runs are dropped
                for text, token in protocol.text_pieces(message):
                    stream._deliver(TextPiece(text, token))
        elif event == protocol.EV_FINISH:
            stream = session.streams.get(message.get("run", -1))
            if stream is not None:
                finished = RunFinished(
                    perf=_perf_from_dict(message.get("perf")),
                    aborted=bool(message.get("aborted")),
                    paused=bool(message.get("paused")),
                    kv_reused=_opt_int(message.get("kv_reused")),
                    prompt_tokens=_opt_int(message.get("prompt_tokens")),
                )
                self._failures.clear()  # a completed run ends a crash streak
                stream._finish(finished)
        elif event == protocol.EV_RUN_ERROR:
            stream = session.streams.get(message.get("run", -1))
            if stream is not None:
                stream._fail(_error_from_reply(message, "run"))
        elif event == protocol.EV_LOG:
            line = message.get("line")
            if isinstance(line, str):
                self._add_log(line)

    async def _stderr_loop(self, stderr: asyncio.StreamReader) -> None:
        """The worker's own fatal messages (and faulthandler dumps) arrive on its original stderr."""
        while True:
            try:
                raw = await stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._add_log(line)

    # -- internals: runs ----------------------------------------------------

    async def _acquire_slot(self, stream: RunStream) -> None:
        await self._slot.acquire()

    def _release_slot(self, stream: RunStream) -> None:
        if self._slot.locked():
            self._slot.release()

    def _submit_run(self, stream: RunStream) -> None:
        session = self._ready_session()
        request_id = next(self._request_ids)
        stream._session = session
        stream._log_mark = self._log_count
        session.streams[stream.run_id] = stream
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future

        def on_reply(done: asyncio.Future[dict[str, Any]]) -> None:
            session.pending.pop(request_id, None)
            if done.cancelled() or done.exception() is not None:
                return
            reply = done.result()
            if not reply.get("ok"):
                error = reply.get("error")
                stream._fail(_error_from_reply(error if isinstance(error, dict) else {}, "run"))

        future.add_done_callback(on_reply)
        try:
            session.send(protocol.request(protocol.OP_RUN, request_id, **stream._request))
        except BaseException:
            session.pending.pop(request_id, None)
            future.cancel()
            session.streams.pop(stream.run_id, None)
            raise
        if stream._paused:  # paused before it was sent: it waits at its first token
            stream.pause(True)

    async def _abort_run(self, stream: RunStream) -> None:
        session = stream._session
        if session is None:
            return
        grace = self.abort_grace_s
        args: dict[str, Any] = {"run": stream.run_id}
        if self.location.remote:
            # The remote worker exits itself if it cannot stop the run; a little later than our own watchdog,
            # so the caller learns the cause from us rather than from a dropped connection.
            args["grace_s"] = grace + REMOTE_GRACE_MARGIN_S
        with contextlib.suppress(EngineError, OSError):
            session.send(protocol.request(protocol.OP_ABORT, next(self._request_ids), **args))
        if await stream._wait_done(grace):
            return
        await self._kill(session, f"the rkllm worker did not honour abort within {grace:g}s; worker killed")
        await stream._wait_done(EXIT_WAIT_S + 1.0)

    async def _kill(self, session: _Session, reason: str) -> None:
        """Watchdog: end a hung worker.

        Local: SIGKILL. Remote: drop the connection; the abort carried `grace_s`, so the remote worker enforces
        the same grace itself and exits, and its service manager (systemd `Restart=always`) starts a fresh one.
        """
        if session.closed.is_set():
            return
        session.kill_reason = reason
        if session.process is not None and session.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                session.process.kill()
        else:
            session.writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_WAIT_S + 1.0):
                await session.closed.wait()

    # -- internals: supervision -------------------------------------------

    async def _connection_lost(self, session: _Session, problem: str | None) -> None:
        """Turn a dead connection into errors for everyone waiting, then restart unless we are stopping."""
        exit_text = await self._reap(session)
        in_flight = bool(session.streams)
        if session.intentional or self._stopping:
            self._fail_waiters(session, EngineUnavailableError("the rkllm worker was stopped"))
            return
        launching = self._session is not session
        action = ""  # what happens next, for the in-flight request's error (not kept in last_error)
        if session.kill_reason is not None:
            message = session.kill_reason
            action = "reconnecting" if self.location.remote else "restarting"
        elif launching:
            lines = list(self._recent_log)
            last_line = logparse.last_problem_line(lines)
            message = f"the rkllm worker ({self.location.describe()}) ended while starting ({exit_text})"
            if last_line:
                message += f": {last_line}"
        else:
            marks = [stream._log_mark for stream in session.streams.values()]
            lines = self._lines_since(min(marks)) if marks else list(self._recent_log)
            last_line = logparse.last_problem_line(lines)
            if self.location.remote:
                what = f"remote rkllm worker {self.location.describe()} closed the connection"
                what += f" ({problem})" if problem else ""
                message = f"the {what}{' during generation' if in_flight else ''}"
                action = "reconnecting"
            else:
                during = " during generation" if in_flight else ""
                message = f"the rkllm worker crashed ({exit_text}){during}"
                action = "restarting"
            if last_line:
                message += f" (last runtime line: {last_line})"
        self.last_error = message
        if launching:
            self._fail_waiters(session, WorkerCrashedError(message))
            return  # _launch's caller reports it
        self._session = None
        self._record_failure()
        if self.state == WorkerState.FAILED:
            action = "giving up"
        self._fail_waiters(session, WorkerCrashedError(f"{message}; {action}" if action else message))
        if self.state == WorkerState.RESTARTING:
            self._schedule_restart()

    async def _reap(self, session: _Session) -> str:
        """Wait for the process to exit (kill it if it lingers) and say how it ended."""
        with contextlib.suppress(OSError):
            session.writer.close()
        process = session.process
        if process is None:
            return "connection closed"
        try:
            async with asyncio.timeout(EXIT_WAIT_S):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return f"closed its control channel; killed ({describe_exit(process.returncode)})"
        if session.stderr_task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(session.stderr_task)
        return describe_exit(process.returncode)

    def _fail_waiters(self, session: _Session, error: EngineError) -> None:
        for future in list(session.pending.values()):
            if not future.done():
                future.set_exception(error)
        session.pending.clear()
        for stream in list(session.streams.values()):
            stream._fail(error)

    def _prune_failures(self) -> None:
        horizon = time.monotonic() - self._failure_window_s
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()

    def _record_failure(self) -> None:
        self._failures.append(time.monotonic())
        self._prune_failures()
        if len(self._failures) >= self._max_failures:
            last = self.last_error or "no reason recorded"
            self.last_error = (
                f"the rkllm worker failed {len(self._failures)} times in a row and is not restarted any more; "
                f"last failure: {last}"
            )
            self._set_state(WorkerState.FAILED)
        else:
            self._set_state(WorkerState.RESTARTING)

    def _schedule_restart(self) -> None:
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart_loop())

    async def _restart_loop(self) -> None:
        """Relaunch with growing backoff until it works or the failures make the state FAILED (terminal)."""
        while not self._stopping and self.state == WorkerState.RESTARTING:
            failures = max(1, len(self._failures))
            await asyncio.sleep(self._backoff[min(failures - 1, len(self._backoff) - 1)])
            spec = self._spec
            if spec is None or self._stopping:
                return
            try:
                await self._launch(spec)
            except EngineError as err:
                self.last_error = f"restart failed: {err}"
                self._record_failure()
                continue
            self.restarts += 1
            self._set_state(WorkerState.READY)
            return

    async def _close_session(self, *, kill: bool) -> None:
        """Close the current session, if any."""
        session, self._session = self._session, None
        if session is not None:
            await self._close(session, kill=kill)

    async def _close(self, session: _Session, *, kill: bool) -> None:
        """Close a session and wait for its process and tasks; no leftovers."""
        session.intentional = True
        process = session.process
        if kill and process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        if process is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        session.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await session.writer.wait_closed()
        for task in (session.reader_task, session.stderr_task):
            if task is not None and not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(task)
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._fail_waiters(session, EngineUnavailableError("the rkllm worker was stopped"))


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
