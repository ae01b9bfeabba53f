"""Typed errors of the native boundary, each carrying one line that names the problem and the file or setting.

The config flow and the worker translate these by `code`; users read the message, so it must say what to fix.
"""

from __future__ import annotations

from pathlib import Path


def _one_line(text: str) -> str:
    """Collapse whitespace runs so a message never spans several log lines."""
    return " ".join(text.split())


class RkllmError(Exception):
    """Base of every error the binding raises; `code` is a stable key for translations."""

    code: str = "rkllm_error"

    def __init__(self, message: str) -> None:
        self.message = _one_line(message)
        super().__init__(self.message)


class LibraryNotFoundError(RkllmError):
    """The configured librkllmrt path does not exist or cannot be read."""

    code = "library_not_found"

    def __init__(self, path: str | Path, reason: str = "no such file") -> None:
        self.path = str(path)
        super().__init__(f"librkllmrt not found at {self.path}: {reason}")


class LibraryLoadError(RkllmError):
    """dlopen failed (wrong architecture, missing glibc symbols, missing libgomp …)."""

    code = "library_load_failed"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"cannot load {self.path}: {reason}")


class LibraryArchitectureError(RkllmError):
    """The library is an ELF object for another CPU than this Python runs on."""

    code = "library_wrong_architecture"

    def __init__(self, path: str | Path, library_arch: str, host_arch: str) -> None:
        self.path = str(path)
        self.library_arch = library_arch
        self.host_arch = host_arch
        super().__init__(
            f"{self.path} is built for {library_arch} but this Python runs on {host_arch}; "
            f"use the librkllmrt.so built for {host_arch}"
        )


class NotRkllmLibraryError(RkllmError):
    """The file is not librkllmrt (not an ELF shared object, or no rkllm marker/symbol)."""

    code = "not_rkllm_library"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} is not librkllmrt: {reason}")


class UnsupportedRuntimeError(RkllmError):
    """The runtime version is one the binding refuses (too old, or unknown without an override)."""

    code = "unsupported_runtime"

    def __init__(self, message: str, version: str | None = None, path: str | Path | None = None) -> None:
        self.version = version
        self.path = None if path is None else str(path)
        super().__init__(message)


class UnknownRuntimeVersionError(UnsupportedRuntimeError):
    """A version newer than the known ones (1.3.1, 1.4.0 …): refused unless a profile override is set."""

    code = "unknown_runtime_version"


class VersionUndetectableError(UnsupportedRuntimeError):
    """Neither the embedded version marker nor a known official blob hash identifies the library."""

    code = "version_undetectable"


class InvalidProfileError(RkllmError):
    """The ABI profile override is not one of the known profile names."""

    code = "invalid_profile"

    def __init__(self, value: object, valid: tuple[str, ...]) -> None:
        self.value = value
        super().__init__(f"invalid ABI profile override {value!r}: valid values are {', '.join(valid)}")


class ProfileMismatchError(RkllmError):
    """The override contradicts the version detected in the library file."""

    code = "profile_mismatch"

    def __init__(self, path: str | Path, override: str, version: str, detected_profile: str) -> None:
        self.path = str(path)
        self.override = override
        self.version = version
        self.detected_profile = detected_profile
        super().__init__(
            f"ABI profile override {override} does not match {self.path}, which is librkllmrt {version} "
            f"(ABI profile {detected_profile}); remove the override or set it to {detected_profile}"
        )


class ModelFileError(RkllmError):
    """The model file is missing or unreadable before the runtime even sees it."""

    code = "model_file"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"model file {self.path}: {reason}")


class PromptCacheFileError(RkllmError):
    """A prompt-cache file to load does not exist or cannot be read."""

    code = "prompt_cache_file"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"prompt cache file {self.path}: {reason}")


class LoraAdapterFileError(RkllmError):
    """A LoRA adapter file to load does not exist or cannot be read."""

    code = "lora_adapter_file"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"LoRA adapter file {self.path}: {reason}")


class InvalidParameterError(RkllmError):
    """A setting is out of range; the message names the setting and the allowed values."""

    code = "invalid_parameter"

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class UnsupportedOnProfileError(RkllmError):
    """A feature the loaded ABI does not have (per-run sampling on 1.2.x, ignore_eos_token …)."""

    code = "unsupported_on_profile"

    def __init__(self, feature: str, profile: str, version: str) -> None:
        self.feature = feature
        self.profile = profile
        super().__init__(f"{feature} needs librkllmrt 1.3.0 (ABI v130); the loaded runtime is {version} ({profile})")


class RuntimeInitError(RkllmError):
    """rkllm_init failed or returned no handle."""

    code = "init_failed"

    def __init__(self, message: str, model_path: str | Path | None = None, return_code: int | None = None) -> None:
        self.model_path = None if model_path is None else str(model_path)
        self.return_code = return_code
        super().__init__(message)


class RuntimeCallError(RkllmError):
    """A runtime function returned non-zero; the runtime prints its reason as an `E rkllm:` log line."""

    code = "call_failed"

    def __init__(self, function: str, return_code: int, detail: str = "") -> None:
        self.function = function
        self.return_code = return_code
        suffix = f": {detail}" if detail else ""
        super().__init__(
            f"{function} failed with return code {return_code}{suffix} (the runtime logs the reason as 'E rkllm:')"
        )


class RuntimeBusyError(RkllmError):
    """A second run (or a destroy that cannot wait) while one run is in progress."""

    code = "busy"


class RuntimeNotInitializedError(RkllmError):
    """A call that needs a handle before init() or after destroy()."""

    code = "not_initialized"


class InvalidInputError(RkllmError):
    """The run input cannot be passed to the C API as given (no text, NUL bytes, bad role …)."""

    code = "invalid_input"
