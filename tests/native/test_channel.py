"""The worker channel's building blocks: HKDF, handshake keys, sealed frames, fingerprints and the allow-list.

The end-to-end behaviour (a worker process refusing bad clients and frames, over TCP and TLS) is in
tests/engine/test_channel.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllm_native import channel, protocol
from rkllm_native.allowlist import AllowList, AllowListConfigError, PathNotAllowedError

NC = bytes(range(32))
NW = bytes(range(32, 64))


def test_hkdf_matches_rfc_5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    prk = channel.hkdf_extract(salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    assert channel.hkdf_expand(prk, info, 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_matches_rfc_5869_test_case_3_without_salt_and_info() -> None:
    prk = channel.hkdf_extract(b"", bytes.fromhex("0b" * 22))
    assert prk.hex() == "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04"
    assert channel.hkdf_expand(prk, b"", 42).hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_proofs_and_keys_are_bound_to_role_direction_nonces_version_and_secret() -> None:
    keys = channel.derive_keys("s3cret", 2, NC, NW)
    # Reflection: the worker's proof is not the client's, and each direction has its own frame key.
    assert keys.client_proof != keys.worker_proof
    assert keys.client_to_worker != keys.worker_to_client
    assert len({keys.client_proof, keys.worker_proof, keys.client_to_worker, keys.worker_to_client}) == 4
    # Replay: new nonces, other secret, other version: nothing carries over.
    for other in (
        channel.derive_keys("s3cret", 2, NW, NC),
        channel.derive_keys("s3cret", 2, NC, bytes(32)),
        channel.derive_keys("other", 2, NC, NW),
        channel.derive_keys("s3cret", 3, NC, NW),
    ):
        assert other.client_proof != keys.client_proof
        assert other.worker_proof != keys.worker_proof
        assert other.client_to_worker != keys.client_to_worker
    assert channel.derive_keys("s3cret", 2, NC, NW) == keys  # deterministic: both sides compute the same
    with pytest.raises(ValueError, match="32 bytes"):
        channel.derive_keys("s3cret", 2, NC[:16], NW)


def test_proof_check_accepts_only_the_exact_hex_proof() -> None:
    proof = channel.derive_keys("s3cret", 2, NC, NW).client_proof
    assert channel.proof_matches(proof, proof.hex())
    assert channel.proof_matches(proof, proof.hex().upper())
    for sent in (None, 5, "", proof.hex()[:-2], proof.hex() + "00", "zz" * 32, "ü" * 64, bytes(32).hex()):
        assert not channel.proof_matches(proof, sent)


def test_nonce_of_refuses_malformed_nonces() -> None:
    assert channel.nonce_of(channel.challenge(NW)) == NW
    for bad in ({}, {"nonce": 5}, {"nonce": "ab"}, {"nonce": "zz" * 32}):
        with pytest.raises(protocol.ProtocolError, match="nonce"):
            channel.nonce_of(bad)


def _pair() -> tuple[channel.FrameSealer, channel.FrameOpener]:
    key = channel.derive_keys("s3cret", 2, NC, NW).client_to_worker
    return channel.FrameSealer(key), channel.FrameOpener(key, "client")


def _split(frame: bytes) -> tuple[bytes, bytes]:
    return frame[:4], frame[4:]


def test_sealed_frames_open_in_order_and_carry_a_32_byte_tag() -> None:
    sealer, opener = _pair()
    first = sealer.seal(b'{"op":"hello"}')
    second = sealer.seal(b'{"op":"stats"}')
    assert len(first) == 4 + len(b'{"op":"hello"}') + channel.TAG_BYTES
    assert first[4:-32] == b'{"op":"hello"}'
    assert opener.open(*_split(first)) == b'{"op":"hello"}'
    assert opener.open(*_split(second)) == b'{"op":"stats"}'
    assert opener.seq == 2


def test_replayed_reordered_dropped_or_cross_direction_frames_fail_the_tag() -> None:
    sealer, opener = _pair()
    frames = [sealer.seal(f'{{"n":{index}}}'.encode()) for index in range(3)]
    opener.open(*_split(frames[0]))
    with pytest.raises(channel.IntegrityError, match=r"frame 1 from the client failed its HMAC-SHA256 check"):
        opener.open(*_split(frames[0]))  # replayed
    _, fresh = _pair()
    with pytest.raises(channel.IntegrityError):
        fresh.open(*_split(frames[1]))  # reordered (or frame 0 dropped)
    keys = channel.derive_keys("s3cret", 2, NC, NW)
    reverse = channel.FrameOpener(keys.worker_to_client, "worker")
    with pytest.raises(channel.IntegrityError, match="from the worker"):
        reverse.open(*_split(frames[0]))  # reflected back in the other direction


@settings(max_examples=200, deadline=None, database=None)
@given(payload=st.binary(max_size=300), position=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_of_a_sealed_frame_is_detected(payload: bytes, position: int, bit: int) -> None:
    sealer, opener = _pair()
    frame = bytearray(sealer.seal(payload))
    index = position % len(frame)
    frame[index] ^= 1 << bit
    header, body = bytes(frame[:4]), bytes(frame[4:])
    if index < 4:
        # A flipped length: the reader waits for other bytes or refuses the size; the tag covers the header too.
        with pytest.raises(protocol.ProtocolError):
            opener.open(header, body[: channel.sealed_frame_length(header)].ljust(4, b"\0"))
        return
    with pytest.raises(channel.IntegrityError):
        opener.open(header, body)


def test_short_and_oversized_sealed_frames_are_refused_with_their_reason() -> None:
    _, opener = _pair()
    with pytest.raises(protocol.ProtocolError, match="fewer than its 32-byte MAC tag"):
        opener.open(protocol.HEADER.pack(10), b"x" * 10)
    with pytest.raises(protocol.ProtocolError, match="exceeds the"):
        channel.sealed_frame_length(protocol.HEADER.pack(channel.MAX_SEALED_FRAME_BYTES + 1))
    sealer, _ = _pair()
    with pytest.raises(protocol.ProtocolError, match="exceeds the"):
        sealer.seal(b"x" * (protocol.MAX_FRAME_BYTES + 1))


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    yield left, right
    left.close()
    right.close()


def test_frame_channel_round_trips_sealed_and_plain_frames(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    keys = channel.derive_keys("s3cret", 2, NC, NW)
    client = channel.FrameChannel(left, peer="w", sealer=channel.FrameSealer(keys.client_to_worker))
    worker = channel.FrameChannel(right, peer="c", opener=channel.FrameOpener(keys.client_to_worker, "client"))
    messages = [protocol.request("hello", 1, version=2), protocol.request("run", 2, text="Küche 💡")]
    client.send(messages[0])
    client.send_many(messages[1:])
    assert [worker.recv(), worker.recv()] == messages
    assert worker.sealed
    plain_left = channel.FrameChannel(left, peer="x")
    plain_left.send({"ev": "log", "line": "x"})
    assert protocol.recv_frame(right) == {"ev": "log", "line": "x"}  # plain frames are protocol frames
    left.close()
    assert worker.recv() is None


OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def test_fingerprint_is_the_one_openssl_prints(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=rkllm-worker", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    printed = subprocess.run(
        [OPENSSL, "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    fingerprint = channel.certificate_fingerprint(cert)
    assert printed.split("=", 1)[1] == fingerprint
    # What a user may paste: openssl's whole line, lower case, no colons, stray spaces.
    assert channel.normalise_fingerprint(printed) == fingerprint
    assert channel.normalise_fingerprint(f"  {fingerprint.replace(':', '').lower()} ") == fingerprint
    assert channel.normalise_fingerprint(fingerprint[:-3]) is None
    assert channel.normalise_fingerprint("not a fingerprint") is None
    assert channel.server_tls_context(cert, key) is not None
    with pytest.raises(channel.TlsSetupError, match="holds no PEM certificate"):
        channel.certificate_fingerprint(key)
    with pytest.raises(channel.TlsSetupError, match="cannot use TLS certificate"):
        channel.server_tls_context(key, cert)


# ---------------------------------------------------------------------------
# Allow-list
# ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "librkllmrt.so").write_bytes(b"\x7fELF")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.rkllm").write_bytes(b"model")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "evil.so").write_bytes(b"\x7fELF")
    (tmp_path / "elsewhere" / "b.rkllm").write_bytes(b"model")
    return tmp_path


def test_allow_list_serves_its_library_and_models_by_real_path(tree: Path) -> None:
    allow = AllowList.from_options([str(tree / "lib/librkllmrt.so")], models_dirs=[str(tree / "models")])
    assert allow.library(str(tree / "lib/librkllmrt.so")) == str(tree / "lib/librkllmrt.so")
    assert allow.library(str(tree / "lib/../lib/librkllmrt.so")) == str(tree / "lib/librkllmrt.so")
    assert allow.model(str(tree / "models/a.rkllm")) == str(tree / "models/a.rkllm")
    # A model downloaded after the worker started is served (the downloader writes into --models-dir).
    (tree / "models" / "sub").mkdir()
    (tree / "models" / "sub" / "later.rkllm").write_bytes(b"model")
    assert allow.model(str(tree / "models/sub/later.rkllm")) == str(tree / "models/sub/later.rkllm")


def test_allow_list_refuses_other_paths_dot_dot_and_symlink_escapes(tree: Path) -> None:
    allow = AllowList.from_options([str(tree / "lib/librkllmrt.so")], models_dirs=[str(tree / "models")])
    with pytest.raises(PathNotAllowedError) as other:
        allow.library(str(tree / "elsewhere/evil.so"))
    assert other.value.flag == "--library"
    assert other.value.path == str(tree / "elsewhere/evil.so")
    assert f"add `--library {tree / 'elsewhere/evil.so'}`" in other.value.message
    with pytest.raises(PathNotAllowedError, match=r"resolves to .*elsewhere/b\.rkllm"):
        allow.model(str(tree / "models/../elsewhere/b.rkllm"))
    os.symlink(tree / "elsewhere/b.rkllm", tree / "models/link.rkllm")
    with pytest.raises(PathNotAllowedError, match="resolves to") as link:
        allow.model(str(tree / "models/link.rkllm"))
    assert link.value.flag == "--model"
    assert "--models-dir" in link.value.message
    os.symlink(tree / "elsewhere/evil.so", tree / "lib/librkllmrt-link.so")
    with pytest.raises(PathNotAllowedError):
        allow.library(str(tree / "lib/librkllmrt-link.so"))
    with pytest.raises(PathNotAllowedError, match="not an absolute path"):
        allow.model("models/a.rkllm")
    with pytest.raises(PathNotAllowedError):
        allow.model(str(tree / "models"))  # the directory itself is no model
    assert not AllowList().serves_anything
    with pytest.raises(PathNotAllowedError, match="it serves: none"):
        AllowList().library(str(tree / "lib/librkllmrt.so"))


def test_allow_list_follows_a_symlinked_allowed_entry(tree: Path) -> None:
    os.symlink(tree / "lib", tree / "current")
    allow = AllowList.from_options([str(tree / "current/librkllmrt.so")], [str(tree / "models/a.rkllm")])
    assert allow.library(str(tree / "lib/librkllmrt.so")) == str(tree / "lib/librkllmrt.so")
    assert allow.model(str(tree / "models/a.rkllm")) == str(tree / "models/a.rkllm")
    with pytest.raises(PathNotAllowedError, match=r"--models-dir"):
        allow.model(str(tree / "models/other.rkllm"))


def test_config_file_holds_the_same_allow_list(tree: Path) -> None:
    config = tree / "worker.toml"
    config.write_text(
        f'library = "{tree / "lib/librkllmrt.so"}"\nmodels_dir = ["{tree / "models"}"]\n', encoding="utf-8"
    )
    allow = AllowList.from_options(config=str(config))
    assert allow.serves_anything
    assert allow.model(str(tree / "models/a.rkllm"))
    config.write_text('library = "relative.so"\n', encoding="utf-8")
    with pytest.raises(AllowListConfigError, match="'library' must be an absolute path"):
        AllowList.from_options(config=str(config))
    config.write_text('listen = "0.0.0.0:1"\n', encoding="utf-8")
    with pytest.raises(AllowListConfigError, match="unknown key"):
        AllowList.from_options(config=str(config))
    config.write_text("library = [", encoding="utf-8")
    with pytest.raises(AllowListConfigError, match="not valid TOML"):
        AllowList.from_options(config=str(config))
    with pytest.raises(AllowListConfigError, match="does not exist"):
        AllowList.from_options(config=str(tree / "absent.toml"))
