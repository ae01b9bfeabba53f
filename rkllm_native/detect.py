"""Tell which librkllmrt a file is, and so which ABI profile to use, without loading it.

librkllmrt exports no version function (docs/runtime.md §5). The order of evidence is: the embedded
`RKLLM SDK (version: X | …)` marker, then the git-blob SHA-1 of the official binaries, then an explicit
profile override. Symbols only separate ≤1.2.0 from ≥1.2.1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .abi import PROFILE_NAMES, ProfileName
from .errors import (
    InvalidProfileError,
    LibraryArchitectureError,
    LibraryNotFoundError,
    NotRkllmLibraryError,
    ProfileMismatchError,
    UnknownRuntimeVersionError,
    UnsupportedRuntimeError,
    VersionUndetectableError,
)

_LOGGER = logging.getLogger(__name__)

SUPPORTED_RANGE_TEXT: Final = "rkllm supports 1.2.1-1.2.3 and 1.3.0"

# Marker from docs/runtime.md §5.1; the version part is bounded so the chunked scan needs a small overlap only.
VERSION_MARKER: Final = re.compile(rb"RKLLM SDK \(version: ([0-9][0-9a-z.]{0,31})")
_MARKER_MAX_LEN: Final = len(b"RKLLM SDK (version: ") + 32
_SYMBOL_INIT: Final = b"rkllm_init\x00"
_SYMBOL_FUNCTION_TOOLS: Final = b"rkllm_set_function_tools\x00"
_OVERLAP: Final = max(_MARKER_MAX_LEN, len(_SYMBOL_INIT), len(_SYMBOL_FUNCTION_TOOLS))
_CHUNK_SIZE: Final = 1 << 20

_KNOWN_PROFILES: Final[dict[str, ProfileName]] = {"1.2.1": "v12x", "1.2.2": "v12x", "1.2.3": "v12x", "1.3.0": "v130"}
_OLDEST_SUPPORTED: Final = (1, 2, 1)

# Git-blob SHA-1 of the official binaries (docs/runtime.md §5.2): version → {build variant: sha1}.
OFFICIAL_BLOB_SHA1: Final[dict[str, dict[str, str]]] = {
    "1.0.0": {
        "linux-aarch64": "53e00993ebbc7797df09673f806479e8642db946",
        "android-arm64-v8a": "0b93495ab81d86d61dfbbb6a6481d7881cc5a557",
    },
    "1.0.1": {
        "linux-aarch64": "a026cbe60905af0ad6c07dfa2fcc339dd4b9fa10",
        "android-arm64-v8a": "ba8f0763753069586541993e4ed66a68f9596ce4",
    },
    "1.0.2b": {
        "linux-aarch64": "c913ab1569dfed48916c05fcd898f8d3f9dafe04",
        "android-arm64-v8a": "2f7e7e97447cf9515d92e94f456ae7ec5795dda8",
    },
    "1.1.0": {
        "linux-aarch64": "66dfdc7c25cdca9ccf9930798118e17abf7592ff",
        "android-arm64-v8a": "9b5ff7f87f5f49655428de4f3dbef613d5a6b6c5",
    },
    "1.1.1": {
        "linux-aarch64": "bfca051375287d0f5aa754a7b8681b4ede52e259",
        "android-arm64-v8a": "9cb37c73de4f51650f61ad3427bdf11c558ae499",
    },
    "1.1.2": {
        "linux-aarch64": "e8f4afc38c7394beeff83003dbc772412f649a44",
        "android-arm64-v8a": "87b6735ebb37a88616e559c81ce7700ae26d440b",
    },
    "1.1.3": {
        "linux-aarch64": "68e79327e82f675413956be615f48c62ccd0f16e",
        "android-arm64-v8a": "ecc05306766660bd79a708200948f3d009efe4ba",
    },
    "1.1.4": {
        "linux-aarch64": "3bb8cb6172c4c06e1c622c8f8c579888378784f4",
        "android-arm64-v8a": "3f173bdf016d346690d2ccad52480efc53234b3e",
    },
    "1.2.0": {
        "linux-aarch64": "d45ee9b8dcb9ef27d7dd875ce3be3d5e6dfb654d",
        "android-arm64-v8a": "d61b58e295a1e88f3c690df316bfd83eec4bd16d",
    },
    "1.2.1b1": {
        "linux-aarch64": "db041c01bba5e0e8f624bb2ff50d48825dde1bfc",
        "android-arm64-v8a": "08dc9db1a201c0a87f596c7667d5dc98ca16a7d9",
    },
    "1.2.1": {
        "linux-aarch64": "6b9439d59f2fe4bb8ef5ee2b09c102f1bf993da9",
        "linux-armhf": "7025f35825e04ad75d839d10392e3c02cc88e57a",
        "android-arm64-v8a": "4464ccb4f167d72dbd61fe1c92b44976ed45dda5",
    },
    "1.2.2": {
        "linux-aarch64": "8ed9cca16f8d5ad8f7cdd7d393de6561182b3395",
        "linux-armhf": "d5953fdad6e60521f1dc696f6d638425c93ba08d",
        "android-arm64-v8a": "471639b60c2c7fdcb2c8dffd553acc8548d10c2e",
    },
    "1.2.3": {
        "linux-aarch64": "0084abc34ab43359cfa9fd5d4c92ece34127dbd0",
        "linux-armhf": "fe1ca6849603a770c54f82d26b826a120c79a01a",
        "android-arm64-v8a": "348986e7a8170ddb2c3b43e99257d2e64d9699f6",
    },
    "1.3.0": {
        "linux-aarch64": "34167b32f99cb7ab19e21fb579fb750d96b878f1",
        "linux-armhf": "17c9063b46168c4e7d093d6fedb097874f92d076",
        "android-arm64-v8a": "5f0bd5f39bd05263a59786733687d29e66982aa6",
    },
}
_BLOB_SHA1_TO_VERSION: Final[dict[str, tuple[str, str]]] = {
    sha1: (version, variant) for version, variants in OFFICIAL_BLOB_SHA1.items() for variant, sha1 in variants.items()
}

# ELF e_machine values we can name in an error message.
_ELF_MACHINES: Final[dict[int, str]] = {3: "x86", 40: "armhf (32-bit ARM)", 62: "x86_64", 183: "aarch64"}
_HOST_MACHINES: Final[dict[str, int]] = {
    "x86_64": 62,
    "amd64": 62,
    "aarch64": 183,
    "arm64": 183,
    "armv7l": 40,
    "armv8l": 40,
    "i686": 3,
}
_ELF_MAGIC: Final = b"\x7fELF"
_EI_CLASS: Final = 4
_EI_DATA: Final = 5
_ELFCLASS64: Final = 2
_ELFDATA2LSB: Final = 1
_ELF_IDENT_AND_TYPE_LEN: Final = 20  # e_ident (16) + e_type (2) + e_machine (2)
_ET_DYN: Final = 3
_HEAD_LEN: Final = 64

VersionSource = Literal["marker", "blob-sha1", "override"]


@dataclass(frozen=True, slots=True)
class LibraryScan:
    """Facts read from the library file in one streaming pass."""

    path: str
    size: int
    version_marker: str | None
    blob_sha1: str
    has_rkllm_init: bool
    has_set_function_tools: bool
    elf_type: int | None  # e_type (3 = shared object); None when the file is not ELF
    elf_machine: int | None  # e_machine (183 = aarch64, 40 = arm, 62 = x86_64)
    elf_64bit: bool | None


@dataclass(frozen=True, slots=True)
class LibraryIdentity:
    """Which runtime a file is and which ABI profile the binding will use for it."""

    path: str
    version: str  # "1.2.3", or "unknown" when only an override identifies it
    profile: ProfileName
    source: VersionSource
    official_build: str | None  # e.g. "linux-aarch64" when the blob hash matched an official binary


def git_blob_sha1(data: bytes) -> str:
    """SHA-1 of a git blob, as in the official repository (docs/runtime.md §5.2)."""
    digest = hashlib.sha1(b"blob %d\x00" % len(data), usedforsecurity=False)
    digest.update(data)
    return digest.hexdigest()


def _open_for_reading(path: Path) -> tuple[int, int]:
    """Open a regular file; missing, unreadable or non-regular paths give LibraryNotFoundError naming the path."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LibraryNotFoundError(path) from None
    except PermissionError:
        raise LibraryNotFoundError(path, "permission denied (not readable by this user)") from None
    except OSError as exc:
        raise LibraryNotFoundError(path, exc.strerror or str(exc)) from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise LibraryNotFoundError(path, "not a regular file")
    return descriptor, info.st_size


def _elf_header(head: bytes) -> tuple[int | None, int | None, bool | None]:
    """e_type, e_machine and ELF class from the first bytes, or Nones when the file is not ELF."""
    if len(head) < _ELF_IDENT_AND_TYPE_LEN or not head.startswith(_ELF_MAGIC):
        return None, None, None
    byteorder: Literal["little", "big"] = "little" if head[_EI_DATA] == _ELFDATA2LSB else "big"
    elf_type = int.from_bytes(head[16:18], byteorder)
    elf_machine = int.from_bytes(head[18:20], byteorder)
    return elf_type, elf_machine, head[_EI_CLASS] == _ELFCLASS64


def scan_library(path: str | Path) -> LibraryScan:
    """Read the file once in 1 MiB chunks: version marker, blob hash, rkllm symbols and the ELF header."""
    file_path = Path(path)
    descriptor, size = _open_for_reading(file_path)
    digest = hashlib.sha1(b"blob %d\x00" % size, usedforsecurity=False)
    version: str | None = None
    has_init = False
    has_tools = False
    head = b""
    tail = b""
    total = 0
    with os.fdopen(descriptor, "rb") as stream:
        while True:
            chunk = stream.read(_CHUNK_SIZE)
            at_end = not chunk
            total += len(chunk)
            digest.update(chunk)
            if len(head) < _HEAD_LEN:
                head += chunk[: _HEAD_LEN - len(head)]
            window = tail + chunk
            if version is None:
                for match in VERSION_MARKER.finditer(window):
                    # A match that touches the window's end may continue in the next chunk: decide then.
                    if match.end() < len(window) or at_end:
                        version = match.group(1).decode("ascii").rstrip(".")
                        break
            has_init = has_init or _SYMBOL_INIT in window
            has_tools = has_tools or _SYMBOL_FUNCTION_TOOLS in window
            if at_end:
                break
            tail = window[-_OVERLAP:]
    if total != size:
        # The file changed while we read it; the hash would describe neither version.
        raise LibraryNotFoundError(file_path, f"file changed while reading ({size} bytes expected, {total} read)")
    elf_type, elf_machine, elf_64bit = _elf_header(head)
    return LibraryScan(
        path=str(file_path),
        size=size,
        version_marker=version,
        blob_sha1=digest.hexdigest(),
        has_rkllm_init=has_init,
        has_set_function_tools=has_tools,
        elf_type=elf_type,
        elf_machine=elf_machine,
        elf_64bit=elf_64bit,
    )


def official_build(blob_sha1: str) -> tuple[str, str] | None:
    """(version, variant) of an official binary with this git-blob SHA-1, or None."""
    return _BLOB_SHA1_TO_VERSION.get(blob_sha1)


def detect_version(path: str | Path) -> str:
    """The runtime version from the embedded marker, else from the official blob-hash table.

    Raises VersionUndetectableError when neither identifies the file.
    """
    scan = scan_library(path)
    found = _version_of(scan)
    if found is None:
        raise VersionUndetectableError(
            f"cannot tell which librkllmrt {scan.path} is: no 'RKLLM SDK (version: …)' marker and not a known "
            "official build",
            path=scan.path,
        )
    return found[0]


def _version_of(scan: LibraryScan) -> tuple[str, VersionSource, str | None] | None:
    """Version, how it was found, and the official build variant when the blob hash matched; None if unknown."""
    known = official_build(scan.blob_sha1)
    if scan.version_marker is not None:
        return scan.version_marker, "marker", None if known is None else known[1]
    if known is not None:
        return known[0], "blob-sha1", known[1]
    return None


_VERSION_PARTS: Final = re.compile(r"^(\d+)\.(\d+)\.(\d+)([0-9a-z.]*)$")


def _parse_version(version: str) -> tuple[tuple[int, int, int], str] | None:
    """(major, minor, patch) and the pre-release suffix ("b1" in 1.2.1b1), or None when unparseable."""
    match = _VERSION_PARTS.match(version)
    if match is None:
        return None
    numbers = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return numbers, match.group(4)


def profile_for_version(version: str, path: str | Path | None = None) -> ProfileName:
    """Map a runtime version to its ABI profile; refuse older runtimes and unknown newer ones.

    1.2.1-1.2.3 → v12x, 1.3.0 → v130. Anything before 1.2.1 (including the 1.2.1b1 pre-release, whose callback
    still returns void) is refused for good. A newer version (1.2.4, 1.3.1, 1.4.0) is refused too: its header may
    have changed again, as 1.3.0's did, and a wrong guess corrupts memory. It can be used only with an explicit
    profile override (see `resolve_profile`).
    """
    where = "" if path is None else f" at {path}"
    if version in _KNOWN_PROFILES:
        return _KNOWN_PROFILES[version]
    parsed = _parse_version(version)
    if parsed is not None:
        numbers, suffix = parsed
        # A pre-release ("1.2.1b1", "1.0.2b") sorts before its release.
        if numbers < _OLDEST_SUPPORTED or (numbers == _OLDEST_SUPPORTED and suffix):
            raise UnsupportedRuntimeError(
                f"librkllmrt {version}{where} is too old: {SUPPORTED_RANGE_TEXT}; "
                "install librkllmrt 1.2.3 or 1.3.0 from airockchip/rknn-llm and a model converted for it",
                version=version,
                path=path,
            )
    raise UnknownRuntimeVersionError(
        f"librkllmrt {version}{where} is not a version this rkllm release knows ({SUPPORTED_RANGE_TEXT}); "
        "if its rkllm.h matches one of them, set the ABI profile override to v130 or v12x",
        version=version,
        path=path,
    )


def validate_profile_name(value: object) -> ProfileName:
    """Check an override setting; anything but the profile names is an InvalidProfileError listing them."""
    for name in PROFILE_NAMES:
        if value == name:
            return name
    raise InvalidProfileError(value, PROFILE_NAMES)


def _check_is_rkllm(scan: LibraryScan) -> None:
    """Refuse files that are not ELF shared objects, are for another CPU, or carry no rkllm marker/symbol."""
    path = scan.path
    if scan.elf_type is None:
        raise NotRkllmLibraryError(path, "not an ELF file (no \\x7fELF magic)")
    if scan.elf_type != _ET_DYN:
        raise NotRkllmLibraryError(path, f"not an ELF shared object (e_type {scan.elf_type}, expected 3)")
    host_machine = _HOST_MACHINES.get(platform.machine().lower())
    if scan.elf_machine is not None and host_machine is not None and scan.elf_machine != host_machine:
        library_arch = _ELF_MACHINES.get(scan.elf_machine, f"ELF machine {scan.elf_machine}")
        raise LibraryArchitectureError(path, library_arch, platform.machine())
    if scan.version_marker is None and not scan.has_rkllm_init and official_build(scan.blob_sha1) is None:
        raise NotRkllmLibraryError(path, "no RKLLM SDK version marker and no rkllm_init symbol")


def identify_library(path: str | Path, override: str | None = None) -> LibraryIdentity:
    """Decide version and ABI profile of a library file; raises an RkllmError subclass naming the problem.

    - The detected version decides. An override must agree with it (ProfileMismatchError naming both).
    - A version older than 1.2.1 is refused even with an override.
    - An unknown newer version is refused unless an override is given; with one it is used, with a warning.
    - With no version found at all, a library lacking `rkllm_set_function_tools` is ≤1.2.0 and refused; otherwise
      an override is required (VersionUndetectableError).
    """
    profile_override = None if override is None else validate_profile_name(override)
    scan = scan_library(path)
    _check_is_rkllm(scan)
    found = _version_of(scan)
    if found is None:
        if scan.has_rkllm_init and not scan.has_set_function_tools:
            raise UnsupportedRuntimeError(
                f"librkllmrt at {scan.path} is older than 1.2.1 (it has no rkllm_set_function_tools): "
                f"{SUPPORTED_RANGE_TEXT}",
                path=scan.path,
            )
        if profile_override is None:
            raise VersionUndetectableError(
                f"cannot tell which librkllmrt {scan.path} is: no 'RKLLM SDK (version: …)' marker and not a known "
                "official build; set the ABI profile override to v12x (1.2.1 to 1.2.3) or v130 (1.3.0)",
                path=scan.path,
            )
        _LOGGER.warning("librkllmrt %s has no version marker; using ABI profile %s as configured", path, override)
        return LibraryIdentity(scan.path, "unknown", profile_override, "override", None)
    version, source, build = found
    try:
        detected = profile_for_version(version, scan.path)
    except UnknownRuntimeVersionError:
        if profile_override is None:
            raise
        _LOGGER.warning(
            "librkllmrt %s at %s is newer than the known versions; using ABI profile %s as configured (unverified)",
            version,
            scan.path,
            profile_override,
        )
        return LibraryIdentity(scan.path, version, profile_override, "override", build)
    if profile_override is not None and profile_override != detected:
        raise ProfileMismatchError(scan.path, profile_override, version, detected)
    return LibraryIdentity(scan.path, version, detected, source, build)


def resolve_profile(path: str | Path, override: str | None = None) -> ProfileName:
    """The ABI profile to load `path` with (see `identify_library` for the rules)."""
    return identify_library(path, override).profile


def check_library(path: str | Path, override: str | None = None) -> LibraryIdentity:
    """Validate a library path for the config flow before anything is loaded.

    Checks, in order: the file exists and is readable; it is an ELF shared object for this CPU; it carries the
    rkllm version marker or the rkllm_init symbol; its version is supported (or the override fits it).
    """
    return identify_library(path, override)
