"""Repository metadata that HACS users and scripts/setup depend on."""

import json
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOCK_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(?P<version>\S+)$")


def read_lock(path: Path) -> dict[str, str]:
    """Map each pinned distribution of a uv lock file to its version."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = LOCK_PIN.match(line)
        assert match, f"{path.name}: unexpected lock line {line!r}"
        pins[match["name"].lower()] = match["version"]
    return pins


def year_month(ha_version: str) -> tuple[int, int]:
    """HA versions are <year>.<month>.<patch>; HACS compares them numerically."""
    year, month = ha_version.split(".")[:2]
    return int(year), int(month)


def test_hacs_minimum_version_is_the_oldest_tested_line(repo_root: Path) -> None:
    hacs = json.loads((repo_root / "hacs.json").read_text(encoding="utf-8"))
    assert hacs["name"] == "RKLLM"
    assert hacs["render_readme"] is True
    tested = [read_lock(lock)["homeassistant"] for lock in sorted((repo_root / "requirements").glob("ha-*.lock"))]
    assert len(tested) == len(line_names(repo_root)), f"expected one lock per HA line, found {tested}"
    # Claiming an older minimum would let HACS install us on releases we never ran against.
    assert year_month(hacs["homeassistant"]) == min(year_month(v) for v in tested)


def line_names(repo_root: Path) -> list[str]:
    """The HA lines scripts/lines.bash names (RKLLM_LINES=(2025.4 …)), which scripts/setup and scripts/test use."""
    match = re.search(r"^RKLLM_LINES=\(([^)]*)\)$", (repo_root / "scripts/lines.bash").read_text(), re.MULTILINE)
    assert match, "scripts/lines.bash does not define RKLLM_LINES=(…)"
    return match.group(1).split()


def test_every_line_has_its_requirement_files_and_no_lock_is_left_over(repo_root: Path) -> None:
    requirements = repo_root / "requirements"
    lines = line_names(repo_root)
    assert lines[0] == "2025.4", "the oldest line comes first (scripts/lint and scripts/develop use .venv)"
    for line in lines:
        ha_pin = f"homeassistant=={line}."
        assert ha_pin in (requirements / f"ha-{line}.in").read_text(encoding="utf-8"), f"ha-{line}.in: {ha_pin}…"
        assert (requirements / f"ha-{line}.lock").is_file(), f"ha-{line}.lock is missing: run requirements/compile"
    assert sorted(lock.stem for lock in requirements.glob("ha-*.lock")) == sorted(f"ha-{line}" for line in lines)


def test_each_lock_pins_what_its_in_file_asks_for(repo_root: Path) -> None:
    requirements = repo_root / "requirements"
    for source in sorted([*requirements.glob("ha-*.in"), *requirements.glob("bare-*.in")]):
        lock = read_lock(source.with_suffix(".lock"))
        common = requirements / "common.in" if "-r common.in" in source.read_text(encoding="utf-8") else None
        for line in [
            *source.read_text(encoding="utf-8").splitlines(),
            *(common.read_text(encoding="utf-8").splitlines() if common else []),
        ]:
            match = LOCK_PIN.match(line.strip())
            if match:
                name = match["name"].lower()
                assert lock.get(name) == match["version"], (
                    f"{source.with_suffix('.lock').name} pins {name}=={lock.get(name)} but {source.name} or "
                    f"common.in asks for {match['version']}: run requirements/compile"
                )


def test_running_venv_matches_its_lock(repo_root: Path) -> None:
    ha_version = version("homeassistant")
    locks = [read_lock(lock) for lock in (repo_root / "requirements").glob("ha-*.lock")]
    matching = [pins for pins in locks if pins["homeassistant"] == ha_version]
    assert matching, f"installed homeassistant {ha_version} is not the version of any requirements/*.lock"
    stale: list[str] = []
    for name, pinned in matching[0].items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            stale.append(f"{name} {installed} (lock: {pinned})")
    assert not stale, "venv differs from its lock, run scripts/setup: " + ", ".join(stale)


def select_lines(repo_root: Path, selection: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, "-c", 'source scripts/lines.bash && select_lines "$1"', "select_lines", selection],
        capture_output=True, text=True, timeout=30, check=False, cwd=repo_root,
    )  # fmt: skip


def test_line_selection_takes_the_line_names_and_the_old_ones(repo_root: Path) -> None:
    # RKLLM_TEST_LINES (scripts/test), scripts/setup's arguments and RKLLM_DEVELOP_LINE all go through this.
    cases = {
        "": ["2025.4", "2026.2", "2026.10"],
        "all": ["2025.4", "2026.2", "2026.10"],
        "both": ["2025.4", "2026.2", "2026.10"],  # the name from when there were two lines
        "2025": ["2025.4"],
        "2026": ["2026.2", "2026.10"],
        "2026.10,2025": ["2025.4", "2026.10"],
        "2026.2 2026.2": ["2026.2"],
    }
    for selection, expected in cases.items():
        result = select_lines(repo_root, selection)
        assert result.returncode == 0, (selection, result.stderr)
        assert result.stdout.split() == expected, selection
    unknown = select_lines(repo_root, "2025 2024")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "2024"
