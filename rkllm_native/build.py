"""Builds the C emulator of librkllmrt in both ABI flavours, so machines without an NPU get a real library.

`emulator_library(profile)` returns `rkllm_native/emulator/build/librkllmrt-emu-<profile>.so`, compiling it
with gcc when it is missing or older than its sources. Builds go to a temporary file that is renamed into
place, so two processes building at once never load a half-written library.
Run `python -m rkllm_native.build` to build both flavours and print their paths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final, Literal

from rkllm_native.errors import RkllmError

Profile = Literal["v12x", "v130"]
PROFILES: Final[tuple[Profile, ...]] = ("v12x", "v130")

EMULATOR_DIR: Final = Path(__file__).resolve().parent / "emulator"
BUILD_DIR: Final = EMULATOR_DIR / "build"

# One source tree compiled twice; the define picks the struct layouts (docs/runtime.md §2 vs §3).
_ABI_DEFINES: Final[dict[str, str]] = {"v12x": "RKLLM_EMU_ABI_V12X", "v130": "RKLLM_EMU_ABI_V130"}
CFLAGS: Final[tuple[str, ...]] = (
    "-std=c11",
    "-O2",
    "-shared",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pthread",
    "-fvisibility=hidden",  # only the rkllm_* API is exported, like the real library
)
LIBS: Final[tuple[str, ...]] = ("-lm",)
_COMPILE_TIMEOUT_S: Final = 300


class EmulatorBuildError(RkllmError):
    """The emulator library could not be built (no compiler, compile error, unwritable build directory)."""

    code = "emulator_build_failed"


def library_path(profile: Profile) -> Path:
    """Where the library of `profile` lives once built (it may not exist yet)."""
    return BUILD_DIR / f"librkllmrt-emu-{profile}.so"


def _sources() -> list[Path]:
    """Every file the build depends on: the C sources, the headers, and this script (it holds the flags)."""
    return sorted([*EMULATOR_DIR.glob("*.c"), *EMULATOR_DIR.glob("*.h"), Path(__file__).resolve()])


def _is_current(output: Path) -> bool:
    try:
        built = output.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(source.stat().st_mtime_ns <= built for source in _sources())


def _compiler() -> str:
    name = os.environ.get("CC", "gcc")
    found = shutil.which(name)
    if found is None:
        raise EmulatorBuildError(
            f"cannot build the RKLLM emulator: C compiler {name!r} not found on PATH (install gcc, or set CC)"
        )
    return found


def _first_error_line(output: str) -> str:
    """The compiler's first diagnostic that says error, else its first line: one line that names the problem."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if " error: " in line or line.startswith("error: "):  # gcc/ld: "file:1:2: error: …"
            return line
    return lines[0] if lines else "no compiler output"


def build_library(profile: Profile) -> Path:
    """Compile the library of `profile` unconditionally and move it into place atomically."""
    if profile not in PROFILES:
        raise EmulatorBuildError(f"unknown emulator profile {profile!r}: valid values are {', '.join(PROFILES)}")
    compiler = _compiler()
    output = library_path(profile)
    try:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        handle, temporary_name = tempfile.mkstemp(dir=BUILD_DIR, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as err:
        raise EmulatorBuildError(f"cannot write the emulator build directory {BUILD_DIR}: {err.strerror}") from err
    os.close(handle)
    temporary = Path(temporary_name)
    c_sources = [str(source) for source in sorted(EMULATOR_DIR.glob("*.c"))]
    command = [compiler, *CFLAGS, f"-D{_ABI_DEFINES[profile]}", "-o", str(temporary), *c_sources, *LIBS]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise EmulatorBuildError(
                f"building {output.name} failed: {_first_error_line(result.stderr or result.stdout)}"
            )
        temporary.chmod(0o755)
        temporary.replace(output)
    except subprocess.TimeoutExpired as err:
        raise EmulatorBuildError(f"building {output.name} took longer than {_COMPILE_TIMEOUT_S} s") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return output


def emulator_library(profile: Profile) -> Path:
    """Path of the emulator library for `profile`, (re)built when missing or older than its sources."""
    if profile not in PROFILES:
        raise EmulatorBuildError(f"unknown emulator profile {profile!r}: valid values are {', '.join(PROFILES)}")
    output = library_path(profile)
    if _is_current(output):
        return output
    return build_library(profile)


def main(argv: list[str] | None = None) -> int:
    """Build both flavours and print one path per line; errors go to stderr as one line."""
    parser = argparse.ArgumentParser(
        prog="python -m rkllm_native.build", description="Build the RKLLM emulator libraries (v12x and v130)."
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the libraries are up to date")
    arguments = parser.parse_args(argv)
    try:
        for profile in PROFILES:
            path = build_library(profile) if arguments.force else emulator_library(profile)
            print(path)
    except EmulatorBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# What a development machine without an NPU offers instead of a real runtime and model. Production code reaches this
# only through the integration's development hook (custom_components/rkllm/develop.py, RKLLM_DEVELOP=1).
EMULATOR_MODEL_HEADER: Final = "rkllm-emulator-model 1"
DEMO_MODEL: Final = EMULATOR_DIR / "models" / "qwen2.5-1.5b-assist.model"
_MODEL_HEADER_PROBE_BYTES: Final = 4096


def built_library(profile: Profile = "v12x") -> Path | None:
    """The emulator library of `profile` if it is built (never builds: for suggestions), else None."""
    path = library_path(profile)
    return path if path.is_file() else None


def demo_model() -> Path | None:
    """The emulator's Assist demo model, if present."""
    return DEMO_MODEL if DEMO_MODEL.is_file() else None


def is_emulator_model(path: str | Path) -> bool:
    """True when the file's first non-comment line is the emulator's model header (emulator/MODEL_FORMAT.md)."""
    try:
        with Path(path).open("rb") as stream:
            head = stream.read(_MODEL_HEADER_PROBE_BYTES)
    except OSError:
        return False
    for line in head.decode("utf-8", "replace").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped == EMULATOR_MODEL_HEADER
    return False
