"""The remote worker channel as a security boundary, over plain TCP and over TLS, against a real worker process.

Both ends prove the shared secret; a tampered, replayed, truncated or oversized frame closes the connection with
a logged reason and the worker serves the next client; random and mutated frames never kill it; the worker opens
only the files it was started with (docs/worker-channel.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkllm_engine.client import InitSpec, WorkerClient, WorkerLocation, WorkerState
from rkllm_engine.types import EngineUnavailableError, RuntimeIncompatibleError, WorkerCrashedError
from rkllm_native import channel, protocol
from rkllm_native.build import emulator_library

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "correct horse battery staple"
HELLO_ANSWER = "Hello from the emulator."
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
WAIT_S = 15.0


def write_model(path: Path, *, decode_tokens_per_s: float = 2000) -> Path:
    path.write_text(
        "rkllm-emulator-model 1\nname = channel-test\nload_time_ms = 5\nprefill_tokens_per_s = 100000\n"
        f"decode_tokens_per_s = {decode_tokens_per_s}\ndefault_answer = {HELLO_ANSWER}\n"
    )
    return path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A throwaway self-signed certificate, made the way the docs tell users to (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "worker.crt", folder / "worker.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=rkllm-worker", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key, channel.certificate_fingerprint(cert)


@dataclass
class Worker:
    """A remote worker process and what it wrote to stderr (its journal), read by a thread."""

    process: subprocess.Popen[bytes]
    port: int
    models: Path
    fingerprint: str | None
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def location(self, secret: str = SECRET, fingerprint: str | None = "pinned") -> WorkerLocation:
        pin = self.fingerprint if fingerprint == "pinned" else fingerprint
        return WorkerLocation(host="127.0.0.1", port=self.port, secret=secret, tls_fingerprint=pin)

    def wait_for_line(self, pattern: str, timeout: float = WAIT_S) -> str:
        """The first stderr line matching `pattern` (a regex), waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no worker line matches {pattern!r}; lines: {self.lines[-20:]}")
                self.changed.wait(remaining)

    def alive(self) -> bool:
        return self.process.poll() is None


def start_worker(tmp_path: Path, tls: tuple[Path, Path, str] | None, *extra: str) -> Worker:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "rkllm_native.worker", "--listen", "127.0.0.1:0", "--secret-file", str(secret_file),
        "--library", str(emulator_library("v12x")), "--models-dir", str(models), "--abort-grace", "2", *extra,
    ]  # fmt: skip
    if tls is not None:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RKLLM_EMULATOR_SPEED": "0"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    banner = process.stderr.readline().decode()
    assert banner.startswith("rkllm-worker: listening on 127.0.0.1:"), banner
    worker = Worker(process, int(banner.split("127.0.0.1:")[1].split()[0]), models, tls[2] if tls else None)
    worker.lines.append(banner.strip())

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            with worker.changed:
                worker.lines.append(raw.decode("utf-8", "replace").rstrip())
                worker.changed.notify_all()

    reader = threading.Thread(target=pump, name="worker-stderr", daemon=True)
    reader.start()
    worker.reader = reader  # type: ignore[attr-defined]
    return worker


def stop_worker(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.terminate()
    try:
        worker.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()
    worker.reader.join(10)  # type: ignore[attr-defined]


@pytest.fixture(params=["tcp", "tls"])
def transport(request: pytest.FixtureRequest, tls_files: tuple[Path, Path, str]) -> tuple[Path, Path, str] | None:
    """Every test here runs over plain TCP and over TLS: the handshake and frame MACs are one code path."""
    return tls_files if request.param == "tls" else None


@pytest.fixture
def worker(
    tmp_path: Path, transport: tuple[Path, Path, str] | None, socket_enabled: None
) -> Iterator[Worker]:
    started = start_worker(tmp_path, transport)
    yield started
    stop_worker(started)


# ---------------------------------------------------------------------------
# A raw client that speaks the handshake itself, to send what a real client never would
# ---------------------------------------------------------------------------


class RawClient:
    """Blocking test client: the real handshake (rkllm_native.channel), then frames it may corrupt on purpose."""

    def __init__(self, worker: Worker, *, secret: str = SECRET, handshake: bool = True) -> None:
        raw = socket.create_connection(("127.0.0.1", worker.port), timeout=WAIT_S)
        self.local_port = raw.getsockname()[1]
        self.sock: socket.socket = raw
        if worker.fingerprint is not None:
            self.sock = channel.client_tls_context().wrap_socket(raw)
            assert channel.fingerprint_matches(worker.fingerprint, self.sock.getpeercert(binary_form=True))
        self.plain = channel.FrameChannel(self.sock, peer="worker")
        self.sealer: channel.FrameSealer | None = None
        self.opener: channel.FrameOpener | None = None
        self.refusal: dict[str, Any] | None = None
        self.busy = False
        if handshake:
            self._handshake(secret)

    def _handshake(self, secret: str) -> None:
        nonce = channel.new_nonce()
        self.plain.send(channel.client_hello(nonce))
        challenge = self.plain.recv()
        assert challenge is not None
        assert challenge["ev"] == "challenge"
        keys = channel.derive_keys(secret, protocol.PROTOCOL_VERSION, nonce, channel.nonce_of(challenge))
        self.plain.send({"op": "auth", "proof": keys.client_proof.hex()})
        answer = self.plain.recv()
        assert answer is not None
        if answer["ev"] != "auth_ok":
            self.refusal = answer
            return
        assert channel.proof_matches(keys.worker_proof, answer["proof"])
        self.sealer = channel.FrameSealer(keys.client_to_worker)
        self.opener = channel.FrameOpener(keys.worker_to_client, "worker")
        admitted = self.recv()
        self.busy = admitted is not None and admitted.get("ev") == "busy"
        assert self.busy or admitted == {"ev": "ready"}, admitted

    def seal(self, message: dict[str, Any]) -> bytes:
        assert self.sealer is not None
        return self.sealer.seal(protocol.encode_payload(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        return channel.FrameChannel(self.sock, peer="worker", opener=self.opener).recv()

    def request(self, op: str, request_id: int, **fields: Any) -> dict[str, Any]:
        self.send_bytes(self.seal(protocol.request(op, request_id, **fields)))
        while True:
            message = self.recv()
            assert message is not None, "the worker closed the connection"
            if message.get("ev") == "reply" and message.get("id") == request_id:
                return message

    def closed_by_worker(self) -> bool:
        """True when the worker closed the connection (EOF, or a reset, within the wait)."""
        deadline = time.monotonic() + WAIT_S
        self.sock.settimeout(WAIT_S)
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def raw_client(worker: Worker, **kwargs: Any) -> Iterator[RawClient]:
    """A connected client; while the previous session is still winding down (a loaded machine), it retries busy."""
    deadline = time.monotonic() + WAIT_S
    client = RawClient(worker, **kwargs)
    while client.busy and time.monotonic() < deadline:
        client.close()
        time.sleep(0.2)
        client = RawClient(worker, **kwargs)
    assert not client.busy, "the worker stayed busy"
    try:
        yield client
    finally:
        client.close()


def assert_serves_a_fresh_client(worker: Worker) -> None:
    """The worker survived whatever came before and gives the next client a working session."""
    assert worker.alive()
    with raw_client(worker) as good:
        hello = good.request("hello", 1, version=protocol.PROTOCOL_VERSION)
        assert hello["ok"], hello
        assert hello["pid"] == worker.process.pid


# ---------------------------------------------------------------------------
# Mutual authentication
# ---------------------------------------------------------------------------


def test_worker_refuses_a_client_that_cannot_prove_the_secret(worker: Worker) -> None:
    with raw_client(worker, secret="a different secret") as intruder:
        assert intruder.refusal == {"ev": "auth_failed", "message": "authentication failed: wrong shared secret"}
        assert intruder.closed_by_worker()
        port = intruder.local_port
    worker.wait_for_line(rf"refused 127\.0\.0\.1:{port}: did not prove the shared secret")
    assert_serves_a_fresh_client(worker)


async def test_worker_refuses_a_wrong_secret_through_the_real_client(worker: Worker) -> None:
    with pytest.raises(EngineUnavailableError) as refused:
        await WorkerClient.probe(worker.location(secret="wrong"), timeout_s=WAIT_S)
    assert refused.value.reason == "secret_refused"
    hello = await WorkerClient.probe(worker.location(), timeout_s=WAIT_S)
    assert hello.protocol_version == protocol.PROTOCOL_VERSION


@dataclass
class FakeWorker:
    """An impostor on the worker's address: speaks the handshake but knows another secret."""

    port: int
    received_after_auth: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def fake_worker(
    transport: tuple[Path, Path, str] | None, socket_enabled: None
) -> AsyncIterator[FakeWorker]:
    tls = channel.server_tls_context(transport[0], transport[1]) if transport else None
    fake = FakeWorker(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await channel.read_frame(reader, None)
            assert hello is not None
            nonce = channel.new_nonce()
            channel.write_frame(writer, channel.challenge(nonce), None)
            keys = channel.derive_keys("impostor", protocol.PROTOCOL_VERSION, channel.nonce_of(hello), nonce)
            await channel.read_frame(reader, None)  # the client's proof: the impostor cannot check it
            channel.write_frame(writer, {"ev": "auth_ok", "proof": keys.worker_proof.hex()}, None)
            channel.write_frame(writer, {"ev": "ready"}, channel.FrameSealer(keys.worker_to_client))
            await writer.drain()
            while chunk := await reader.read(65536):
                fake.received_after_auth.append(chunk)
        finally:
            writer.close()
            fake.done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()
    await server.wait_closed()


async def test_client_refuses_a_worker_that_cannot_prove_the_secret(
    fake_worker: FakeWorker, transport: tuple[Path, Path, str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    location = WorkerLocation(
        host="127.0.0.1", port=fake_worker.port, secret=SECRET, tls_fingerprint=transport[2] if transport else None
    )
    with pytest.raises(EngineUnavailableError) as unverified:
        await WorkerClient.probe(location, timeout_s=WAIT_S)
    assert unverified.value.reason == "worker_unverified"
    assert str(unverified.value).startswith(
        f"remote rkllm worker 127.0.0.1:{fake_worker.port} could not prove it knows the shared secret"
    )
    await asyncio.wait_for(fake_worker.done.wait(), WAIT_S)
    assert fake_worker.received_after_auth == []  # no hello, no init: nothing after the client's own proof
    assert "could not prove it knows the shared secret" in caplog.text


async def test_a_pinned_fingerprint_that_does_not_match_is_refused_before_the_handshake(
    worker: Worker, tls_files: tuple[Path, Path, str]
) -> None:
    other = "00:" * 31 + "00"
    if worker.fingerprint is None:  # a plain worker: asking for TLS fails as a TLS mismatch
        with pytest.raises(EngineUnavailableError) as mismatch:
            await WorkerClient.probe(worker.location(fingerprint=tls_files[2]), timeout_s=WAIT_S)
        assert mismatch.value.reason == "tls_mismatch"
        worker.wait_for_line("started TLS, but this worker runs without --tls-cert")
    else:
        with pytest.raises(EngineUnavailableError) as mismatch:
            await WorkerClient.probe(worker.location(fingerprint=other), timeout_s=WAIT_S)
        assert mismatch.value.reason == "fingerprint_mismatch"
        assert f"fingerprint {worker.fingerprint}, not the pinned {other}" in str(mismatch.value)
        with pytest.raises(EngineUnavailableError) as plain:
            await WorkerClient.probe(worker.location(fingerprint=None), timeout_s=WAIT_S)
        assert plain.value.reason == "tls_mismatch"
        assert "speaks TLS only" in str(plain.value)
        worker.wait_for_line("did not start TLS")
    assert (await WorkerClient.probe(worker.location(), timeout_s=WAIT_S)).protocol_version == 2


# ---------------------------------------------------------------------------
# Bad frames after the handshake
# ---------------------------------------------------------------------------


def _flip(frame: bytes, index: int) -> bytes:
    corrupted = bytearray(frame)
    corrupted[index] ^= 0x01
    return bytes(corrupted)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("flipped_payload_byte", r"frame 0 from the client failed its HMAC-SHA256 check"),
        ("flipped_tag_byte", r"frame 0 from the client failed its HMAC-SHA256 check"),
        ("replayed", r"frame 1 from the client failed its HMAC-SHA256 check"),
        ("truncated", r"connection closed inside a frame \(\d+ of \d+ bytes read\)"),
        ("oversized", r"frame length \d+ exceeds the \d+-byte limit"),
        ("shorter_than_its_tag", r"fewer than its 32-byte MAC tag"),
        ("nested_too_deeply", r"frame nests JSON too deeply"),
    ],
)
def test_a_bad_frame_closes_the_connection_with_its_reason_and_the_next_client_is_served(
    worker: Worker, case: str, reason: str
) -> None:
    with raw_client(worker) as client:
        hello = client.seal(protocol.request("hello", 1, version=protocol.PROTOCOL_VERSION))
        if case == "flipped_payload_byte":
            client.send_bytes(_flip(hello, 10))
        elif case == "flipped_tag_byte":
            client.send_bytes(_flip(hello, len(hello) - 1))
        elif case == "replayed":
            client.send_bytes(hello)
            assert client.recv() is not None  # the reply: the original was accepted
            client.send_bytes(hello)
        elif case == "truncated":
            client.send_bytes(hello[: len(hello) // 2])
        elif case == "oversized":
            client.send_bytes(protocol.HEADER.pack(channel.MAX_SEALED_FRAME_BYTES + 1) + b"x" * 64)
        elif case == "shorter_than_its_tag":
            client.send_bytes(protocol.HEADER.pack(8) + b"12345678")
        elif case == "nested_too_deeply":  # authentic, but hostile JSON
            client.send_bytes(hello)
            assert client.recv() is not None
            assert client.sealer is not None
            client.send_bytes(client.sealer.seal(b"[" * 100_000))
        if case == "truncated":
            client.close()  # the rest of the frame never comes
        else:
            assert client.closed_by_worker()
        port = client.local_port
    worker.wait_for_line(rf"closing the connection from 127\.0\.0\.1:{port}: .*{reason}")
    assert_serves_a_fresh_client(worker)


class TamperingProxy:
    """A man in the middle between client and worker that flips one byte of the worker's stream on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.corrupt_next = False
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        worker_reader, worker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tamper: bool) -> None:
            try:
                while chunk := await reader.read(65536):
                    if tamper and self.corrupt_next and len(chunk) > 8:
                        self.corrupt_next = False
                        chunk = _flip(chunk, len(chunk) // 2)
                    writer.write(chunk)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        tasks = [
            asyncio.create_task(pipe(client_reader, worker_writer, tamper=False)),
            asyncio.create_task(pipe(worker_reader, client_writer, tamper=True)),
        ]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def test_the_client_drops_a_tampered_worker_frame_with_a_logged_reason_and_reconnects(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    proxy = TamperingProxy(worker.port)
    port = await proxy.start()
    location = WorkerLocation(host="127.0.0.1", port=port, secret=SECRET, tls_fingerprint=worker.fingerprint)
    client = WorkerClient(location, restart_backoff_s=(0.1,), connect_timeout_s=WAIT_S)
    model = write_model(worker.models / "m.model", decode_tokens_per_s=200)
    try:
        await client.start(InitSpec(str(emulator_library("v12x")), str(model), None, {}))
        proxy.corrupt_next = True
        stream = client.run("user", "hi", keep_history=False, enable_thinking=False)
        with pytest.raises(WorkerCrashedError, match="closed the connection"):
            async for _piece in stream:
                pass
        if worker.fingerprint is None:
            # Plain TCP: our frame MAC is what catches it. (Under TLS, TLS's own record MAC catches it first.)
            assert "failed its HMAC-SHA256 check" in caplog.text
        await client.wait_ready(WAIT_S)  # the supervisor reconnected through the (now honest) proxy
        assert proxy.connections == 2
        stream = client.run("user", "hi", keep_history=False, enable_thinking=False)
        assert "".join([piece.text async for piece in stream]) == HELLO_ANSWER
    finally:
        await client.stop()
        await proxy.stop()


def test_an_unauthenticated_peer_cannot_make_the_worker_read_a_big_frame(worker: Worker) -> None:
    with raw_client(worker, handshake=False) as peer:
        peer.send_bytes(protocol.HEADER.pack(5000) + b"{" * 64)
        assert peer.closed_by_worker()
        port = peer.local_port
    worker.wait_for_line(rf"127\.0\.0\.1:{port} failed: handshake frame of 5000 bytes exceeds the 4096-byte limit")
    assert_serves_a_fresh_client(worker)


# ---------------------------------------------------------------------------
# Fuzzing the worker's parser
# ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, min_size=1, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, min_size=1, max_size=4)
    ),
    max_leaves=12,
)
MESSAGES = st.dictionaries(
    st.sampled_from(["op", "id", "version", "run", "path", "library_path", "model_path", "text", "x"]),
    # Every op but shutdown, which ends the session cleanly before the corrupt frames that follow are read.
    JSON | st.sampled_from(sorted(protocol.OPS - {protocol.OP_SHUTDOWN})),
    max_size=5,
)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("valid"), MESSAGES),
        st.tuples(st.just("flip"), MESSAGES, st.integers(min_value=0)),
        st.tuples(st.just("truncate"), MESSAGES, st.integers(min_value=1)),
        st.tuples(st.just("raw"), st.binary(min_size=1, max_size=64)),
    ),
    min_size=1,
    max_size=4,
)


def _fuzz_one(worker: Worker, before_handshake: bytes | None, operations: list[tuple[Any, ...]]) -> None:
    """One connection of random input; the worker must close any corrupted one with a logged reason."""
    with raw_client(worker, handshake=before_handshake is None) as client:
        port = client.local_port
        corrupted = before_handshake is not None
        try:
            if before_handshake is not None:
                client.send_bytes(before_handshake)
            else:
                for operation in operations:
                    frame = client.seal(operation[1]) if operation[0] != "raw" else operation[1]
                    if operation[0] == "flip":
                        frame = _flip(frame, 4 + operation[2] % (len(frame) - 4))
                    elif operation[0] == "truncate":
                        frame = frame[: operation[2] % len(frame)]
                    corrupted = corrupted or operation[0] != "valid"
                    client.send_bytes(frame)
        except OSError:
            pass  # the worker already closed on an earlier corrupt frame
    if corrupted:  # the worker logs why the connection ended, naming our port
        ended = "closing the connection from|lost the connection from|handshake with|refused|cannot send to"
        worker.wait_for_line(rf"({ended}) 127\.0\.0\.1:{port}\b")
    assert worker.alive()


@pytest.mark.timeout(120)
def test_random_and_mutated_frames_never_kill_the_worker(worker: Worker) -> None:
    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        before_handshake=st.none() | st.binary(min_size=1, max_size=200),
        operations=OPERATIONS,
    )
    def fuzz(before_handshake: bytes | None, operations: list[tuple[Any, ...]]) -> None:
        _fuzz_one(worker, before_handshake, operations)

    fuzz()  # bounded by max_examples, not by the clock
    assert_serves_a_fresh_client(worker)


# ---------------------------------------------------------------------------
# Allow-list
# ---------------------------------------------------------------------------


async def test_the_worker_serves_only_the_files_it_was_started_with(worker: Worker, tmp_path: Path) -> None:
    library = str(emulator_library("v12x"))
    inside = write_model(worker.models / "served.model")
    outside = write_model(tmp_path / "elsewhere.model")
    other_library = str(emulator_library("v130"))

    client = WorkerClient(worker.location(), connect_timeout_s=WAIT_S)
    try:
        with pytest.raises(RuntimeIncompatibleError) as library_refused:
            await client.start(InitSpec(other_library, str(inside), None, {}))
        assert library_refused.value.reason == "path_not_allowed"
        assert library_refused.value.details == {"path": other_library, "flag": "--library"}
        assert f"library {other_library} is not on this worker's allow-list" in str(library_refused.value)
        assert f"add `--library {other_library}`" in str(library_refused.value)

        with pytest.raises(RuntimeIncompatibleError) as model_refused:
            await client.start(InitSpec(library, str(outside), None, {}))
        assert model_refused.value.reason == "path_not_allowed"
        assert model_refused.value.details == {"path": str(outside), "flag": "--model"}
        assert f"add `--model {outside}` or `--models-dir {tmp_path}`" in str(model_refused.value)

        os.symlink(outside, worker.models / "escape.model")
        with pytest.raises(RuntimeIncompatibleError, match=r"resolves to .*elsewhere\.model"):
            await client.start(InitSpec(library, str(worker.models / "escape.model"), None, {}))

        # A model that arrives in the models directory after the worker started (a download) is served.
        later = write_model(worker.models / "downloaded-later.model")
        await client.start(InitSpec(library, str(later), None, {}))
        stream = client.run("user", "hi", keep_history=False, enable_thinking=False)
        assert "".join([piece.text async for piece in stream]) == HELLO_ANSWER
        with pytest.raises(RuntimeIncompatibleError, match="LoRA adapter /etc/passwd is not on"):
            await client.call("load_lora", path="/etc/passwd", name="x")
    finally:
        await client.stop()
    worker.wait_for_line(rf"refused: library {re.escape(other_library)} is not on this worker's allow-list")


async def test_probe_asks_the_worker_about_the_paths_without_loading_them(worker: Worker, tmp_path: Path) -> None:
    library = str(emulator_library("v12x"))
    hello = await WorkerClient.probe(
        worker.location(), WAIT_S, library_path=library, model_path=str(worker.models / "any.model")
    )
    assert not hello.initialized
    with pytest.raises(RuntimeIncompatibleError) as refused:
        await WorkerClient.probe(worker.location(), WAIT_S, library_path=library, model_path=str(tmp_path / "x.model"))
    assert refused.value.reason == "path_not_allowed"
    assert refused.value.details["path"] == str(tmp_path / "x.model")


async def test_the_local_child_is_held_to_its_own_spec(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.model")
    client = WorkerClient(WorkerLocation())
    try:
        await client.start(InitSpec(str(emulator_library("v12x")), str(model), None, {}))
        assert client.state is WorkerState.READY
        with pytest.raises(RuntimeIncompatibleError) as refused:
            await client.call("load_prompt_cache", path=str(tmp_path / "other.cache"))
        assert refused.value.reason == "path_not_allowed"
    finally:
        await client.stop()


# ---------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------


def test_tls_worker_prints_the_fingerprint_openssl_prints(worker: Worker, tls_files: tuple[Path, Path, str]) -> None:
    if worker.fingerprint is None:
        worker.wait_for_line(r"no TLS \(--tls-cert/--tls-key\)")
        return
    printed = subprocess.run(
        [OPENSSL, "x509", "-in", str(tls_files[0]), "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    line = worker.wait_for_line("TLS certificate SHA-256 fingerprint")
    assert printed.split("=", 1)[1] in line
    worker.wait_for_line(r"serving library .*librkllmrt-emu-v12x\.so; models under ")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "127.0.0.1:0", "--secret-file", "S"], "--listen needs the files it may serve"),
        (["--listen", "127.0.0.1:0", "--secret-file", "S", "--library", "/x.so"], "nothing to serve"),
        (["--listen", "127.0.0.1:0", "--secret-file", "S", "--config", "/absent.toml"], "config file /absent.toml"),
        (["--listen", "127.0.0.1:0", "--secret-file", "S", "--library", "/x", "--model", "/m", "--tls-cert", "/c"],
         "--tls-cert and --tls-key go together"),
        (["--listen", "127.0.0.1:0", "--secret-file", "S", "--library", "/x", "--model", "/m", "--tls-cert", "/c",
          "--tls-key", "/k"], "TLS certificate or key file missing"),
    ],
)  # fmt: skip
def test_a_remote_worker_without_an_allow_list_or_with_bad_tls_files_does_not_start(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    result = subprocess.run(
        [sys.executable, "-m", "rkllm_native.worker", *(str(secret) if arg == "S" else arg for arg in arguments)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_a_config_file_gives_the_allow_list(tmp_path: Path, socket_enabled: None) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'library = ["{emulator_library("v12x")}"]\nmodels_dir = "{tmp_path / "models"}"\n', encoding="utf-8"
    )
    worker = start_worker(tmp_path, None, "--config", str(config))
    try:
        worker.wait_for_line(rf"models under {re.escape(str(tmp_path / 'models'))}")
        with raw_client(worker) as client:
            model = write_model(worker.models / "m.model")
            reply = client.request("check_paths", 1, library_path=str(emulator_library("v12x")), model_path=str(model))
            assert reply["ok"], reply
    finally:
        stop_worker(worker)

