"""Remote-worker packaging: the systemd unit, the Dockerfile and the udev rules.

No Docker engine or Rockchip board is available to the tests, so they check what breaks a deployment: the
command line the worker must accept, the base image that runs on RK3588, device access that hardening must
not take away, and Python syntax the board's interpreter understands.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_engine.engine import Engine, EngineConfig, WorkerLocation
from rkllm_engine.types import ChatMessage, ChatRequest
from tests.conftest import REPO_ROOT

PACKAGING = REPO_ROOT / "packaging"
WORKER_MODULE = ["-m", "rkllm_native.worker"]


def unit_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a systemd unit as (key, value) lists in order; repeated keys (DeviceAllow=) are kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        assert current is not None, f"setting outside a section: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def test_unit_runs_the_worker_as_documented_and_restarts_it() -> None:
    sections = unit_sections(PACKAGING / "rkllm-worker.service")
    assert set(sections) == {"Unit", "Service", "Install"}
    service = sections["Service"]
    assert values(service, "ExecStart") == [
        "/usr/bin/python3 -m rkllm_native.worker --listen 127.0.0.1:8765 --secret-file /etc/rkllm/secret"
        " --library /opt/rkllm/lib/librkllmrt.so --models-dir /opt/rkllm/models"
    ]  # loopback by default; only the installed library and the models directory
    assert values(service, "Restart") == ["always"]
    assert values(service, "Environment").count("PYTHONPATH=/opt/rkllm") == 1
    assert values(service, "User") == ["rkllm"]
    assert "render" in values(service, "SupplementaryGroups")[0].split()
    assert values(sections["Install"], "WantedBy") == ["multi-user.target"]


def test_unit_hardening_leaves_the_npu_devices_reachable() -> None:
    service = unit_sections(PACKAGING / "rkllm-worker.service")["Service"]
    allowed = [value.split()[0] for value in values(service, "DeviceAllow")]
    assert {"/dev/rknpu", "char-drm", "char-dma_heap"} <= set(allowed)
    assert all(value.split()[1] == "rw" for value in values(service, "DeviceAllow"))
    # PrivateDevices hides /dev/rknpu, /dev/dri and /dev/dma_heap; W^X breaks ctypes callbacks (libffi closures).
    assert values(service, "PrivateDevices") in ([], ["no"])
    assert values(service, "MemoryDenyWriteExecute") in ([], ["no"])
    assert values(service, "NoNewPrivileges") == ["yes"]
    assert values(service, "ProtectSystem") == ["strict"]
    families = values(service, "RestrictAddressFamilies")[0].split()
    assert {"AF_INET", "AF_INET6"} <= set(families)


def test_the_worker_accepts_the_units_command_line(tmp_path: Path) -> None:
    service = unit_sections(PACKAGING / "rkllm-worker.service")["Service"]
    command = shlex.split(values(service, "ExecStart")[0])
    assert command[1:3] == WORKER_MODULE
    missing_secret = tmp_path / "secret"
    arguments = [missing_secret.as_posix() if arg == "/etc/rkllm/secret" else arg for arg in command[3:]]
    result = subprocess.run(
        [sys.executable, *WORKER_MODULE, *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    # Options parsed; the worker stops at the secret file, before listening.
    assert result.returncode == 2
    assert result.stderr.strip() == f"rkllm-worker: secret file {missing_secret} does not exist"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending += " " + line.removesuffix("\\").strip() if pending else line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile_uses_a_base_that_runs_on_rk3588_and_starts_the_worker() -> None:
    instructions = dockerfile_instructions(PACKAGING / "Dockerfile")
    bases = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    # Debian trixie (python:*-slim) arm64 is built with ARMv8.3 PAC: "exec format error" on RK3588 (§8 item 13).
    assert bases == ["ubuntu:24.04"]
    run = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert re.search(r"apt-get install .*\bpython3\b", run)
    assert re.search(r"\blibgomp1\b", run), "librkllmrt links libgomp"
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert ("COPY", "rkllm_native /opt/rkllm/rkllm_native") in instructions
    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    assert "PYTHONPATH=/opt/rkllm" in env
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    # Exec form, so SIGTERM reaches the worker (it aborts the run and releases the NPU) instead of a shell.
    assert json.loads(entrypoints[0]) == ["python3", *WORKER_MODULE]
    commands = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    assert len(commands) == 1
    # Loopback by default (host networking reaches it); only the mounted library and models directory.
    assert json.loads(commands[0]) == [
        "--listen", "127.0.0.1:8765", "--secret-file", "/run/secrets/rkllm_secret",
        "--library", "/opt/rkllm/lib/librkllmrt.so", "--models-dir", "/opt/rkllm/models",
    ]  # fmt: skip
    assert ("EXPOSE", "8765") in instructions


def test_docker_context_leaves_out_build_outputs() -> None:
    patterns = [
        line.strip()
        for line in (PACKAGING / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[:2] == ["*", "!rkllm_native/"]
    assert "rkllm_native/emulator/build/" in patterns[2:]
    assert "**/__pycache__/" in patterns[2:]


def test_udev_rules_are_well_formed_and_cover_the_npu_nodes() -> None:
    rules = [
        line
        for line in (PACKAGING / "99-rkllm-npu.rules").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    pair = re.compile(r'^\s*([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|=|\+=|:=)\s*"[^"]*"\s*$')
    for rule in rules:
        parts = rule.split(",")
        assert all(pair.match(part) for part in parts), rule
        assert any('GROUP="render"' in part for part in parts), rule
    joined = "\n".join(rules)
    for match in ('SUBSYSTEM=="dma_heap"', 'KERNEL=="rknpu"', 'KERNEL=="renderD*"'):
        assert match in joined


def test_native_package_parses_on_the_boards_python() -> None:
    # The worker runs on the board's python3 (Ubuntu 24.04: 3.12; Armbian/Debian bookworm: 3.11), not HA's 3.13.
    for path in sorted((REPO_ROOT / "rkllm_native").glob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 11))


@pytest.fixture
def opt_rkllm(tmp_path: Path) -> Path:
    """/opt/rkllm as docs/remote-worker.md installs it: only the rkllm_native sources, emulator built there."""
    opt = tmp_path / "opt" / "rkllm"
    shutil.copytree(
        REPO_ROOT / "rkllm_native",
        opt / "rkllm_native",
        ignore=shutil.ignore_patterns("build", "__pycache__", "*.pyc"),
    )
    build = subprocess.run(
        [sys.executable, "-P", "-c", "from rkllm_native.build import emulator_library; emulator_library('v12x')"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(opt)},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    return opt


async def test_worker_installed_like_the_unit_serves_a_remote_engine(
    opt_rkllm: Path, tmp_path: Path, socket_enabled: None
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("a long shared secret\n", encoding="utf-8")
    native = opt_rkllm / "rkllm_native"
    # The unit's command line and PYTHONPATH, on a loopback port chosen by the kernel.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-P", *WORKER_MODULE, "--listen", "127.0.0.1:0", "--secret-file", str(secret_file),
        "--library", str(native / "emulator/build/librkllmrt-emu-v12x.so"),
        "--models-dir", str(native / "emulator/models"),
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(opt_rkllm), "RKLLM_EMULATOR_SPEED": "50"},
        cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        banner = (await asyncio.wait_for(process.stderr.readline(), 15)).decode()
        assert banner.startswith("rkllm-worker: listening on 127.0.0.1:"), banner
        port = int(banner.split("127.0.0.1:")[1].split()[0])
        engine = Engine(
            EngineConfig(
                library_path=str(native / "emulator/build/librkllmrt-emu-v12x.so"),
                model_path=str(native / "emulator/models/qwen2-0.5b-chat.model"),
                worker=WorkerLocation(host="127.0.0.1", port=port, secret="a long shared secret"),
            )
        )
        await engine.start()
        try:
            text, _finished = await engine.submit(ChatRequest(messages=[ChatMessage("user", "hello")])).collect()
        finally:
            await engine.stop()
        assert text == "Hello! I am a small chat model running on the RKLLM emulator."
        assert process.returncode is None  # a client leaving does not stop the service
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
        await process.stderr.read()
