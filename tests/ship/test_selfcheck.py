"""The board self-check: its JSON report on the emulator, its verdicts, and its errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rkllm_native import selfcheck
from rkllm_native.build import emulator_library
from rkllm_native.selfcheck import RunMeasurement, SlotInstance, SlotRun
from tests.conftest import REPO_ROOT

SPEED = 10.0
# Emulator calibration qwen2-0.5b-rk3588 = the official RK3588 figures of Qwen2 0.5B (docs/runtime.md §10.1).
QWEN2_DECODE = 41.58
QWEN2_PREFILL = 877.0
QWEN2_LOAD_MS = 2000.0
KV_ASSUMPTIONS = {
    "a1_empty_tools",
    "a2_keep_history",
    "a3_clear_keeps_system",
    "a4_template_restore",
    "a5_forced_call",
    "a6_raw_template",
    "a7_keep_history_off",
    "a8_abort_partial_turn",
    "a9_cut_then_append",
}
SLOT_CHECKS = {
    "slots_init",
    "slots_concurrent_output",
    "slots_shared_throughput",
    "slots_block_resume",
    "slots_block_cost",
}


def run_selfcheck(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkllm_native.selfcheck", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=cwd,
        # The session's own emulated NPU (tests/conftest.py): other test runs on this machine do not slow this one.
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO_ROOT),
            "RKLLM_EMULATOR_NPU": os.environ["RKLLM_EMULATOR_NPU"],
        },
    )


def write_model(directory: Path, body: str, name: str = "board.model") -> Path:
    path = directory / name
    path.write_text(f"rkllm-emulator-model 1\n{body}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["v12x", "v130"])
def emulator_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any], str]:
    profile: str = request.param
    tmp_path = tmp_path_factory.mktemp(f"selfcheck-{profile}")
    library = emulator_library("v130" if profile == "v130" else "v12x")
    model = write_model(tmp_path, "calibration = qwen2-0.5b-rk3588")
    report_path = tmp_path / "report.json"
    result = run_selfcheck(
        "--library", str(library), "--model", str(model), "--speed", str(SPEED), "--json", str(report_path),
        cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert result.returncode == report["exit_status"], result.stderr
    return profile, report, result.stdout


def checks_by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["id"]: check for check in report["checks"]}


def test_report_schema_and_identity(emulator_report: tuple[str, dict[str, Any], str]) -> None:
    profile, report, _ = emulator_report
    assert report["schema"] == 1
    assert set(report) == {
        "schema", "tool", "created_at", "mode", "exit_status", "errors", "host", "library", "driver", "model",
        "settings", "performance", "slots", "checks", "runtime_log",
    }  # fmt: skip
    assert set(report["settings"]) == {"context_length", "max_new_tokens", "cpu_cores", "cpu_mask", "rkllm_log_level"}
    assert report["tool"] == "rkllm_native.selfcheck"
    assert report["mode"] == "in-process"
    assert report["errors"] == []
    assert report["library"]["profile"] == profile
    assert report["library"]["version"] == ("1.3.0" if profile == "v130" else "1.2.3")
    assert report["library"]["version_source"] == "marker"
    assert report["library"]["emulator"] is True
    assert report["library"]["emulator_speed"] == SPEED
    assert report["driver"]["version"] == "0.9.8"
    assert report["driver"]["source"] == "runtime init line"
    assert report["driver"]["platform"] == "RK3588"
    assert isinstance(report["driver"]["sysfs_note"], str)
    assert report["model"]["class"] == "Qwen2 0.5B"
    assert report["model"]["class_source"] == "emulator calibration"
    assert report["model"]["max_context_limit"] == 4096
    assert report["settings"]["context_length"] == 4096
    for key in ("machine", "kernel", "python"):
        assert isinstance(report["host"][key], str)
    # The runtime's own lines are in the report, not on the console.
    assert any(line.startswith("I rkllm: rkllm-runtime version:") for line in report["runtime_log"])
    assert any("kv cache matches" in line for line in report["runtime_log"])


def test_measured_speed_matches_the_emulator_calibration(emulator_report: tuple[str, dict[str, Any], str]) -> None:
    _, report, _ = emulator_report
    performance = report["performance"]
    for key in ("load_time_ms", "ttft_ms", "prefill_time_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert isinstance(performance[key], float), key
        assert performance[key] > 0, key
    assert isinstance(performance["prompt_tokens"], int)
    assert performance["prompt_tokens"] > 100
    assert performance["generate_tokens"] > 0
    # How close to the calibration a run comes is a speed (bench/, printed); what cannot depend on the machine's load:
    # never faster than the calibration, and the load time is slept (a loaded machine only lengthens both).
    print(
        f"\nselfcheck x{SPEED:g}: decode {performance['decode_tokens_per_s']:.1f} tok/s ({QWEN2_DECODE * SPEED:g}), "
        f"prefill {performance['prefill_tokens_per_s']:.0f} tok/s ({QWEN2_PREFILL * SPEED:g}), "
        f"load {performance['load_time_ms']:.0f} ms ({QWEN2_LOAD_MS / SPEED:g})"
    )
    assert performance["decode_tokens_per_s"] <= QWEN2_DECODE * SPEED * 1.01
    assert performance["prefill_tokens_per_s"] <= QWEN2_PREFILL * SPEED * 1.01
    assert performance["load_time_ms"] >= QWEN2_LOAD_MS / SPEED
    assert performance["ttft_ms"] >= performance["prefill_time_ms"]
    assert performance["memory_usage_mb"] == 670.0
    reference = performance["reference"]
    assert reference["model_class"] == "Qwen2 0.5B"
    assert reference["decode_tokens_per_s"] == QWEN2_DECODE
    assert reference["speed_factor"] == SPEED
    # The verdict follows the measured ratios (its thresholds: test_driver_and_speed_verdicts, fabricated runs).
    verdict = checks_by_id(report)["performance"]
    ratios = verdict["measurements"]
    assert 0 < ratios["decode_ratio"] <= 1.01
    passed = ratios["decode_ratio"] >= selfcheck.DECODE_PASS_RATIO
    passed = passed and ratios["prefill_ratio"] >= selfcheck.PREFILL_PASS_RATIO
    assert verdict["status"] == ("PASS" if passed else "FAIL")


def test_kv_reuse_assumptions_pass_on_the_emulator(emulator_report: tuple[str, dict[str, Any], str]) -> None:
    profile, report, stdout = emulator_report
    checks = checks_by_id(report)
    assert set(checks) == {
        *KV_ASSUMPTIONS, *SLOT_CHECKS, "a10_tool_turn", "kv_accounting", "prefix_switch", "driver_version",
        "performance",
    }  # fmt: skip
    assert checks["prefix_switch"]["status"] == "PASS"
    switch = checks["prefix_switch"]["measurements"]
    assert switch["switched_prefill_tokens"] == switch["fresh_prefill_tokens"] > 900
    assert switch["kv_after_clear"] > 900  # the old prefix was still resident, and none of it was reused
    assert checks["kv_accounting"]["status"] == "PASS"
    assert checks["kv_accounting"]["measurements"]["continued_offset"] == 0
    assert {check_id: checks[check_id]["status"] for check_id in KV_ASSUMPTIONS} == dict.fromkeys(
        KV_ASSUMPTIONS, "PASS"
    )
    assert checks["driver_version"]["status"] == "PASS"
    # Whether a model relates a tool result to its call cannot be decided by counters.
    assert checks["a10_tool_turn"]["status"] == "UNKNOWN"
    # Only the speed verdict may fail here (a loaded machine runs the emulator below its calibration).
    assert report["exit_status"] == (1 if checks["performance"]["status"] == "FAIL" else 0)
    warm = checks["a3_clear_keeps_system"]["measurements"]
    assert warm["warm_prefill_tokens"] < 0.05 * warm["cold_prefill_tokens"]  # the cause of the saved time
    assert warm["kv_after_clear"] > 900  # the ~1k-token system prompt (more in the emulator's tokenizer)
    cut = checks["a9_cut_then_append"]["measurements"]
    assert cut["max_new_tokens"] == (selfcheck.CUT_MAX_NEW_TOKENS if profile == "v130" else 64)
    assert "in-process diagnostic" in stdout
    assert "keep_history=1 appends the new turn and prefills only it" in stdout


def test_an_unknown_model_class_is_said_so(tmp_path: Path) -> None:
    model = write_model(tmp_path, "parameters_b = 0.5", name="my-finetune.model")
    result = run_selfcheck(
        "--library", str(emulator_library("v12x")), "--model", str(model), "--speed", "20",
        "--json", str(tmp_path / "r.json"), "--no-slots", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert "slots" not in report  # --no-slots
    assert not [check for check in report["checks"] if check["id"].startswith("slots_")]
    assert report["model"]["class"] is None
    assert report["performance"]["reference"] is None
    assert checks_by_id(report)["performance"]["status"] == "UNKNOWN"
    assert "unknown class" in result.stdout


def test_a_missing_library_is_one_error_line(tmp_path: Path) -> None:
    model = write_model(tmp_path, "calibration = qwen2-0.5b-rk3588")
    result = run_selfcheck(
        "--library", str(tmp_path / "librkllmrt.so"), "--model", str(model), "--json", str(tmp_path / "r.json"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"selfcheck: error: librkllmrt not found at {tmp_path / 'librkllmrt.so'}: no such file"
    )
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["exit_status"] == 2
    assert report["errors"] == [f"librkllmrt not found at {tmp_path / 'librkllmrt.so'}: no such file"]


def test_an_init_failure_carries_the_runtimes_error_line(tmp_path: Path) -> None:
    model = write_model(tmp_path, "calibration = qwen2-0.5b-rk3588\nfault = init_fail")
    result = run_selfcheck("--library", str(emulator_library("v12x")), "--model", str(model), cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("selfcheck: error: rkllm_init failed for model")
    assert f"(E rkllm: emulated init failure (fault = init_fail in {model}))" in last
    assert "Traceback" not in result.stderr


def test_a_context_too_small_for_the_checks_is_refused(tmp_path: Path) -> None:
    result = run_selfcheck("--library", "x.so", "--model", "m", "--context", "1024", cwd=tmp_path)
    assert result.returncode == 2
    assert "--context: must be at least 2048" in result.stderr


def test_speed_is_refused_for_a_real_runtime(tmp_path: Path) -> None:
    # A copy of the emulator whose marker no longer says "build: emulator" stands in for Rockchip's library.
    data = emulator_library("v12x").read_bytes()
    assert data.count(selfcheck.EMULATOR_MARKER) == 1
    library = tmp_path / "librkllmrt.so"
    library.write_bytes(data.replace(selfcheck.EMULATOR_MARKER, b"| build: 27637c95)"))
    model = write_model(tmp_path, "calibration = qwen2-0.5b-rk3588")
    result = run_selfcheck("--library", str(library), "--model", str(model), "--speed", "5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"selfcheck: error: --speed only applies to the emulator library; {library} is a real runtime"
    )


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("Qwen3-1.7B-rk3588-w8a8-opt-1-hybrid-ratio-0.0.rkllm", ("qwen3-1.7b", "w8a8")),
        ("Qwen2.5-1.5B-Instruct-rk3588-w8a8.rkllm", ("qwen2.5-1.5b", "w8a8")),
        ("qwen2.5-3b-instruct_rk3588.rkllm", ("qwen2.5-3b", None)),
        ("Qwen3.5-0.8B-rk3576-w4a16.rkllm", ("qwen3.5-0.8b", "w4a16")),
        ("TinyLlama-1.1B-Chat-v1.0-rk3588-w8a8.rkllm", ("tinyllama-1.1b", "w8a8")),
        ("Phi-3-mini-4k-instruct-rk3588.rkllm", ("phi3-3.8b", None)),
        ("gemma-4-E2B-it-rk3588.rkllm", ("gemma4-e2b", None)),
        ("chatglm3-6b-rk3588-w8a8.rkllm", ("chatglm3-6b", "w8a8")),
        ("Llama-3.2-1B-Instruct-rk3588-w8a8.rkllm", None),
        ("gemma-3-1b-it-rk3588.rkllm", None),
        ("Qwen2.5-0.5B-Instruct-rk3588.rkllm", None),
    ],
)
def test_model_class_from_file_names(file_name: str, expected: tuple[str, str | None] | None) -> None:
    found = selfcheck.class_from_name(file_name, "file name")
    assert (None if found is None else (found.key, found.dtype)) == expected


def test_references_follow_platform_and_dtype() -> None:
    qwen3 = selfcheck.class_from_name("Qwen3-0.6B-rk3576-w4a16.rkllm", "file name")
    reference = selfcheck.reference_for(qwen3, "RK3576")
    assert reference is not None
    assert (reference.decode_tokens_per_s, reference.prefill_tokens_per_s) == (24.9, None)
    default_dtype = selfcheck.reference_for(selfcheck.class_from_name("qwen3-0.6b.rkllm", "file name"), None)
    assert default_dtype is not None
    assert (default_dtype.platform, default_dtype.dtype, default_dtype.decode_tokens_per_s) == ("RK3588", "w8a8", 32.91)
    assert selfcheck.reference_for(selfcheck.class_from_name("Qwen2.5-1.5B.rkllm", "file name"), "RK3562") is None


def measurement(**values: Any) -> RunMeasurement:
    defaults: dict[str, Any] = {
        "text": "",
        "prefill_tokens": 30,
        "prefill_time_ms": 100.0,
        "generate_tokens": 10,
        "generate_time_ms": 600.0,
        "memory_usage_mb": 1700.0,
        "ttft_ms": 160.0,
        "wall_ms": 800.0,
        "kv_before": 1000,
        "kv_after": 1041,
        "finished": True,
        "aborted": False,
        "error": None,
    }
    defaults.update(values)
    return RunMeasurement(**defaults)


COLD = measurement(prefill_tokens=1100, prefill_time_ms=3300.0, kv_before=0, kv_after=1111)


def test_a_runtime_that_reprefills_the_system_prompt_fails_the_kv_checks() -> None:
    full_again = measurement(prefill_tokens=1100, prefill_time_ms=3300.0, kv_before=0, kv_after=1111)
    assert selfcheck.evaluate_clear_keeps_system(COLD, full_again, 0).status == "FAIL"
    assert selfcheck.evaluate_keep_history(COLD, full_again).status == "FAIL"
    warm = measurement(prefill_tokens=30, prefill_time_ms=90.0, kv_before=1070, kv_after=1111)
    assert selfcheck.evaluate_clear_keeps_system(COLD, warm, 1070).status == "PASS"
    assert selfcheck.evaluate_keep_history(COLD, measurement(kv_before=1111, kv_after=1152)).status == "PASS"
    # Few tokens but no time saved: the counters lie or the prefix is recomputed anyway.
    slow = measurement(prefill_tokens=30, prefill_time_ms=3000.0)
    assert selfcheck.evaluate_clear_keeps_system(COLD, slow, 1070).status == "FAIL"


def test_other_assumption_verdicts_on_fabricated_runs() -> None:
    with_tools_block = measurement(prefill_tokens=1095)
    assert selfcheck.evaluate_empty_tools(COLD, with_tools_block).status == "FAIL"
    assert selfcheck.evaluate_empty_tools(COLD, measurement(prefill_tokens=700)).status == "PASS"
    assert selfcheck.evaluate_template_restore(COLD, measurement(prefill_tokens=800)).status == "FAIL"
    no_thinking = measurement(text="Hello.")
    assert selfcheck.evaluate_template_restore(COLD, measurement(prefill_tokens=1100), no_thinking).status == "FAIL"
    accumulated = selfcheck.evaluate_keep_history_off(1070, measurement(kv_after=1111), measurement(kv_after=1152))
    assert accumulated.status == "FAIL"
    assert "accumulate" in accumulated.detail
    assert selfcheck.evaluate_abort(measurement(aborted=False)).status == "UNKNOWN"
    assert selfcheck.evaluate_abort(measurement(aborted=True, kv_after=1000)).status == "FAIL"
    short_answer = measurement(generate_tokens=12)
    assert selfcheck.evaluate_cut_then_append(64, short_answer, measurement(), COLD).status == "UNKNOWN"
    refused = measurement(finished=False, error="E rkllm: bad tool turn")
    assert selfcheck.evaluate_tool_turn(measurement(), refused, COLD).status == "FAIL"
    assert selfcheck.evaluate_forced_call(True, measurement(text="Sure, turning it on.")).status == "FAIL"
    forced = measurement(text='HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>')
    assert selfcheck.evaluate_forced_call(True, forced).status == "PASS"
    assert selfcheck.evaluate_forced_call(False, None).status == "UNKNOWN"


def test_kv_accounting_verdicts() -> None:
    cold = measurement(kv_before=0, prefill_tokens=1100, generate_tokens=10, kv_after=1110)
    continued = measurement(kv_before=1110, prefill_tokens=31, generate_tokens=10, kv_after=1151)
    assert selfcheck.evaluate_kv_accounting(cold, continued).status == "PASS"
    # A runtime that keeps the end-of-turn token in the KV without counting it: one token off per turn.
    cold_eos = measurement(kv_before=0, prefill_tokens=1100, generate_tokens=10, kv_after=1111)
    continued_eos = measurement(kv_before=1111, prefill_tokens=30, generate_tokens=10, kv_after=1152)
    off = selfcheck.evaluate_kv_accounting(cold_eos, continued_eos)
    assert off.status == "FAIL"
    assert "off by +1 (cold) and +1 (continued)" in off.detail
    assert selfcheck.evaluate_kv_accounting(cold, measurement(finished=False)).status == "UNKNOWN"


def test_prefix_switch_verdicts() -> None:
    fresh = measurement(prefill_tokens=1100, prefill_time_ms=3300.0)
    assert selfcheck.evaluate_prefix_switch(1070, measurement(prefill_tokens=1100), fresh).status == "PASS"
    header_only = selfcheck.evaluate_prefix_switch(1070, measurement(prefill_tokens=1095), fresh)
    assert header_only.status == "PASS"
    assert "all but 5 leading tokens" in header_only.detail
    kept_old = selfcheck.evaluate_prefix_switch(1070, measurement(prefill_tokens=30), fresh)
    assert kept_old.status == "FAIL"
    assert "clear_kv_cache(0)" in kept_old.detail
    assert selfcheck.evaluate_prefix_switch(1070, measurement(prefill_tokens=700), fresh).status == "UNKNOWN"


def test_driver_and_speed_verdicts() -> None:
    assert selfcheck.evaluate_driver("0.9.6", "debugfs").status == "FAIL"
    assert selfcheck.evaluate_driver("v0.9.10", "debugfs").status == "PASS"
    assert selfcheck.evaluate_driver(None, None).status == "UNKNOWN"
    reference = selfcheck.reference_for(selfcheck.class_from_name("qwen3-0.6b", "file name"), "RK3588")
    half_speed = measurement(generate_tokens=64, generate_time_ms=64 / 16.0 * 1000, prefill_tokens=128)
    slow = selfcheck.evaluate_performance(half_speed, reference, 1.0)
    assert slow.status == "FAIL"
    assert "fix_freq" in slow.detail
    full_speed = measurement(generate_tokens=64, generate_time_ms=64 / 32.0 * 1000, prefill_tokens=128)
    assert selfcheck.evaluate_performance(full_speed, reference, 1.0).status == "PASS"


# ---------------------------------------------------------------------------------------------------------------
# The slot checks: two instances in two worker processes (the engine's multi-slot assumptions)


def test_slot_checks_pass_on_the_emulator_with_its_figures(emulator_report: tuple[str, dict[str, Any], str]) -> None:
    _, report, stdout = emulator_report
    checks = checks_by_id(report)
    assert {check_id: checks[check_id]["status"] for check_id in SLOT_CHECKS} == dict.fromkeys(SLOT_CHECKS, "PASS")
    slots = report["slots"]
    assert slots["skipped"] is None
    assert slots["base_domain_ids"] == [0, 1]
    assert slots["block_s"] == pytest.approx(selfcheck.SLOT_BLOCK_S / SPEED)
    assert slots["needed_per_instance_mb"] == 670.0  # the calibration's memory (the file itself is tiny)
    init = checks["slots_init"]["measurements"]
    for slot in (0, 1):
        assert QWEN2_LOAD_MS / SPEED <= init[f"slot{slot}_load_ms"] <= 3 * QWEN2_LOAD_MS / SPEED
        assert init[f"slot{slot}_rss_mb"] > 0
    # The emulator's NPU model: at once each slot gets about half, together as much as one alone; a slot blocked in
    # its callback leaves the other at its solo rate, and its own perf leaves the blocked time out.
    shared = checks["slots_shared_throughput"]["measurements"]
    assert shared["slot0_share"] == pytest.approx(0.5, abs=0.15)
    assert shared["slot1_share"] == pytest.approx(0.5, abs=0.15)
    assert shared["combined_vs_alone"] == pytest.approx(1.0, abs=0.2)
    assert checks["slots_block_cost"]["measurements"]["share_of_alone"] == pytest.approx(1.0, abs=0.2)
    resumed = checks["slots_block_resume"]["measurements"]
    assert resumed["blocked_ms"] >= 1000 * selfcheck.SLOT_BLOCK_S / SPEED
    assert resumed["perf_counts_blocked_time"] is False
    # Each worker's runtime lines are in the report, marked with its slot.
    for slot in (0, 1):
        assert any(line.startswith(f"[slot {slot}] I rkllm: rkllm-runtime version:") for line in report["runtime_log"])
    assert "two instances at once lose no NPU throughput" in stdout
    assert "2 instances in 2 processes (base_domain_id 0, 1)" in stdout


def slot_run(times: list[float], text: str = "same text", **extra: Any) -> SlotRun:
    return SlotRun(text=text, token_times=tuple(times), started=times[0] - 0.5, ended=times[-1] + 0.01, **extra)


def ticks(start: float, rate: float, count: int) -> list[float]:
    return [start + index / rate for index in range(count)]


def test_slot_memory_and_init_verdicts() -> None:
    skipped = selfcheck.evaluate_slots_memory(2400.0, 3000.0)
    assert skipped is not None
    assert "skipped: 2 instances need about 2 x 2400 MB" in skipped
    assert "MemAvailable is 3000 MB" in skipped
    assert selfcheck.evaluate_slots_memory(2400.0, 16000.0) is None
    loaded = SlotInstance(0, load_ms=2800.0, rss_mb=2350.0, hwm_mb=2400.0)
    no_memory = SlotInstance(1, error="rkllm_init failed (E rkllm: failed to malloc npu memory!)")
    failed = selfcheck.evaluate_slots_init([loaded, no_memory], 12000.0, 9600.0)
    assert failed.status == "FAIL"
    assert "slot 1 (base_domain_id 1): rkllm_init failed (E rkllm: failed to malloc npu memory!)" in failed.detail
    both = selfcheck.evaluate_slots_init([loaded, SlotInstance(1, 2900.0, 2350.0, 2400.0)], 12000.0, 7300.0)
    assert both.status == "PASS"
    assert "MemAvailable fell by 4700 MB for both" in both.detail


def test_slot_concurrency_verdicts_on_fabricated_runs() -> None:
    alone = [slot_run(ticks(0, 13.0, 64), "story one"), slot_run(ticks(20, 13.0, 64), "story two")]
    half = [slot_run(ticks(40, 6.5, 64), "story one"), slot_run(ticks(40, 6.5, 64), "story two")]
    assert selfcheck.evaluate_concurrent_output(alone, half, [None, None]).status == "PASS"
    shared = selfcheck.evaluate_shared_throughput(alone, half)
    assert shared.status == "PASS"
    assert "as the emulator models it" in shared.detail
    wasteful = [slot_run(ticks(40, 4.0, 64), "story one"), slot_run(ticks(40, 4.0, 64), "story two")]
    assert selfcheck.evaluate_shared_throughput(alone, wasteful).status == "FAIL"
    spare = [slot_run(ticks(40, 12.0, 64), "story one"), slot_run(ticks(40, 12.0, 64), "story two")]
    assert "capacity to spare" in selfcheck.evaluate_shared_throughput(alone, spare).detail
    mixed = [slot_run(ticks(40, 6.5, 64), "story one"), slot_run(ticks(40, 6.5, 64), "story twelve")]
    crossed = selfcheck.evaluate_concurrent_output(alone, mixed, [None, slot_run(ticks(60, 13.0, 64), "story two")])
    assert crossed.status == "FAIL"
    assert "slot 1 differs from its solo text after 8 characters" in crossed.detail
    unsure = selfcheck.evaluate_concurrent_output(alone, mixed, [None, slot_run(ticks(60, 13.0, 64), "story six")])
    assert unsure.status == "UNKNOWN"


def test_blocked_callback_verdicts_on_fabricated_runs() -> None:
    alone = slot_run(ticks(0, 13.0, 64))
    # Slot 0 blocks 2 s after its second piece; its perf either counts the block or leaves it out.
    blocked_times = ticks(10, 6.5, 2) + ticks(12.2, 6.5, 62)
    counted = slot_run(blocked_times, generate_tokens=64, generate_time_ms=11_600.0, block=(10.16, 12.16))
    resumed = selfcheck.evaluate_block_resume(alone, counted, None)
    assert resumed.status == "PASS"
    assert resumed.measurements["perf_counts_blocked_time"] is True
    left_out = slot_run(blocked_times, generate_tokens=64, generate_time_ms=9_500.0, block=(10.16, 12.16))
    assert selfcheck.evaluate_block_resume(alone, left_out, None).measurements["perf_counts_blocked_time"] is False
    garbled = slot_run(blocked_times, "same tex!", generate_tokens=64, generate_time_ms=9_500.0, block=(10.16, 12.16))
    assert selfcheck.evaluate_block_resume(alone, garbled, None).status == "FAIL"
    never_blocked = slot_run(ticks(10, 13.0, 1))
    assert selfcheck.evaluate_block_resume(alone, never_blocked, None).status == "UNKNOWN"
    # The other slot: at its solo rate during the block (PASS), or held back as if the blocked run still computed.
    free = slot_run(ticks(10, 6.5, 2) + ticks(10.3, 13.0, 26) + ticks(12.3, 6.5, 36))
    assert selfcheck.evaluate_block_cost(alone, free, counted).status == "PASS"
    held = slot_run(ticks(10, 6.5, 64))
    cost = selfcheck.evaluate_block_cost(alone, held, counted)
    assert cost.status == "FAIL"
    assert "abort" in cost.detail
    finished_before = slot_run(ticks(9, 13.0, 10))
    assert selfcheck.evaluate_block_cost(alone, finished_before, counted).status == "UNKNOWN"


def slot_config(model: Path) -> dict[str, Any]:
    return {
        "library": str(emulator_library("v130")),
        "profile": "v130",
        "model": str(model),
        "context_length": 4096,
        "cpu_mask": 0xF0,
        "base_domain_id": 1,
    }


def test_a_slot_worker_that_cannot_load_says_why(tmp_path: Path) -> None:
    model = write_model(tmp_path, "speed = 0\nfault = init_fail")
    worker = selfcheck.SlotWorker(slot_config(model), tmp_path / "slot.log")
    try:
        reply = worker.receive(60)
        assert reply["event"] == "error"
        assert reply["message"].startswith("rkllm_init failed for model")
        assert worker.last_runtime_error() == f"E rkllm: emulated init failure (fault = init_fail in {model})"
    finally:
        worker.close()
    assert worker.process.returncode == 2


def test_a_slot_worker_that_crashes_mid_run_is_reported_not_waited_for(tmp_path: Path) -> None:
    model = write_model(tmp_path, "speed = 0\nfault = crash_after_tokens:3")
    worker = selfcheck.SlotWorker(slot_config(model), tmp_path / "slot.log")
    try:
        assert worker.receive(60)["event"] == "ready"
        with pytest.raises(selfcheck.SlotWorkerError, match=r"stopped \(exited with status -11"):
            worker.run("hello")
    finally:
        worker.close()


def test_slots_are_skipped_with_a_note_when_two_instances_cannot_fit(tmp_path: Path) -> None:
    model = write_model(tmp_path, "calibration = qwen2-0.5b-rk3588\nmemory_mb = 40000000")  # a 40 TB model
    result = run_selfcheck(
        "--library", str(emulator_library("v12x")), "--model", str(model), "--speed", "20",
        "--json", str(tmp_path / "r.json"), cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    skipped = report["slots"]["skipped"]
    assert skipped.startswith("skipped: 2 instances need about 2 x 40000000 MB")
    slot_checks = {check["id"]: check for check in report["checks"] if check["id"].startswith("slots_")}
    assert set(slot_checks) == SLOT_CHECKS
    assert {check["status"] for check in slot_checks.values()} == {"UNKNOWN"}
    assert {check["detail"] for check in slot_checks.values()} == {skipped}
    # Inconclusive is not a failure: only another check's FAIL (the speed check on a loaded machine) sets it.
    failed = {check["id"] for check in report["checks"] if check["status"] == "FAIL"}
    assert failed <= {"performance"}
    assert report["exit_status"] == (1 if failed else 0)
    assert f"slots     {skipped}" in result.stdout
