"""Build the release zips: the integration with `rkllm_native`, `rkllm_engine` and `rkllm_openai` vendored in it.

Neither package is on PyPI, so a Home Assistant install gets them from the zip, under
`custom_components/rkllm/vendor/` (the integration's `vendor` module puts that directory on sys.path).
Two files with the same content:

- `dist/rkllm-<version>.zip`: `custom_components/rkllm/…`; unzip it into the Home Assistant config directory.
- `dist/rkllm.zip`: the same tree rooted at the integration directory, the layout HACS extracts into
  `custom_components/rkllm/` for a release asset (`zip_release` in hacs.json).

Only sources go in (Python, C sources and headers of the emulator, its model files, JSON, the brand icon);
build outputs, caches and hidden files never do. Entries are sorted and time-stamped alike, so the same tree
gives byte-identical zips. Standard library only: runs with any Python 3.11+.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
INTEGRATION: Final = Path("custom_components/rkllm")
VENDOR: Final = INTEGRATION / "vendor"
VENDORED_PACKAGES: Final = ("rkllm_native", "rkllm_engine", "rkllm_openai")
HACS_ZIP_NAME: Final = "rkllm.zip"
# Only these kinds of files ship; anything else under a packaged directory is an error, not a silent extra.
SHIPPED_SUFFIXES: Final = frozenset({".py", ".json", ".c", ".h", ".md", ".model", ".png", ".yaml", ".typed"})
# Never packaged: build outputs and caches (rkllm_native/emulator/build holds the compiled emulator).
EXCLUDED_DIRS: Final = frozenset({"__pycache__", "build", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
ZIP_TIMESTAMP: Final = (1980, 1, 1, 0, 0, 0)  # the zip epoch: the content, not the build time, decides the bytes
VERSION_PATTERN: Final = re.compile(r"^\d+\.\d+\.\d+([ab]\d+|rc\d+)?$")


class ReleaseError(Exception):
    """The tree cannot be released as it is; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class ReleaseFile:
    """One file of the release: where it is in the repository and where it goes under the integration."""

    source: Path
    target: Path  # relative to custom_components/rkllm/


def read_version(root: Path) -> str:
    """The manifest version; pyproject.toml must say the same, so a release has one number."""
    manifest_path = root / INTEGRATION / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReleaseError(f"cannot read {manifest_path}: {err}") from err
    version = manifest.get("version")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ReleaseError(f"{manifest_path}: 'version' must look like 1.2.3 (got {version!r})")
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    if match is None or match.group(1) != version:
        found = None if match is None else match.group(1)
        raise ReleaseError(f"pyproject.toml version {found!r} differs from manifest.json version {version!r}")
    return version


def _walk(directory: Path) -> Iterator[Path]:
    """Files under `directory` in sorted order, skipping excluded and hidden directories."""
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in EXCLUDED_DIRS:
                yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _checked(path: Path, root: Path) -> Path:
    """The path itself, or a ReleaseError when it is not a kind of file that ships."""
    if path.suffix not in SHIPPED_SUFFIXES:
        raise ReleaseError(
            f"{path.relative_to(root)}: unexpected file type in a packaged directory "
            f"(shipped suffixes: {', '.join(sorted(SHIPPED_SUFFIXES))}); remove it or extend SHIPPED_SUFFIXES"
        )
    return path


def collect_files(root: Path) -> list[ReleaseFile]:
    """Every file of the release, sorted by its place in the zip."""
    integration_dir = root / INTEGRATION
    vendor_module = root / VENDOR / "__init__.py"
    if not vendor_module.is_file():
        raise ReleaseError(f"{vendor_module.relative_to(root)} is missing: the integration could not find its packages")
    files: list[ReleaseFile] = []
    for path in _walk(integration_dir):
        relative = path.relative_to(integration_dir)
        # vendor/ is filled below from the repository's packages; a stale copy in the working tree never ships.
        if relative.parts[0] == "vendor" and relative != Path("vendor/__init__.py"):
            continue
        files.append(ReleaseFile(_checked(path, root), relative))
    for package in VENDORED_PACKAGES:
        package_dir = root / package
        if not (package_dir / "__init__.py").is_file():
            raise ReleaseError(f"{package}/__init__.py is missing: cannot vendor {package}")
        for path in _walk(package_dir):
            target = Path("vendor") / package / path.relative_to(package_dir)
            files.append(ReleaseFile(_checked(path, root), target))
    files.sort(key=lambda item: item.target.as_posix())
    return files


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_zip(path: Path, files: list[ReleaseFile], prefix: Path | None) -> None:
    """Write the files under `prefix` (None = at the zip root), deterministically, via a temporary file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for item in files:
            name = (item.target if prefix is None else prefix / item.target).as_posix()
            archive.writestr(_zip_info(name), item.source.read_bytes())
    temporary.replace(path)


def uncommitted_changes(root: Path) -> list[str]:
    """Paths under the packaged directories that differ from the last commit (empty outside a git checkout)."""
    if shutil.which("git") is None or not (root / ".git").exists():
        return []
    paths = [str(INTEGRATION), *VENDORED_PACKAGES]
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],  # noqa: S607 - git from PATH
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return []
    return [line[3:] for line in result.stdout.splitlines() if line.strip()]


def build(root: Path, output_dir: Path) -> tuple[Path, Path, int]:
    """Both zips; returns their paths and the number of files."""
    version = read_version(root)
    files = collect_files(root)
    output_dir.mkdir(parents=True, exist_ok=True)
    manual = output_dir / f"rkllm-{version}.zip"
    hacs = output_dir / HACS_ZIP_NAME
    write_zip(manual, files, INTEGRATION)
    write_zip(hacs, files, None)
    return manual, hacs, len(files)


def main(argv: list[str] | None = None) -> int:
    """Build the zips and print one line per file written; errors are one line on stderr."""
    parser = argparse.ArgumentParser(prog="scripts/build_release", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "dist", help="where the zips go (dist/)")
    args = parser.parse_args(argv)
    try:
        manual, hacs, count = build(REPO_ROOT, args.output_dir)
    except (ReleaseError, OSError) as err:
        print(f"build_release: error: {err}", file=sys.stderr)
        return 1
    changes = uncommitted_changes(REPO_ROOT)
    if changes:
        print(
            f"build_release: note: {len(changes)} packaged file(s) differ from the last commit "
            f"(first: {changes[0]}); release from a clean checkout"
        )
    for path in (manual, hacs):
        print(f"build_release: wrote {path} ({count} files, {path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
