"""Parse the runtime's `I/W/E rkllm:` log lines: the only place it reports versions and error reasons.

The C API returns bare 0/-1 (docs/runtime.md §4.4); the detail (driver version, the model's context
limit, why a prompt was refused) is printed on stdout. Formats follow docs/runtime.md Appendix A.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

LogLevel = Literal["I", "W", "E"]
_LEVELS: dict[str, LogLevel] = {"I": "I", "W": "W", "E": "E"}

_LINE = re.compile(r"^\s*(?P<level>[IWE])\s+rkllm:\s?(?P<message>.*?)\s*$")
_RUNTIME_VERSION = re.compile(
    r"rkllm-runtime version:\s*(?P<runtime>[^,]+?)\s*,\s*rknpu driver version:\s*(?P<driver>[^,]+?)\s*,"
    r"\s*platform:\s*(?P<platform>\S+)"
)
_TOOLKIT = re.compile(
    r"rkllm-toolkit version:\s*(?P<toolkit>[^,]+?)\s*,\s*max_context_limit:\s*(?P<limit>\d+)"
    r"(?:\s*,\s*npu_core_num:\s*(?P<cores>\d+))?(?:\s*,\s*target_platform:\s*(?P<target>\S+))?"
)
_PROMPT_TOO_LONG = re.compile(
    r"length of prompt is greater than max context \(prompt:\s*(?P<prompt>\d+)\s*tokens?,\s*max context:\s*"
    r"(?P<context>\d+)\)"
)
_CONTEXT_NOT_ENOUGH = re.compile(
    r"context is not enough!\s*history_s:\s*(?P<history>\d+),\s*cur_input_s:\s*(?P<input>\d+),\s*"
    r"discard_s:\s*(?P<discard>\d+),\s*max_context:\s*(?P<context>\d+)"
)
_MAX_CONTEXT_TOO_BIG = re.compile(
    r"max_context\[(?P<requested>\d+)\] must be less than the model's max_context_limit\[(?P<limit>\d+)\]"
)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One runtime line split into its level letter and message."""

    level: LogLevel
    message: str

    @property
    def text(self) -> str:
        """The line as the runtime printed it (normalised spacing)."""
        return f"{self.level} rkllm: {self.message}"


@dataclass(frozen=True, slots=True)
class InitLogInfo:
    """What `rkllm_init` printed about the runtime, the driver and the model."""

    runtime_version: str | None = None
    driver_version: str | None = None
    platform: str | None = None
    toolkit_version: str | None = None
    max_context_limit: int | None = None
    npu_core_num: int | None = None
    target_platform: str | None = None


@dataclass(frozen=True, slots=True)
class ContextOverflow:
    """The runtime refused a prompt because it does not fit the context window."""

    line: str
    prompt_tokens: int | None
    max_context: int | None


def parse_line(line: str) -> LogLine | None:
    """Split an `X rkllm: …` line; None for anything else (our own output, Python warnings)."""
    match = _LINE.match(line)
    if match is None:
        return None
    return LogLine(level=_LEVELS[match["level"]], message=match["message"])


def parse_init_lines(lines: Iterable[str]) -> InitLogInfo:
    """Collect version, driver, platform and the model's context limit from the init output."""
    runtime_version = driver_version = platform = toolkit_version = target_platform = None
    max_context_limit = npu_core_num = None
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is None or parsed.level != "I":
            continue
        if (match := _RUNTIME_VERSION.search(parsed.message)) is not None:
            runtime_version = match["runtime"]
            driver_version = match["driver"]
            platform = match["platform"]
        elif (match := _TOOLKIT.search(parsed.message)) is not None:
            toolkit_version = match["toolkit"]
            max_context_limit = int(match["limit"])
            npu_core_num = int(match["cores"]) if match["cores"] else None
            target_platform = match["target"]
    return InitLogInfo(
        runtime_version=runtime_version,
        driver_version=driver_version,
        platform=platform,
        toolkit_version=toolkit_version,
        max_context_limit=max_context_limit,
        npu_core_num=npu_core_num,
        target_platform=target_platform,
    )


def find_context_overflow(lines: Iterable[str]) -> ContextOverflow | None:
    """The last line that says the prompt or history does not fit the context, with its numbers."""
    found: ContextOverflow | None = None
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is None or parsed.level != "E":
            continue
        if (match := _PROMPT_TOO_LONG.search(parsed.message)) is not None:
            found = ContextOverflow(parsed.text, int(match["prompt"]), int(match["context"]))
        elif (match := _CONTEXT_NOT_ENOUGH.search(parsed.message)) is not None:
            total = int(match["history"]) + int(match["input"])
            found = ContextOverflow(parsed.text, total, int(match["context"]))
        elif (match := _MAX_CONTEXT_TOO_BIG.search(parsed.message)) is not None:
            found = ContextOverflow(parsed.text, int(match["requested"]), int(match["limit"]))
    return found


# What Python's faulthandler prints when the worker dies on a signal (the worker enables it on its stderr).
_KV_MATCHES = re.compile(r"kv cache matches\s+(?P<reused>\d+)\s*/\s*(?P<prompt>\d+)\s+tokens of prompt")


def kv_reuse(lines: Iterable[str]) -> tuple[int, int] | None:
    """(reused, prompt) tokens from the runtime's last `kv cache matches n / m tokens of prompt` line, if any.

    The runtime's own statement of prefix reuse for a run that starts from a fresh prompt (docs/runtime.md §4.6,
    Appendix A); a run that appends to the KV prints none.
    """
    found: tuple[int, int] | None = None
    for line in lines:
        if (match := _KV_MATCHES.search(line)) is not None:
            found = (int(match["reused"]), int(match["prompt"]))
    return found


_CRASH_REPORT = re.compile(r"^\s*Fatal Python error:")


def last_problem_line(lines: Iterable[str], levels: str = "EW", *, crash_reports: bool = False) -> str | None:
    """The most recent runtime error (or warning) line, the best one-line reason to show a user.

    With `crash_reports`, the worker's own crash report counts as an error line too: it is what a dying worker
    leaves behind when the runtime printed nothing (messages that already name the signal leave it out).
    """
    last_error: str | None = None
    last_warning: str | None = None
    for raw in lines:
        if crash_reports and "E" in levels and _CRASH_REPORT.match(raw):
            last_error = raw.strip()
            continue
        parsed = parse_line(raw)
        if parsed is None or parsed.level not in levels:
            continue
        if parsed.level == "E":
            last_error = parsed.text
        else:
            last_warning = parsed.text
    return last_error or last_warning


# The repairs' view of one init (formats of docs/runtime.md Appendix A). [Inf] The version line opens every
# rkllm_init (docs/runtime.md §5 item 4), so the lines after the last one belong to the runtime that is loaded now
# (or that just failed to load).
_INIT_VERSION_LINE = re.compile(
    r"^\s*I\s+rkllm:\s*rkllm-runtime version:\s*[^,]*,\s*rknpu driver version:\s*(?P<driver>[^,\s]+)"
    r"(?:\s*,\s*platform:\s*(?P<platform>\S+))?"
)
_DRIVER_TOO_LOW_LINE = re.compile(
    r"^\s*W\s+rkllm:.*rknpu driver version is too low, please upgrade to\s*(?P<required>[^\s,]+?)\.?\s*$",
    re.IGNORECASE,
)
_PLATFORM_MISMATCH_LINE = re.compile(r"^\s*E\s+rkllm:.*target_platform does not match the real platform", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class InitFindings:
    """What the latest init's lines say about the driver and the platform (for repair issues)."""

    driver_version: str | None = None
    platform: str | None = None
    required_driver_version: str | None = None  # from "rknpu driver version is too low, please upgrade to X"
    platform_mismatch: str | None = None  # the runtime's mismatch line, shown to the user


def latest_init_findings(lines: Iterable[str]) -> InitFindings | None:
    """Findings of the lines since the last init began; None when the lines no longer hold that init.

    Only the latest `rkllm_init` counts, so an old warning from before a driver upgrade cannot keep an issue
    alive. Some failures print before (or instead of) the version line: a mismatch anywhere still counts.
    """
    ring = list(lines)
    start: int | None = None
    for index in range(len(ring) - 1, -1, -1):
        if _INIT_VERSION_LINE.match(ring[index]):
            start = index
            break
    if start is None:
        if not any(_PLATFORM_MISMATCH_LINE.match(line) for line in ring):
            return None
        start = 0
    driver_version: str | None = None
    platform: str | None = None
    required: str | None = None
    mismatch: str | None = None
    for line in ring[start:]:  # the last of each wins
        if (version := _INIT_VERSION_LINE.match(line)) is not None:
            driver_version, platform = version["driver"], version["platform"]
        elif (warning := _DRIVER_TOO_LOW_LINE.match(line)) is not None:
            required = warning["required"]
        elif _PLATFORM_MISMATCH_LINE.match(line):
            mismatch = line.strip()
    return InitFindings(driver_version, platform, required, mismatch)


def version_tuple(version: str) -> tuple[int, ...]:
    """`0.9.8` → (0, 9, 8); letters end a part (`1.2.1b1` → (1, 2, 1)), so odd strings still compare."""
    parts: list[int] = []
    for part in version.strip().lstrip("vV").split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


# Runtime lines that print prompt text after a key: `I rkllm: system_prompt: …`, `prompt_prefix: …`,
# `prompt_postfix: …` (docs/runtime.md Appendix A), and tool definitions if a runtime echoes them.
_PROMPT_ECHO = re.compile(r"^(?P<head>.*?\b(?:system_prompt|prompt_prefix|prompt_postfix|tools?)\s*:)\s*\S.*$")


def redact_prompt_echo(line: str, replacement: str) -> str:
    """The line with the prompt text it echoes replaced (for diagnostics); other lines unchanged."""
    match = _PROMPT_ECHO.match(line)
    if match is None:
        return line
    return f"{match['head']} {replacement}"
