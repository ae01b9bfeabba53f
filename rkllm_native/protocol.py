"""Framed JSON protocol between the worker process and its client, blocking and asyncio flavours.

A frame is a 4-byte big-endian length followed by one UTF-8 JSON object. Requests carry `"op"` and an
integer `"id"`; everything the worker sends on its own carries `"ev"`. The same frames travel over the
local socketpair and over TCP to a remote worker; TCP adds a mutual handshake on the shared secret and a MAC on
every later frame (`rkllm_native.channel`, docs/worker-channel.md).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

# 2: mutual authentication and per-frame MACs on TCP (docs/worker-channel.md); version 1 clients cannot connect.
PROTOCOL_VERSION: Final = 2
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
HEADER: Final = struct.Struct(">I")

# Request/reply operations the worker understands.
OP_HELLO: Final = "hello"
OP_INIT: Final = "init"
OP_RUN: Final = "run"
OP_ABORT: Final = "abort"
OP_PAUSE: Final = "pause"
OP_RESUME: Final = "resume"
OP_CLEAR_KV_CACHE: Final = "clear_kv_cache"
OP_GET_KV_CACHE_SIZE: Final = "get_kv_cache_size"
OP_SET_FUNCTION_TOOLS: Final = "set_function_tools"
OP_SET_CHAT_TEMPLATE: Final = "set_chat_template"
OP_LOAD_PROMPT_CACHE: Final = "load_prompt_cache"
OP_RELEASE_PROMPT_CACHE: Final = "release_prompt_cache"
OP_LOAD_LORA: Final = "load_lora"
OP_STATS: Final = "stats"
OP_SHUTDOWN: Final = "shutdown"
OP_CHECK_PATHS: Final = "check_paths"
# Handshake frames of a remote connection (rkllm_native.channel); never sent with call().
OP_CLIENT_HELLO: Final = "client_hello"
OP_AUTH: Final = "auth"
OPS: Final = frozenset(
    {
        OP_HELLO,
        OP_INIT,
        OP_RUN,
        OP_ABORT,
        OP_PAUSE,
        OP_RESUME,
        OP_CLEAR_KV_CACHE,
        OP_GET_KV_CACHE_SIZE,
        OP_SET_FUNCTION_TOOLS,
        OP_SET_CHAT_TEMPLATE,
        OP_LOAD_PROMPT_CACHE,
        OP_RELEASE_PROMPT_CACHE,
        OP_LOAD_LORA,
        OP_STATS,
        OP_SHUTDOWN,
        OP_CHECK_PATHS,
    }
)

# Events the worker sends without being asked.
EV_REPLY: Final = "reply"
EV_TEXT: Final = "text"
EV_FINISH: Final = "finish"
EV_RUN_ERROR: Final = "run_error"
EV_LOG: Final = "log"
EV_CHALLENGE: Final = "challenge"
EV_AUTH_OK: Final = "auth_ok"
EV_AUTH_FAILED: Final = "auth_failed"
EV_BUSY: Final = "busy"
EV_READY: Final = "ready"  # first sealed frame of a session: the worker is all this client's
EV_TLS_REQUIRED: Final = "tls_required"  # a worker with --tls-cert answers a client that did not start TLS

# Error kinds in failed replies and run_error events; the client maps them onto engine errors.
KIND_BAD_REQUEST: Final = "bad_request"
KIND_VERSION_MISMATCH: Final = "version_mismatch"
KIND_NOT_INITIALIZED: Final = "not_initialized"
KIND_INIT_FAILED: Final = "init_failed"
KIND_BUSY: Final = "busy"
KIND_CALL_FAILED: Final = "call_failed"
KIND_RUNTIME_ERROR: Final = "runtime_error"
KIND_CONTEXT_OVERFLOW: Final = "context_overflow"
KIND_INVALID_INPUT: Final = "invalid_input"
KIND_UNSUPPORTED: Final = "unsupported"
KIND_PATH_NOT_ALLOWED: Final = "path_not_allowed"  # not a --library/--model/--models-dir the worker serves

BUSY_MESSAGE: Final = "busy: another client is connected"
TLS_REQUIRED_MESSAGE: Final = (
    "this worker speaks TLS only: enter the certificate fingerprint it printed at start in Home Assistant"
)

# Facts of a failed init (`error.facts`, all strings): what the binding's typed error knew, plus what the runtime
# printed. The client turns `code` + facts into a typed engine error, so nobody has to parse the message.
FACT_ATTRIBUTES: Final = (
    "path",
    "version",
    "override",
    "detected_profile",
    "library_arch",
    "host_arch",
    "model_path",
    "return_code",
)
FACT_RUNTIME_LINE: Final = "runtime_line"  # the runtime's last `E rkllm:` line during init
FACT_RUNTIME_PROBLEM: Final = "runtime_problem"  # one of the PROBLEM_* values, parsed from the runtime's lines
PROBLEM_PLATFORM_MISMATCH: Final = "target_platform_mismatch"
PROBLEM_MODEL_REFUSED: Final = "model_refused"
PROBLEM_NPU_OUT_OF_MEMORY: Final = "npu_out_of_memory"


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; the connection cannot be trusted any more."""


class SecretFileError(Exception):
    """The shared-secret file for the remote worker is missing, unreadable or empty."""


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def scrub_text(text: str) -> str:
    """`text` as valid Unicode: each lone UTF-16 surrogate becomes U+FFFD (as a browser's TextEncoder does).

    Python strings may hold lone surrogates (the JSON escape of U+D800 decodes to one), which UTF-8 cannot encode;
    the runtime takes UTF-8 C strings, so they are replaced here, once, for every frame (docs/robustness.md §3).
    """
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def encode_payload(message: dict[str, Any]) -> bytes:
    """One message as UTF-8 JSON (the body of a plain or sealed frame); lone surrogates are replaced."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return scrub_text(text).encode("utf-8")


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message; refuses frames the peer would reject so the error shows on the sending side.

    Never raises for the text a message carries: lone surrogates are replaced (`scrub_text`). Only a frame over
    `MAX_FRAME_BYTES` raises `ProtocolError`.
    """
    payload = encode_payload(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """Validate a length header before allocating a buffer for it (a corrupt header must not eat RAM)."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME_BYTES}-byte limit (corrupt stream?)")
    return int(length)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse one frame body; anything but a JSON object is a protocol violation."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ProtocolError(f"frame is not valid UTF-8: {err.reason} at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise ProtocolError(f"frame is not valid JSON: {err.msg} at position {err.pos}") from err
    except RecursionError as err:  # hostile nesting ([[[[…): refuse it like any other malformed frame
        raise ProtocolError("frame nests JSON too deeply") from err
    if not isinstance(message, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(message).__name__}")
    return message


# ---------------------------------------------------------------------------
# Blocking sockets (worker side)
# ---------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int, *, at_boundary: bool) -> bytes | None:
    """Read exactly `size` bytes; None only for EOF before the first byte of a frame."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if at_boundary and not chunks:
                return None
            raise ProtocolError(f"connection closed inside a frame ({len(chunks)} of {size} bytes read)")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Read one message from a blocking socket; None means the peer closed cleanly between frames."""
    header = _recv_exactly(sock, HEADER.size, at_boundary=True)
    if header is None:
        return None
    length = frame_length(header)
    payload = _recv_exactly(sock, length, at_boundary=False) if length else b""
    return decode_payload(payload or b"")


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one message to a blocking socket (callers serialise writers; frames must not interleave)."""
    sock.sendall(encode_frame(message))


def send_frames(sock: socket.socket, messages: Sequence[dict[str, Any]]) -> None:
    """Write several messages with one system call, which matters at high token rates."""
    sock.sendall(b"".join(encode_frame(message) for message in messages))


# ---------------------------------------------------------------------------
# asyncio streams (client side)
# ---------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one message from a stream; None means the peer closed cleanly between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise ProtocolError(f"connection closed inside a frame header ({len(err.partial)} of 4 bytes)") from err
    length = frame_length(header)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise ProtocolError(f"connection closed inside a frame ({len(err.partial)} of {length} bytes read)") from err
    return decode_payload(payload)


def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Queue one message on a stream without waiting; call `drain_frames` to apply back-pressure."""
    writer.write(encode_frame(message))


async def drain_frames(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport buffer is below its high-water mark."""
    await writer.drain()


# ---------------------------------------------------------------------------
# Message constructors
# ---------------------------------------------------------------------------


def request(op: str, request_id: int, **fields: Any) -> dict[str, Any]:
    """Build a request frame; the id pairs it with its reply."""
    return {"op": op, "id": request_id, **fields}


def reply_ok(request_id: int, **fields: Any) -> dict[str, Any]:
    """Build a successful reply."""
    return {"ev": EV_REPLY, "id": request_id, "ok": True, **fields}


def reply_error(request_id: int, kind: str, message: str, **details: Any) -> dict[str, Any]:
    """Build a failed reply; `message` is one line a user can act on, `kind` is for code."""
    error: dict[str, Any] = {"kind": kind, "message": message, **details}
    return {"ev": EV_REPLY, "id": request_id, "ok": False, "error": error}


def error_facts(err: BaseException) -> dict[str, str]:
    """The attributes of a binding error (`rkllm_native.errors`) that name the file, version or setting at fault."""
    facts: dict[str, str] = {}
    for name in FACT_ATTRIBUTES:
        value = getattr(err, name, None)
        if value is not None:
            facts[name] = str(value)
    return facts


def text_event(run_id: int, text: str, token_id: int) -> dict[str, Any]:
    """One decoded piece of a run."""
    return {"ev": EV_TEXT, "run": run_id, "text": text, "token": token_id}


def text_batch_event(run_id: int, pieces: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Several queued pieces of one run in one frame."""
    return {"ev": EV_TEXT, "run": run_id, "pieces": [[text, token] for text, token in pieces]}


def text_pieces(event: dict[str, Any]) -> list[tuple[str, int]]:
    """The pieces of a text event in order, whether it carries one piece or a batch."""
    pieces = event.get("pieces")
    if pieces is None:
        return [(_require_str(event, "text"), _require_int(event, "token"))]
    if not isinstance(pieces, list):
        raise ProtocolError("text event 'pieces' must be a list")
    result: list[tuple[str, int]] = []
    for piece in pieces:
        if (
            not isinstance(piece, list)
            or len(piece) != 2
            or not isinstance(piece[0], str)
            or not isinstance(piece[1], int)
        ):
            raise ProtocolError(f"text event piece must be [text, token], got {piece!r:.80}")
        result.append((piece[0], piece[1]))
    return result


def log_event(line: str) -> dict[str, Any]:
    """One line the runtime (or the worker) printed."""
    return {"ev": EV_LOG, "line": line}


def _require_str(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string in {message.get('ev') or message.get('op')} frame")
    return value


def _require_int(message: dict[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be an integer in {message.get('ev') or message.get('op')} frame")
    return value


# ---------------------------------------------------------------------------
# TCP: keepalive and the shared-secret file (the handshake itself is in rkllm_native.channel)
# ---------------------------------------------------------------------------


# A peer that vanishes without closing (power loss, a dropped network) is noticed after about
# KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT seconds of silence, instead of never.
KEEPALIVE_IDLE_S: Final = 30
KEEPALIVE_INTERVAL_S: Final = 10
KEEPALIVE_COUNT: Final = 3


def enable_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive so a dead remote peer ends the session (the worker serves one client at a time)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):  # Linux has all three; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def read_secret_file(path: str | Path) -> str:
    """Read the shared secret (first line, stripped) so both sides can keep it out of command lines."""
    secret_path = Path(path)
    try:
        text = secret_path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise SecretFileError(f"secret file {secret_path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise SecretFileError(f"cannot read secret file {secret_path}: {err}") from err
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise SecretFileError(f"secret file {secret_path} is empty (the secret is its first line)")
    return secret
