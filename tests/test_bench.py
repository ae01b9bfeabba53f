"""bench/voice.py keeps working: its help, a short run on a real Home Assistant, and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "voice.py"
WORKDIR_ENV = "RKLLM_VOICE_BENCH_CONFIG"  # bench/voice.py marks Home Assistant's (and its worker's) environment
SUMMARY_KEYS = ("voice_warm_s", "voice_first_delta_s", "voice_after_api_ratio", "voice_under_load_s", "api_run_s")


def bench_env(tmp_path: Path) -> dict[str, str]:
    """The bench's temporary config directories go under `tmp_path`, so this test finds exactly its own."""
    return {**os.environ, "TMPDIR": str(tmp_path)}


def leftover_processes(tmp_path: Path) -> list[str]:
    """Processes whose environment names a config directory of this test's bench run (hass or the worker)."""
    marker = f"{WORKDIR_ENV}={tmp_path}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if marker in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_help_says_how_to_run_it() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=False, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert ".venv/bin/python bench/voice.py" in result.stdout
    for option in ("--quick", "--slots", "--speed"):
        assert option in result.stdout


@pytest.mark.timeout(420)
def test_quick_run_with_one_slot_prints_the_table_and_the_summary_and_stops_home_assistant(tmp_path: Path) -> None:
    # Speed 20: the emulated board time shrinks, so this only proves the bench runs end to end.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--slots", "1", "--speed", "20"],
        capture_output=True,
        text=True,
        check=False,
        timeout=400,
        env=bench_env(tmp_path),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    table = "\n".join(lines)
    for scenario in ("cold (first command)", "warm (median of 2)", "after 1 raw /v1 request", "4 API streams"):
        assert scenario in table
    # The voice command turned the light on every time the NPU accepted it (16 streams may still refuse it).
    assert next(line for line in lines if "warm (median" in line).endswith("  ok")
    assert next(line for line in lines if "after 1 raw /v1 request" in line).endswith("  ok")
    summary = dict(item.split("=", 1) for item in lines[-1].split())
    assert summary["slots"] == "1"
    for key in SUMMARY_KEYS:
        assert float(summary[key]) > 0, summary
    assert summary["voice_failed"] == "0", table
    assert int(summary["api_429_of_16"]) >= 0
    assert leftover_processes(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the temporary config directory is gone


@pytest.mark.timeout(300)
def test_sigterm_mid_run_stops_home_assistant_and_its_worker(tmp_path: Path) -> None:
    log = tmp_path / "bench.err"
    with log.open("w") as stderr:
        bench = subprocess.Popen(
            [sys.executable, str(BENCH), "--quick", "--slots", "1", "--speed", "20"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=bench_env(tmp_path),
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 240
        while "warm commands" not in log.read_text() and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "warm commands" in log.read_text(), log.read_text()[-4000:]
        assert leftover_processes(tmp_path) != []  # Home Assistant and the worker are running now

        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()

    assert "interrupted; Home Assistant stopped" in log.read_text()
    assert leftover_processes(tmp_path) == []
    assert [path.name for path in tmp_path.iterdir()] == ["bench.err"]
