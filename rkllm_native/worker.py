"""The process that owns the runtime handle and serves it over the framed protocol.

A native crash in librkllmrt must not take Home Assistant down (docs/architecture.md decision 2), and musl hosts need
the runtime on a glibc machine (decision 3), so the handle lives here: locally on an inherited socketpair
(`--fd N`) or remotely on TCP (`--listen HOST:PORT --secret-file FILE [--tls-cert FILE --tls-key FILE]`). Run
it as `python -m rkllm_native.worker`. It opens only the libraries and models it was started with (`--library`,
`--model`, `--models-dir`, or `--config FILE`; rkllm_native.allowlist). A remote client and the worker prove the
shared secret to each other, and every later frame carries a MAC (rkllm_native.channel, docs/worker-channel.md).

Remote deployment: run it under a service manager that restarts it (systemd `Restart=always`). A run that ignores
abort past its grace (the client's `abort_grace_s` plus a margin, or `--abort-grace` when the client vanished)
makes the worker exit with code 75, because only a fresh process gives a clean runtime handle.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import faulthandler
import json
import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from rkllm_native import channel, logparse, protocol
from rkllm_native.allowlist import AllowList, AllowListConfigError, PathNotAllowedError

if TYPE_CHECKING:
    from rkllm_native.runtime import PerfStat, Runtime

PR_SET_PDEATHSIG: Final = 1
LOG_RING_LINES: Final = 200
MAX_LOG_LINE_CHARS: Final = 4096
SYNC_MARKER: Final = "\x1erkllm-worker-sync "
SYNC_TIMEOUT_S: Final = 2.0
MAX_BATCH_FRAMES: Final = 512
AUTH_TIMEOUT_S: Final = 10.0
SESSION_HANDOVER_S: Final = 2.0
# Connections still in the handshake at once; more are closed at once (a flood cannot starve the accept loop).
MAX_PENDING_HANDSHAKES: Final = 8
# A shorter shared secret is worth a warning: its proofs can be guessed offline (docs/worker-channel.md).
MIN_SECRET_CHARS: Final = 16
EXIT_ABORT_TIMEOUT: Final = 75
EXIT_USAGE: Final = 2
EXIT_STARTUP: Final = 3
MAX_WORKER_SLOTS: Final = 4


class TerminateRequested(Exception):
    """Raised in the main thread by the SIGTERM handler to unwind into the orderly shutdown."""


class OpError(Exception):
    """A request that fails; turned into a failed reply with `kind` and a one-line message."""

    def __init__(self, kind: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details


# ---------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to signal us when the parent goes away, so no orphan keeps NPU memory.

    PR_SET_PDEATHSIG fires when the *thread* that forked us exits (docs/runtime.md §8 item 9), so the
    client forks from its long-lived event-loop thread; we set it first thing in our main thread.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _line_buffer_c_stdio() -> None:
    """Make the C library flush stdout per line: the runtime's printf output must reach us before a crash."""
    try:
        libc = ctypes.CDLL(None)
        io_lbf = 1  # glibc's _IOLBF
        for name in ("stdout", "stderr"):
            stream = ctypes.c_void_p.in_dll(libc, name)
            libc.setvbuf(stream, None, io_lbf, 0)
    except (OSError, ValueError, AttributeError):
        # Not glibc (or no such symbols): lines still arrive, only later (at a flush).
        return


def _flush_c_stdio() -> None:
    """Push out anything the runtime printed but the C library still buffers."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        return


class LogTap:
    """Captures fd 1 and fd 2 through a pipe, forwards each line and keeps the last ones.

    The runtime prints its only diagnostics there (docs/runtime.md Appendix A), and the protocol channel
    must never be fd 1. `sync()` is a barrier: after it returns every line printed before it was seen,
    which lets init and run results include the lines they caused.
    """

    def __init__(self) -> None:
        self.fatal_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        _line_buffer_c_stdio()
        self._read_fd = read_fd
        self._lines: deque[tuple[int, str]] = deque(maxlen=LOG_RING_LINES)
        self._count = 0
        self._synced = 0
        self._sync_counter = 0
        self._cond = threading.Condition()
        self._listeners: list[Callable[[str], None]] = []
        self._thread = threading.Thread(target=self._pump, name="rkllm-log-tap", daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        """Number of lines seen so far: a mark for `lines_since`."""
        with self._cond:
            return self._count

    def add_listener(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Route new lines to a connected client too; returns the function that stops it.

        The runtime prints to the process's stdout, so with several runtime contexts in one remote worker every
        connected client sees every line (docs/voice.md §2).
        """
        with self._cond:
            self._listeners.append(listener)

        def remove() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def lines_since(self, mark: int) -> list[str]:
        """Lines seen after `mark` that are still in the ring."""
        with self._cond:
            return [line for index, line in self._lines if index >= mark]

    def recent(self) -> list[str]:
        """The ring: the last lines printed, for error messages and diagnostics."""
        with self._cond:
            return [line for _, line in self._lines]

    def emit(self, line: str) -> None:
        """Record a line of the worker's own (never through fd 1: it would loop through the pipe)."""
        self._accept(line)

    def fatal(self, message: str) -> None:
        """Write to the original stderr: the only channel left when the protocol is gone."""
        try:
            os.write(self.fatal_fd, f"rkllm-worker: {message}\n".encode("utf-8", "replace"))
        except OSError:
            return

    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> bool:
        """Wait until every line printed so far has been read from the pipe."""
        _flush_c_stdio()
        with self._cond:
            self._sync_counter += 1
            ticket = self._sync_counter
        try:
            os.write(1, f"{SYNC_MARKER}{ticket}\n".encode())
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._synced < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _accept(self, line: str) -> None:
        if line.startswith(SYNC_MARKER):
            ticket = line[len(SYNC_MARKER) :].strip()
            with self._cond:
                if ticket.isdigit():
                    self._synced = max(self._synced, int(ticket))
                self._cond.notify_all()
            return
        line = line[:MAX_LOG_LINE_CHARS]
        with self._cond:
            self._lines.append((self._count, line))
            self._count += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener(line)

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if len(pending) > MAX_LOG_LINE_CHARS * 4:
                complete.append(pending)
                pending = b""
            for raw in complete:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line:
                    self._accept(line)


# ---------------------------------------------------------------------------
# Outgoing frames
# ---------------------------------------------------------------------------


TEXT_COALESCE_S = 0.001


class Outbox:
    """One writer thread per connection; every frame goes through its queue, in order.

    The runtime's callback only puts into a SimpleQueue (never blocks on the socket), and the writer
    merges text pieces that queued up into one frame: cheap at high token rates.
    """

    def __init__(self, conn: channel.FrameChannel, tap: LogTap) -> None:
        self._conn = conn
        self._tap = tap
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._alive = True
        self._thread = threading.Thread(target=self._drain, name="rkllm-outbox", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the peer stopped accepting data."""
        return self._alive

    def put(self, frame: dict[str, Any]) -> None:
        """Queue a frame; never blocks."""
        self._queue.put(frame)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            frames = [first]
            stop = False
            if first.get("ev") == protocol.EV_TEXT:
                # Let a few more tokens arrive: one frame per ~ms instead of one per token halves the wake-ups
                # of both processes at high token rates; 1 ms is invisible next to a token on the board.
                time.sleep(TEXT_COALESCE_S)
            while len(frames) < MAX_BATCH_FRAMES:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                frames.append(item)
            if self._alive:
                try:
                    self._conn.send_many(merge_text_events(frames))
                except (OSError, protocol.ProtocolError) as err:
                    self._alive = False
                    self._tap.fatal(f"cannot send to {self._conn.peer}: {err}")
            if stop:
                return


def merge_text_events(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold runs of consecutive text events of the same run into one batched event."""
    merged: list[dict[str, Any]] = []
    pieces: list[tuple[str, int]] = []
    pieces_run: int | None = None

    def flush() -> None:
        nonlocal pieces, pieces_run
        if pieces_run is not None:
            if len(pieces) == 1:
                merged.append(protocol.text_event(pieces_run, pieces[0][0], pieces[0][1]))
            else:
                merged.append(protocol.text_batch_event(pieces_run, pieces))
        pieces = []
        pieces_run = None

    for frame in frames:
        if frame.get("ev") == protocol.EV_TEXT and "text" in frame:
            if pieces_run != frame["run"]:
                flush()
                pieces_run = frame["run"]
            pieces.append((frame["text"], frame["token"]))
        else:
            flush()
            merged.append(frame)
    flush()
    return merged


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ActiveRun:
    """The one run in progress: its id, where its events go, and whether it was asked to stop."""

    run_id: int
    outbox: Outbox
    thread: threading.Thread | None = None
    abort_requested: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    # Cleared while the run is paused: the token callback waits on it (docs/voice.md §3); set to let it go on.
    running: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        """A run starts running (not paused)."""
        self.running.set()


class EventSink:
    """Receives the runtime's callbacks on the run thread and turns them into queued frames."""

    def __init__(self, run: ActiveRun) -> None:
        self._run = run
        self.perf: PerfStat | None = None
        self.error_message: str | None = None
        self.tokens = 0

    def on_text(self, text: str, token_id: int) -> bool:
        """Queue one piece, then wait here while the run is paused (the runtime computes nothing meanwhile).

        [Inf] The runtime calls the callback on its inference thread between two decode steps, so holding it
        only delays the next step and leaves the NPU to other runtime contexts (docs/runtime.md Appendix C).
        Never returns "pause" to the runtime: the engine decides what to keep.
        """
        self.tokens += 1
        self._run.outbox.put(protocol.text_event(self._run.run_id, text, token_id))
        self._run.running.wait()
        return False

    def on_finish(self, perf: PerfStat) -> None:
        """Remember the perf stats; the finish event is sent once `run` returned."""
        self.perf = perf

    def on_error(self, message: str) -> None:
        """Remember that the runtime reported the ERROR state."""
        self.error_message = message


def perf_to_dict(perf: PerfStat | None) -> dict[str, float | int]:
    """The runtime's perf struct as a JSON object (zeros when the runtime reported none)."""
    if perf is None:
        return {
            "prefill_time_ms": 0.0,
            "prefill_tokens": 0,
            "generate_time_ms": 0.0,
            "generate_tokens": 0,
            "memory_usage_mb": 0.0,
        }
    return {
        "prefill_time_ms": float(perf.prefill_time_ms),
        "prefill_tokens": int(perf.prefill_tokens),
        "generate_time_ms": float(perf.generate_time_ms),
        "generate_tokens": int(perf.generate_tokens),
        "memory_usage_mb": float(perf.memory_usage_mb),
    }


def _read_proc_status() -> dict[str, int]:
    """VmRSS/VmHWM in bytes, as the runtime's own perf figure uses VmHWM (docs/runtime.md §4.9)."""
    result: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    result[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return result
    return result


def _mem_available() -> int | None:
    """MemAvailable of this host in bytes (the budget a second runtime context would take from), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as meminfo:
            for line in meminfo:
                key, _, value = line.partition(":")
                if key == "MemAvailable":
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------------------
# Request handling
# ---------------------------------------------------------------------------


def _str_arg(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise OpError(protocol.KIND_BAD_REQUEST, f"'{message.get('op')}' needs a string '{key}'")
    return value


def _opt_str_arg(message: dict[str, Any], key: str) -> str | None:
    return None if message.get(key) is None else _str_arg(message, key)


def _int_arg(message: dict[str, Any], key: str, default: int | None = None) -> int:
    value = message.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OpError(protocol.KIND_BAD_REQUEST, f"'{message.get('op')}' needs an integer '{key}'")
    return value


def _bool_arg(message: dict[str, Any], key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise OpError(protocol.KIND_BAD_REQUEST, f"'{message.get('op')}' needs a boolean '{key}'")
    return value


class Worker:
    """Owns the runtime and serves one connection at a time; survives reconnects (remote mode)."""

    def __init__(
        self, tap: LogTap, *, remote: bool, abort_grace_s: float, allow: AllowList, slot: int = 0, slots: int = 1
    ) -> None:
        self.tap = tap
        self.remote = remote
        self.slot = slot  # which runtime context of this process (a remote worker may hold several)
        self.slots = slots
        self.abort_grace_s = abort_grace_s
        self.allow = allow
        self.runtime: Runtime | None = None
        self.init_key: str | None = None
        self.init_reply: dict[str, Any] = {}
        self.runs_served = 0
        self.started = time.monotonic()
        self._run: ActiveRun | None = None
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------

    def serve(self, conn: channel.FrameChannel) -> bool:
        """Serve one connection until EOF or shutdown; True when the process should exit.

        A frame that is malformed, oversized, truncated or fails its MAC ends the connection with the reason on
        stderr (the journal of a remote worker); a remote worker then serves its next client.
        """
        outbox = Outbox(conn, self.tap)
        stop_forwarding = self.tap.add_listener(lambda line: outbox.put(protocol.log_event(line)))
        exit_requested = False
        try:
            while True:
                try:
                    message = conn.recv()
                except protocol.ProtocolError as err:
                    self.tap.fatal(f"closing the connection from {conn.peer}: {err}")
                    break
                except OSError as err:
                    self.tap.fatal(f"lost the connection from {conn.peer}: {err.strerror or err}")
                    break
                if message is None:
                    break
                action = self.handle(message, outbox)
                if action == "shutdown":
                    exit_requested = not self.remote
                    break
        finally:
            stop_forwarding()
            self.stop_run(self.abort_grace_s)
            outbox.close()
        return exit_requested

    def handle(self, message: dict[str, Any], outbox: Outbox) -> str | None:
        """Dispatch one request; every request gets exactly one reply."""
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            outbox.put(protocol.reply_error(-1, protocol.KIND_BAD_REQUEST, "request without an integer 'id'"))
            return None
        op = message.get("op")
        handler = self._handlers().get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(protocol.OPS))
            text = f"unknown op {op!r}; known: {known}"
            outbox.put(protocol.reply_error(request_id, protocol.KIND_BAD_REQUEST, text))
            return None
        try:
            fields = handler(message, outbox)
        except OpError as err:
            outbox.put(protocol.reply_error(request_id, err.kind, err.message, **err.details))
            return None
        except Exception as err:  # noqa: BLE001 - one bad request must not kill the worker
            from rkllm_native.errors import RkllmError

            if isinstance(err, RkllmError):
                kind, text = self._classify_runtime_error(err)
                outbox.put(protocol.reply_error(request_id, kind, text, code=err.code))
            else:
                text = f"{op} failed: {type(err).__name__}: {err}"
                outbox.put(protocol.reply_error(request_id, protocol.KIND_CALL_FAILED, " ".join(text.split())))
            return None
        if fields is not None:  # None: the handler queued its reply itself (op_run)
            outbox.put(protocol.reply_ok(request_id, **fields))
        return "shutdown" if op == protocol.OP_SHUTDOWN else None

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], Outbox], dict[str, Any] | None]]:
        return {
            protocol.OP_HELLO: self.op_hello,
            protocol.OP_INIT: self.op_init,
            protocol.OP_RUN: self.op_run,
            protocol.OP_ABORT: self.op_abort,
            protocol.OP_PAUSE: self.op_pause,
            protocol.OP_RESUME: self.op_resume,
            protocol.OP_CLEAR_KV_CACHE: self.op_clear_kv_cache,
            protocol.OP_GET_KV_CACHE_SIZE: self.op_get_kv_cache_size,
            protocol.OP_SET_FUNCTION_TOOLS: self.op_set_function_tools,
            protocol.OP_SET_CHAT_TEMPLATE: self.op_set_chat_template,
            protocol.OP_LOAD_PROMPT_CACHE: self.op_load_prompt_cache,
            protocol.OP_RELEASE_PROMPT_CACHE: self.op_release_prompt_cache,
            protocol.OP_LOAD_LORA: self.op_load_lora,
            protocol.OP_STATS: self.op_stats,
            protocol.OP_SHUTDOWN: self.op_shutdown,
            protocol.OP_CHECK_PATHS: self.op_check_paths,
        }

    def _classify_runtime_error(self, err: Exception, *, with_log: bool = True) -> tuple[str, str]:
        """Kind and message for a binding error, with the runtime's own E line when it printed one."""
        from rkllm_native import errors

        kinds: dict[type[Exception], str] = {
            errors.RuntimeNotInitializedError: protocol.KIND_NOT_INITIALIZED,
            errors.RuntimeBusyError: protocol.KIND_BUSY,
            errors.InvalidInputError: protocol.KIND_INVALID_INPUT,
            errors.InvalidParameterError: protocol.KIND_INVALID_INPUT,
            errors.PromptCacheFileError: protocol.KIND_INVALID_INPUT,
            errors.UnsupportedOnProfileError: protocol.KIND_UNSUPPORTED,
        }
        kind = next((k for cls, k in kinds.items() if isinstance(err, cls)), protocol.KIND_CALL_FAILED)
        text = str(err)
        if with_log and isinstance(err, errors.RuntimeCallError):
            self.tap.sync()
            reason = logparse.last_problem_line(self.tap.recent()[-20:], levels="E")
            if reason and reason not in text:
                text = f"{text}: {reason}"
        return kind, text

    # -- helpers ----------------------------------------------------------

    def _require_runtime(self) -> Runtime:
        if self.runtime is None:
            raise OpError(protocol.KIND_NOT_INITIALIZED, "the runtime is not initialised yet (send 'init' first)")
        return self.runtime

    def _allowed(self, check: Callable[[str], str], path: str) -> str:
        """The real path to open, or the `path_not_allowed` refusal naming the path and the flag to add."""
        try:
            return check(path)
        except PathNotAllowedError as err:
            self.tap.fatal(f"refused: {err.message}")
            raise OpError(
                protocol.KIND_PATH_NOT_ALLOWED, err.message, facts={"path": err.path, "flag": err.flag}
            ) from err

    def _allowed_model_file(self, path: str, what: str) -> str:
        return self._allowed(lambda value: self.allow.model(value, what), path)

    def _require_idle(self, op: str) -> Runtime:
        runtime = self._require_runtime()
        with self._lock:
            run = self._run
        if run is not None:
            raise OpError(protocol.KIND_BUSY, f"busy: run {run.run_id} is in progress; '{op}' must wait")
        return runtime

    # -- ops --------------------------------------------------------------

    def op_hello(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Version handshake: refuse a client that speaks another protocol version."""
        version = message.get("version")
        if version != protocol.PROTOCOL_VERSION:
            raise OpError(
                protocol.KIND_VERSION_MISMATCH,
                f"protocol version mismatch: client speaks {version!r}, worker speaks {protocol.PROTOCOL_VERSION}; "
                "install the same rkllm version on both sides",
            )
        return {
            "version": protocol.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "mode": "remote" if self.remote else "local",
            "initialized": self.runtime is not None,
            "python": sys.version.split()[0],
            "slot": self.slot,
            "slots": self.slots,
        }

    def op_check_paths(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Would `init` accept this library and model? Loads nothing (the config flow asks before saving)."""
        library_path = _opt_str_arg(message, "library_path")
        model_path = _opt_str_arg(message, "model_path")
        if library_path is not None:
            self._allowed(self.allow.library, library_path)
        if model_path is not None:
            self._allowed(self.allow.model, model_path)
        return {}

    def op_init(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Load library and model; a repeated identical spec reuses the loaded runtime (loading is slow).

        Only files on the allow-list are opened, by their resolved real path (no symlink or `..` escape).
        """
        library_path = _str_arg(message, "library_path")
        model_path = _str_arg(message, "model_path")
        real_library = self._allowed(self.allow.library, library_path)
        real_model = self._allowed(self.allow.model, model_path)
        profile = _opt_str_arg(message, "profile")
        params = message.get("params") or {}
        if not isinstance(params, dict):
            raise OpError(protocol.KIND_BAD_REQUEST, "'init' needs 'params' as an object")
        key = json.dumps(
            {"library_path": library_path, "model_path": model_path, "profile": profile, "params": params},
            sort_keys=True,
        )
        if self.runtime is not None and key == self.init_key:
            return {**self.init_reply, "reused": True}
        runtime_params = build_runtime_params(real_model, params)  # refuse bad keys before unloading anything
        if self.runtime is not None:
            self._require_idle("init")
            self._destroy_runtime()
        return {**self._load(real_library, profile, runtime_params, key), "reused": False}

    def _load(self, library_path: str, profile: str | None, runtime_params: Any, key: str) -> dict[str, Any]:
        from rkllm_native import errors
        from rkllm_native.detect import validate_profile_name
        from rkllm_native.runtime import Runtime

        mark = self.tap.count
        try:
            runtime = Runtime(library_path, None if profile is None else validate_profile_name(profile))
            runtime.init(runtime_params)
        except errors.RkllmError as err:
            self.tap.sync()
            lines = self.tap.lines_since(mark)
            reason = logparse.last_problem_line(lines, levels="E")
            text = str(err)
            if reason and reason not in text:
                text = f"{text}: {reason}"
            facts = protocol.error_facts(err)
            if reason:
                facts[protocol.FACT_RUNTIME_LINE] = reason
            problem = init_problem(lines, facts.get("return_code"))
            if problem is not None:
                facts[protocol.FACT_RUNTIME_PROBLEM] = problem
            raise OpError(protocol.KIND_INIT_FAILED, text, code=err.code, facts=facts) from err
        self.tap.sync()
        info = logparse.parse_init_lines(self.tap.lines_since(mark))
        self.runtime = runtime
        self.init_key = key
        self.init_reply = {
            "version": runtime.version,
            "profile": str(runtime.profile.name),
            "driver_version": info.driver_version,
            "platform": info.platform or info.target_platform,
            "max_context_limit": info.max_context_limit,
            "toolkit_version": info.toolkit_version,
            "pid": os.getpid(),
        }
        return self.init_reply

    def op_run(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any] | None:
        """Start a run on its own thread and reply at once; events follow on the same connection."""
        runtime = self._require_runtime()
        run_id = _int_arg(message, "run")
        role = _str_arg(message, "role")
        text = _opt_str_arg(message, "text")
        token_ids = message.get("token_ids")
        if token_ids is not None and (
            not isinstance(token_ids, list) or not all(type(token) is int for token in token_ids)
        ):
            raise OpError(protocol.KIND_BAD_REQUEST, "'run' needs 'token_ids' as a list of integers")
        enable_thinking = _bool_arg(message, "enable_thinking", False)
        keep_history = _bool_arg(message, "keep_history", False)
        max_new_tokens = _int_arg(message, "max_new_tokens", 0)
        sampling = message.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise OpError(protocol.KIND_BAD_REQUEST, "'run' needs 'sampling' as an object or null")
        lora_name = _opt_str_arg(message, "lora_name")
        save_path = _opt_str_arg(message, "save_prompt_cache_path")
        if save_path is not None:
            save_path = self._allowed_model_file(save_path, "prompt cache")
        if role not in ("user", "tool"):
            raise OpError(protocol.KIND_INVALID_INPUT, f"run role must be 'user' or 'tool', got {role!r}")
        run_input, run_options = build_run_request(
            role=role,
            text=text,
            token_ids=token_ids,
            enable_thinking=enable_thinking,
            keep_history=keep_history,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            lora_name=lora_name,
            save_prompt_cache_path=save_path,
        )
        with self._lock:
            if self._run is not None:
                raise OpError(protocol.KIND_BUSY, f"busy: run {self._run.run_id} is still in progress")
            run = ActiveRun(run_id=run_id, outbox=outbox)
            self._run = run
        # The reply is queued before the thread exists, so "accepted" always precedes the run's events.
        outbox.put(protocol.reply_ok(_int_arg(message, "id"), accepted=True, run=run_id))
        thread = threading.Thread(
            target=self._run_body, args=(runtime, run, run_input, run_options), name=f"rkllm-run-{run_id}", daemon=True
        )
        run.thread = thread
        thread.start()
        return None

    def _run_body(self, runtime: Runtime, run: ActiveRun, run_input: Any, run_options: Any) -> None:
        from rkllm_native.errors import RkllmError

        mark = self.tap.count
        sink = EventSink(run)
        final: dict[str, Any]
        try:
            outcome = runtime.run(run_input, run_options, sink)
        except RkllmError as err:
            kind, _ = self._classify_runtime_error(err, with_log=False)
            final = self._run_failure(run, mark, kind, str(err))
        except Exception as err:  # noqa: BLE001 - the client must always get a terminal event
            final = self._run_failure(run, mark, protocol.KIND_CALL_FAILED, f"{type(err).__name__}: {err}")
        else:
            if sink.error_message is not None and not run.abort_requested:
                final = self._run_failure(run, mark, protocol.KIND_RUNTIME_ERROR, sink.error_message)
            else:
                perf = getattr(outcome, "perf", None) or sink.perf
                final = {
                    "ev": protocol.EV_FINISH,
                    "run": run.run_id,
                    "perf": perf_to_dict(perf),
                    "aborted": bool(run.abort_requested or getattr(outcome, "aborted", False)),
                    "paused": bool(getattr(outcome, "paused", False)),
                    "tokens": sink.tokens,
                }
                self.tap.sync()  # the runtime's own reuse figure, when it printed one, goes with the finish
                if (reuse := logparse.kv_reuse(self.tap.lines_since(mark))) is not None:
                    final["kv_reused"], final["prompt_tokens"] = reuse
        with self._lock:
            self._run = None
            self.runs_served += 1
        run.outbox.put(final)
        run.done.set()

    def _run_failure(self, run: ActiveRun, mark: int, kind: str, message: str) -> dict[str, Any]:
        """A run_error event, upgraded to context_overflow when the runtime said the prompt does not fit."""
        if run.abort_requested:
            return {
                "ev": protocol.EV_FINISH,
                "run": run.run_id,
                "perf": perf_to_dict(None),
                "aborted": True,
                "paused": False,
            }
        self.tap.sync()
        lines = self.tap.lines_since(mark)
        event: dict[str, Any] = {"ev": protocol.EV_RUN_ERROR, "run": run.run_id}
        overflow = logparse.find_context_overflow(lines)
        if overflow is not None:
            event.update(
                kind=protocol.KIND_CONTEXT_OVERFLOW,
                message=overflow.line,
                prompt_tokens=overflow.prompt_tokens,
                max_context=overflow.max_context,
            )
            return event
        reason = logparse.last_problem_line(lines, levels="E")
        text = " ".join(message.split()) or "the runtime reported an error"
        if reason and reason not in text:
            text = f"{text}: {reason}"
        event.update(kind=kind, message=text)
        return event

    def op_abort(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Ask the runtime to stop the run; optionally exit if it does not within `grace_s`."""
        run_id = _int_arg(message, "run")
        grace = message.get("grace_s")
        if grace is not None and (not isinstance(grace, int | float) or isinstance(grace, bool) or grace <= 0):
            raise OpError(protocol.KIND_BAD_REQUEST, "'abort' needs 'grace_s' as a positive number or null")
        with self._lock:
            run = self._run
        if run is None or run.run_id != run_id:
            return {"was_running": False}
        self._abort(run, float(grace) if grace is not None else None)
        return {"was_running": True}

    def op_pause(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Hold the run in its token callback until `resume` (or an abort) lets it go on."""
        return self._set_running(_int_arg(message, "run"), running=False)

    def op_resume(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Let a paused run go on."""
        return self._set_running(_int_arg(message, "run"), running=True)

    def _set_running(self, run_id: int, *, running: bool) -> dict[str, Any]:
        with self._lock:
            run = self._run
        if run is None or run.run_id != run_id:
            return {"was_running": False}
        if running or run.abort_requested:
            run.running.set()
        else:
            run.running.clear()
        return {"was_running": True}

    def _abort(self, run: ActiveRun, grace_s: float | None) -> None:
        run.abort_requested = True
        run.running.set()  # a paused run must reach the runtime's abort check
        if self.runtime is not None:
            try:
                self.runtime.abort()
            except Exception as err:  # noqa: BLE001 - abort is best effort; the grace timer still applies
                self.tap.emit(f"rkllm-worker: rkllm_abort failed: {err}")
        if grace_s is not None:
            timer = threading.Thread(
                target=self._enforce_abort, args=(run, grace_s), name="rkllm-abort-grace", daemon=True
            )
            timer.start()

    def _enforce_abort(self, run: ActiveRun, grace_s: float) -> None:
        """Exit the process when a run ignores abort past the grace; its supervisor starts a fresh one.

        [Inf] abort is cooperative and was seen to take >1 s (docs/runtime.md §8 item 8); past the grace the
        handle is in an unknown state, and only a new process gives a clean one.
        """
        if run.done.wait(grace_s):
            return
        self.tap.fatal(
            f"run {run.run_id} did not honour abort within {grace_s:g}s; exiting so the supervisor restarts me"
        )
        os._exit(EXIT_ABORT_TIMEOUT)

    def stop_run(self, grace_s: float) -> bool:
        """Abort any run and wait for it; False when it did not end in time."""
        with self._lock:
            run = self._run
        if run is None:
            return True
        self._abort(run, grace_s if self.remote else None)
        return run.done.wait(grace_s)

    def op_clear_kv_cache(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Drop the KV cache (optionally keeping the system prompt or clearing a range)."""
        runtime = self._require_idle("clear_kv_cache")
        keep = _bool_arg(message, "keep_system_prompt", True)
        start_pos = message.get("start_pos")
        end_pos = message.get("end_pos")
        for name, value in (("start_pos", start_pos), ("end_pos", end_pos)):
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, int) for v in value)):
                raise OpError(protocol.KIND_BAD_REQUEST, f"'clear_kv_cache' needs '{name}' as a list of integers")
        runtime.clear_kv_cache(keep, start_pos, end_pos)
        return {}

    def op_get_kv_cache_size(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Tokens currently held in the KV cache (one entry per batch slot)."""
        runtime = self._require_idle("get_kv_cache_size")
        return {"sizes": list(runtime.get_kv_cache_size())}

    def op_set_function_tools(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Install the tools JSON into the runtime's template."""
        runtime = self._require_idle("set_function_tools")
        system_prompt = _str_arg(message, "system_prompt")
        tools_json = _str_arg(message, "tools_json")
        tool_response = _opt_str_arg(message, "tool_response_str") or "tool_response"
        runtime.set_function_tools(system_prompt, tools_json, tool_response)
        return {}

    def op_set_chat_template(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Replace the chat template (disables tools and thinking: docs/runtime.md §4.7)."""
        runtime = self._require_idle("set_chat_template")
        system_prompt = _str_arg(message, "system_prompt")
        prefix = _str_arg(message, "prompt_prefix")
        postfix = _str_arg(message, "prompt_postfix")
        runtime.set_chat_template(system_prompt, prefix, postfix)
        return {}

    def op_load_prompt_cache(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Preload a saved prefill state."""
        runtime = self._require_idle("load_prompt_cache")
        path = self._allowed_model_file(_str_arg(message, "path"), "prompt cache")
        runtime.load_prompt_cache(path)
        return {}

    def op_release_prompt_cache(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Forget a preloaded prefill state."""
        self._require_idle("release_prompt_cache").release_prompt_cache()
        return {}

    def op_load_lora(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Load a LoRA adapter that runs can select by name."""
        runtime = self._require_idle("load_lora")
        path = self._allowed_model_file(_str_arg(message, "path"), "LoRA adapter")
        name = _str_arg(message, "name")
        scale = message.get("scale", 1.0)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise OpError(protocol.KIND_BAD_REQUEST, "'load_lora' needs 'scale' as a number")
        runtime.load_lora(path, name, float(scale))
        return {}

    def op_stats(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Process figures for diagnostics; cheap, allowed during a run."""
        status = _read_proc_status()
        with self._lock:
            running = None if self._run is None else self._run.run_id
        return {
            "pid": os.getpid(),
            "mem_available": _mem_available(),
            "rss": status.get("VmRSS"),
            "hwm": status.get("VmHWM"),
            "runs_served": self.runs_served,
            "running": running,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "initialized": self.runtime is not None,
        }

    def op_shutdown(self, message: dict[str, Any], outbox: Outbox) -> dict[str, Any]:
        """Local: the process exits after the reply. Remote: only this session ends; the model stays loaded."""
        return {"exiting": not self.remote}

    # -- teardown ---------------------------------------------------------

    def _destroy_runtime(self) -> None:
        runtime, self.runtime = self.runtime, None
        self.init_key = None
        self.init_reply = {}
        if runtime is not None:
            try:
                runtime.destroy()
            except Exception as err:  # noqa: BLE001 - teardown continues regardless
                self.tap.fatal(f"rkllm_destroy failed: {err}")

    def shutdown(self) -> None:
        """Abort, destroy, and leave: used for shutdown, SIGTERM and parent death."""
        if self.stop_run(self.abort_grace_s):
            self._destroy_runtime()
        else:
            self.tap.fatal("the run did not stop; exiting without rkllm_destroy (the kernel frees the NPU)")


# ---------------------------------------------------------------------------
# Init failures: what the runtime's lines say went wrong
# ---------------------------------------------------------------------------

# [Inf] Strings the runtime prints when init fails, from the library's strings and user reports (docs/runtime.md
# §7, §8 item 9, Appendix A), not observed on a board. Matched on any line: the out-of-memory and RKNN magic
# messages do not come as `E rkllm:` lines.
_PLATFORM_MISMATCH = re.compile(r"target_platform does not match", re.IGNORECASE)
_NPU_OUT_OF_MEMORY = re.compile(r"failed to malloc npu memory", re.IGNORECASE)
_MODEL_REFUSED = re.compile(
    r"invalid rkllm model|invalid rknn llm model magic|unsupported model architecture|"
    r"rkllm-runtime version is lower than the rkllm-toolkit version",
    re.IGNORECASE,
)


def init_problem(lines: list[str], return_code: str | None) -> str | None:
    """Classify a failed rkllm_init from what the runtime printed during it (newest line first).

    [Inf] rkllm_init returning 0 without a handle was reported under NPU out-of-memory (docs/runtime.md §2.4).
    """
    for line in reversed(lines):
        if _PLATFORM_MISMATCH.search(line):
            return protocol.PROBLEM_PLATFORM_MISMATCH
        if _NPU_OUT_OF_MEMORY.search(line):
            return protocol.PROBLEM_NPU_OUT_OF_MEMORY
        if _MODEL_REFUSED.search(line):
            return protocol.PROBLEM_MODEL_REFUSED
    if return_code == "0":
        return protocol.PROBLEM_NPU_OUT_OF_MEMORY
    return None


# ---------------------------------------------------------------------------
# Protocol fields -> binding types
# ---------------------------------------------------------------------------


def build_runtime_params(model_path: str, params: dict[str, Any]) -> Any:
    """`RuntimeParams` from the init request; unknown keys are refused by name rather than ignored."""
    from rkllm_native.runtime import RuntimeParams

    known = {field.name for field in dataclasses.fields(RuntimeParams)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise OpError(
            protocol.KIND_BAD_REQUEST,
            f"unknown runtime parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'model_path'}))}",
        )
    return RuntimeParams(**{**params, "model_path": model_path})


def build_run_request(
    *,
    role: str,
    text: str | None,
    token_ids: list[int] | None,
    enable_thinking: bool,
    keep_history: bool,
    sampling: dict[str, Any] | None,
    max_new_tokens: int,
    lora_name: str | None,
    save_prompt_cache_path: str | None,
) -> tuple[Any, Any]:
    """`RunInput` and `RunOptions` from a run request."""
    from rkllm_native.runtime import RunInput, RunOptions, SamplingParams

    sampling_params = None
    if sampling:
        known = {field.name for field in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise OpError(protocol.KIND_BAD_REQUEST, f"unknown sampling parameter(s) {', '.join(unknown)}")
        values = {key: value for key, value in sampling.items() if value is not None}
        sampling_params = SamplingParams(**values) if values else None
    run_input = RunInput(role=role, text=text, token_ids=token_ids, enable_thinking=enable_thinking)  # type: ignore[arg-type]
    run_options = RunOptions(
        keep_history=keep_history,
        sampling=sampling_params,
        max_new_tokens=max_new_tokens,
        lora_name=lora_name,
        save_prompt_cache_path=save_prompt_cache_path,
    )
    return run_input, run_options


# ---------------------------------------------------------------------------
# Remote mode: one authenticated client at a time
# ---------------------------------------------------------------------------


class HandshakeFailed(Exception):
    """A connection that did not complete the mutual handshake; the message is the reason the worker logs."""


def describe_peer(peer: tuple[Any, ...]) -> str:
    """`host:port` of a TCP peer, `[v6]:port` for IPv6."""
    host = str(peer[0])
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


class RemoteServer:
    """Accepts TCP (optionally TLS) clients, runs the mutual handshake, and hands one at a time to the main thread.

    Each connection is authenticated on its own thread (at most MAX_PENDING_HANDSHAKES at once), so a silent or
    hostile peer cannot hold the accept loop; only an authenticated client competes for the one session, and its
    "busy" answer is itself authenticated.
    """

    def __init__(
        self, workers: list[Worker], host: str, port: int, secret: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.workers = workers
        self.worker = workers[0]
        self.secret = secret
        self.tls = tls
        self.listener = socket.create_server((host, port), backlog=8)
        self.address = self.listener.getsockname()
        # One session per runtime context (`--slots`); a free context keeps its model loaded for the next client.
        self._free: queue.Queue[Worker] = queue.Queue()
        for worker in workers:
            self._free.put(worker)
        self._pending = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self._thread = threading.Thread(target=self._accept_loop, name="rkllm-accept", daemon=True)

    def start(self) -> None:
        """Begin accepting in the background."""
        self._thread.start()

    def _log(self, line: str) -> None:
        """A connection event: on stderr (the service's journal) and in the ring the connected client sees."""
        self.worker.tap.fatal(line)
        self.worker.tap.emit(f"rkllm-worker: {line}")

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            where = describe_peer(peer)
            if not self._pending.acquire(blocking=False):
                self._log(f"refused {where}: {MAX_PENDING_HANDSHAKES} handshakes are already in progress")
                conn.close()
                continue
            threading.Thread(target=self._admit, args=(conn, where), name="rkllm-handshake", daemon=True).start()

    def _admit(self, conn: socket.socket, where: str) -> None:
        """Authenticate one connection, then wait briefly for the session; never raises (the thread just ends)."""
        try:
            try:
                session = self._handshake(conn, where)
            finally:
                self._pending.release()
        except HandshakeFailed as err:
            self._log(f"refused {where}: {err}")
            conn.close()
            return
        except (OSError, protocol.ProtocolError) as err:
            self._log(f"handshake with {where} failed: {err}")
            conn.close()
            return
        except Exception as err:  # noqa: BLE001 - whatever a peer sends, the worker logs it and goes on
            self._log(f"handshake with {where} failed: {type(err).__name__}: {err}")
            conn.close()
            return
        # A client that just disconnected may still be winding down (abort, flush): give it a moment, so a
        # quick reconnect (e.g. an integration reload) is not refused as busy.
        try:
            worker = self._free.get(timeout=SESSION_HANDOVER_S)
        except queue.Empty:
            with contextlib.suppress(OSError, protocol.ProtocolError):
                session.send({"ev": protocol.EV_BUSY, "message": protocol.BUSY_MESSAGE})
            session.close()
            self._log(f"refused {where}: {protocol.BUSY_MESSAGE}")
            return
        try:
            session.send({"ev": protocol.EV_READY})
        except (OSError, protocol.ProtocolError) as err:
            self._log(f"lost {where} right after the handshake: {err}")
            session.close()
            self._free.put(worker)
            return
        if len(self.workers) > 1:
            self._log(f"{where} uses runtime context {worker.slot} of {len(self.workers)}")
        try:
            worker.serve(session)
        finally:
            session.close()
            self._free.put(worker)

    def _handshake(self, conn: socket.socket, where: str) -> channel.FrameChannel:
        """TLS (when configured), then the mutual proof of the secret; the sealed channel of an authenticated client.

        Raises HandshakeFailed with the reason to log; the client gets `auth_failed` only when its proof was wrong.
        """
        conn.settimeout(AUTH_TIMEOUT_S)
        # Without it a client that vanished silently would hold the only session until a manual restart.
        protocol.enable_keepalive(conn)
        first = conn.recv(1, socket.MSG_PEEK)
        if not first:
            raise HandshakeFailed("closed the connection before the handshake")
        stream: socket.socket = conn
        if self.tls is not None:
            if first[0] != channel.TLS_HANDSHAKE_RECORD:
                refusal = {"ev": protocol.EV_TLS_REQUIRED, "message": protocol.TLS_REQUIRED_MESSAGE}
                with contextlib.suppress(OSError):
                    protocol.send_frame(conn, refusal)
                raise HandshakeFailed(
                    "did not start TLS; this worker runs with --tls-cert, so Home Assistant needs its certificate "
                    "fingerprint"
                )
            try:
                stream = self.tls.wrap_socket(conn, server_side=True)
            except ssl.SSLError as err:
                raise HandshakeFailed(f"TLS handshake failed: {err.reason or err}") from err
        elif first[0] == channel.TLS_HANDSHAKE_RECORD:
            raise HandshakeFailed(
                "started TLS, but this worker runs without --tls-cert/--tls-key (clear the TLS fingerprint in Home "
                "Assistant, or restart the worker with a certificate)"
            )
        plain = channel.FrameChannel(stream, peer=where, max_frame_bytes=channel.MAX_HANDSHAKE_FRAME_BYTES)
        worker_nonce = channel.new_nonce()
        plain.send(channel.challenge(worker_nonce))
        hello = plain.recv()
        if hello is None:
            raise HandshakeFailed("closed the connection during the handshake")
        if hello.get("op") != protocol.OP_CLIENT_HELLO:
            plain.send({"ev": protocol.EV_AUTH_FAILED, "message": "protocol mismatch: update rkllm on both sides"})
            raise HandshakeFailed(
                f"sent {hello.get('op')!r} instead of a client_hello (an rkllm older than protocol "
                f"{protocol.PROTOCOL_VERSION}?); install the same rkllm version on both sides"
            )
        version = hello.get("version")
        if version != protocol.PROTOCOL_VERSION:
            raise HandshakeFailed(
                f"speaks protocol {version!r}, this worker {protocol.PROTOCOL_VERSION}; install the same rkllm version "
                "on both sides"
            )
        keys = channel.derive_keys(self.secret, protocol.PROTOCOL_VERSION, channel.nonce_of(hello), worker_nonce)
        answer = plain.recv()
        if answer is None:
            raise HandshakeFailed("closed the connection during the handshake")
        if answer.get("op") != protocol.OP_AUTH or not channel.proof_matches(keys.client_proof, answer.get("proof")):
            plain.send({"ev": protocol.EV_AUTH_FAILED, "message": "authentication failed: wrong shared secret"})
            raise HandshakeFailed("did not prove the shared secret (a different secret on one side)")
        plain.send({"ev": protocol.EV_AUTH_OK, "proof": keys.worker_proof.hex()})
        sealer = channel.FrameSealer(keys.worker_to_client)
        opener = channel.FrameOpener(keys.client_to_worker, "client")
        if isinstance(stream, ssl.SSLSocket):
            tls_stream = channel.TlsStream(stream)
            return channel.FrameChannel(tls_stream, peer=where, closer=tls_stream, sealer=sealer, opener=opener)
        conn.settimeout(None)
        return channel.FrameChannel(conn, peer=where, closer=conn, sealer=sealer, opener=opener)

    def serve_forever(self) -> None:
        """Serve until SIGTERM: each session runs on its handshake's thread; the runtimes stay loaded between them.

        The main thread only waits here, so the SIGTERM handler (which raises in the main thread) always runs.
        """
        stop = threading.Event()
        while not stop.wait(3600):
            pass

    def shutdown(self) -> None:
        """Abort, release and leave every runtime context."""
        for worker in self.workers:
            worker.shutdown()


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - binding all interfaces is the user's choice


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rkllm_native.worker", description="Serve librkllmrt over the rkllm worker protocol."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fd", type=int, help="inherited socketpair end (local child of Home Assistant)")
    mode.add_argument("--listen", type=_parse_listen, help="HOST:PORT to serve remote clients on")
    parser.add_argument(
        "--parent-pid", type=int, help="pid of the spawning process; exit at once if it is already gone (local mode)"
    )
    parser.add_argument("--secret-file", help="file whose first line is the shared secret (required with --listen)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve TLS; clients pin its SHA-256 fingerprint (--listen)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--slots",
        type=int,
        default=1,
        help="runtime contexts to serve at once (--listen): one per Home Assistant slot, each loads the model "
        "(docs/voice.md)",
    )
    files = parser.add_argument_group(
        "files served (the allow-list; any other library or model a client names is refused)"
    )
    files.add_argument("--library", action="append", default=[], metavar="PATH", help="librkllmrt.so (repeatable)")
    files.add_argument("--model", action="append", default=[], metavar="PATH", help="a model file (repeatable)")
    files.add_argument(
        "--models-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="every model file under DIR, including ones added later (repeatable)",
    )
    files.add_argument("--config", metavar="FILE", help="TOML file with library, model and models_dir (paths or lists)")
    parser.add_argument(
        "--abort-grace", type=float, default=10.0, help="seconds a run may take to honour abort before the worker exits"
    )
    args = parser.parse_args(argv)
    if args.listen is not None and not args.secret_file:
        parser.error("--listen needs --secret-file FILE (the first line of FILE is the shared secret)")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together (a PEM certificate and its private key)")
    if args.tls_cert is not None and args.listen is None:
        parser.error("--tls-cert is for --listen (the local socketpair needs no TLS)")
    if args.listen is not None and not (args.library or args.config):
        parser.error(
            "--listen needs the files it may serve: --library PATH and --model PATH or --models-dir DIR "
            "(or --config FILE)"
        )
    if args.abort_grace <= 0:
        parser.error("--abort-grace must be a positive number of seconds")
    if not 1 <= args.slots <= MAX_WORKER_SLOTS:
        parser.error(f"--slots must be between 1 and {MAX_WORKER_SLOTS}")
    return args


def _log_remote_setup(tap: LogTap, allow: AllowList, fingerprint: str | None, secret: str) -> None:
    """The start lines a remote worker's owner needs: what it serves, the fingerprint to pin, a weak secret."""
    if fingerprint is not None:
        tap.fatal(f"TLS certificate SHA-256 fingerprint {fingerprint} (enter it in Home Assistant)")
    else:
        tap.fatal("no TLS (--tls-cert/--tls-key): frames are authenticated but readable on the network")
    tap.fatal(f"serving {allow.describe()}")
    if len(secret) < MIN_SECRET_CHARS:
        tap.fatal(
            f"warning: the shared secret has only {len(secret)} characters; use a long random one "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def _install_sigterm() -> None:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise TerminateRequested

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> int:
    """Run the worker; returns the process exit code."""
    args = _parse_args(argv)
    if args.fd is not None:
        # Before any thread exists, in the main thread: die with the parent (docs/runtime.md §8 item 9).
        set_parent_death_signal()
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            # The parent died before prctl took effect: the death signal will never come.
            print(f"rkllm-worker: parent process {args.parent_pid} is gone; exiting", file=sys.stderr)
            return EXIT_STARTUP
    secret = None
    if args.secret_file:
        try:
            secret = protocol.read_secret_file(args.secret_file)
        except protocol.SecretFileError as err:
            print(f"rkllm-worker: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        allow = AllowList.from_options(args.library, args.model, args.models_dir, args.config)
    except AllowListConfigError as err:
        print(f"rkllm-worker: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.listen is not None and not allow.serves_anything:
        print(
            "rkllm-worker: nothing to serve: give --library PATH and --model PATH or --models-dir DIR "
            "(or the same keys in --config FILE)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    tls: ssl.SSLContext | None = None
    fingerprint = None
    if args.tls_cert is not None:
        try:
            tls = channel.server_tls_context(args.tls_cert, args.tls_key)
            fingerprint = channel.certificate_fingerprint(args.tls_cert)
        except channel.TlsSetupError as err:
            print(f"rkllm-worker: {err}", file=sys.stderr)
            return EXIT_USAGE
    sock: socket.socket | None = None
    if args.fd is not None:
        try:
            sock = socket.socket(fileno=args.fd)
        except OSError as err:
            print(f"rkllm-worker: --fd {args.fd} is not a usable socket: {err}", file=sys.stderr)
            return EXIT_USAGE
    tap = LogTap()
    fatal_file: BinaryIO = os.fdopen(os.dup(tap.fatal_fd), "wb", buffering=0)
    faulthandler.enable(file=fatal_file, all_threads=True)
    _install_sigterm()
    slots = args.slots if sock is None else 1
    workers = [
        Worker(tap, remote=sock is None, abort_grace_s=args.abort_grace, allow=allow, slot=index, slots=slots)
        for index in range(slots)
    ]
    worker = workers[0]
    try:
        if sock is not None:
            # An inherited socketpair end: no third party can reach it, so its frames carry no MAC.
            worker.serve(channel.FrameChannel(sock, peer="the local client", closer=sock))
            sock.close()
        else:
            host, port = args.listen
            try:
                server = RemoteServer(workers, host, port, secret or "", tls)
            except OSError as err:
                tap.fatal(f"cannot listen on {host}:{port}: {err.strerror or err}")
                return EXIT_STARTUP
            tap.fatal(f"listening on {server.address[0]}:{server.address[1]} (pid {os.getpid()})")
            _log_remote_setup(tap, allow, fingerprint, secret or "")
            server.start()
            server.serve_forever()
    except TerminateRequested:
        tap.fatal("SIGTERM: aborting, releasing the runtime, exiting")
    except KeyboardInterrupt:
        tap.fatal("interrupted: aborting, releasing the runtime, exiting")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for each in workers:
        each.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
