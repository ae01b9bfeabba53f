"""The download catalogue (`catalog.json`): which models and runtime builds can be fetched, and which fit together.

A model converted with rkllm-toolkit X needs a runtime ≥ X (`E rkllm: The rkllm-runtime version is lower than the
rkllm-toolkit version …`, docs/runtime.md §7), and a model runs only on the SoC it was converted for. Each model entry
states its SoCs, toolkit version and the runtime range known to run it; `offered_models` keeps the ones this rkllm
release can drive on this board. Stdlib only (the fetch command runs on boards without Home Assistant).

Base URLs are rewritten by `RKLLM_FETCH_MIRRORS` (`https://huggingface.co=http://127.0.0.1:8900/hf,…`) and more
catalogue files are read from `RKLLM_FETCH_CATALOG` (`path[:path…]`): the tests and the develop demo serve fixture
files that way; production users set neither.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from .detect import OFFICIAL_BLOB_SHA1

CATALOG_FORMAT: Final = 1
ENV_MIRRORS: Final = "RKLLM_FETCH_MIRRORS"
ENV_EXTRA_CATALOGS: Final = "RKLLM_FETCH_CATALOG"
GITHUB_RAW_BASE: Final = "https://raw.githubusercontent.com/airockchip/rknn-llm"

# Runtime versions this rkllm release can drive (rkllm_native.detect: v12x = 1.2.1-1.2.3, v130 = 1.3.0).
SUPPORTED_RUNTIMES: Final = ("1.2.1", "1.2.2", "1.2.3", "1.3.0")

# `platform.machine()` → the build variant of the official binaries (docs/runtime.md §5.2 table columns).
_MACHINE_VARIANTS: Final = {
    "aarch64": "linux-aarch64",
    "arm64": "linux-aarch64",
    "armv7l": "linux-armhf",
    "armv8l": "linux-armhf",
}

_VERSION: Final = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)")
# A published size as Hugging Face prints it: 3 significant digits and a decimal unit ("2.04 GB", "783 MB").
_SIZE_TEXT: Final = re.compile(r"^\s*(?P<number>\d+(?:\.(?P<decimals>\d+))?)\s*(?P<unit>[kMGT]?B|Bytes)\s*$")
_UNITS: Final = {"B": 1, "Bytes": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


class CatalogError(ValueError):
    """A catalogue file is unreadable or an entry lacks what the downloader needs (names the file and entry)."""


def version_tuple(version: str) -> tuple[int, int, int] | None:
    """`1.2.3` → (1, 2, 3); a suffix (`1.2.1b1`) is ignored; None when there is no x.y.z."""
    match = _VERSION.match(version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def version_at_least(version: str, minimum: str) -> bool:
    """`version` ≥ `minimum`, comparing x.y.z; unparseable versions compare as not at least."""
    have, need = version_tuple(version), version_tuple(minimum)
    return have is not None and need is not None and have >= need


@dataclass(frozen=True, slots=True)
class SizeRange:
    """The byte counts a published size allows: exact when the site gave bytes, else the rounding interval."""

    low: int
    high: int  # inclusive
    text: str

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and self.low <= size <= self.high

    @property
    def display(self) -> str:
        """For people: the published text, or a byte count in decimal units ("900.00 kB")."""
        if self.low != self.high:
            return self.text
        for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
            if self.low >= factor:
                return f"{self.low / factor:.2f} {unit}"
        return f"{self.low} B"

    @classmethod
    def exact(cls, size: int) -> SizeRange:
        """A size the site published to the byte."""
        return cls(size, size, f"{size} bytes")

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        """`2.04 GB` → [2 035 000 000, 2 049 999 999]: what a 3-significant-digit display can stand for.

        Hugging Face prints decimal units with the trailing zeros dropped ("1.8 GB"); the interval covers both a
        rounded and a truncated display. The SHA-256 is the exact check; the size catches a wrong file early.
        """
        match = _SIZE_TEXT.match(text)
        if match is None:
            raise CatalogError(f"size {text!r} is neither a byte count nor like '2.04 GB'")
        unit = _UNITS[match["unit"]]
        decimals = len(match["decimals"] or "")
        # Work in integers: the number times 10^decimals, and a half step of the last printed digit.
        scaled = int(match["number"].replace(".", ""))
        scale = 10**decimals
        if unit == 1:
            return cls.exact(int(float(match["number"])))
        low = (2 * scaled - 1) * unit // (2 * scale)
        high = (scaled + 1) * unit // scale - 1
        return cls(max(0, low), high, text.strip())


@dataclass(frozen=True, slots=True)
class RuntimeRelease:
    """One rknn-llm release's librkllmrt builds (the file paths inside the repository at that tag)."""

    version: str
    tag: str
    files: Mapping[str, str]  # build variant ("linux-aarch64") → path in the repository
    source: str

    def url(self, variant: str) -> str:
        """The raw-file URL of this release's build for `variant` (GitHub's raw URL shape)."""
        return f"{GITHUB_RAW_BASE}/{self.tag}/{self.files[variant]}"

    def blob_sha1(self, variant: str) -> str | None:
        """The official binary's git-blob SHA-1 (detect.OFFICIAL_BLOB_SHA1), None when the table lacks it."""
        return OFFICIAL_BLOB_SHA1.get(self.version, {}).get(variant)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A `.rkllm` file with what the hosting site publishes about it and what it is compatible with."""

    id: str
    name: str
    file: str
    url: str
    page: str
    sha256: str
    size: SizeRange
    socs: tuple[str, ...]
    toolkit_version: str
    runtime_min: str
    runtime_max: str
    quantization: str
    context_length: int
    license: str
    assist_tools: bool
    base_model: str = ""
    notes: str = ""

    def runs_on_runtime(self, version: str) -> bool:
        """Whether `version` is inside the range known to run this model (and not older than its toolkit)."""
        return (
            version_at_least(version, self.runtime_min)
            and version_at_least(self.runtime_max, version)
            and version_at_least(version, self.toolkit_version)
        )

    def runtimes(self) -> list[str]:
        """The supported runtime versions that run this model, oldest first."""
        return [version for version in SUPPORTED_RUNTIMES if self.runs_on_runtime(version)]

    def label(self) -> str:
        """One line for a picker: name, size, toolkit and whether it suits Assist with tools."""
        assist = ", recommended for Assist with tools" if self.assist_tools else ""
        return f"{self.name}: {self.size.display}, toolkit {self.toolkit_version}{assist}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """The models and runtime releases of one or more catalogue files."""

    models: tuple[ModelEntry, ...]
    runtimes: tuple[RuntimeRelease, ...]

    def model(self, model_id: str) -> ModelEntry | None:
        """The entry with this id, or None."""
        return next((entry for entry in self.models if entry.id == model_id), None)

    def runtime(self, version: str) -> RuntimeRelease | None:
        """The release of this runtime version, or None."""
        return next((release for release in self.runtimes if release.version == version), None)

    def runtime_for_model(self, entry: ModelEntry, variant: str) -> RuntimeRelease | None:
        """The newest release that runs `entry` and has a verifiable build for `variant`."""
        for version in reversed(entry.runtimes()):
            release = self.runtime(version)
            if release is not None and variant in release.files and release.blob_sha1(variant) is not None:
                return release
        return None

    def runtime_at_least(self, version: str) -> RuntimeRelease | None:
        """The oldest supported release not older than `version` (what a model from toolkit `version` needs)."""
        for release in sorted(self.runtimes, key=lambda item: version_tuple(item.version) or (0, 0, 0)):
            if release.version in SUPPORTED_RUNTIMES and version_at_least(release.version, version):
                return release
        return None


def _str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _model_from(raw: Mapping[str, Any], where: str) -> ModelEntry:
    entry_id = _str(raw, "id", where)
    where = f"{where} model {entry_id!r}"
    sha256 = _str(raw, "sha256", where).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise CatalogError(f"{where}: 'sha256' must be 64 hex digits")
    size_bytes = raw.get("size_bytes")
    size = SizeRange.exact(size_bytes) if isinstance(size_bytes, int) else SizeRange.parse(_str(raw, "size", where))
    socs = raw.get("socs")
    if not isinstance(socs, list) or not socs or not all(isinstance(soc, str) for soc in socs):
        raise CatalogError(f"{where}: 'socs' must be a non-empty list of SoC names")
    for key in ("toolkit_version", "runtime_min", "runtime_max"):
        if version_tuple(_str(raw, key, where)) is None:
            raise CatalogError(f"{where}: '{key}' must be a version like 1.2.3")
    context = raw.get("context_length", 4096)
    if not isinstance(context, int) or context <= 0:
        raise CatalogError(f"{where}: 'context_length' must be a positive integer")
    file_name = _str(raw, "file", where)
    if "/" in file_name or file_name.startswith("."):
        raise CatalogError(f"{where}: 'file' must be a plain file name")
    return ModelEntry(
        id=entry_id,
        name=_str(raw, "name", where),
        file=file_name,
        url=_str(raw, "url", where),
        page=_str(raw, "page", where),
        sha256=sha256,
        size=size,
        socs=tuple(soc.lower() for soc in socs),
        toolkit_version=_str(raw, "toolkit_version", where),
        runtime_min=_str(raw, "runtime_min", where),
        runtime_max=_str(raw, "runtime_max", where),
        quantization=_str(raw, "quantization", where),
        context_length=context,
        license=_str(raw, "license", where),
        assist_tools=bool(raw.get("assist_tools", False)),
        base_model=str(raw.get("base_model", "")),
        notes=str(raw.get("notes", "")),
    )


def _runtime_from(raw: Mapping[str, Any], where: str) -> RuntimeRelease:
    version = _str(raw, "version", where)
    files = raw.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CatalogError(f"{where} runtime {version}: 'files' must map build variants to paths")
    return RuntimeRelease(
        version=version, tag=_str(raw, "tag", where), files=dict(files), source=str(raw.get("source", ""))
    )


def parse_catalog(data: Mapping[str, Any], where: str) -> Catalog:
    """Validate one catalogue document; `where` (its path) prefixes every error."""
    if data.get("format") != CATALOG_FORMAT:
        raise CatalogError(f"{where}: 'format' must be {CATALOG_FORMAT}")
    models = data.get("models", [])
    runtimes = data.get("runtimes", [])
    if not isinstance(models, list) or not isinstance(runtimes, list):
        raise CatalogError(f"{where}: 'models' and 'runtimes' must be lists")
    return Catalog(
        models=tuple(_model_from(raw, where) for raw in models if isinstance(raw, dict)),
        runtimes=tuple(_runtime_from(raw, where) for raw in runtimes if isinstance(raw, dict)),
    )


def merge(catalogs: Iterable[Catalog]) -> Catalog:
    """Later catalogues add models and runtimes; an id or version given twice keeps the first one."""
    models: dict[str, ModelEntry] = {}
    runtimes: dict[str, RuntimeRelease] = {}
    for catalog in catalogs:
        for entry in catalog.models:
            models.setdefault(entry.id, entry)
        for release in catalog.runtimes:
            runtimes.setdefault(release.version, release)
    return Catalog(models=tuple(models.values()), runtimes=tuple(runtimes.values()))


def read_catalog_file(path: str | Path) -> Catalog:
    """Read and validate one catalogue file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CatalogError(f"catalogue {path}: {err}") from err
    if not isinstance(data, dict):
        raise CatalogError(f"catalogue {path}: not a JSON object")
    return parse_catalog(data, str(path))


def load_catalog(extra: Sequence[str | Path] | None = None, env: Mapping[str, str] | None = None) -> Catalog:
    """The shipped catalogue plus `extra` files (default: the paths in RKLLM_FETCH_CATALOG). Blocking I/O."""
    environ = os.environ if env is None else env
    shipped_text = resources.files(__package__).joinpath("catalog.json").read_text(encoding="utf-8")
    shipped = parse_catalog(json.loads(shipped_text), "rkllm_native/catalog.json")
    if extra is None:
        extra = [part for part in environ.get(ENV_EXTRA_CATALOGS, "").split(os.pathsep) if part.strip()]
    return merge([shipped, *(read_catalog_file(path) for path in extra)])


def parse_mirrors(text: str) -> dict[str, str]:
    """`FROM=TO[,FROM=TO…]` → {FROM: TO} (trailing slashes dropped)."""
    mirrors: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise CatalogError(f"{ENV_MIRRORS}: {part!r} is not FROM=TO")
        mirrors[source.strip().rstrip("/")] = target.strip().rstrip("/")
    return mirrors


def mirrors_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base-URL rewrites of RKLLM_FETCH_MIRRORS (empty in production)."""
    return parse_mirrors((os.environ if env is None else env).get(ENV_MIRRORS, ""))


def apply_mirrors(url: str, mirrors: Mapping[str, str]) -> str:
    """Rewrite the longest matching base of `url` (`https://huggingface.co/x` → `http://127.0.0.1:8900/hf/x`)."""
    for source in sorted(mirrors, key=len, reverse=True):
        if url == source or url.startswith(source + "/"):
            return mirrors[source] + url[len(source) :]
    return url


# `E rkllm: The rkllm-runtime version is lower than the rkllm-toolkit version. Please update rkllm-runtime to %s or
# higher.` (docs/runtime.md Appendix A); [Inf] the version it names is the model's toolkit version.
_RUNTIME_TOO_OLD: Final = re.compile(
    r"rkllm-runtime version is lower than the rkllm-toolkit version.*?update rkllm-runtime to\s*v?([0-9][0-9a-z.]*?)"
    r"\.?\s+or higher",
    re.IGNORECASE,
)


def toolkit_version_refused(runtime_line: str) -> str | None:
    """The toolkit version a runtime's refusal names (it wants a runtime at least that new), else None."""
    match = _RUNTIME_TOO_OLD.search(runtime_line)
    return match.group(1) if match is not None else None


def toolkit_newer_than_runtime(toolkit_version: str | None, runtime_version: str | None) -> bool:
    """A model from toolkit X needs runtime ≥ X (docs/runtime.md §7); True when that is known to be violated."""
    if not toolkit_version or not runtime_version:
        return False
    toolkit, runtime = version_tuple(toolkit_version), version_tuple(runtime_version)
    return toolkit is not None and runtime is not None and toolkit > runtime


def machine_variant(machine: str | None = None) -> str | None:
    """The official build variant for this CPU (`linux-aarch64`, `linux-armhf`), None when Rockchip ships none."""
    return _MACHINE_VARIANTS.get((machine or platform.machine()).lower())


def offered_models(catalog: Catalog, soc: str | None) -> list[ModelEntry]:
    """The entries this rkllm release can run on a board with `soc` (None: unknown, every SoC is offered).

    Kept: a supported runtime runs the model (its range meets SUPPORTED_RUNTIMES and its toolkit is not newer
    than that runtime) and, when the SoC is known, the model was converted for it.
    """
    return [
        entry
        for entry in catalog.models
        if entry.runtimes() and (soc is None or soc.lower() in entry.socs)
    ]
