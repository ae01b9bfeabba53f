"""The files a worker may open for its client: the libraries and models it was started with, nothing else.

The client names the library the worker dlopens and the model it feeds to the runtime; without a list, whoever
holds the secret could make the worker load any shared object on its host. So the worker takes `--library PATH`
and `--model PATH` / `--models-dir DIR` (repeatable, or the same keys in a `--config` TOML file) and refuses every
other path with `path_not_allowed`. Paths are compared after resolving symlinks and `..` (`os.path.realpath`), on
every request, so a model downloaded later into a models directory is served, and a link out of it is not.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

FLAG_LIBRARY: Final = "--library"
FLAG_MODEL: Final = "--model"
FLAG_MODELS_DIR: Final = "--models-dir"
CONFIG_KEYS: Final = {"library": FLAG_LIBRARY, "model": FLAG_MODEL, "models_dir": FLAG_MODELS_DIR}


class PathNotAllowedError(Exception):
    """A client asked for a file the worker was not started with; the message names the path and the flag."""

    def __init__(self, message: str, *, path: str, flag: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.flag = flag


class AllowListConfigError(Exception):
    """The `--config` file cannot be read or holds something other than the allow-list keys."""


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _inside(real: str, directory: str) -> bool:
    try:
        return real != directory and os.path.commonpath([real, directory]) == directory
    except ValueError:  # different drives (not on Linux) or mixed absolute/relative
        return False


@dataclass(frozen=True, slots=True)
class AllowList:
    """Absolute paths as given; resolved at each check (links may change, models may arrive later)."""

    libraries: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    models_dirs: tuple[str, ...] = ()

    @classmethod
    def from_options(
        cls,
        libraries: Iterable[str] = (),
        models: Iterable[str] = (),
        models_dirs: Iterable[str] = (),
        config: str | None = None,
    ) -> AllowList:
        """Union of the command-line flags and the `--config` file's `library`, `model` and `models_dir`."""
        found = {"library": list(libraries), "model": list(models), "models_dir": list(models_dirs)}
        if config is not None:
            for key, values in read_config(config).items():
                found[key].extend(values)
        return cls(
            libraries=tuple(dict.fromkeys(_absolute(path) for path in found["library"])),
            models=tuple(dict.fromkeys(_absolute(path) for path in found["model"])),
            models_dirs=tuple(dict.fromkeys(_absolute(path) for path in found["models_dir"])),
        )

    @property
    def serves_anything(self) -> bool:
        """A library and at least one model source: otherwise every init is refused."""
        return bool(self.libraries) and bool(self.models or self.models_dirs)

    def describe(self) -> str:
        """One line for the worker's start-up log."""
        parts = [f"library {path}" for path in self.libraries]
        parts += [f"model {path}" for path in self.models]
        parts += [f"models under {path}" for path in self.models_dirs]
        return "; ".join(parts) if parts else "nothing (no --library/--model/--models-dir)"

    def library(self, path: str) -> str:
        """The real path of an allowed library; PathNotAllowedError otherwise."""
        real = self._real(path, "library", FLAG_LIBRARY)
        if any(real == os.path.realpath(allowed) for allowed in self.libraries):
            return real
        served = ", ".join(self.libraries) or "none"
        raise PathNotAllowedError(
            f"library {path}{self._resolved_note(path, real)} is not on this worker's allow-list (it serves: "
            f"{served}); add `{FLAG_LIBRARY} {real}` to the worker's command line (or `library` in its --config "
            "file) and restart it",
            path=path,
            flag=FLAG_LIBRARY,
        )

    def model(self, path: str, what: str = "model") -> str:
        """The real path of an allowed model file (or LoRA / prompt cache beside the models)."""
        real = self._real(path, what, FLAG_MODEL)
        if any(real == os.path.realpath(allowed) for allowed in self.models):
            return real
        if any(_inside(real, os.path.realpath(directory)) for directory in self.models_dirs):
            return real
        served = [*self.models, *(f"{directory}/*" for directory in self.models_dirs)]
        raise PathNotAllowedError(
            f"{what} {path}{self._resolved_note(path, real)} is not on this worker's allow-list (it serves: "
            f"{', '.join(served) or 'none'}); add `{FLAG_MODEL} {real}` or `{FLAG_MODELS_DIR} "
            f"{os.path.dirname(real)}` to the worker's command line (or `model`/`models_dir` in its --config "
            "file) and restart it",
            path=path,
            flag=FLAG_MODEL,
        )

    @staticmethod
    def _real(path: str, what: str, flag: str) -> str:
        if not path or not os.path.isabs(path) or "\0" in path:
            raise PathNotAllowedError(
                f"{what} path {path!r} is not an absolute path; the worker serves only absolute paths it was started "
                f"with ({flag})",
                path=path,
                flag=flag,
            )
        return os.path.realpath(path)

    @staticmethod
    def _resolved_note(path: str, real: str) -> str:
        return "" if path == real else f" (resolves to {real})"


def read_config(path: str | Path) -> dict[str, list[str]]:
    """The allow-list keys of a TOML file: `library`, `model`, `models_dir`, each a path or a list of paths."""
    try:
        with Path(path).open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError as err:
        raise AllowListConfigError(f"config file {path} does not exist") from err
    except OSError as err:
        raise AllowListConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise AllowListConfigError(f"config file {path} is not valid TOML: {err}") from err
    return _allow_list_keys(path, data)


def _allow_list_keys(path: str | Path, data: Mapping[str, object]) -> dict[str, list[str]]:
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise AllowListConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}"
        )
    found: dict[str, list[str]] = {}
    for key, value in data.items():
        values: Sequence[object] = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
        if not all(isinstance(item, str) and os.path.isabs(item) for item in values):
            raise AllowListConfigError(f"config file {path}: '{key}' must be an absolute path or a list of them")
        found[key] = [str(item) for item in values]
    return found
