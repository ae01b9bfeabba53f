"""Version detection and library checks: users get one line naming the file and what is wrong with it."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from rkllm_native import detect
from rkllm_native.errors import (
    InvalidProfileError,
    LibraryArchitectureError,
    LibraryNotFoundError,
    NotRkllmLibraryError,
    ProfileMismatchError,
    RkllmError,
    UnknownRuntimeVersionError,
    UnsupportedRuntimeError,
    VersionUndetectableError,
)

_HOST_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "armv7l": 40}[platform.machine().lower()]
_OTHER_ELF_MACHINE = 183 if _HOST_ELF_MACHINE != 183 else 62
SYMBOLS_121 = b"\x00rkllm_init\x00rkllm_run\x00rkllm_set_function_tools\x00"


def elf_header(e_type: int = 3, e_machine: int = _HOST_ELF_MACHINE) -> bytes:
    """A 64-byte little-endian ELF64 header: enough for the magic, type and machine checks."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + e_type.to_bytes(2, "little") + e_machine.to_bytes(2, "little") + bytes(44)


def write_library(path: Path, payload: bytes, *, e_type: int = 3, e_machine: int = _HOST_ELF_MACHINE) -> Path:
    path.write_bytes(elf_header(e_type, e_machine) + payload)
    return path


def marker(version: str) -> bytes:
    return f"RKLLM SDK (version: {version} | target: Linux | build: 27637c95 2025-05-02 17:46:07)".encode()


def assert_one_line(error: RkllmError) -> str:
    text = str(error)
    assert "\n" not in text
    assert text.strip() == text
    return text


@pytest.mark.parametrize(
    ("version", "profile"),
    [("1.2.1", "v12x"), ("1.2.2", "v12x"), ("1.2.3", "v12x"), ("1.3.0", "v130")],
)
def test_supported_versions_map_to_their_profile(version: str, profile: str) -> None:
    assert detect.profile_for_version(version) == profile


@pytest.mark.parametrize("version", ["1.2.1b1", "1.2.0", "1.1.4", "1.1.0", "1.0.2b", "1.0.1", "1.0.0", "0.9.9"])
def test_older_versions_are_refused_as_too_old(version: str) -> None:
    with pytest.raises(UnsupportedRuntimeError) as caught:
        detect.profile_for_version(version, "/opt/rkllm/librkllmrt.so")
    assert not isinstance(caught.value, UnknownRuntimeVersionError)
    text = assert_one_line(caught.value)
    assert text.startswith(f"librkllmrt {version} at /opt/rkllm/librkllmrt.so is too old: ")
    assert "rkllm supports 1.2.1-1.2.3 and 1.3.0" in text


@pytest.mark.parametrize("version", ["1.2.4", "1.3.1", "1.4.0", "2.0.0", "1.3.0b1", "1.3"])
def test_unknown_newer_versions_are_refused_with_an_override_hint(version: str) -> None:
    with pytest.raises(UnknownRuntimeVersionError) as caught:
        detect.profile_for_version(version, "/lib/librkllmrt.so")
    text = assert_one_line(caught.value)
    assert f"librkllmrt {version} at /lib/librkllmrt.so" in text
    assert "set the ABI profile override to v130 or v12x" in text


def test_git_blob_sha1_matches_git() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert detect.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.mark.parametrize(
    ("sha1", "expected"),
    [
        ("0084abc34ab43359cfa9fd5d4c92ece34127dbd0", ("1.2.3", "linux-aarch64")),
        ("fe1ca6849603a770c54f82d26b826a120c79a01a", ("1.2.3", "linux-armhf")),
        ("34167b32f99cb7ab19e21fb579fb750d96b878f1", ("1.3.0", "linux-aarch64")),
        ("5f0bd5f39bd05263a59786733687d29e66982aa6", ("1.3.0", "android-arm64-v8a")),
        ("6b9439d59f2fe4bb8ef5ee2b09c102f1bf993da9", ("1.2.1", "linux-aarch64")),
        ("db041c01bba5e0e8f624bb2ff50d48825dde1bfc", ("1.2.1b1", "linux-aarch64")),
        ("3bb8cb6172c4c06e1c622c8f8c579888378784f4", ("1.1.4", "linux-aarch64")),
        ("53e00993ebbc7797df09673f806479e8642db946", ("1.0.0", "linux-aarch64")),
    ],
)
def test_official_blob_table_identifies_the_documented_binaries(sha1: str, expected: tuple[str, str]) -> None:
    assert detect.official_build(sha1) == expected


def test_official_blob_table_covers_every_release_and_variant() -> None:
    assert len(detect.OFFICIAL_BLOB_SHA1) == 14
    with_armhf = {v for v, variants in detect.OFFICIAL_BLOB_SHA1.items() if "linux-armhf" in variants}
    assert with_armhf == {"1.2.1", "1.2.2", "1.2.3", "1.3.0"}
    assert all("android-arm64-v8a" in variants for variants in detect.OFFICIAL_BLOB_SHA1.values())


def test_marker_gives_the_version(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", b"\x00junk" + marker("1.2.3") + SYMBOLS_121)
    assert detect.detect_version(library) == "1.2.3"
    identity = detect.identify_library(library)
    assert (identity.version, identity.profile, identity.source) == ("1.2.3", "v12x", "marker")


def test_marker_split_across_the_scan_chunk_boundary_is_found(tmp_path: Path) -> None:
    text = marker("1.3.0")
    for cut in (5, 20, 23):  # inside the prefix, right after it, and inside the version itself
        padding = bytes(1 << 20)[: (1 << 20) - 64 - cut]
        library = write_library(tmp_path / f"lib{cut}.so", padding + text + SYMBOLS_121)
        assert detect.detect_version(library) == "1.3.0", cut


def test_marker_at_the_very_end_of_the_file_is_found(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", SYMBOLS_121 + b"RKLLM SDK (version: 1.2.2")
    assert detect.detect_version(library) == "1.2.2"


def test_blob_hash_identifies_a_library_without_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = write_library(tmp_path / "librkllmrt.so", b"synthetic official build" + SYMBOLS_121)
    sha1 = detect.git_blob_sha1(library.read_bytes())
    monkeypatch.setitem(detect._BLOB_SHA1_TO_VERSION, sha1, ("1.2.2", "linux-aarch64"))
    assert detect.detect_version(library) == "1.2.2"
    identity = detect.identify_library(library)
    assert (identity.version, identity.profile, identity.source, identity.official_build) == (
        "1.2.2",
        "v12x",
        "blob-sha1",
        "linux-aarch64",
    )


def test_library_with_marker_114_is_refused_naming_the_version(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.1.4") + b"\x00rkllm_init\x00")
    with pytest.raises(UnsupportedRuntimeError) as caught:
        detect.check_library(library)
    text = assert_one_line(caught.value)
    assert text.startswith(f"librkllmrt 1.1.4 at {library} is too old: rkllm supports 1.2.1-1.2.3 and 1.3.0")


def test_too_old_runtime_is_refused_even_with_an_override(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.2.0") + b"\x00rkllm_init\x00")
    with pytest.raises(UnsupportedRuntimeError, match=r"librkllmrt 1\.2\.0 at .* is too old"):
        detect.resolve_profile(library, "v12x")


def test_override_that_contradicts_the_version_names_both(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.2.3") + SYMBOLS_121)
    with pytest.raises(ProfileMismatchError) as caught:
        detect.resolve_profile(library, "v130")
    text = assert_one_line(caught.value)
    assert "override v130" in text
    assert "librkllmrt 1.2.3 (ABI profile v12x)" in text
    assert str(library) in text


def test_override_that_agrees_with_the_version_is_accepted(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.3.0") + SYMBOLS_121)
    assert detect.resolve_profile(library, "v130") == "v130"


@pytest.mark.parametrize("override", ["v13", "V130", "1.3.0", "", "auto"])
def test_invalid_override_lists_the_valid_values(tmp_path: Path, override: str) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.3.0") + SYMBOLS_121)
    with pytest.raises(InvalidProfileError) as caught:
        detect.resolve_profile(library, override)
    text = assert_one_line(caught.value)
    assert text == f"invalid ABI profile override {override!r}: valid values are v12x, v130"


def test_unknown_newer_version_needs_the_override_and_then_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.3.1") + SYMBOLS_121)
    with pytest.raises(UnknownRuntimeVersionError, match=r"librkllmrt 1\.3\.1 at "):
        detect.resolve_profile(library)
    with caplog.at_level(logging.WARNING, logger="rkllm_native.detect"):
        identity = detect.identify_library(library, "v130")
    assert (identity.version, identity.profile, identity.source) == ("1.3.1", "v130", "override")
    assert "1.3.1" in caplog.text
    assert "unverified" in caplog.text


def test_library_without_version_needs_an_override(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", b"stripped build" + SYMBOLS_121)
    with pytest.raises(VersionUndetectableError) as caught:
        detect.resolve_profile(library)
    assert f"cannot tell which librkllmrt {library} is" in assert_one_line(caught.value)
    with pytest.raises(VersionUndetectableError):
        detect.detect_version(library)
    identity = detect.identify_library(library, "v12x")
    assert (identity.version, identity.profile, identity.source) == ("unknown", "v12x", "override")


def test_library_without_function_tools_symbol_is_older_than_121(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", b"\x00rkllm_init\x00rkllm_run\x00")
    with pytest.raises(UnsupportedRuntimeError, match=r"older than 1\.2\.1 \(it has no rkllm_set_function_tools\)"):
        detect.resolve_profile(library, "v12x")


def test_missing_library_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "lib" / "librkllmrt.so"
    with pytest.raises(LibraryNotFoundError) as caught:
        detect.check_library(missing)
    assert assert_one_line(caught.value) == f"librkllmrt not found at {missing}: no such file"


def test_directory_is_not_a_library(tmp_path: Path) -> None:
    with pytest.raises(LibraryNotFoundError, match="not a regular file"):
        detect.check_library(tmp_path)


def test_text_file_is_not_librkllmrt(tmp_path: Path) -> None:
    text_file = tmp_path / "librkllmrt.so"
    text_file.write_text("this is a README, not a library\n")
    with pytest.raises(NotRkllmLibraryError) as caught:
        detect.check_library(text_file)
    assert assert_one_line(caught.value) == f"{text_file} is not librkllmrt: not an ELF file (no \\x7fELF magic)"


def test_elf_executable_is_not_a_shared_object(tmp_path: Path) -> None:
    executable = write_library(tmp_path / "rkllm_demo", marker("1.2.3") + SYMBOLS_121, e_type=2)
    with pytest.raises(NotRkllmLibraryError, match=r"not an ELF shared object \(e_type 2, expected 3\)"):
        detect.check_library(executable)


def test_library_for_another_cpu_is_refused(tmp_path: Path) -> None:
    library = write_library(tmp_path / "librkllmrt.so", marker("1.2.3") + SYMBOLS_121, e_machine=_OTHER_ELF_MACHINE)
    with pytest.raises(LibraryArchitectureError) as caught:
        detect.check_library(library)
    text = assert_one_line(caught.value)
    assert f"{library} is built for " in text
    assert f"this Python runs on {platform.machine()}" in text


def test_a_real_shared_object_that_is_not_librkllmrt_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "other.c"
    source.write_text("int other_function(int x) { return x + 1; }\n")
    library = tmp_path / "libother.so"
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is needed to build a foreign shared object"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    with pytest.raises(NotRkllmLibraryError) as caught:
        detect.check_library(library)
    assert assert_one_line(caught.value) == (
        f"{library} is not librkllmrt: no RKLLM SDK version marker and no rkllm_init symbol"
    )
