"""Worker protocol framing and auth: frames survive the trip intact, and bad input fails with one clear error."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_native import protocol


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    yield left, right
    left.close()
    right.close()


def test_frames_round_trip_in_order_including_non_ascii(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    messages = [
        protocol.request(protocol.OP_RUN, 7, run=3, role="user", text="Schalte das Licht in der Küche aus 💡"),
        protocol.text_event(3, "ok", 42),
        protocol.reply_error(7, protocol.KIND_BUSY, "busy: run 2 is in progress"),
    ]
    protocol.send_frame(left, messages[0])
    protocol.send_frames(left, messages[1:])
    assert [protocol.recv_frame(right) for _ in messages] == messages


def test_clean_close_between_frames_is_end_of_stream(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    protocol.send_frame(left, {"ev": "log", "line": "I rkllm: rkllm_run ended"})
    left.close()
    assert protocol.recv_frame(right) == {"ev": "log", "line": "I rkllm: rkllm_run ended"}
    assert protocol.recv_frame(right) is None


def test_close_inside_a_frame_is_a_protocol_error(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    left.sendall(struct.pack(">I", 100) + b'{"ev":')
    left.close()
    with pytest.raises(protocol.ProtocolError, match=r"closed inside a frame \(6 of 100 bytes"):
        protocol.recv_frame(right)


def test_oversized_length_header_is_refused_before_reading_the_body(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = socket_pair
    left.sendall(struct.pack(">I", protocol.MAX_FRAME_BYTES + 1))
    with pytest.raises(protocol.ProtocolError, match="exceeds the 16777216-byte limit"):
        protocol.recv_frame(right)


def test_frame_at_the_limit_passes_and_one_byte_more_is_refused_when_encoding() -> None:
    overhead = len(json.dumps({"line": ""}, separators=(",", ":")))
    at_limit = {"line": "x" * (protocol.MAX_FRAME_BYTES - overhead)}
    frame = protocol.encode_frame(at_limit)
    assert len(frame) == protocol.MAX_FRAME_BYTES + 4
    assert protocol.decode_payload(frame[4:]) == at_limit
    with pytest.raises(protocol.ProtocolError, match="exceeds the 16777216-byte limit"):
        protocol.encode_frame({"line": "x" * (protocol.MAX_FRAME_BYTES - overhead + 1)})


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'{"ev": ', "not valid JSON"),
        (b'{"ev": "\xff"}', "not valid UTF-8"),
    ],
)
def test_payloads_that_are_not_a_json_object_are_protocol_errors(payload: bytes, expected: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=expected):
        protocol.decode_payload(payload)


async def test_asyncio_helpers_talk_to_the_blocking_ones() -> None:
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=left)
    try:
        protocol.write_frame(writer, protocol.request(protocol.OP_HELLO, 1, version=protocol.PROTOCOL_VERSION))
        await protocol.drain_frames(writer)
        received = await asyncio.to_thread(protocol.recv_frame, right)
        assert received == {"op": "hello", "id": 1, "version": protocol.PROTOCOL_VERSION}

        await asyncio.to_thread(protocol.send_frame, right, protocol.reply_ok(1, version=1, pid=99))
        assert await protocol.read_frame(reader) == {"ev": "reply", "id": 1, "ok": True, "version": 1, "pid": 99}

        right.sendall(struct.pack(">I", 10) + b"{}")
        right.close()
        with pytest.raises(protocol.ProtocolError, match="closed inside a frame"):
            await protocol.read_frame(reader)
    finally:
        writer.close()
        await writer.wait_closed()
        right.close()


async def test_asyncio_reader_sees_clean_close_as_end_of_stream() -> None:
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=left)
    right.close()
    assert await protocol.read_frame(reader) is None
    writer.close()
    await writer.wait_closed()


def test_text_pieces_reads_single_and_batched_events() -> None:
    assert protocol.text_pieces(protocol.text_event(1, "Hi", 5)) == [("Hi", 5)]
    batch = protocol.text_batch_event(1, [("Hel", 1), ("lo", 2)])
    assert protocol.text_pieces(json.loads(json.dumps(batch))) == [("Hel", 1), ("lo", 2)]
    with pytest.raises(protocol.ProtocolError, match=r"piece must be \[text, token\]"):
        protocol.text_pieces({"ev": "text", "run": 1, "pieces": [["a"]]})
    with pytest.raises(protocol.ProtocolError, match="'token' must be an integer"):
        protocol.text_pieces({"ev": "text", "run": 1, "text": "a", "token": "5"})


def test_hostile_json_nesting_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(protocol.ProtocolError, match="nests JSON too deeply"):
        protocol.decode_payload(b"[" * 100_000)


def test_secret_file_first_line_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  correct horse  \nsecond line is ignored\n")
    assert protocol.read_secret_file(secret) == "correct horse"


def test_secret_file_missing_or_empty_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(protocol.SecretFileError, match=f"secret file {missing} does not exist"):
        protocol.read_secret_file(missing)
    empty = tmp_path / "empty"
    empty.write_text("\n   \n")
    with pytest.raises(protocol.SecretFileError, match=f"secret file {empty} is empty"):
        protocol.read_secret_file(empty)


def test_keepalive_is_on_with_short_probes(socket_enabled: None) -> None:
    """A remote session's socket notices a vanished peer within about a minute (Linux options)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        protocol.enable_keepalive(tcp)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == protocol.KEEPALIVE_IDLE_S
            assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == protocol.KEEPALIVE_COUNT
