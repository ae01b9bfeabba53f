"""The release zip on a bare Home Assistant 2026.11.0: HA installs our requirements itself, then the agent answers.

A user's Home Assistant has only homeassistant and its dependencies. Issue 11 was the config flow failing there
with "No module named 'pydantic'", which no test saw because every venv of this project has pydantic. Here a fresh
venv gets nothing but requirements/bare-2026.11.lock (homeassistant==2026.11.0 and its dependencies), the
release zip is unpacked into a fresh config directory with the entry scripts/develop seeds, and `hass` starts
**with pip enabled**, as on a user's machine: it must install manifest.json's requirements before the entry
loads, and the agent must answer through `POST /api/conversation/process`.

Why 2026.11.0: the release the failure was reported on, the newest on PyPI, and one the test lines do not cover
(the test plugin stops at 2026.10.4); it also runs on Python 3.14, which the 2026.10 line's venv already has.
scripts/test runs this once, with the 2026.10 line (RKLLM_BARE_INSTALL=0 deselects it on the others).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from demo import long_lived_token, seed_config
from tests.conftest import REPO_ROOT
from tests.ship.test_release_zip import _free_port, _processes_using, clean_env, release, stop_home_assistant

BARE_LOCK = REPO_ROOT / "requirements" / "bare-2026.11.lock"
HA_VERSION = "2026.11.0"
UV = REPO_ROOT / ".tools" / "uv" / "bin" / "uv"
NEWEST_LINE_VENV = REPO_ROOT / ".venv-2026.10"
ASSIST_MODEL = "rkllm_native/emulator/models/qwen2.5-1.5b-assist.model"
AGENT = "conversation.rkllm_conversation"
MANIFEST = json.loads((REPO_ROOT / "custom_components/rkllm/manifest.json").read_text(encoding="utf-8"))
# A first start installs the frontend and the voice helpers too; generous, most of it is uv's cache.
STARTUP_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 600

# The entry is ready, or waiting longer shows nothing new (a failed core requirement stops HA's start).
READY_OR_FAILED = (
    "rkllm engine for",
    "Error setting up entry",
    "Setup failed for 'rkllm'",
    "Home Assistant core failed to initialize",
    "Unable to install package pydantic",
)
# How this machine reaches PyPI (CA bundle, proxy, uv's settings): a user's Home Assistant has its machine's too.
NETWORK_VARIABLES = re.compile(r"SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|(?i:(?:https?|no|all)_proxy)|UV_\w+")

pytestmark = [pytest.mark.bare_install, pytest.mark.timeout(1200)]


@dataclass(frozen=True, slots=True)
class BareHome:
    """A running bare Home Assistant with the unzipped release and its log."""

    process: subprocess.Popen[bytes]
    venv: Path
    config: Path
    log: Path
    url: str
    username: str
    password: str


def run(command: list[str | Path], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a setup step; fail naming the step and the end of its output."""
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False, cwd=cwd, env=env,
    )  # fmt: skip
    output = (result.stderr or result.stdout)[-3000:]
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output}"
    return result.stdout


def python314() -> Path:
    """The 2026.10 line's interpreter (scripts/setup: the machine's Python 3.14, or Debian's: scripts/debian_python)."""
    python = NEWEST_LINE_VENV / "bin" / "python"
    assert python.exists(), f"{python} is missing: run scripts/setup 2026.10 (HA 2026.11 needs Python 3.14)"
    base = run([python, "-c", "import sys; print(sys._base_executable)"], "asking the 2026.10 venv for its interpreter")
    return Path(base.strip())


def wait_for_entry(process: subprocess.Popen[bytes], log: Path) -> str:
    """The log once the rkllm entry is ready (or setup failed, or hass exited): what a user would look at."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        if any(marker in text for marker in READY_OR_FAILED):
            break
        time.sleep(0.5)
    return text


@pytest.fixture
def bare_home(tmp_path: Path, socket_enabled: None) -> Iterator[BareHome]:
    root = tmp_path
    venv = root / "venv"
    started = time.monotonic()
    # Only homeassistant and its dependencies, from the lock (uv's cache makes this ~20 s on a warm machine).
    run([UV, "venv", "--quiet", "--python", python314(), venv], "creating the bare venv")
    run(
        [UV, "pip", "sync", "--quiet", "--compile-bytecode", "--python", venv / "bin" / "python", BARE_LOCK],
        f"installing {BARE_LOCK.name} into the bare venv",
    )
    version = run([venv / "bin" / "python", "-c", "import homeassistant.const as c; print(c.__version__)"], "HA")
    assert version.strip() == HA_VERSION
    for requirement in MANIFEST["requirements"]:
        name = re.split(r"[<>=!~;\[]", requirement, maxsplit=1)[0]
        found = run([venv / "bin" / "python", "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"], name)
        assert found.strip() == "None", f"{name} is already in the bare venv: the test would prove nothing"

    config = root / "config"
    config.mkdir()
    manual_zip, _hacs_zip, _count = release.build(REPO_ROOT, root / "dist")
    with zipfile.ZipFile(manual_zip) as archive:
        archive.extractall(config)
    vendor = config / "custom_components" / "rkllm" / "vendor"
    library = run(
        [venv / "bin" / "python", "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from rkllm_native.build import emulator_library; print(emulator_library('v12x'))", vendor],
        "building the emulator from the unzipped release", cwd=config, env=clean_env(),
    ).strip()  # fmt: skip
    port = _free_port()
    (config / "configuration.yaml").write_text(
        "homeassistant:\n  name: bare install check\n  latitude: 52.37\n  longitude: 4.89\n  elevation: 0\n"
        "  unit_system: metric\n  time_zone: Europe/Amsterdam\n  country: NL\n"
        f"http:\n  server_host: 127.0.0.1\n  server_port: {port}\n"
        "api:\nconversation:\n"
        "logger:\n  default: warning\n  logs:\n"
        # "Attempting install of …" is homeassistant.util.package's INFO line.
        "    homeassistant.util.package: info\n    homeassistant.requirements: info\n"
        "    custom_components.rkllm: debug\n",
        encoding="utf-8",
    )
    seed_config.seed_config_entry(config / ".storage", library, str(vendor / ASSIST_MODEL), "rk3588")
    seed_config.seed_user(config, venv / "bin" / "hass")
    credentials = json.loads((config / seed_config.CREDENTIALS_FILE).read_text(encoding="utf-8"))
    print(f"bare venv, zip, config and user ready in {time.monotonic() - started:.0f} s")

    log = config / "home-assistant.log"
    # `hass` exactly as a user runs it: pip enabled (no --skip-pip), nothing of this repository on sys.path.
    # Home Assistant's own `uv pip install` shares our uv's cache (a first start needs ~15 packages).
    network = {key: value for key, value in os.environ.items() if NETWORK_VARIABLES.fullmatch(key)}
    network.setdefault("UV_CACHE_DIR", run([UV, "cache", "dir"], "asking uv for its cache directory").strip())
    process = subprocess.Popen(
        [venv / "bin" / "hass", "--config", config, "--log-file", log],
        cwd=root,
        env=clean_env(RKLLM_EMULATOR_SPEED="50", **network),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(root / "hass.stderr").open("wb"),
    )
    try:
        yield BareHome(
            process, venv, config, log, f"http://127.0.0.1:{port}", credentials["username"], credentials["password"]
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def ask_agent(home: BareHome, text: str) -> tuple[int, str]:
    """Log in like the frontend (demo/long_lived_token.py), then run the agent through the REST API."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        token = await long_lived_token.login(session, home.url, home.username, home.password)
        async with session.post(
            f"{home.url}/api/conversation/process",
            json={"text": text, "agent_id": AGENT, "language": "en"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            return response.status, await response.text()


def test_bare_home_assistant_installs_the_requirements_and_the_agent_answers(bare_home: BareHome) -> None:
    started = time.monotonic()
    text = wait_for_entry(bare_home.process, bare_home.log)
    startup_s = time.monotonic() - started
    assert "rkllm engine for" in text, f"the rkllm entry did not load within {STARTUP_TIMEOUT_S:.0f} s:\n{text[-5000:]}"
    assert "No module named" not in text, text[-5000:]

    # Home Assistant itself installed each requirement, under its own constraints, before loading the entry.
    install_lines = [line for line in text.splitlines() if "Attempting install of" in line]
    for requirement in MANIFEST["requirements"]:
        assert any(line.endswith(f"Attempting install of {requirement}") for line in install_lines), install_lines
    assert "Unable to install package" not in text, text[-5000:]
    print(f"Home Assistant {HA_VERSION} started and loaded the entry in {startup_s:.0f} s; its installs:")
    print("\n".join(install_lines))
    installed = run([bare_home.venv / "bin" / "python", "-c", "import pydantic; print(pydantic.VERSION)"], "pydantic")
    constraints = next((bare_home.venv / "lib").glob("python3.*/site-packages/homeassistant/package_constraints.txt"))
    assert f"\npydantic=={installed.strip()}\n" in constraints.read_text(encoding="utf-8"), (
        f"pydantic {installed.strip()} is not the version Home Assistant pins"
    )

    status, body = asyncio.run(ask_agent(bare_home, "hello"))
    assert status == 200, body
    speech = json.loads(body)["response"]["speech"]["plain"]["speech"]
    assert speech.startswith("Hello! I can turn the kitchen light on or off"), body

    assert stop_home_assistant(bare_home.process) == 0
    deadline = time.monotonic() + 60  # a wait, not a bound: the worker leaves with Home Assistant
    while _processes_using(bare_home.config) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_using(bare_home.config) == [], "the worker outlived Home Assistant"
