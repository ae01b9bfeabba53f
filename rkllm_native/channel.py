"""The authenticated worker channel: mutual proof of the shared secret, a MAC on every frame, optional TLS.

The construction (docs/worker-channel.md, step by step):

1. Both sides send a fresh 32-byte nonce at once: the client `client_hello` (its protocol version, nonce Nc),
   the worker `challenge` (its version, nonce Nw). A version mismatch stops here, before any proof.
2. Keys: PRK = HKDF-Extract(salt = Nc || Nw, IKM = secret) and each key = HKDF-Expand(PRK, label || 0 || TH, 32)
   (HKDF-SHA256, RFC 5869), where the transcript TH = "rkllm-worker-channel" || 0 || u32 version || Nc || Nw.
   Keys: one proof key and one frame key per direction.
3. The client proves first: HMAC-SHA256(proof key, "rkllm client proof" || 0 || TH). The worker checks it and
   answers with its own proof under the role label "rkllm worker proof"; the client checks that before it sends
   anything else or trusts any frame. Role labels defeat reflection, both nonces defeat replay, the version in TH
   defeats downgrade.
4. Every later frame is `u32 length || payload || tag`, tag = HMAC-SHA256(direction key, u64 seq || u32 length ||
   payload): the SSH binary-packet MAC (RFC 4253 §6.4) with hmac-sha2-256 (RFC 6668), an implicit sequence number
   per direction starting at 0. A flipped bit, a replayed, reordered or dropped frame fails the tag; the receiver
   closes the connection and logs why. The tag is checked before the payload is parsed.

TLS (`--tls-cert/--tls-key` on the worker, a pinned SHA-256 certificate fingerprint in the client) wraps the same
bytes; the handshake and the frame MACs run inside it unchanged. The local socketpair channel (an inherited fd no
third party can reach) uses plain frames (`sealer`/`opener` None).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from rkllm_native import protocol

NONCE_BYTES: Final = 32
KEY_BYTES: Final = 32
TAG_BYTES: Final = 32
SEQ: Final = struct.Struct(">Q")
MAX_SEQ: Final = (1 << 64) - 1
MAX_SEALED_FRAME_BYTES: Final = protocol.MAX_FRAME_BYTES + TAG_BYTES
TRANSCRIPT_LABEL: Final = b"rkllm-worker-channel"
LABEL_PROOF_KEY: Final = b"rkllm proof key"
LABEL_CLIENT_TO_WORKER: Final = b"rkllm client-to-worker frame key"
LABEL_WORKER_TO_CLIENT: Final = b"rkllm worker-to-client frame key"
LABEL_CLIENT_PROOF: Final = b"rkllm client proof"
LABEL_WORKER_PROOF: Final = b"rkllm worker proof"
# The first byte of a TLS record carrying a handshake message (a ClientHello); a plain frame starts with 0x00.
TLS_HANDSHAKE_RECORD: Final = 0x16
# Handshake frames come from peers not yet authenticated: a few hundred bytes, never megabytes.
MAX_HANDSHAKE_FRAME_BYTES: Final = 4096
_HEX_FINGERPRINT = re.compile(r"^[0-9A-F]{64}$")


class IntegrityError(protocol.ProtocolError):
    """A frame's MAC does not match: tampered, replayed, reordered or dropped on the way; the channel is done."""


class TlsSetupError(Exception):
    """The worker's TLS certificate or key cannot be used; the message names the file."""


# ---------------------------------------------------------------------------
# HKDF-SHA256 (RFC 5869) and the handshake keys
# ---------------------------------------------------------------------------


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM)."""
    return hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.3: T(i) = HMAC-Hash(PRK, T(i-1) || info || i), concatenated and cut to `length`."""
    if length > 255 * hashlib.sha256().digest_size:
        raise ValueError("HKDF-SHA256 cannot expand to more than 8160 bytes")
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def new_nonce() -> bytes:
    """A fresh random nonce per connection and side, so no proof or frame of another session is ever valid."""
    return secrets.token_bytes(NONCE_BYTES)


def transcript(version: int, client_nonce: bytes, worker_nonce: bytes) -> bytes:
    """TH: what both proofs and every key are bound to (fixed-length fields, so it parses one way only)."""
    return TRANSCRIPT_LABEL + b"\x00" + struct.pack(">I", version) + client_nonce + worker_nonce


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Everything one handshake derives; `client_proof` and `worker_proof` travel, the frame keys never do."""

    client_proof: bytes
    worker_proof: bytes
    client_to_worker: bytes
    worker_to_client: bytes


def derive_keys(secret: str, version: int, client_nonce: bytes, worker_nonce: bytes) -> SessionKeys:
    """HKDF-SHA256 over the secret, salted with both nonces; labels separate proof and frame keys per direction."""
    if len(client_nonce) != NONCE_BYTES or len(worker_nonce) != NONCE_BYTES:
        raise ValueError(f"nonces must be {NONCE_BYTES} bytes")
    th = transcript(version, client_nonce, worker_nonce)
    prk = hkdf_extract(client_nonce + worker_nonce, secret.encode("utf-8"))

    def expand(label: bytes) -> bytes:
        return hkdf_expand(prk, label + b"\x00" + th, KEY_BYTES)

    proof_key = expand(LABEL_PROOF_KEY)
    return SessionKeys(
        client_proof=hmac.new(proof_key, LABEL_CLIENT_PROOF + b"\x00" + th, hashlib.sha256).digest(),
        worker_proof=hmac.new(proof_key, LABEL_WORKER_PROOF + b"\x00" + th, hashlib.sha256).digest(),
        client_to_worker=expand(LABEL_CLIENT_TO_WORKER),
        worker_to_client=expand(LABEL_WORKER_TO_CLIENT),
    )


def proof_matches(expected: bytes, sent: object) -> bool:
    """Constant-time check of a proof sent as hex; anything that is not a hex string of the right size fails."""
    if not isinstance(sent, str) or len(sent) != 2 * len(expected):
        return False
    try:
        raw = bytes.fromhex(sent)
    except ValueError:
        return False
    return hmac.compare_digest(expected, raw)


# ---------------------------------------------------------------------------
# Handshake messages
# ---------------------------------------------------------------------------


def client_hello(nonce: bytes) -> dict[str, Any]:
    """The client's first frame: its protocol version and nonce (sent at once, before the worker's challenge)."""
    return {"op": protocol.OP_CLIENT_HELLO, "version": protocol.PROTOCOL_VERSION, "nonce": nonce.hex()}


def challenge(nonce: bytes) -> dict[str, Any]:
    """The worker's first frame: its protocol version and nonce."""
    return {"ev": protocol.EV_CHALLENGE, "version": protocol.PROTOCOL_VERSION, "nonce": nonce.hex()}


def nonce_of(message: dict[str, Any]) -> bytes:
    """The nonce a hello or challenge carries; a malformed one is a protocol error (never a weak key)."""
    value = message.get("nonce")
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise protocol.ProtocolError(f"the handshake nonce must be {2 * NONCE_BYTES} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError as err:
        raise protocol.ProtocolError("the handshake nonce is not hexadecimal") from err


# ---------------------------------------------------------------------------
# Sealed frames
# ---------------------------------------------------------------------------


def _tag(key: bytes, seq: int, header: bytes, payload: bytes) -> bytes:
    mac = hmac.new(key, SEQ.pack(seq), hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


class FrameSealer:
    """Adds the tag to each outgoing frame of one direction and counts the sequence number (one writer only)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def seal(self, payload: bytes) -> bytes:
        """Header, payload and tag of the next frame."""
        if len(payload) > protocol.MAX_FRAME_BYTES:
            raise protocol.ProtocolError(
                f"frame of {len(payload)} bytes exceeds the {protocol.MAX_FRAME_BYTES}-byte limit"
            )
        if self._seq >= MAX_SEQ:
            raise protocol.ProtocolError("the frame sequence number is exhausted; reconnect")
        header = protocol.HEADER.pack(len(payload) + TAG_BYTES)
        tag = _tag(self._key, self._seq, header, payload)
        self._seq += 1
        return header + payload + tag


class FrameOpener:
    """Checks each incoming frame of one direction against its tag and the expected sequence number."""

    def __init__(self, key: bytes, sender: str) -> None:
        self._key = key
        self._seq = 0
        self.sender = sender  # "client" or "worker", for the reason a failure logs

    @property
    def seq(self) -> int:
        """The sequence number the next frame must carry."""
        return self._seq

    def open(self, header: bytes, body: bytes) -> bytes:
        """The payload of a frame whose tag is valid; raises IntegrityError otherwise."""
        if len(body) < TAG_BYTES:
            raise protocol.ProtocolError(
                f"frame {self._seq} from the {self.sender} has {len(body)} bytes, "
                f"fewer than its {TAG_BYTES}-byte MAC tag (truncated or not a sealed frame)"
            )
        payload, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
        if not hmac.compare_digest(_tag(self._key, self._seq, header, payload), tag):
            raise IntegrityError(
                f"frame {self._seq} from the {self.sender} failed its HMAC-SHA256 check "
                "(tampered, replayed, reordered or dropped on the way)"
            )
        self._seq += 1
        return payload


def sealed_frame_length(header: bytes) -> int:
    """The body length of a sealed frame, refused before any allocation when over the limit."""
    (length,) = protocol.HEADER.unpack(header)
    if length > MAX_SEALED_FRAME_BYTES:
        raise protocol.ProtocolError(
            f"frame length {length} exceeds the {MAX_SEALED_FRAME_BYTES}-byte limit (corrupt or hostile stream)"
        )
    return int(length)


def encode(message: dict[str, Any], sealer: FrameSealer | None) -> bytes:
    """One frame on the wire: plain (`sealer` None) or sealed."""
    if sealer is None:
        return protocol.encode_frame(message)
    return sealer.seal(protocol.encode_payload(message))


# ---------------------------------------------------------------------------
# Blocking channel (worker side)
# ---------------------------------------------------------------------------


class ByteStream(Protocol):
    """What a channel reads and writes: a socket, or a TLS socket behind `TlsStream`."""

    def recv(self, size: int, /) -> bytes:
        """Up to `size` bytes; b"" at end of stream."""

    def sendall(self, data: bytes, /) -> None:
        """All of `data`, or an OSError."""


class TlsStream:
    """A TLS socket that one thread may read while another writes.

    OpenSSL forbids concurrent calls on one connection (SSL_read in one thread, SSL_write in another), but the
    worker reads requests on its main thread while the outbox thread writes events. So the socket is non-blocking,
    every OpenSSL call holds one lock, and the waits for readiness happen outside it.
    """

    POLL_S: Final = 0.25  # re-check after this long even without a wake-up (another call may have read a record)

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = threading.Lock()

    def recv(self, size: int, /) -> bytes:
        """Up to `size` decrypted bytes; b"" when the peer closed."""
        while True:
            with self._lock:
                try:
                    return self._sock.recv(size)
                except ssl.SSLWantReadError:
                    want = select.POLLIN
                except ssl.SSLWantWriteError:
                    want = select.POLLOUT
                except ssl.SSLZeroReturnError:
                    return b""
            self._wait(want)

    def sendall(self, data: bytes, /) -> None:
        """Encrypt and send all of `data` (a retried write repeats the same bytes, as OpenSSL requires)."""
        view = memoryview(data)
        while view:
            with self._lock:
                try:
                    sent = self._sock.send(view)
                except ssl.SSLWantWriteError:
                    want = select.POLLOUT
                except ssl.SSLWantReadError:
                    want = select.POLLIN
                else:
                    view = view[sent:]
                    continue
            self._wait(want)

    def close(self) -> None:
        """Close the TLS socket (no close_notify: the peer sees the end of the stream either way)."""
        self._sock.close()

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), events | select.POLLERR | select.POLLHUP)
        poller.poll(self.POLL_S * 1000)


class FrameChannel:
    """Blocking frame I/O over one connection: plain (the local socketpair) or sealed (a remote client).

    One thread may receive while another sends; each direction has one user at a time.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        peer: str,
        closer: socket.socket | TlsStream | None = None,
        sealer: FrameSealer | None = None,
        opener: FrameOpener | None = None,
        max_frame_bytes: int | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self._closer = closer
        self._sealer = sealer
        self._opener = opener
        self._max_frame_bytes = max_frame_bytes  # a tighter limit (the handshake's) than the protocol's

    @property
    def sealed(self) -> bool:
        """True when every frame carries a MAC (a remote client after the handshake)."""
        return self._opener is not None

    def recv(self) -> dict[str, Any] | None:
        """One message; None when the peer closed between frames. ProtocolError for anything else."""
        header = _recv_exactly(self.stream, protocol.HEADER.size, at_boundary=True)
        if header is None:
            return None
        length = protocol.frame_length(header) if self._opener is None else sealed_frame_length(header)
        if self._max_frame_bytes is not None and length > self._max_frame_bytes:
            raise protocol.ProtocolError(
                f"handshake frame of {length} bytes exceeds the {self._max_frame_bytes}-byte limit"
            )
        body = (_recv_exactly(self.stream, length, at_boundary=False) or b"") if length else b""
        payload = body if self._opener is None else self._opener.open(header, body)
        return protocol.decode_payload(payload)

    def send(self, message: dict[str, Any]) -> None:
        """Write one message."""
        self.stream.sendall(encode(message, self._sealer))

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        """Write several messages with one system call (high token rates)."""
        self.stream.sendall(b"".join(encode(message, self._sealer) for message in messages))

    def close(self) -> None:
        """Close the underlying socket."""
        if self._closer is not None:
            try:
                self._closer.close()
            except OSError:
                return


def _recv_exactly(stream: ByteStream, size: int, *, at_boundary: bool) -> bytes | None:
    """Read exactly `size` bytes; None only for EOF before the first byte of a frame."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = stream.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if at_boundary and not chunks:
                return None
            raise protocol.ProtocolError(f"connection closed inside a frame ({len(chunks)} of {size} bytes read)")
        chunks += chunk
    return bytes(chunks)


# ---------------------------------------------------------------------------
# asyncio (client side)
# ---------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader, opener: FrameOpener | None) -> dict[str, Any] | None:
    """Read one message (sealed when `opener` is given); None means the peer closed cleanly between frames."""
    try:
        header = await reader.readexactly(protocol.HEADER.size)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise protocol.ProtocolError(
            f"connection closed inside a frame header ({len(err.partial)} of 4 bytes)"
        ) from err
    length = protocol.frame_length(header) if opener is None else sealed_frame_length(header)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise protocol.ProtocolError(
            f"connection closed inside a frame ({len(err.partial)} of {length} bytes read)"
        ) from err
    return protocol.decode_payload(body if opener is None else opener.open(header, body))


def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any], sealer: FrameSealer | None) -> None:
    """Queue one message (sealed when `sealer` is given) without waiting."""
    writer.write(encode(message, sealer))


# ---------------------------------------------------------------------------
# TLS with a pinned certificate fingerprint
# ---------------------------------------------------------------------------


def fingerprint_of_der(der: bytes) -> str:
    """SHA-256 of a DER certificate as `AB:CD:…`, the form `openssl x509 -fingerprint -sha256` prints."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[index : index + 2] for index in range(0, len(digest), 2))


def normalise_fingerprint(text: str) -> str | None:
    """`AB:CD:…` from what a user pasted (any case, with or without colons or an `sha256 Fingerprint=` prefix).

    None when it is not 32 bytes of hex.
    """
    value = text.strip()
    if "=" in value:
        value = value.rsplit("=", 1)[1]
    digits = re.sub(r"[\s:]", "", value).upper()
    if not _HEX_FINGERPRINT.match(digits):
        return None
    return ":".join(digits[index : index + 2] for index in range(0, len(digits), 2))


def certificate_fingerprint(cert_file: str | Path) -> str:
    """The fingerprint of the first certificate in a PEM file (the worker prints it at start)."""
    try:
        text = Path(cert_file).read_text(encoding="ascii", errors="replace")
    except OSError as err:
        raise TlsSetupError(f"cannot read TLS certificate {cert_file}: {err.strerror or err}") from err
    found = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
    if found is None:
        raise TlsSetupError(f"TLS certificate {cert_file} holds no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(found.group(0))
    except ValueError as err:
        raise TlsSetupError(f"TLS certificate {cert_file} is not a valid PEM certificate: {err}") from err
    return fingerprint_of_der(der)


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """The worker's TLS context: TLS 1.2 or newer, no client certificates (the shared secret authenticates them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0  # one session per connection; nothing to resume
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError as err:
        raise TlsSetupError(f"TLS certificate or key file missing: {err.filename}") from err
    except (ssl.SSLError, OSError) as err:
        raise TlsSetupError(
            f"cannot use TLS certificate {cert_file} with key {key_file}: {getattr(err, 'reason', None) or err}"
        ) from err
    return context


def client_tls_context() -> ssl.SSLContext:
    """The client's TLS context: no CA, no host name; the certificate is trusted by its pinned fingerprint only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # replaced by the fingerprint pin, checked before the first byte is sent
    return context


def fingerprint_matches(expected: str, der: bytes | None) -> bool:
    """True when the peer's DER certificate has the pinned fingerprint."""
    if der is None:
        return False
    return hmac.compare_digest(fingerprint_of_der(der), expected)
