"""Fixtures for the Home Assistant tests: the real engine, worker and emulator library, no engine mocks.

Every entry runs a real local worker process on the emulator library (`rkllm_native.build`). Emulated delays are
switched off (`RKLLM_EMULATOR_SPEED=0`) unless a test asks for timing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.config_flow import default_conversation_options
from custom_components.rkllm.const import CONF_WORKER_ENV, DOMAIN, SUBENTRY_CONVERSATION
from rkllm_native.build import emulator_library
from tests.ha_shared import (  # fixtures are registered by the names this conftest holds
    KITCHEN_LIGHT,
    auto_enable_custom_integrations,
    flow_input,
    kitchen_light,
    setup_homeassistant,
    unload_rkllm_entries,
)

__all__ = [
    "KITCHEN_LIGHT",
    "auto_enable_custom_integrations",
    "kitchen_light",
    "setup_homeassistant",
    "unload_rkllm_entries",
]

FAST_ENV = {"RKLLM_EMULATOR_SPEED": "0"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def _call(tool: str, arguments: str) -> str:
    """A scripted Hermes-style tool call (`{{tool:X}}` resolves to the offered tool's possibly prefixed name)."""
    return '<tool_call>\\n{"name": "' + tool + '", "arguments": ' + arguments + "}\\n</tool_call>"


# A small assist model in the emulator's format (rkllm_native/emulator/MODEL_FORMAT.md): it calls the light
# tools by their (possibly prefixed) names, answers tool results, and thinks when asked to. User patterns match
# the end of the input, so a rebuilt history ("Conversation so far: …") only matches its newest message.
ASSIST_MODEL = "\n".join(
    [
        "rkllm-emulator-model 1",
        "# Test model for the Home Assistant tests.",
        "name = ha-test-assist",
        "calibration = qwen2.5-1.5b-rk3588",
        "max_context_limit = 4096",
        "thinking = true",
        'answer user "*turn on the kitchen light" = '
        + _call("{{tool:HassTurnOn}}", '{"name": "Kitchen Light", "area": ""}'),
        'answer user "*turn off the kitchen light" = ' + _call("{{tool:HassTurnOff}}", '{"name": "Kitchen Light"}'),
        'answer user "*turn on the bathroom fan" = ' + _call("{{tool:HassTurnOn}}", '{"name": "Bathroom Fan"}'),
        'answer user "*keep calling tools" = ' + _call("{{tool:GetLiveContext}}", "{}"),
        'answer user "*tool without api" = ' + _call("HassTurnOn", '{"name": "Kitchen Light"}'),
        'answer user "*give me json*" = {"color": "blue", "count": 3}',
        'answer user "*give me broken json*" = this is not json at all',
        'answer user "*think about it*" = The answer is 42.',
        'answer tool "*not allowed for user*" = I am not allowed to do that for you.',
        'answer tool "*Bathroom Fan*" = There is no bathroom fan.',
        'answer tool "*Live Context*" = ' + _call("{{tool:GetLiveContext}}", "{}"),
        'answer tool "*action_done*" = Done, the kitchen light is on.',
        'answer tool "*error*" = Sorry, that did not work.',
        "default_answer = You said: {{input}}",
        "",
    ]
)


@pytest.fixture(scope="session")
def emulator_lib() -> str:
    """The v1.2.x-flavoured emulator library, built if missing."""
    return str(emulator_library("v12x"))


@pytest.fixture(scope="session")
def emulator_lib_v130() -> str:
    """The v1.3.0-flavoured emulator library."""
    return str(emulator_library("v130"))


@pytest.fixture
def assist_model(tmp_path: Path) -> Path:
    """The test assist model file."""
    path = tmp_path / "qwen2.5-1.5b-ha-test.model"
    path.write_text(ASSIST_MODEL, encoding="utf-8")
    return path


def entry_data(library: str, model: Path | str, **overrides: Any) -> dict[str, Any]:
    """Entry data as the config flow stores it, plus the dev-only fast emulator env."""
    return flow_input(library, model, **{CONF_WORKER_ENV: dict(FAST_ENV), **overrides})




def conversation_subentry(title: str = "Assist on NPU", **options: Any) -> dict[str, Any]:
    """A conversation subentry with the default options (Assist API selected) and overrides."""
    data = default_conversation_options()
    data.update(options)
    if data.get(CONF_LLM_HASS_API) in (None, []):
        data.pop(CONF_LLM_HASS_API, None)
    return {"data": data, "subentry_type": SUBENTRY_CONVERSATION, "title": title, "unique_id": None}


@pytest.fixture
def subentries() -> list[dict[str, Any]]:
    """Subentries of `mock_config_entry`; tests override this fixture to change the agents."""
    return [conversation_subentry(llm_hass_api=[llm.LLM_API_ASSIST])]


@pytest.fixture
def mock_config_entry(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, subentries: list[dict[str, Any]]
) -> MockConfigEntry:
    """An rkllm entry on the emulator with one Assist agent, added to hass but not set up."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title=assist_model.stem,
        data=entry_data(emulator_lib, assist_model),
        subentries_data=subentries,
    )
    entry.add_to_hass(hass)
    return entry


@pytest.fixture
async def loaded_entry(hass: HomeAssistant, mock_config_entry: MockConfigEntry) -> MockConfigEntry:
    """`mock_config_entry` set up (engine running); `unload_rkllm_entries` stops it after the test."""
    assert await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is ConfigEntryState.LOADED
    return mock_config_entry


def child_pids() -> set[int]:
    """Live child processes of this test process (from /proc), to prove no worker is left behind."""
    me = os.getpid()
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces) start after the last ')'.
        fields = stat.rpartition(")")[2].split()
        state, parent = fields[0], int(fields[1])
        if parent == me and state != "Z":
            children.add(int(entry.name))
    return children


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    """Fail when a test leaves a worker process running."""
    before = child_pids()
    yield
    leftover = child_pids() - before
    assert not leftover, f"worker processes left running: {sorted(leftover)}"


@dataclass(frozen=True)
class RemoteWorker:
    """A worker serving TCP clients, as it runs on the NPU host next to a musl Home Assistant."""

    host: str
    port: int
    secret: str
    fingerprint: str | None = None  # set when the worker serves TLS


def _remote_worker(tmp_path: Path, name: str, *extra: str) -> Iterator[RemoteWorker]:
    """`python -m rkllm_native.worker --listen 127.0.0.1:0` with a secret file and an allow-list; stopped after.

    It serves both emulator libraries, `librkllmrt.so` in the test's directory (absent unless a test writes it)
    and every model under the test's directory.
    """
    secret = "correct horse battery staple"
    secret_file = tmp_path / f"{name}.secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    log_path = tmp_path / f"{name}.log"
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": str(REPO_ROOT)}
    allow = [
        *("--library", str(emulator_library("v12x")), "--library", str(emulator_library("v130"))),
        *("--library", str(tmp_path / "librkllmrt.so"), "--models-dir", str(tmp_path)),
    ]
    command = [sys.executable, "-m", "rkllm_native.worker", "--listen", "127.0.0.1:0"]
    command += ["--secret-file", str(secret_file)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *allow, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env
        )
    try:
        deadline = time.monotonic() + 30
        port: int | None = None
        fingerprint: str | None = None
        while port is None:
            text = log_path.read_text(errors="replace")
            if (found := re.search(r"listening on [^\s:]+:(\d+)", text)) is not None and "serving" in text:
                port = int(found.group(1))
                if (pin := re.search(r"fingerprint ([0-9A-F:]{95})", text)) is not None:
                    fingerprint = pin.group(1)
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"remote worker did not start: {log_path.read_text(errors='replace')}")
            else:
                time.sleep(0.05)
        yield RemoteWorker("127.0.0.1", port, secret, fingerprint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def remote_worker(tmp_path: Path, socket_enabled: None) -> Iterator[RemoteWorker]:
    """A plain-TCP remote worker (see `_remote_worker`).

    Requests `socket_enabled`: the test plugin blocks TCP sockets, and a remote worker is reached over TCP.
    """
    yield from _remote_worker(tmp_path, "worker")


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key, made with the openssl command docs/remote-worker.md gives."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "worker.crt", folder / "worker.key"
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=rkllm-worker", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_remote_worker(
    tmp_path: Path, socket_enabled: None, tls_certificate: tuple[Path, Path]
) -> Iterator[RemoteWorker]:
    """A remote worker serving TLS; `fingerprint` is the one it printed at start."""
    cert, key = tls_certificate
    yield from _remote_worker(tmp_path, "tls-worker", "--tls-cert", str(cert), "--tls-key", str(key))


_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}.get(platform.machine().lower(), 62)


def fake_library(path: Path, payload: bytes = b"", *, machine: int = _ELF_MACHINE, elf: bool = True) -> str:
    """A file that looks like a shared object for `machine` and carries `payload` (markers, symbol names)."""
    header = bytearray(64)
    if elf:
        header[0:4] = b"\x7fELF"
        header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little endian, version 1
        header[16:18] = (3).to_bytes(2, "little")  # ET_DYN
        header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header) + b"\0" * 64 + payload + b"\0")
    return str(path)


def free_tcp_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
