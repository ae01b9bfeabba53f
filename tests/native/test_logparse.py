"""Runtime log lines: the only source of driver version, context limit and the reason a prompt was refused."""

from __future__ import annotations

from rkllm_native import logparse

INIT_LINES = [
    "I rkllm: rkllm-runtime version: 1.2.3, rknpu driver version: 0.9.8, platform: RK3588",
    "I rkllm: loading rkllm model from /models/qwen3-1.7b.rkllm",
    "I rkllm: rkllm-toolkit version: 1.2.3, max_context_limit: 4096, npu_core_num: 3, target_platform: RK3588",
    "I rkllm: Enabled cpus num: 4",
]


def test_init_lines_give_versions_platform_and_context_limit() -> None:
    info = logparse.parse_init_lines(["unrelated output", *INIT_LINES])
    assert info == logparse.InitLogInfo(
        runtime_version="1.2.3",
        driver_version="0.9.8",
        platform="RK3588",
        toolkit_version="1.2.3",
        max_context_limit=4096,
        npu_core_num=3,
        target_platform="RK3588",
    )


def test_init_lines_missing_leave_fields_unknown() -> None:
    assert logparse.parse_init_lines(["I rkllm: loading rkllm model from /m"]) == logparse.InitLogInfo()


def test_prompt_longer_than_context_gives_both_numbers() -> None:
    line = "E rkllm: the length of prompt is greater than max context (prompt: 5000 tokens, max context: 4096)"
    overflow = logparse.find_context_overflow(["I rkllm: current kv cache size: 0", line])
    assert overflow == logparse.ContextOverflow(line=line, prompt_tokens=5000, max_context=4096)


def test_context_not_enough_counts_history_plus_input() -> None:
    line = "E rkllm: the context is not enough! history_s: 3000, cur_input_s: 1500, discard_s: 0, max_context: 4096!"
    overflow = logparse.find_context_overflow([line])
    assert overflow is not None
    assert (overflow.prompt_tokens, overflow.max_context) == (4500, 4096)


def test_no_overflow_line_means_none() -> None:
    assert logparse.find_context_overflow(["E rkllm: invalid rkllm model!", *INIT_LINES]) is None


def test_last_problem_line_prefers_the_latest_error_over_warnings() -> None:
    lines = [
        "E rkllm: invalid rkllm model!",
        "W rkllm: the model version is too old, please use the latest toolkit to reconvert the model",
        "E rkllm: rkllm_init failed",
        "I rkllm: rkllm_run ended",
    ]
    assert logparse.last_problem_line(lines) == "E rkllm: rkllm_init failed"
    assert logparse.last_problem_line(lines[1:2]) == lines[1]
    assert logparse.last_problem_line(lines[1:2], levels="E") is None


def test_parse_line_splits_level_and_ignores_foreign_lines() -> None:
    assert logparse.parse_line("  W rkllm: Warning: low driver  ") == logparse.LogLine("W", "Warning: low driver")
    assert logparse.parse_line("rkllm-worker: listening on 127.0.0.1:1") is None
    assert logparse.parse_line("X rkllm: nope") is None


def test_a_worker_crash_report_counts_as_the_last_error() -> None:
    lines = [
        "W rkllm: Warning: Your rknpu driver version is too low, please upgrade to 0.9.8",
        "E rkllm: the context is not enough!",
        "Fatal Python error: Segmentation fault",
        "  File worker.py, line 1 in run",
    ]
    assert logparse.last_problem_line(lines, crash_reports=True) == "Fatal Python error: Segmentation fault"
    assert logparse.last_problem_line(lines) == "E rkllm: the context is not enough!"
    assert logparse.last_problem_line(lines, levels="W", crash_reports=True) == lines[0]


def test_init_findings_read_only_the_latest_init() -> None:
    """Driver version, the driver warning and a platform mismatch come from the lines of the last init only."""
    old_init = [
        "I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: 0.9.6, platform: RK3588",
        "W rkllm: Warning: Your rknpu driver version is too low, please upgrade to 0.9.7.",
    ]
    new_init = ["I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: 0.9.8, platform: RK3588"]
    assert logparse.latest_init_findings(old_init) == logparse.InitFindings("0.9.6", "RK3588", "0.9.7", None)
    assert logparse.latest_init_findings([*old_init, *new_init]) == logparse.InitFindings("0.9.8", "RK3588")
    mismatch = "E rkllm: the target_platform does not match the real platform!"
    assert logparse.latest_init_findings([mismatch]) == logparse.InitFindings(platform_mismatch=mismatch)
    assert logparse.latest_init_findings(["I rkllm: loading"]) is None
    assert logparse.version_tuple("v0.9.8") == (0, 9, 8) > logparse.version_tuple("0.9.7b1")
