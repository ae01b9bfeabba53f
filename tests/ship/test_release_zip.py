"""The release zip installs into a fresh Home Assistant config directory and runs there without this repository.

A user who unzips `rkllm-<version>.zip` into `/config` gets nothing from PyPI for `rkllm_native` and
`rkllm_engine`: the zip must carry them, and the integration and its worker process must find them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT

VERSION = json.loads((REPO_ROOT / "custom_components/rkllm/manifest.json").read_text(encoding="utf-8"))["version"]
PREFIX = "custom_components/rkllm/"
VENDOR = PREFIX + "vendor/"
DEMO_MODEL = "rkllm_native/emulator/models/qwen2-0.5b-chat.model"
HASS_READY_TIMEOUT_S = 180.0  # a wait for the event, generous for a loaded machine


def _load_release_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rkllm_release", REPO_ROOT / "scripts" / "release.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


release = _load_release_module()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's Home Assistant: no PYTHONPATH pointing into this repository.

    RKLLM_DEVELOP=1 lets it accept the emulator's model files, which these tests install instead of a real model.
    """
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    env["RKLLM_DEVELOP"] = "1"
    env.update(extra)
    return env


def build_zips(output_dir: Path) -> tuple[Path, Path]:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "release.py"), "--output-dir", str(output_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return output_dir / f"rkllm-{VERSION}.zip", output_dir / "rkllm.zip"


@pytest.fixture(scope="module")
def release_zips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_zips(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def installed_config(release_zips: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh HA config dir with the manual-install zip unpacked into it, and the emulator built from it."""
    config = tmp_path_factory.mktemp("ha") / "config"
    config.mkdir()
    with zipfile.ZipFile(release_zips[0]) as archive:
        archive.extractall(config)
    vendor = config / "custom_components/rkllm/vendor"
    build = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from rkllm_native.build import emulator_library; print(emulator_library('v12x'))", str(vendor)],
        capture_output=True, text=True, timeout=120, check=False, cwd=config, env=clean_env(),
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert Path(build.stdout.strip()).is_relative_to(vendor)
    return config


def repository_sources() -> set[str]:
    """Every source file of the three packages, as its name in the zip."""
    names: set[str] = set()
    for package, target in (
        ("custom_components/rkllm", PREFIX),
        ("rkllm_native", VENDOR + "rkllm_native/"),
        ("rkllm_engine", VENDOR + "rkllm_engine/"),
        ("rkllm_openai", VENDOR + "rkllm_openai/"),
    ):
        root = REPO_ROOT / package
        for path in root.rglob("*"):
            relative = path.relative_to(root)
            if not path.is_file() or any(
                part in {"__pycache__", "build"} or part.startswith(".") for part in relative.parts
            ):
                continue
            if (
                package == "custom_components/rkllm"
                and relative.parts[0] == "vendor"
                and relative.name != "__init__.py"
            ):
                continue
            names.add(target + relative.as_posix())
    return names


def test_zip_holds_every_source_and_no_build_output(release_zips: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(release_zips[0]) as archive:
        names = set(archive.namelist())
    assert all(name.startswith(PREFIX) for name in names)
    assert names == repository_sources()
    for required in (
        "manifest.json",
        "brand/icon.png",
        "vendor/__init__.py",
        "vendor/rkllm_native/worker.py",
        "vendor/rkllm_native/selfcheck.py",
        "vendor/rkllm_native/build.py",
        "vendor/rkllm_native/emulator/emu_runtime.c",
        "vendor/rkllm_native/emulator/rkllm.h",
        "vendor/rkllm_native/emulator/models/qwen2-0.5b-chat.model",
        "vendor/rkllm_engine/engine.py",
        "vendor/rkllm_openai/schemas.py",
    ):
        assert PREFIX + required in names
    forbidden = [n for n in names if "__pycache__" in n or "/build/" in n or n.endswith((".so", ".pyc", ".o"))]
    assert forbidden == []


def test_hacs_zip_is_the_same_tree_at_the_root(release_zips: tuple[Path, Path]) -> None:
    manual, hacs = release_zips
    with zipfile.ZipFile(manual) as manual_zip, zipfile.ZipFile(hacs) as hacs_zip:
        manual_files = {name.removeprefix(PREFIX): manual_zip.read(name) for name in manual_zip.namelist()}
        hacs_files = {name: hacs_zip.read(name) for name in hacs_zip.namelist()}
    assert "manifest.json" in hacs_files
    assert hacs_files == manual_files


def test_building_twice_gives_identical_zips(release_zips: tuple[Path, Path], tmp_path: Path) -> None:
    again = build_zips(tmp_path)
    assert again[0].read_bytes() == release_zips[0].read_bytes()
    assert again[1].read_bytes() == release_zips[1].read_bytes()


def _fake_tree(root: Path, manifest_version: str = "1.2.3", pyproject_version: str = "1.2.3") -> Path:
    (root / "custom_components/rkllm/vendor").mkdir(parents=True)
    (root / "custom_components/rkllm/manifest.json").write_text(json.dumps({"version": manifest_version}))
    (root / "custom_components/rkllm/vendor/__init__.py").write_text("")
    (root / "pyproject.toml").write_text(f'[project]\nname = "rkllm"\nversion = "{pyproject_version}"\n')
    for package in ("rkllm_native", "rkllm_engine", "rkllm_openai"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    return root


def test_versions_of_manifest_and_pyproject_must_agree(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, "1.2.3", "1.2.4")
    with pytest.raises(release.ReleaseError, match=r"pyproject.toml version '1.2.4' differs from manifest.json"):
        release.build(root, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_an_unexpected_file_type_stops_the_build(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path)
    (root / "rkllm_native" / "notes.orig").write_text("stray merge leftover")
    with pytest.raises(release.ReleaseError, match=r"rkllm_native/notes\.orig: unexpected file type"):
        release.build(root, tmp_path / "dist")


def test_build_outputs_in_the_tree_are_left_out(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path)
    (root / "rkllm_native/emulator/build").mkdir(parents=True)
    (root / "rkllm_native/emulator/build/librkllmrt-emu-v12x.so").write_bytes(b"\x7fELF")
    (root / "rkllm_native/__pycache__").mkdir()
    (root / "rkllm_native/__pycache__/abi.cpython-313.pyc").write_bytes(b"")
    (root / "custom_components/rkllm/vendor/rkllm_native").mkdir()
    (root / "custom_components/rkllm/vendor/rkllm_native/stale.py").write_text("")
    manual, _hacs, count = release.build(root, tmp_path / "dist")
    with zipfile.ZipFile(manual) as archive:
        assert sorted(archive.namelist()) == [
            "custom_components/rkllm/manifest.json",
            "custom_components/rkllm/vendor/__init__.py",
            "custom_components/rkllm/vendor/rkllm_engine/__init__.py",
            "custom_components/rkllm/vendor/rkllm_native/__init__.py",
            "custom_components/rkllm/vendor/rkllm_openai/__init__.py",
        ]
    assert count == 5


ENGINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    from pathlib import Path

    config, model = Path(sys.argv[1]), sys.argv[2]
    leaked = [name for name in ("rkllm_native", "rkllm_engine") if importlib.util.find_spec(name) is not None]
    assert not leaked, f"importable before the integration was imported: {leaked}"
    sys.path.insert(0, str(config))  # what Home Assistant does with its config directory
    import custom_components.rkllm  # its vendor bootstrap puts the vendored packages on sys.path
    import rkllm_engine, rkllm_native
    from rkllm_engine.engine import Engine, EngineConfig
    from rkllm_engine.types import ChatMessage, ChatRequest
    from rkllm_native.build import library_path

    async def main() -> dict[str, object]:
        engine = Engine(EngineConfig(library_path=str(library_path("v12x")), model_path=model,
                                     env={"RKLLM_EMULATOR_SPEED": "50"}))
        await engine.start()
        try:
            request = ChatRequest(messages=[ChatMessage(role="user", content="hello")])
            text, finished = await engine.submit(request).collect()
            metrics = engine.metrics
        finally:
            await engine.stop()
        return {
            "text": text,
            "runtime_version": metrics.runtime_version,
            "native": rkllm_native.__file__,
            "engine": rkllm_engine.__file__,
            "integration": custom_components.rkllm.__file__,
        }

    print(json.dumps(asyncio.run(main())))
    """
)


def test_unzipped_integration_answers_with_only_home_assistants_python(installed_config: Path, tmp_path: Path) -> None:
    vendor = installed_config / "custom_components/rkllm/vendor"
    model = vendor / DEMO_MODEL
    result = subprocess.run(
        [sys.executable, "-I", "-c", ENGINE_SCRIPT, str(installed_config), str(model)],
        capture_output=True,
        text=True,
        timeout=300,  # catches a hang only
        check=False,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["text"] == "Hello! I am a small chat model running on the RKLLM emulator."
    assert facts["runtime_version"] == "1.2.3"
    for key in ("native", "engine", "integration"):
        assert Path(facts[key]).is_relative_to(installed_config), (key, facts[key])
    assert Path(facts["native"]).is_relative_to(vendor)


HASS_LAUNCHER = textwrap.dedent(
    """
    import sys
    from homeassistant import runner

    # What `hass --config DIR --skip-pip` runs, without its Python version gate (the 2026 line's CLI refuses
    # Python 3.13.0, which its tests accept; docs/toolchain.md).
    sys.exit(runner.run(runner.RuntimeConfig(config_dir=sys.argv[1], skip_pip=True, log_file=sys.argv[2])))
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _seed_entry(config: Path, library: Path, model: Path) -> None:
    """The config entry scripts/develop seeds (demo/seed_config.py), pointing at the unzipped copy."""
    spec = importlib.util.spec_from_file_location("rkllm_seed_config", REPO_ROOT / "demo" / "seed_config.py")
    assert spec is not None
    assert spec.loader is not None
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    seed.seed_config_entry(config / ".storage", str(library), str(model), "rk3588")


def stop_home_assistant(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM once Home Assistant handles it; its exit code.

    Home Assistant sets up config entries before it installs its signal handlers (2026.x: after startup finished),
    so a SIGTERM sent as soon as the entry is loaded can still meet the default action and kill it (exit -15) on a
    busy machine. The kernel says when the handler is there: SIGTERM's bit in SigCgt of /proc/<pid>/status.
    """
    sigterm_bit = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + 120  # a wait for the event, not a bound
    while process.poll() is None and time.monotonic() < deadline:
        status = Path(f"/proc/{process.pid}/status").read_text(encoding="ascii")
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & sigterm_bit:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def _processes_using(path: Path) -> list[int]:
    """Pids whose command line or environment mentions `path` (a worker left behind would)."""
    marker = str(path).encode()
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture
def hass_process(
    installed_config: Path, tmp_path: Path, socket_enabled: None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    vendor = installed_config / "custom_components/rkllm/vendor"
    config = tmp_path / "config"
    config.mkdir()
    (config / "custom_components").symlink_to(installed_config / "custom_components", target_is_directory=True)
    (config / "configuration.yaml").write_text(
        textwrap.dedent(
            f"""
            homeassistant:
              name: release zip check
              latitude: 52.37
              longitude: 4.89
              elevation: 0
              unit_system: metric
              time_zone: Europe/Amsterdam
              country: NL
            http:
              server_host: 127.0.0.1
              server_port: {_free_port()}
            logger:
              default: warning
              logs:
                custom_components.rkllm: debug
            """
        ),
        encoding="utf-8",
    )
    _seed_entry(config, vendor / "rkllm_native/emulator/build/librkllmrt-emu-v12x.so", vendor / DEMO_MODEL)
    log = config / "hass.log"
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", HASS_LAUNCHER, str(config), str(log)],
        cwd=tmp_path,
        env=clean_env(RKLLM_EMULATOR_SPEED="50"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_home_assistant_loads_the_integration_from_the_unzipped_release(
    hass_process: tuple[subprocess.Popen[bytes], Path], installed_config: Path
) -> None:
    process, log = hass_process
    deadline = time.monotonic() + HASS_READY_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        if "rkllm engine for" in text or "Error setting up entry" in text or "Setup failed for" in text:
            break
        time.sleep(0.2)
    assert "ready (runtime 1.2.3, ABI v12x" in text, text[-4000:]
    assert "Error setting up entry" not in text
    assert stop_home_assistant(process) == 0
    # The engine's worker (spawned from the vendored package) stopped with Home Assistant.
    deadline = time.monotonic() + 60  # a wait, not a bound: the worker leaves with Home Assistant
    while _processes_using(installed_config) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_using(installed_config) == []
