"""Board self-check: measures a runtime + model and tests the engine's hardware assumptions, for bug reports.

`python -m rkllm_native.selfcheck --library librkllmrt.so --model model.rkllm [--json report.json]`

It is a diagnostic, so it loads the runtime **in this process** through the binding (the integration runs it in
a worker process instead); a native crash therefore ends the self-check, and with `--json` the report written
after the last completed step survives it. The runtime's stdout/stderr (its `I/W/E rkllm:` lines) are captured
into the report rather than printed.

What it reports:
- the runtime version and ABI profile (detected from the library file), the rknpu driver version and platform
  (from the runtime's init line and `/sys/kernel/debug/rknpu/version` when readable);
- load time, time to first token, prefill and decode tokens/s for a fixed prompt, compared with the published
  numbers of docs/runtime.md §10 for the model's class (guessed from the file name or the emulator calibration);
- one PASS/FAIL/UNKNOWN line per hardware assumption of docs/HISTORY.md that a run can decide: the KV cache
  keeping the system prompt and the history (prefill token counts and times), `set_function_tools` with "[]",
  template restore, forced tool-call prefill, the empty template, keep_history=0, abort and max_new_tokens;
  plus what usage relies on (docs/runtime.md §4.6): KV after a keep_history=1 run = reused + prefilled +
  generated (`kv_accounting`), and a switch of system prompt prefilling all of the new one (`prefix_switch`);
- the slot checks (skip them with `--no-slots`): what the engine's multi-slot design assumes of the board, with
  two runtime instances in two worker processes (`python -m rkllm_native.selfcheck --slot-worker`, each with its
  own `base_domain_id`; this process's instance is released first): both load at once (memory per instance; the
  section is skipped with a note when MemAvailable cannot hold two), both give the same tokens at once as alone,
  their combined throughput against one alone, a run whose callback blocks ~2 s continues with the same text, and
  what that blocked run costs the other one ([Inf] items of docs/runtime.md Appendix C).

JSON report, schema 1 (keys are stable; a new key may be added without a schema bump, a changed one bumps it):

    schema: 1                      tool: "rkllm_native.selfcheck"      created_at: ISO 8601 UTC
    mode: "in-process"             exit_status: 0 | 1 | 2               errors: [str]  (fatal problems)
    host: {machine, kernel, libc, python, board, soc}
    library: {path, version, profile, version_source, official_build, emulator, emulator_speed}
    driver: {version, source, sysfs_version, sysfs_note, platform, minimum}
    model: {path, size_bytes, class, class_key, class_source, toolkit_version, max_context_limit, target_platform,
            npu_core_num}
    settings: {context_length, max_new_tokens, cpu_cores, cpu_mask, rkllm_log_level}
    performance: {load_time_ms, prompt_tokens, ttft_ms, prefill_time_ms, prefill_tokens_per_s, generate_tokens,
                  generate_time_ms, decode_tokens_per_s, memory_usage_mb,
                  reference: null | {model_class, platform, dtype, source, ttft_ms, prefill_tokens_per_s,
                                     decode_tokens_per_s, memory_mb, speed_factor},
                  cold_system_prompt_prefill, warm_turn_prefill: {prefill_tokens, prefill_time_ms,
                                     generate_tokens, kv_before, kv_after}}
    slots: {count, needed_per_instance_mb, mem_available_mb, base_domain_ids, block_s, skipped: null | str}
                                   (absent with --no-slots)
    checks: [{id, assumption (HISTORY.md number or null), title, status: PASS|FAIL|UNKNOWN, detail, measurements}]
    runtime_log: [str]  (every line the runtime printed)

Exit status: 0 = no check failed, 1 = at least one FAIL, 2 = the self-check could not run (bad arguments, the
library or model could not be loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from . import logparse
from .abi import PROFILE_NAMES, ProfileName
from .detect import identify_library
from .errors import RkllmError, RuntimeNotInitializedError
from .runtime import PerfStat, RunInput, RunOptions, Runtime, RuntimeParams

SCHEMA_VERSION: Final = 1
MINIMUM_DRIVER: Final = "0.9.8"  # the 1.3.0 SDK's requirement (docs/runtime.md §7)
RKNPU_VERSION_FILE: Final = Path("/sys/kernel/debug/rknpu/version")
BENCH_MAX_NEW_TOKENS: Final = 64  # the official benchmark generates 64 tokens (docs/runtime.md §10.1)
CUT_MAX_NEW_TOKENS: Final = 8  # per-run cap for the max_new_tokens check (ABI v130 only)
MIN_CONTEXT: Final = 2048  # the ~1k-token system prompt, a few turns and their answers must fit
DEFAULT_CONTEXT: Final = 4096
EMULATOR_MARKER: Final = b"| build: emulator)"
EMULATOR_HEADER: Final = "rkllm-emulator-model 1"
# A warm prefill must cost at most this share of the cold one (system prompt ≈1k tokens, the turn a few dozen).
WARM_SHARE: Final = 0.25
DECODE_PASS_RATIO: Final = 0.75
# The published prefill figure is 128/TTFT (it includes the first decode step), so allow more slack.
PREFILL_PASS_RATIO: Final = 0.6
LOG_LINES_KEPT: Final = 2000

Status = Literal["PASS", "FAIL", "UNKNOWN"]
Role = Literal["user", "tool"]

# ---------------------------------------------------------------------------------------------------------------
# Fixed inputs. They are ours (no copied prompts): an Assist-like static prefix of about 1k tokens.
# ---------------------------------------------------------------------------------------------------------------

BENCH_PROMPT: Final = (
    "Write a long, detailed story for children about a small robot who lives in a lighthouse on a rocky island. "
    "Every night the robot climbs the spiral stairs, cleans the big lamp, and watches the ships pass by. "
    "One stormy evening the lamp goes dark and a fishing boat is lost in the fog. Describe how the robot repairs "
    "the lamp with parts from its own body, how the sailors find their way home, and what the village gives "
    "the robot as a thank-you. Use simple words and many sentences."
)
TURN_LIGHT: Final = "Turn on the kitchen light."
TURN_THANKS: Final = "Thank you. Is the front door locked?"
TURN_TIME: Final = "What can you do for me?"
TURN_DAY: Final = "Which rooms do you know about?"
RAW_PROMPT: Final = "The capital of France is"
SHORT_SYSTEM: Final = "You are a helpful assistant."

_DEVICES: Final = (
    ("Kitchen Light", "light", "Kitchen"),
    ("Kitchen Ceiling Fan", "fan", "Kitchen"),
    ("Dishwasher Plug", "switch", "Kitchen"),
    ("Living Room Lamp", "light", "Living Room"),
    ("Living Room TV", "media_player", "Living Room"),
    ("Living Room Blinds", "cover", "Living Room"),
    ("Living Room Thermostat", "climate", "Living Room"),
    ("Hallway Light", "light", "Hallway"),
    ("Front Door", "lock", "Hallway"),
    ("Front Door Sensor", "binary_sensor", "Hallway"),
    ("Bedroom Light", "light", "Bedroom"),
    ("Bedroom Window", "cover", "Bedroom"),
    ("Bedroom Heater", "climate", "Bedroom"),
    ("Bathroom Light", "light", "Bathroom"),
    ("Bathroom Humidity", "sensor", "Bathroom"),
    ("Office Desk Lamp", "light", "Office"),
    ("Office Speaker", "media_player", "Office"),
    ("Garage Door", "cover", "Garage"),
    ("Garage Light", "light", "Garage"),
    ("Garden Sprinkler", "valve", "Garden"),
    ("Garden Lights", "light", "Garden"),
    ("Outside Temperature", "sensor", "Garden"),
    ("Washing Machine", "sensor", "Utility Room"),
    ("Robot Vacuum", "vacuum", "Utility Room"),
)

SYSTEM_PROMPT: Final = "\n".join(
    [
        "You are a voice assistant for a smart home. Answer in one or two short sentences that can be read aloud.",
        "To change a device, call one of the tools with the device name and, when useful, its domain or area.",
        "To answer a question about the current state of a device or sensor, call GetLiveContext first and "
        "answer from its result; never guess a state.",
        "If a request names a device that is not listed below, say that you do not know it. If a request is "
        "ambiguous, ask which device is meant. Questions unrelated to the home are answered from general knowledge.",
        "Locks are locked with HassTurnOn and unlocked with HassTurnOff. Covers such as blinds, windows and the "
        "garage door are opened with HassTurnOn and closed with HassTurnOff.",
        "",
        "Static context: the areas and devices of this home:",
        *(f"- name: {name}\n  domain: {domain}\n  area: {area}" for name, domain, area in _DEVICES),
    ]
)

# Another static prefix of the same size (the engine's "reset" moves a slot to it): only its first words differ.
SWITCH_SYSTEM_PROMPT: Final = SYSTEM_PROMPT.replace(
    "You are a voice assistant for a smart home.", "You are an assistant for the people who live in this home.", 1
)


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_TARGET: Final[dict[str, Any]] = {
    "name": {"type": "string"},
    "area": {"type": "string"},
    "domain": {"type": "array", "items": {"type": "string"}},
}
TOOLS: Final = [
    _tool("HassTurnOn", "Switches on, opens or locks a device, an entity or every device of an area", _TARGET, []),
    _tool("HassTurnOff", "Switches off, closes or unlocks a device, an entity or every device of an area", _TARGET, []),
    _tool(
        "HassLightSet",
        "Sets the brightness (percent) or color of a light",
        {**_TARGET, "brightness": {"type": "integer", "minimum": 0, "maximum": 100}, "color": {"type": "string"}},
        [],
    ),
    _tool(
        "HassClimateSetTemperature",
        "Sets the target temperature of a thermostat or heater in degrees Celsius",
        {"name": {"type": "string"}, "area": {"type": "string"}, "temperature": {"type": "number"}},
        ["temperature"],
    ),
    _tool(
        "GetLiveContext", "Reports the current state of every device and sensor listed in the static context", {}, []
    ),
]
TOOLS_JSON: Final = json.dumps(TOOLS, separators=(",", ":"))
TOOL_NAMES: Final = tuple(str(tool["function"]["name"]) for tool in TOOLS)
TOOL_RESULT_JSON: Final = json.dumps(
    [
        {
            "name": "HassTurnOn",
            "content": {
                "speech": {},
                "response_type": "action_done",
                "data": {
                    "targets": [],
                    "success": [{"name": "Kitchen Light", "type": "entity", "id": "light.kitchen"}],
                },
            },
        }
    ],
    separators=(",", ":"),
)

# Forced tool call with a ChatML template (docs/HISTORY.md "tool_choice"; Qwen 2.5 tools block, one per line).
CHATML_USER_PREFIX: Final = "<|im_start|>user\n"
FORCED_OPENING: Final = '<tool_call>\n{"name": "'
CHATML_POSTFIX_FORCED: Final = "<|im_end|>\n<|im_start|>assistant\n" + FORCED_OPENING


def chatml_system_with_tools(system_prompt: str) -> str:
    """The system part of a ChatML prompt with a Qwen 2.5 tools block, as the engine's forced mode renders it."""
    tool_lines = "\n".join(json.dumps(tool) for tool in TOOLS)
    return (
        f"<|im_start|>system\n{system_prompt}\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_lines}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Published numbers (docs/runtime.md §10) and the model-class guess
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelClass:
    """Which published model a file is, by family and size; `source` says how it was recognised."""

    key: str  # "qwen2.5-1.5b"
    display: str  # "Qwen2.5 1.5B"
    source: Literal["file name", "emulator calibration"]
    dtype: str | None  # "w8a8" when the file name says so


@dataclass(frozen=True, slots=True)
class Reference:
    """Published figures of one model class on one platform."""

    model_class: str
    platform: str
    dtype: str
    source: str
    ttft_ms: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float
    memory_mb: float | None


_OFFICIAL_RK3588: Final = "docs/runtime.md §10.1, official benchmark v1.3.0 (128 input tokens, 64 new)"
_COMMUNITY_RK3588: Final = "docs/runtime.md §10.2, community measurement"
_OTHER_SOCS: Final = "docs/runtime.md §10.1, official table for other SoCs (decode only)"

# class key → display name; the keys are what guess_model_class produces.
CLASS_NAMES: Final[dict[str, str]] = {
    "qwen2-0.5b": "Qwen2 0.5B",
    "minicpm4-0.5b": "MiniCPM4 0.5B",
    "qwen3-0.6b": "Qwen3 0.6B",
    "qwen3.5-0.8b": "Qwen3.5 0.8B",
    "tinyllama-1.1b": "TinyLlama 1.1B",
    "qwen2.5-1.5b": "Qwen2.5 1.5B",
    "qwen3-1.7b": "Qwen3 1.7B",
    "internlm2-1.8b": "InternLM2 1.8B",
    "qwen3.5-2b": "Qwen3.5 2B",
    "gemma2-2b": "Gemma2 2B",
    "gemma4-e2b": "Gemma4 E2B",
    "telechat2-3b": "TeleChat2 3B",
    "qwen2.5-3b": "Qwen2.5 3B",
    "phi3-3.8b": "Phi3 3.8B",
    "qwen3.5-4b": "Qwen3.5 4B",
    "minicpm3-4b": "MiniCPM3 4B",
    "chatglm3-6b": "ChatGLM3 6B",
}

# (class key, platform, dtype) → (ttft ms, prefill tok/s, decode tok/s, memory MB, source)
_REFERENCE_ROWS: Final[dict[tuple[str, str, str], tuple[float | None, float | None, float, float | None, str]]] = {
    ("qwen2-0.5b", "RK3588", "w8a8"): (145.9, 877, 41.58, 670, _OFFICIAL_RK3588),
    ("minicpm4-0.5b", "RK3588", "w8a8"): (135.3, 946, 45.34, 535, _OFFICIAL_RK3588),
    ("qwen3-0.6b", "RK3588", "w8a8"): (199.1, 643, 32.91, 791, _OFFICIAL_RK3588),
    ("qwen3.5-0.8b", "RK3588", "w8a8"): (587.7, 218, 27.05, 1040, _OFFICIAL_RK3588),
    ("tinyllama-1.1b", "RK3588", "w8a8"): (243.9, 525, 24.43, 1094, _OFFICIAL_RK3588),
    ("qwen2.5-1.5b", "RK3588", "w8a8"): (378.3, 338, 16.69, 1689, _OFFICIAL_RK3588),
    ("internlm2-1.8b", "RK3588", "w8a8"): (380.1, 337, 15.45, 1776, _OFFICIAL_RK3588),
    ("qwen3.5-2b", "RK3588", "w8a8"): (777.0, 165, 13.59, 2122, _OFFICIAL_RK3588),
    ("gemma2-2b", "RK3588", "w8a8"): (598.4, 214, 10.37, 2779, _OFFICIAL_RK3588),
    ("gemma4-e2b", "RK3588", "w8a8"): (599.1, 214, 11.12, 2499, _OFFICIAL_RK3588),
    ("telechat2-3b", "RK3588", "w8a8"): (618.5, 207, 10.18, 2788, _OFFICIAL_RK3588),
    ("phi3-3.8b", "RK3588", "w8a8"): (1017.3, 126, 7.45, 3758, _OFFICIAL_RK3588),
    ("qwen3.5-4b", "RK3588", "w8a8"): (2068.9, 62, 6.22, 4576, _OFFICIAL_RK3588),
    ("minicpm3-4b", "RK3588", "w8a8"): (1408.5, 91, 5.94, 4384, _OFFICIAL_RK3588),
    ("chatglm3-6b", "RK3588", "w8a8"): (1352.9, 95, 4.98, 5986, _OFFICIAL_RK3588),
    ("qwen3-1.7b", "RK3588", "w8a8"): (None, None, 13.0, 2343, _COMMUNITY_RK3588 + " (GatekeeperZA, runtime 1.2.3)"),
    ("qwen2.5-3b", "RK3588", "w8a8"): (None, None, 6.7, None, _COMMUNITY_RK3588 + " (kuneberg/rk_llm_chat)"),
    ("qwen2-0.5b", "RK3576", "w8a8"): (None, None, 21.7, None, _OTHER_SOCS),
    ("qwen2-0.5b", "RK3576", "w4a16"): (None, None, 32.6, None, _OTHER_SOCS),
    ("qwen3-0.6b", "RK3576", "w8a8"): (None, None, 17.2, None, _OTHER_SOCS),
    ("qwen3-0.6b", "RK3576", "w4a16"): (None, None, 24.9, None, _OTHER_SOCS),
    ("tinyllama-1.1b", "RK3576", "w8a8"): (None, None, 12.2, None, _OTHER_SOCS),
    ("tinyllama-1.1b", "RK3576", "w4a16"): (None, None, 19.7, None, _OTHER_SOCS),
    ("qwen2-0.5b", "RV1126B", "w4a16"): (None, None, 20.9, None, _OTHER_SOCS),
    ("qwen3-0.6b", "RV1126B", "w4a16"): (None, None, 15.0, None, _OTHER_SOCS),
}
# RK3562's figures carry no dtype in the table; they are looked up whatever the file's dtype.
_RK3562_DECODE: Final[dict[str, float]] = {"qwen2-0.5b": 13.6, "qwen3-0.6b": 10.9}

# Family patterns, most specific first ("qwen3.5" before "qwen3", "qwen2.5" before "qwen2").
_FAMILIES: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern), family)
    for pattern, family in (
        (r"qwen[-_ ]?3\.5", "qwen3.5"),
        (r"qwen[-_ ]?3(?![.\d])", "qwen3"),
        (r"qwen[-_ ]?2\.5", "qwen2.5"),
        (r"qwen[-_ ]?2(?![.\d])", "qwen2"),
        (r"minicpm[-_ ]?4", "minicpm4"),
        (r"minicpm[-_ ]?3", "minicpm3"),
        (r"tinyllama", "tinyllama"),
        (r"internlm[-_ ]?2(?![.\d])", "internlm2"),
        (r"gemma[-_ ]?4", "gemma4"),
        (r"gemma[-_ ]?2(?![.\d])", "gemma2"),
        (r"telechat[-_ ]?2", "telechat2"),
        (r"phi[-_ ]?3(?![.\d])", "phi3"),
        (r"chatglm[-_ ]?3", "chatglm3"),
    )
)
_SIZE: Final = re.compile(r"(?<![a-z0-9.])(e?\d+(?:\.\d+)?)b(?![a-z0-9])")
_DTYPE: Final = re.compile(r"(?<![a-z0-9])(w4a16|w8a8|w4a8|w8a16)(?![a-z0-9])")
_DEFAULT_SIZE: Final[dict[str, str]] = {"tinyllama": "1.1", "phi3": "3.8"}  # one size per family in the tables


def _normalise_size(size: str) -> str:
    prefix = "e" if size.startswith("e") else ""
    number = float(size.removeprefix("e"))
    return prefix + (f"{number:g}")


def class_from_name(name: str, source: Literal["file name", "emulator calibration"]) -> ModelClass | None:
    """Recognise a published model class in a file or calibration name (docs/runtime.md §7 naming habit)."""
    lowered = name.lower()
    for pattern, family in _FAMILIES:
        if pattern.search(lowered) is None:
            continue
        sizes = [_normalise_size(match) for match in _SIZE.findall(lowered)]
        candidates = sizes or ([_DEFAULT_SIZE[family]] if family in _DEFAULT_SIZE else [])
        for size in candidates:
            key = f"{family}-{size}b"
            if key in CLASS_NAMES:
                dtype_match = _DTYPE.search(lowered)
                dtype = dtype_match.group(1) if dtype_match else ("w8a8" if source == "emulator calibration" else None)
                return ModelClass(key, CLASS_NAMES[key], source, dtype)
        return None
    return None


def reference_for(model_class: ModelClass | None, board_platform: str | None) -> Reference | None:
    """The published figures for this class on this platform (RK3588 when unknown); None when there are none."""
    if model_class is None:
        return None
    target = (board_platform or "RK3588").upper()
    if target == "RK3562" and model_class.key in _RK3562_DECODE:
        return Reference(
            model_class.display, target, model_class.dtype or "unspecified", _OTHER_SOCS, None, None,
            _RK3562_DECODE[model_class.key], None,
        )  # fmt: skip
    # RK3588 benchmarks are w8a8 only (docs/runtime.md §7); a file without a dtype is compared with w8a8.
    dtype = model_class.dtype or "w8a8"
    row = _REFERENCE_ROWS.get((model_class.key, target, dtype))
    if row is None:
        return None
    ttft, prefill, decode, memory, source = row
    return Reference(model_class.display, target, dtype, source, ttft, prefill, decode, memory)


@dataclass(frozen=True, slots=True)
class EmulatorModelFacts:
    """What an emulator model file says about itself (MODEL_FORMAT.md §2)."""

    calibration: str | None
    speed: float | None


def read_emulator_model(path: Path) -> EmulatorModelFacts | None:
    """The calibration and speed keys of an emulator model file; None when the file is not one."""
    try:
        with path.open("rb") as stream:
            head = stream.read(1 << 20)
    except OSError:
        return None
    if b"\x00" in head:
        return None  # a real (binary) .rkllm file
    calibration: str | None = None
    speed: float | None = None
    header_seen = False
    for raw in head.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not header_seen:
            if line.removeprefix("\ufeff") != EMULATOR_HEADER:
                return None
            header_seen = True
            continue
        key, sep, value = line.partition("=")
        if not sep or key.startswith("answer "):
            continue
        key, value = key.strip(), value.strip()
        if key == "calibration":
            calibration = value
        elif key == "speed":
            with contextlib.suppress(ValueError):
                speed = float(value)
    return EmulatorModelFacts(calibration, speed) if header_seen else None


def guess_model_class(model_path: Path) -> ModelClass | None:
    """The model's published class: an emulator file's calibration, else the file name."""
    facts = read_emulator_model(model_path)
    if facts is not None:
        return None if facts.calibration is None else class_from_name(facts.calibration, "emulator calibration")
    return class_from_name(model_path.name, "file name")


def is_emulator_library(path: Path) -> bool:
    """True for the repository's emulator build (its version marker says `build: emulator`)."""
    overlap = b""
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                if EMULATOR_MARKER in overlap + chunk:
                    return True
                overlap = chunk[-len(EMULATOR_MARKER) :]
    except OSError:
        return False
    return False


def version_tuple(version: str) -> tuple[int, ...] | None:
    """Numeric parts of a dotted version ("v0.9.8" → (0, 9, 8)); None when there are none."""
    match = re.search(r"(\d+(?:\.\d+)+)", version)
    return None if match is None else tuple(int(part) for part in match.group(1).split("."))


# ---------------------------------------------------------------------------------------------------------------
# Report types
# ---------------------------------------------------------------------------------------------------------------


Measurements = dict[str, float | int | str | bool | None]


@dataclass(slots=True)
class CheckResult:
    """One line of the check table."""

    id: str
    assumption: int | None
    title: str
    status: Status
    detail: str
    measurements: Measurements = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunMeasurement:
    """What one rkllm_run did: the runtime's perf counters, wall times, KV sizes around it, and its text."""

    text: str
    prefill_tokens: int
    prefill_time_ms: float
    generate_tokens: int
    generate_time_ms: float
    memory_usage_mb: float
    ttft_ms: float | None  # wall time from rkllm_run to the first text
    wall_ms: float
    kv_before: int
    kv_after: int
    finished: bool  # FINISH came (perf is real)
    aborted: bool
    error: str | None
    abort_latency_ms: float | None = None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prefill rate from the runtime's counters."""
        return _rate(self.prefill_tokens, self.prefill_time_ms)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode rate from the runtime's counters."""
        return _rate(self.generate_tokens, self.generate_time_ms)

    def summary(self) -> Measurements:
        """The numbers a check shows."""
        return {
            "prefill_tokens": self.prefill_tokens,
            "prefill_time_ms": round(self.prefill_time_ms, 2),
            "generate_tokens": self.generate_tokens,
            "kv_before": self.kv_before,
            "kv_after": self.kv_after,
        }


def _rate(tokens: int, time_ms: float) -> float | None:
    if tokens <= 0 or time_ms <= 0 or not math.isfinite(time_ms):
        return None
    return tokens / (time_ms / 1000.0)


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Evaluations: pure functions of measurements, one per assumption (so each can be tested on fabricated numbers)
# ---------------------------------------------------------------------------------------------------------------


def _warm(run: RunMeasurement, cold: RunMeasurement) -> bool:
    return run.prefill_tokens <= WARM_SHARE * cold.prefill_tokens


def evaluate_empty_tools(cold_with_tools: RunMeasurement, without_tools: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 1: `set_function_tools(system, "[]")` works and renders no tools block."""
    title = 'set_function_tools with "[]" renders no tools block'
    measurements: Measurements = {
        "prefill_tokens_with_tools": cold_with_tools.prefill_tokens,
        "prefill_tokens_without_tools": without_tools.prefill_tokens,
    }
    smallest_block = len(TOOLS_JSON) // 8  # half of a 4-chars-per-token estimate of the tools JSON
    difference = cold_with_tools.prefill_tokens - without_tools.prefill_tokens
    if difference >= smallest_block:
        detail = f'accepted; the same turn prefills {difference} fewer tokens with "[]" than with the 5 tools'
        return CheckResult("a1_empty_tools", 1, title, "PASS", detail, measurements)
    detail = (
        f'with "[]" the turn prefills {without_tools.prefill_tokens} tokens, with tools '
        f"{cold_with_tools.prefill_tokens}: a tools block ({smallest_block}+ tokens) is still rendered"
    )
    return CheckResult("a1_empty_tools", 1, title, "FAIL", detail, measurements)


def evaluate_keep_history(cold: RunMeasurement, continued: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 2: keep_history=1 appends the turn and prefills only it."""
    title = "keep_history=1 appends the new turn and prefills only it"
    measurements: Measurements = {
        "cold_prefill_tokens": cold.prefill_tokens,
        "cold_prefill_time_ms": round(cold.prefill_time_ms, 2),
        **{f"next_{key}": value for key, value in continued.summary().items()},
    }
    grew = continued.kv_after > continued.kv_before
    if _warm(continued, cold) and grew:
        detail = (
            f"second turn prefilled {continued.prefill_tokens} tokens in {continued.prefill_time_ms:.0f} ms "
            f"(first: {cold.prefill_tokens} in {cold.prefill_time_ms:.0f} ms); KV {continued.kv_before} → "
            f"{continued.kv_after}"
        )
        return CheckResult("a2_keep_history", 2, title, "PASS", detail, measurements)
    detail = (
        f"second turn prefilled {continued.prefill_tokens} tokens (first: {cold.prefill_tokens}); KV "
        f"{continued.kv_before} → {continued.kv_after}: the history is re-prefilled or not kept"
    )
    return CheckResult("a2_keep_history", 2, title, "FAIL", detail, measurements)


def evaluate_kv_accounting(cold: RunMeasurement, continued: RunMeasurement) -> CheckResult:
    """[Inf] After a finished keep_history=1 run, KV = reused + prefilled + generated (docs/runtime.md §4.6).

    The engine reports `cached_tokens` = KV after - prefill_tokens - generate_tokens. `cold` starts on an empty KV
    (reused 0); `continued` appends to it (reused = the KV before it). An offset says how far usage is off, and
    in which direction (+1 per turn: the end-of-turn token is in the KV but counted nowhere).
    """
    title = "KV after a keep_history=1 run = reused + prefilled + generated tokens"
    offsets: list[int] = []
    measurements: Measurements = {}
    for name, run, reused in (("cold", cold, 0), ("continued", continued, continued.kv_before)):
        if not run.finished:
            detail = f"the {name} run gave no perf counters ({run.error or 'no FINISH'})"
            return CheckResult("kv_accounting", None, title, "UNKNOWN", detail, measurements)
        offset = run.kv_after - run.prefill_tokens - run.generate_tokens - reused
        offsets.append(offset)
        measurements[f"{name}_kv_before"] = run.kv_before
        measurements[f"{name}_kv_after"] = run.kv_after
        measurements[f"{name}_prefill_tokens"] = run.prefill_tokens
        measurements[f"{name}_generate_tokens"] = run.generate_tokens
        measurements[f"{name}_offset"] = offset
    if offsets == [0, 0]:
        detail = (
            f"cold: KV {cold.kv_after} = {cold.prefill_tokens} prefilled + {cold.generate_tokens} generated; "
            f"continued: KV {continued.kv_after} = {continued.kv_before} reused + {continued.prefill_tokens} + "
            f"{continued.generate_tokens}"
        )
        return CheckResult("kv_accounting", None, title, "PASS", detail, measurements)
    detail = (
        f"KV after minus prefilled and generated is off by {offsets[0]:+d} (cold) and {offsets[1]:+d} (continued) "
        "tokens from what was reused: usage's cached_tokens is off by as much per turn"
    )
    return CheckResult("kv_accounting", None, title, "FAIL", detail, measurements)


def evaluate_prefix_switch(kv_after_clear: int, switched: RunMeasurement, fresh: RunMeasurement) -> CheckResult:
    """[Inf] After a switch of system prompt a keep_history=1 run prefills all of it (docs/runtime.md §4.6).

    The switch is the engine's "reset": set_function_tools(another system prompt), clear_kv_cache(1), then the run.
    `fresh` is the same run on an empty KV (clear_kv_cache(0)): the whole new prompt.
    """
    title = "a switch of system prompt prefills the whole new prompt"
    measurements: Measurements = {
        "kv_after_clear": kv_after_clear,
        "switched_prefill_tokens": switched.prefill_tokens,
        "switched_prefill_time_ms": round(switched.prefill_time_ms, 2),
        "fresh_prefill_tokens": fresh.prefill_tokens,
        "fresh_prefill_time_ms": round(fresh.prefill_time_ms, 2),
    }
    reused = fresh.prefill_tokens - switched.prefill_tokens
    if _warm(switched, fresh):
        detail = (
            f"after the switch the turn prefilled only {switched.prefill_tokens} tokens (the new prompt is "
            f"{fresh.prefill_tokens}): the runtime went on with the old system prompt ({kv_after_clear} tokens "
            "resident); the engine must clear the KV completely (clear_kv_cache(0)) when it switches prefixes"
        )
        return CheckResult("prefix_switch", None, title, "FAIL", detail, measurements)
    if reused <= max(2, round(0.02 * fresh.prefill_tokens)):
        shared = f", all but {reused} leading tokens the two prompts share" if reused > 0 else ""
        detail = (
            f"prefilled {switched.prefill_tokens} tokens in {switched.prefill_time_ms:.0f} ms, as the new prompt on "
            f"an empty KV ({fresh.prefill_tokens} tokens, {fresh.prefill_time_ms:.0f} ms){shared}: nothing of the old "
            "prefix was reused"
        )
        return CheckResult("prefix_switch", None, title, "PASS", detail, measurements)
    detail = (
        f"prefilled {switched.prefill_tokens} of the new prompt's {fresh.prefill_tokens} tokens: {reused} tokens of "
        "the old prefix were reused, so usage's cached_tokens 0 for a switch under-reports"
    )
    return CheckResult("prefix_switch", None, title, "UNKNOWN", detail, measurements)


def evaluate_clear_keeps_system(cold: RunMeasurement, warm: RunMeasurement, kv_after_clear: int) -> CheckResult:
    """HISTORY.md assumption 3: clear_kv_cache(keep_system_prompt=1) keeps system prompt and tools resident."""
    title = "clear_kv_cache(keep_system_prompt=1) keeps the system prompt resident"
    measurements: Measurements = {
        "cold_prefill_tokens": cold.prefill_tokens,
        "cold_prefill_time_ms": round(cold.prefill_time_ms, 2),
        "kv_after_clear": kv_after_clear,
        "warm_prefill_tokens": warm.prefill_tokens,
        "warm_prefill_time_ms": round(warm.prefill_time_ms, 2),
    }
    faster = warm.prefill_time_ms < 0.5 * cold.prefill_time_ms
    if _warm(warm, cold) and faster and kv_after_clear > 0:
        saved = cold.prefill_time_ms - warm.prefill_time_ms
        detail = (
            f"after the clear the same turn prefilled {warm.prefill_tokens} of {cold.prefill_tokens} tokens, "
            f"{warm.prefill_time_ms:.0f} ms instead of {cold.prefill_time_ms:.0f} ms ({saved:.0f} ms saved); "
            f"{kv_after_clear} tokens stayed resident"
        )
        return CheckResult("a3_clear_keeps_system", 3, title, "PASS", detail, measurements)
    detail = (
        f"after the clear the same turn prefilled {warm.prefill_tokens} tokens in {warm.prefill_time_ms:.0f} ms "
        f"(cold: {cold.prefill_tokens} in {cold.prefill_time_ms:.0f} ms; KV after clear {kv_after_clear}): "
        "the system prompt is prefilled again, so every new conversation pays the full prefix"
    )
    return CheckResult("a3_clear_keeps_system", 3, title, "FAIL", detail, measurements)


def evaluate_template_restore(
    cold: RunMeasurement, restored: RunMeasurement, thinking: RunMeasurement | None = None
) -> CheckResult:
    """HISTORY.md assumption 4: set_function_tools after set_chat_template restores tools and enable_thinking.

    `thinking` is a run with enable_thinking=True on a model that thinks (Qwen3), None for other models.
    """
    title = "set_function_tools after set_chat_template restores the built-in template"
    measurements: Measurements = {
        "prefill_tokens_before": cold.prefill_tokens,
        "prefill_tokens_restored": restored.prefill_tokens,
        "tool_call_before": "<tool_call>" in cold.text,
        "tool_call_restored": "<tool_call>" in restored.text,
        "thinks_when_enabled": None if thinking is None else "<think>" in thinking.text,
    }
    tolerance = max(2, round(0.02 * cold.prefill_tokens))
    same_prompt = abs(restored.prefill_tokens - cold.prefill_tokens) <= tolerance
    lost_calls = "<tool_call>" in cold.text and "<tool_call>" not in restored.text
    lost_thinking = thinking is not None and "<think>" not in thinking.text
    if same_prompt and not lost_calls and not lost_thinking:
        calls = "; it still answers with <tool_call>" if "<tool_call>" in restored.text else ""
        thinks = "; enable_thinking still gives <think>" if thinking is not None else ""
        again = f"the turn prefills {restored.prefill_tokens} tokens again (first time {cold.prefill_tokens})"
        detail = again + calls + thinks
        return CheckResult("a4_template_restore", 4, title, "PASS", detail, measurements)
    if not same_prompt:
        why = f"the prompt is {restored.prefill_tokens} tokens instead of {cold.prefill_tokens}"
    elif lost_calls:
        why = "the answer no longer contains <tool_call>"
    else:
        why = "enable_thinking no longer produces <think>"
    return CheckResult(
        "a4_template_restore", 4, title, "FAIL", f"{why}: the tools template did not come back", measurements
    )


def parse_forced_call(generated: str) -> tuple[str, object] | None:
    """Name and arguments of the call that `FORCED_OPENING` + generated text forms, or None when it is not one."""
    body = FORCED_OPENING + generated
    start = body.find("{")
    end = body.find("</tool_call>")
    if end < 0:
        end = len(body)
    try:
        call = json.loads(body[start:end].strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], call.get("arguments")


def evaluate_forced_call(chatml: bool, forced: RunMeasurement | None) -> CheckResult:
    """HISTORY.md assumption 5: ChatML markers in set_chat_template strings act as special tokens."""
    title = "ChatML markers in set_chat_template work (forced tool call)"
    if not chatml or forced is None:
        detail = "not a ChatML (Qwen) model: the engine does not force calls by prefill on it"
        return CheckResult("a5_forced_call", 5, title, "UNKNOWN", detail)
    measurements: Measurements = {"generated": _excerpt(forced.text, 200)}
    parsed = parse_forced_call(forced.text)
    if parsed is not None and parsed[0] in TOOL_NAMES and isinstance(parsed[1], dict):
        detail = f"the prefilled call continued as valid JSON: {parsed[0]}({json.dumps(parsed[1])})"
        return CheckResult("a5_forced_call", 5, title, "PASS", detail, measurements)
    detail = f"the prefilled '<tool_call>' did not continue as a call of an offered tool: {_excerpt(forced.text)!r}"
    return CheckResult("a5_forced_call", 5, title, "FAIL", detail, measurements)


def evaluate_raw_template(templated: RunMeasurement, raw: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 6: set_chat_template("", "", "") passes the prompt through untouched."""
    title = 'set_chat_template("", "", "") passes the prompt through'
    measurements: Measurements = {
        "prefill_tokens_templated": templated.prefill_tokens,
        "prefill_tokens_raw": raw.prefill_tokens,
        "continuation": _excerpt(raw.text, 200),
    }
    if 0 < raw.prefill_tokens < templated.prefill_tokens:
        detail = (
            f"{RAW_PROMPT!r} prefills {raw.prefill_tokens} tokens raw vs {templated.prefill_tokens} with the template; "
            f"continuation: {_excerpt(raw.text, 60)!r} (judge it yourself)"
        )
        return CheckResult("a6_raw_template", 6, title, "PASS", detail, measurements)
    detail = (
        f"raw prefill {raw.prefill_tokens} tokens is not below the templated {templated.prefill_tokens}: "
        "the runtime still wraps the prompt"
    )
    return CheckResult("a6_raw_template", 6, title, "FAIL", detail, measurements)


def evaluate_keep_history_off(system_tokens: int, first: RunMeasurement, second: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 7: keep_history=0 leaves only the system prompt in the KV."""
    title = "keep_history=0 leaves only the system prompt in the KV"
    measurements: Measurements = {
        "system_prompt_tokens": system_tokens,
        "kv_after_first": first.kv_after,
        "kv_after_second": second.kv_after,
        "second_prefill_tokens": second.prefill_tokens,
    }
    slack = 2
    if system_tokens > 0 and first.kv_after <= system_tokens + slack and second.kv_after <= system_tokens + slack:
        detail = (
            f"the KV holds {first.kv_after} and {second.kv_after} tokens after two runs "
            f"(system prompt: {system_tokens})"
        )
        return CheckResult("a7_keep_history_off", 7, title, "PASS", detail, measurements)
    accumulated = second.kv_after >= first.kv_after + second.prefill_tokens
    consequence = "turns accumulate in the KV" if accumulated else "the last turn stays until the next run (harmless)"
    detail = (
        f"the KV holds {first.kv_after} then {second.kv_after} tokens after keep_history=0 runs "
        f"(system prompt: {system_tokens}): {consequence}"
    )
    return CheckResult("a7_keep_history_off", 7, title, "FAIL", detail, measurements)


def evaluate_abort(aborted: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 8: after an abort during a keep_history=1 run the KV holds a partial turn."""
    title = "an aborted keep_history=1 run leaves a partial turn in the KV"
    measurements: Measurements = {
        **aborted.summary(),
        "abort_latency_ms": None if aborted.abort_latency_ms is None else round(aborted.abort_latency_ms, 1),
    }
    if not aborted.aborted:
        detail = "the run ended before the abort took effect"
        return CheckResult("a8_abort_partial_turn", 8, title, "UNKNOWN", detail, measurements)
    latency = "" if aborted.abort_latency_ms is None else f"; the abort took {aborted.abort_latency_ms:.1f} ms"
    if aborted.kv_after > aborted.kv_before:
        detail = f"KV {aborted.kv_before} → {aborted.kv_after} after the abort (the engine resets anyway){latency}"
        return CheckResult("a8_abort_partial_turn", 8, title, "PASS", detail, measurements)
    detail = f"KV {aborted.kv_before} → {aborted.kv_after}: the aborted turn left nothing (harmless){latency}"
    return CheckResult("a8_abort_partial_turn", 8, title, "FAIL", detail, measurements)


def evaluate_cut_then_append(
    cap: int, cut: RunMeasurement, following: RunMeasurement, cold: RunMeasurement
) -> CheckResult:
    """HISTORY.md assumption 9: a run cut at max_new_tokens stays in the KV and the next turn appends after it."""
    title = "a run cut at max_new_tokens stays in the KV; the next turn appends"
    measurements: Measurements = {
        "max_new_tokens": cap,
        "cut_generate_tokens": cut.generate_tokens,
        "kv_after_cut": cut.kv_after,
        **{f"next_{key}": value for key, value in following.summary().items()},
    }
    if cut.generate_tokens < cap:
        detail = f"the answer ended after {cut.generate_tokens} tokens, before max_new_tokens ({cap})"
        return CheckResult("a9_cut_then_append", 9, title, "UNKNOWN", detail, measurements)
    if following.kv_before == cut.kv_after and following.kv_after > cut.kv_after and _warm(following, cold):
        detail = (
            f"cut at {cut.generate_tokens} tokens; the next turn prefilled {following.prefill_tokens} tokens and "
            f"KV grew {cut.kv_after} → {following.kv_after}"
        )
        return CheckResult("a9_cut_then_append", 9, title, "PASS", detail, measurements)
    detail = (
        f"after the cut (KV {cut.kv_after}) the next turn saw KV {following.kv_before} → {following.kv_after} and "
        f"prefilled {following.prefill_tokens} tokens: the cut answer was not kept"
    )
    return CheckResult("a9_cut_then_append", 9, title, "FAIL", detail, measurements)


def evaluate_tool_turn(call_turn: RunMeasurement, tool_turn: RunMeasurement, cold: RunMeasurement) -> CheckResult:
    """HISTORY.md assumption 10: a role="tool" JSON array is accepted as a turn after the call."""
    title = 'a role="tool" turn with a JSON array follows the call'
    measurements: Measurements = {
        "call_turn_has_tool_call": "<tool_call>" in call_turn.text,
        **tool_turn.summary(),
        "answer": _excerpt(tool_turn.text, 200),
    }
    if tool_turn.error is not None or not tool_turn.finished:
        detail = f"the runtime refused the tool turn: {tool_turn.error or 'no FINISH'}"
        return CheckResult("a10_tool_turn", 10, title, "FAIL", detail, measurements)
    if not _warm(tool_turn, cold) or tool_turn.kv_after <= tool_turn.kv_before:
        detail = f"the tool turn prefilled {tool_turn.prefill_tokens} tokens: it was not appended to the call turn"
        return CheckResult("a10_tool_turn", 10, title, "FAIL", detail, measurements)
    detail = (
        f"accepted and appended ({tool_turn.prefill_tokens} tokens); whether the model relates the result to its "
        f"call is model behaviour, read the answer: {_excerpt(tool_turn.text, 60)!r}"
    )
    return CheckResult("a10_tool_turn", 10, title, "UNKNOWN", detail, measurements)


def evaluate_driver(version: str | None, source: str | None) -> CheckResult:
    """The 1.3.0 SDK needs rknpu driver ≥ 0.9.8 (docs/runtime.md §7)."""
    title = f"rknpu driver ≥ {MINIMUM_DRIVER}"
    measurements: Measurements = {"driver_version": version, "source": source}
    parsed = None if version is None else version_tuple(version)
    if parsed is None:
        return CheckResult("driver_version", None, title, "UNKNOWN", "the driver version is unknown", measurements)
    minimum = version_tuple(MINIMUM_DRIVER) or ()
    if parsed >= minimum:
        return CheckResult("driver_version", None, title, "PASS", f"{version} (from {source})", measurements)
    detail = f"{version} (from {source}) is too old: install a vendor kernel with rknpu {MINIMUM_DRIVER} or newer"
    return CheckResult("driver_version", None, title, "FAIL", detail, measurements)


def evaluate_performance(bench: RunMeasurement, reference: Reference | None, speed: float) -> CheckResult:
    """Decode and prefill speed against the published figures, scaled by the emulator's speed factor."""
    title = "speed against the published figures"
    decode = bench.decode_tokens_per_s
    prefill = bench.prefill_tokens_per_s
    measurements: Measurements = {"decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill}
    if reference is None:
        detail = "unknown class: no published figures for this model on this platform (docs/runtime.md §10)"
        return CheckResult("performance", None, title, "UNKNOWN", detail, measurements)
    if decode is None:
        return CheckResult("performance", None, title, "UNKNOWN", "the run generated no tokens", measurements)
    decode_ratio = decode / (reference.decode_tokens_per_s * speed)
    measurements["decode_ratio"] = round(decode_ratio, 3)
    parts = [f"decode {decode:.1f} tok/s = {decode_ratio:.0%} of {reference.decode_tokens_per_s * speed:g}"]
    ok = decode_ratio >= DECODE_PASS_RATIO
    if reference.prefill_tokens_per_s is not None and prefill is not None:
        prefill_ratio = prefill / (reference.prefill_tokens_per_s * speed)
        measurements["prefill_ratio"] = round(prefill_ratio, 3)
        parts.append(f"prefill {prefill:.0f} tok/s = {prefill_ratio:.0%} of {reference.prefill_tokens_per_s * speed:g}")
        ok = ok and prefill_ratio >= PREFILL_PASS_RATIO
    detail = "; ".join(parts) + f" ({reference.model_class}, {reference.platform} {reference.dtype})"
    if ok:
        return CheckResult("performance", None, title, "PASS", detail, measurements)
    hint = (
        "; below the published figures: run rknn-llm's scripts/fix_freq_<soc>.sh as root, set the CPU governor to "
        "performance, check DDR frequency scaling (docs/runtime.md §8 item 12)"
    )
    return CheckResult("performance", None, title, "FAIL", detail + hint, measurements)


# ---------------------------------------------------------------------------------------------------------------
# Slots: two runtime instances in two processes (the engine's multi-slot design, docs/runtime.md Appendix C)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotInstance:
    """One slot worker after its init: what loading took, or why it failed."""

    base_domain_id: int
    load_ms: float | None = None
    rss_mb: float | None = None  # VmRSS after init
    hwm_mb: float | None = None  # VmHWM after init
    error: str | None = None  # init failed: the error and the runtime's last E line


@dataclass(frozen=True, slots=True)
class SlotRun:
    """One run in a slot worker: its text, when each text piece arrived (CLOCK_MONOTONIC, shared by processes)."""

    text: str
    token_times: tuple[float, ...]
    started: float
    ended: float
    generate_tokens: int = 0
    generate_time_ms: float = 0.0
    finished: bool = True
    error: str | None = None
    block: tuple[float, float] | None = None  # when its callback blocked: (entered, returned)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Pieces per second from the first to the last piece (what a client sees)."""
        if len(self.token_times) < 2 or self.token_times[-1] <= self.token_times[0]:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    def pieces_between(self, start: float, end: float) -> int:
        """Pieces that arrived in (start, end]."""
        return sum(1 for at in self.token_times if start < at <= end)


SLOT_COUNT: Final = 2
SLOT_MAX_NEW_TOKENS: Final = 64
SLOT_BLOCK_S: Final = 2.0  # how long the blocked callback waits (divided by the emulator's speed)
SLOT_BLOCK_AFTER: Final = 2  # pieces before the callback blocks
SLOT_MEMORY_MARGIN: Final = 1.15  # MemAvailable must exceed the instances' estimate by this factor
SLOT_MIN_PIECES: Final = 5  # fewer pieces in a window than this: the rate in it is not judged
SHARED_THROUGHPUT_PASS: Final = 0.8  # two at once must still deliver this share of one run alone, combined
HALF_SHARE_HIGH: Final = 0.7  # each run at most this share of its solo rate = "time-shared" as the emulator models
BLOCK_COST_PASS: Final = 0.8  # beside a blocked run the other keeps at least this share of its solo rate
BLOCK_COST_FAIL: Final = 0.6
SLOT_PROMPTS: Final = (
    BENCH_PROMPT,
    "Write a long, detailed story for children about a cat who runs a small bakery in a mountain village. Every "
    "morning the cat bakes bread, cakes and biscuits, and the villagers queue in the snow. One winter the oven "
    "breaks just before the big festival. Describe how the animals of the village help, what they bake together, "
    "and how the festival ends. Use simple words and many sentences.",
)


def _unknown_slots(check_id: str, title: str, why: str) -> CheckResult:
    return CheckResult(check_id, None, title, "UNKNOWN", why)


SLOT_TITLES: Final[dict[str, str]] = {
    "slots_init": "two runtime instances in two processes initialise at once",
    "slots_concurrent_output": "two instances running at once give the same tokens as alone",
    "slots_shared_throughput": "two instances at once lose no NPU throughput",
    "slots_block_resume": "a run whose callback blocks continues with the same output",
    "slots_block_cost": "a run blocked in its callback does not slow the other instance",
}


def evaluate_slots_memory(needed_mb: float, available_mb: float | None) -> str | None:
    """Why the slot checks are skipped (not enough memory for two instances), or None to go ahead."""
    if available_mb is None:
        return None  # no /proc/meminfo: try, the init check reports a failure
    wanted = SLOT_COUNT * needed_mb * SLOT_MEMORY_MARGIN
    if available_mb >= wanted:
        return None
    return (
        f"skipped: {SLOT_COUNT} instances need about {SLOT_COUNT} x {needed_mb:.0f} MB "
        f"(+{SLOT_MEMORY_MARGIN - 1:.0%}), MemAvailable is {available_mb:.0f} MB; the engine cannot keep "
        f"{SLOT_COUNT} slots of this model on this board"
    )


def evaluate_slots_init(
    instances: list[SlotInstance], available_before_mb: float | None, available_after_mb: float | None
) -> CheckResult:
    """Two rkllm_init at the same time, in two processes, each with its own base_domain_id (docs/runtime.md §4.3)."""
    title = SLOT_TITLES["slots_init"]
    measurements: Measurements = {
        "mem_available_before_mb": _round(available_before_mb, 0),
        "mem_available_after_mb": _round(available_after_mb, 0),
    }
    for index, instance in enumerate(instances):
        measurements[f"slot{index}_base_domain_id"] = instance.base_domain_id
        measurements[f"slot{index}_load_ms"] = _round(instance.load_ms, 0)
        measurements[f"slot{index}_rss_mb"] = _round(instance.rss_mb, 0)
        measurements[f"slot{index}_hwm_mb"] = _round(instance.hwm_mb, 0)
    failed = [(index, instance) for index, instance in enumerate(instances) if instance.error is not None]
    if failed:
        reasons = "; ".join(
            f"slot {index} (base_domain_id {item.base_domain_id}): {item.error}" for index, item in failed
        )
        return CheckResult("slots_init", None, title, "FAIL", reasons, measurements)
    taken = ""
    if available_before_mb is not None and available_after_mb is not None:
        taken = f"; MemAvailable fell by {available_before_mb - available_after_mb:.0f} MB for both"
    each = ", ".join(
        f"slot {index}: loaded in {_fmt(item.load_ms, ' ms', 0)}, RSS {_fmt(item.rss_mb, ' MB', 0)}"
        for index, item in enumerate(instances)
    )
    return CheckResult("slots_init", None, title, "PASS", each + taken, measurements)


def _common_prefix_chars(first: str, second: str) -> int:
    count = 0
    for one, other in zip(first, second, strict=False):
        if one != other:
            break
        count += 1
    return count


def evaluate_concurrent_output(
    alone: list[SlotRun], together: list[SlotRun], alone_again: list[SlotRun | None]
) -> CheckResult:
    """Each instance's text when both run at once equals its text alone (greedy decoding, top_k = 1).

    `alone_again[i]` is a second solo run, made only when slot i's texts differed: it tells a runtime that is not
    deterministic even alone (UNKNOWN) from one whose concurrent runs disturb each other (FAIL).
    """
    title = SLOT_TITLES["slots_concurrent_output"]
    measurements: Measurements = {}
    problems: list[str] = []
    unsure: list[str] = []
    for index, (solo, both) in enumerate(zip(alone, together, strict=True)):
        measurements[f"slot{index}_pieces_alone"] = len(solo.token_times)
        measurements[f"slot{index}_pieces_together"] = len(both.token_times)
        if both.error is not None or not both.finished:
            problems.append(f"slot {index} did not finish: {both.error or 'no FINISH'}")
            continue
        if both.text == solo.text:
            continue
        same = _common_prefix_chars(both.text, solo.text)
        measurements[f"slot{index}_same_chars"] = same
        again = alone_again[index]
        if again is not None and again.text != solo.text:
            unsure.append(f"slot {index} gives different texts even alone (greedy decoding is not repeatable)")
        else:
            problems.append(
                f"slot {index} differs from its solo text after {same} characters: "
                f"{_excerpt(both.text[same:], 40)!r} instead of {_excerpt(solo.text[same:], 40)!r}"
            )
    if problems:
        return CheckResult("slots_concurrent_output", None, title, "FAIL", "; ".join(problems), measurements)
    if unsure:
        return CheckResult("slots_concurrent_output", None, title, "UNKNOWN", "; ".join(unsure), measurements)
    detail = (
        "both texts are identical to the texts each instance gives alone ("
        + ", ".join(f"slot {index}: {len(run.token_times)} pieces" for index, run in enumerate(together))
        + ")"
    )
    return CheckResult("slots_concurrent_output", None, title, "PASS", detail, measurements)


def overlap_window(runs: list[SlotRun]) -> tuple[float, float] | None:
    """The time every run was decoding (from the latest first piece to the earliest last piece)."""
    if any(len(run.token_times) < 2 for run in runs):
        return None
    start = max(run.token_times[0] for run in runs)
    end = min(run.token_times[-1] for run in runs)
    return (start, end) if end > start else None


def evaluate_shared_throughput(alone: list[SlotRun], together: list[SlotRun]) -> CheckResult:
    """[Inf] Two runs at once time-share the NPU: each about half as fast, together as fast as one alone."""
    title = SLOT_TITLES["slots_shared_throughput"]
    solo_rates = [run.decode_tokens_per_s for run in alone]
    measurements: Measurements = {
        f"slot{index}_alone_tokens_per_s": _round(rate) for index, rate in enumerate(solo_rates)
    }
    window = overlap_window(together)
    known_rates = [rate for rate in solo_rates if rate is not None]
    if window is None or len(known_rates) != len(solo_rates):
        detail = "the runs did not decode at the same time"
        return CheckResult("slots_shared_throughput", None, title, "UNKNOWN", detail, measurements)
    start, end = window
    counts = [run.pieces_between(start, end) for run in together]
    measurements["overlap_s"] = round(end - start, 3)
    if min(counts) < SLOT_MIN_PIECES:
        detail = f"the runs overlapped for only {end - start:.2f} s ({min(counts)} pieces): too short to judge"
        return CheckResult("slots_shared_throughput", None, title, "UNKNOWN", detail, measurements)
    shares: list[float] = []
    together_rates: list[float] = []
    for index, (count, solo_rate) in enumerate(zip(counts, known_rates, strict=True)):
        rate = count / (end - start)
        together_rates.append(rate)
        shares.append(rate / solo_rate)
        measurements[f"slot{index}_together_tokens_per_s"] = round(rate, 2)
        measurements[f"slot{index}_share"] = round(rate / solo_rate, 3)
    combined = sum(together_rates) / (sum(known_rates) / len(known_rates))
    measurements["combined_vs_alone"] = round(combined, 3)
    split = ", ".join(f"slot {index} {share:.0%}" for index, share in enumerate(shares))
    detail = (
        f"at once each ran at {split} of its solo rate; together {sum(together_rates):.1f} tok/s = {combined:.0%} of "
        "one run alone"
    )
    if combined < SHARED_THROUGHPUT_PASS:
        hint = ": running slots at once wastes NPU time; pause the other slot rather than share"
        return CheckResult("slots_shared_throughput", None, title, "FAIL", detail + hint, measurements)
    model = (
        " (time-shared, as the emulator models it)"
        if max(shares) <= HALF_SHARE_HIGH
        else " (each run kept more than the emulator's half: the NPU had capacity to spare)"
    )
    return CheckResult("slots_shared_throughput", None, title, "PASS", detail + model, measurements)


def evaluate_block_resume(alone: SlotRun, blocked: SlotRun, again: SlotRun | None) -> CheckResult:
    """[Inf] A run whose callback blocks (the engine's pause) continues afterwards with the same output.

    Also reports whether the runtime's generate_time_ms counts the blocked time: it is then close to the wall time
    from the first to the last piece, else close to that minus the block. `again` is a second solo run, made only
    when the texts differ.
    """
    title = SLOT_TITLES["slots_block_resume"]
    measurements: Measurements = {"pieces_before_block": SLOT_BLOCK_AFTER}
    if blocked.block is None:
        detail = f"the run ended after {len(blocked.token_times)} pieces, before its callback could block"
        return CheckResult("slots_block_resume", None, title, "UNKNOWN", detail, measurements)
    block_ms = (blocked.block[1] - blocked.block[0]) * 1000
    measurements["blocked_ms"] = round(block_ms, 1)
    counted = None
    if blocked.finished and blocked.generate_time_ms > 0 and len(blocked.token_times) >= 2:
        span_ms = (blocked.token_times[-1] - blocked.token_times[0]) * 1000
        measurements["generate_time_ms"] = round(blocked.generate_time_ms, 1)
        measurements["first_to_last_piece_ms"] = round(span_ms, 1)
        counted = blocked.generate_time_ms > span_ms - 0.5 * block_ms
        measurements["perf_counts_blocked_time"] = counted
    if blocked.error is not None or not blocked.finished:
        detail = f"after the {block_ms:.0f} ms block the run did not finish: {blocked.error or 'no FINISH'}"
        return CheckResult("slots_block_resume", None, title, "FAIL", detail, measurements)
    perf_note = (
        ""
        if counted is None
        else "; its generate_time_ms includes the blocked time"
        if counted
        else "; its generate_time_ms leaves the blocked time out"
    )
    if blocked.text == alone.text:
        detail = f"blocked {block_ms:.0f} ms after {SLOT_BLOCK_AFTER} pieces, then finished with the same text"
        detail += perf_note
        return CheckResult("slots_block_resume", None, title, "PASS", detail, measurements)
    if again is not None and again.text != alone.text:
        detail = "the text differs, but it differs between two solo runs too (greedy decoding is not repeatable)"
        return CheckResult("slots_block_resume", None, title, "UNKNOWN", detail, measurements)
    same = _common_prefix_chars(blocked.text, alone.text)
    measurements["same_chars"] = same
    detail = (
        f"after the {block_ms:.0f} ms block the text differs from the solo text after {same} characters: "
        f"{_excerpt(blocked.text[same:], 40)!r}"
    )
    return CheckResult("slots_block_resume", None, title, "FAIL", detail, measurements)


def evaluate_block_cost(alone: SlotRun, beside_block: SlotRun, blocked: SlotRun) -> CheckResult:
    """[Inf] A run blocked in its callback computes nothing, so the other instance runs at its solo rate meanwhile."""
    title = SLOT_TITLES["slots_block_cost"]
    solo_rate = alone.decode_tokens_per_s
    measurements: Measurements = {"alone_tokens_per_s": _round(solo_rate)}
    if blocked.block is None or solo_rate is None or len(beside_block.token_times) < 2:
        detail = "no block overlapped the other run"
        return CheckResult("slots_block_cost", None, title, "UNKNOWN", detail, measurements)
    start = max(blocked.block[0], beside_block.token_times[0])
    end = min(blocked.block[1], beside_block.token_times[-1])
    pieces = beside_block.pieces_between(start, end) if end > start else 0
    measurements["window_s"] = round(max(0.0, end - start), 3)
    measurements["pieces_in_window"] = pieces
    if pieces < SLOT_MIN_PIECES:
        detail = f"the other run produced {pieces} pieces while the first one was blocked: too few to judge"
        return CheckResult("slots_block_cost", None, title, "UNKNOWN", detail, measurements)
    rate = pieces / (end - start)
    share = rate / solo_rate
    measurements["beside_block_tokens_per_s"] = round(rate, 2)
    measurements["share_of_alone"] = round(share, 3)
    detail = f"while the first run sat in its callback the other ran at {rate:.1f} tok/s = {share:.0%} of its solo rate"
    if share >= BLOCK_COST_PASS:
        return CheckResult("slots_block_cost", None, title, "PASS", detail, measurements)
    if share <= BLOCK_COST_FAIL:
        hint = ": a run blocked in its callback still holds the NPU; pause other slots by aborting them instead"
        return CheckResult("slots_block_cost", None, title, "FAIL", detail + hint, measurements)
    return CheckResult("slots_block_cost", None, title, "UNKNOWN", detail + " (between the two verdicts)", measurements)


# ---------------------------------------------------------------------------------------------------------------
# Capturing what the runtime prints
# ---------------------------------------------------------------------------------------------------------------


def _flush_c_stdio() -> None:
    """The runtime printf()s; a pipe or file is block-buffered in C, so flush before reading."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


class OutputCapture:
    """Points fd 1 and 2 at a temporary file for the duration, so the runtime's lines land in the report.

    `console` writes to the original stderr, for progress while the capture is active.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the capture
        self._saved_stdout = -1
        self._saved_stderr = -1
        self._offset = 0
        self._partial = b""
        self.lines: list[str] = []

    def __enter__(self) -> OutputCapture:
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_stdout = os.dup(1)
        self._saved_stderr = os.dup(2)
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved_stdout, 1)
        os.dup2(self._saved_stderr, 2)
        os.close(self._saved_stdout)
        os.close(self._saved_stderr)
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", errors="replace").rstrip())
            self._partial = b""
        self._file.close()

    def collect(self) -> list[str]:
        """Lines printed since the last call (also appended to `lines`)."""
        _flush_c_stdio()
        sys.stdout.flush()
        sys.stderr.flush()
        self._file.seek(self._offset)
        data = self._file.read()
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if not complete and not _:
            return []
        new = [line.rstrip() for line in complete.decode("utf-8", errors="replace").split("\n")]
        self.lines.extend(new)
        return new

    def console(self, text: str) -> None:
        """Write a progress line to the real stderr."""
        fd = self._saved_stderr if self._saved_stderr >= 0 else 2
        os.write(fd, (text + "\n").encode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------------------------------
# Slot workers: `python -m rkllm_native.selfcheck --slot-worker <json>` holds one runtime instance
# ---------------------------------------------------------------------------------------------------------------

SLOT_WORKER_FLAG: Final = "--slot-worker"
SLOT_INIT_TIMEOUT_S: Final = 180.0  # two loads at once, 2-15 s each on a board (docs/runtime.md §10.2)
SLOT_RUN_TIMEOUT_S: Final = 600.0
SLOT_START_DELAY_S: Final = 0.3  # both runs start at one moment this far ahead, after both got the command


class SlotWorkerError(RkllmError):
    """A slot worker died or stopped answering."""

    code = "selfcheck_slot_worker"


def _status_mb(key: str) -> float | None:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return None


def _with_line(message: object, worker: SlotWorker) -> str:
    """An init failure with the runtime's own reason, as the main check reports its own (E rkllm: …)."""
    runtime_line = worker.last_runtime_error()
    return str(message) if runtime_line is None else f"{message} ({runtime_line})"


def mem_available_mb() -> float | None:
    """MemAvailable of /proc/meminfo in MB (None when unreadable)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return None


class _SlotSink:
    """Keeps each piece's arrival time; with block_s, blocks inside the callback once, as the engine's pause."""

    def __init__(self, block_s: float | None) -> None:
        self.pieces: list[str] = []
        self.times: list[float] = []
        self.block_s = block_s
        self.block: tuple[float, float] | None = None
        self.perf: PerfStat | None = None
        self.error: str | None = None

    def on_text(self, text: str, token_id: int) -> bool:
        self.times.append(time.monotonic())
        self.pieces.append(text)
        if self.block_s is not None and self.block is None and len(self.pieces) >= SLOT_BLOCK_AFTER:
            entered = time.monotonic()
            time.sleep(self.block_s)  # blocking here on purpose: this is what is being measured
            self.block = (entered, time.monotonic())
        return False

    def on_finish(self, perf: PerfStat) -> None:
        self.perf = perf

    def on_error(self, message: str) -> None:
        self.error = message


def slot_worker_main(argv: list[str]) -> int:
    """The worker side: init one instance, then run what the parent sends, answering in JSON lines on stdout."""
    config = json.loads(argv[0])
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # the runtime's own lines go to the worker's log (stderr), never into the channel

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    mask = int(config["cpu_mask"])
    params = RuntimeParams(
        model_path=config["model"],
        max_context_len=int(config["context_length"]),
        max_new_tokens=SLOT_MAX_NEW_TOKENS,
        top_k=1,  # greedy: a run's text alone and beside another must be comparable
        base_domain_id=int(config["base_domain_id"]),
        enabled_cpus_num=mask.bit_count(),
        enabled_cpus_mask=mask,
    )
    runtime = Runtime(config["library"], config["profile"])
    started = time.monotonic()
    try:
        runtime.init(params)
    except RkllmError as err:
        _flush_c_stdio()
        send({"event": "error", "message": str(err)})
        return 2
    send(
        {
            "event": "ready",
            "load_ms": (time.monotonic() - started) * 1000.0,
            "rss_mb": _status_mb("VmRSS"),
            "hwm_mb": _status_mb("VmHWM"),
        }
    )
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cmd") != "run":
            break
        start_at = command.get("start_at")
        if isinstance(start_at, float):
            time.sleep(max(0.0, start_at - time.monotonic()))
        sink = _SlotSink(command.get("block_s"))
        began = time.monotonic()
        error: str | None = None
        try:
            outcome = runtime.run(RunInput(role="user", text=command["text"]), RunOptions(keep_history=False), sink)
            error = outcome.error
        except RkllmError as err:
            error = str(err)
        perf = sink.perf
        send(
            {
                "event": "done",
                "text": "".join(sink.pieces),
                "token_times": sink.times,
                "started": began,
                "ended": time.monotonic(),
                "generate_tokens": 0 if perf is None else perf.generate_tokens,
                "generate_time_ms": 0.0 if perf is None else perf.generate_time_ms,
                "finished": perf is not None,
                "error": error or sink.error,
                "block": None if sink.block is None else list(sink.block),
            }
        )
    runtime.destroy()
    _flush_c_stdio()
    return 0


class SlotWorker:
    """The parent's side of one slot worker process and its JSON-lines channel."""

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(part for part in (package_root, os.environ.get("PYTHONPATH", "")) if part)
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rkllm_native.selfcheck", SLOT_WORKER_FLAG, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            encoding="utf-8",
            env={**os.environ, "PYTHONPATH": python_path},
        )
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="selfcheck-slot-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.stdout
        if stream is not None:
            for line in stream:
                with contextlib.suppress(json.JSONDecodeError):
                    self._replies.put(json.loads(line))
        self._replies.put(None)

    def last_runtime_error(self) -> str | None:
        """The runtime's last E line in this worker's log (`failed to malloc npu memory`, …)."""
        self._log.flush()
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        return logparse.last_problem_line(lines, levels="E")

    def _gone(self, what: str) -> SlotWorkerError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)  # a dying worker: let its exit status and last lines arrive
        code = self.process.poll()
        status = "is still running" if code is None else f"exited with status {code}"
        runtime_line = self.last_runtime_error()
        reason = "" if runtime_line is None else f"; {runtime_line}"
        return SlotWorkerError(f"slot worker {self.process.pid} {what} ({status}{reason})")

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next message; SlotWorkerError when the worker died or said nothing for `timeout` seconds."""
        try:
            message = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise self._gone(f"did not answer within {timeout:.0f} s") from None
        if message is None:
            self._replies.put(None)
            raise self._gone("stopped")
        return message

    def send_run(self, text: str, *, start_at: float | None = None, block_s: float | None = None) -> None:
        """Start one run (keep_history=0); its result comes from receive_run()."""
        command = {"cmd": "run", "text": text, "start_at": start_at, "block_s": block_s}
        stdin = self.process.stdin
        if stdin is None:
            raise self._gone("has no command channel")
        try:
            stdin.write(json.dumps(command) + "\n")
            stdin.flush()
        except OSError:
            raise self._gone("cannot take commands") from None

    def receive_run(self) -> SlotRun:
        """The result of the run started by send_run()."""
        reply = self.receive(SLOT_RUN_TIMEOUT_S)
        block = reply.get("block")
        return SlotRun(
            text=str(reply.get("text", "")),
            token_times=tuple(float(at) for at in reply.get("token_times", [])),
            started=float(reply.get("started", 0.0)),
            ended=float(reply.get("ended", 0.0)),
            generate_tokens=int(reply.get("generate_tokens", 0)),
            generate_time_ms=float(reply.get("generate_time_ms", 0.0)),
            finished=bool(reply.get("finished")),
            error=reply.get("error"),
            block=None if not block else (float(block[0]), float(block[1])),
        )

    def run(self, text: str) -> SlotRun:
        """One run alone."""
        self.send_run(text)
        return self.receive_run()

    def close(self) -> None:
        """Ask the worker to destroy its instance and exit; kill it when it does not."""
        stdin = self.process.stdin
        with contextlib.suppress(OSError, ValueError):
            if stdin is not None:
                stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._reader.join(timeout=5)
        self._log.close()


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """Command-line settings."""

    library: Path
    model: Path
    profile: ProfileName | None = None
    context_length: int = DEFAULT_CONTEXT
    speed: float | None = None
    json_path: Path | None = None
    cpu_mask: int | None = None
    slots: bool = True


class _CollectingSink:
    """RunSink that keeps the text, the first-text time and the perf counters; can abort at the first text."""

    def __init__(self, abort: Callable[[], None] | None) -> None:
        self.pieces: list[str] = []
        self.first_text_at: float | None = None
        self.abort_at: float | None = None
        self.perf: PerfStat | None = None
        self.error: str | None = None
        self._abort = abort

    def on_text(self, text: str, token_id: int) -> bool:
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()
            if self._abort is not None:
                self.abort_at = self.first_text_at
                self._abort()  # the binding allows Runtime.abort() from the sink
        self.pieces.append(text)
        return False

    def on_finish(self, perf: PerfStat) -> None:
        self.perf = perf

    def on_error(self, message: str) -> None:
        self.error = message


def _cpu_mask_for_board() -> int:
    """Big cores 4-7 on RK3588/RK3576 (official demos); RK3562 and RV1126B only have CPUs 0-3 (§4.5)."""
    compatible = _read_text(Path("/proc/device-tree/compatible")) or ""
    if "rk3562" in compatible or "rv1126" in compatible:
        return 0x0F
    return 0xF0


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\x00", b" ").decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def read_sysfs_driver_version(path: Path = RKNPU_VERSION_FILE) -> tuple[str | None, str]:
    """The version in debugfs (`RKNPU driver: v0.9.8`) and a note on why it is missing when it is."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None, f"{path} does not exist (no rknpu driver, debugfs not mounted, or not a Rockchip board)"
    except PermissionError:
        return None, f"{path} is not readable (debugfs needs root: run the self-check with sudo to include it)"
    except OSError as err:
        return None, f"{path}: {err.strerror or err}"
    match = re.search(r"v?(\d+\.\d+\.\d+)", text)
    return (match.group(1) if match else text or None), f"read from {path}"


def host_facts() -> dict[str, str | None]:
    """Machine facts that matter for a runtime bug report."""
    libc_name, libc_version = platform.libc_ver()
    compatible = _read_text(Path("/proc/device-tree/compatible"))
    return {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "libc": f"{libc_name} {libc_version}".strip() or None,
        "python": platform.python_version(),
        "board": _read_text(Path("/proc/device-tree/model")),
        "soc": None if compatible is None else compatible.split()[-1],
    }


class SelfCheck:
    """One self-check session: loads the runtime, measures, evaluates, and keeps the report up to date."""

    def __init__(self, options: Options, capture: OutputCapture) -> None:
        self.options = options
        self.capture = capture
        self.report: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "tool": "rkllm_native.selfcheck",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": "in-process",
            "exit_status": 2,
            "errors": [],
            "host": host_facts(),
            "library": {"path": str(options.library)},
            "driver": {"minimum": MINIMUM_DRIVER},
            "model": {"path": str(options.model)},
            "settings": {},
            "performance": {},
            "checks": [],
            "runtime_log": capture.lines,
        }
        self.checks: list[CheckResult] = []
        self.runtime: Runtime | None = None
        self.speed = 1.0
        self.model_class: ModelClass | None = None

    # -- report plumbing ------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the JSON report as it stands (after every step, so a native crash leaves the last state)."""
        self.capture.collect()
        ordered = sorted(
            self.checks,
            key=lambda check: (check.id.startswith("slots_"), check.assumption or 0, check.id != "driver_version"),
        )
        self.report["checks"] = [dataclasses.asdict(check) for check in ordered]
        self.report["runtime_log"] = self.capture.lines[-LOG_LINES_KEPT:]
        if self.options.json_path is None:
            return
        path = self.options.json_path
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        temporary.replace(path)

    def progress(self, text: str) -> None:
        """A progress line on the console (the runtime's own output goes to the report)."""
        self.capture.console(f"selfcheck: {text}")

    def add(self, check: CheckResult) -> None:
        """Record a check and save the report."""
        self.checks.append(check)
        self.save()

    def fail_step(self, check_id: str, assumption: int | None, title: str, err: Exception) -> None:
        """A step raised: its check FAILs with the error line (and the runtime's last E line)."""
        lines = self.capture.collect()
        runtime_line = logparse.last_problem_line(lines, levels="E")
        detail = str(err) if runtime_line is None else f"{err} ({runtime_line})"
        self.add(CheckResult(check_id, assumption, title, "FAIL", detail))

    # -- steps ----------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Identify the library, init the runtime (timed), parse the init lines; raises RkllmError."""
        options = self.options
        identity = identify_library(options.library, options.profile)
        emulator = is_emulator_library(options.library)
        facts = read_emulator_model(options.model) if emulator else None
        if options.speed is not None:
            if not emulator:
                raise RkllmError(f"--speed only applies to the emulator library; {options.library} is a real runtime")
            os.environ["RKLLM_EMULATOR_SPEED"] = f"{options.speed:g}"
            self.speed = options.speed
        elif emulator:
            env_speed = os.environ.get("RKLLM_EMULATOR_SPEED")
            model_speed = facts.speed if facts is not None else None
            with contextlib.suppress(ValueError):
                self.speed = float(env_speed) if env_speed else (model_speed if model_speed is not None else 1.0)
        self.report["library"] = {
            "path": str(options.library),
            "version": identity.version,
            "profile": identity.profile,
            "version_source": identity.source,
            "official_build": identity.official_build,
            "emulator": emulator,
            "emulator_speed": self.speed if emulator else None,
        }
        mask = options.cpu_mask if options.cpu_mask is not None else _cpu_mask_for_board()
        params = RuntimeParams(
            model_path=options.model,
            max_context_len=options.context_length,
            max_new_tokens=BENCH_MAX_NEW_TOKENS,
            top_k=1,  # greedy, as the official servers: repeatable answers between runs
            enabled_cpus_num=mask.bit_count(),
            enabled_cpus_mask=mask,
        )
        self.report["settings"] = {
            "context_length": options.context_length,
            "max_new_tokens": BENCH_MAX_NEW_TOKENS,
            "cpu_cores": mask.bit_count(),
            "cpu_mask": f"{mask:#04x}",
        }
        model_size = options.model.stat().st_size if options.model.is_file() else None
        self.report["model"] = {"path": str(options.model), "size_bytes": model_size}
        self.progress(f"loading {options.model} with librkllmrt {identity.version} ({identity.profile})")
        self.save()
        # Level 2 adds the runtime's KV lines (`current kv cache size`, `kv cache matches …`) to the report.
        os.environ.setdefault("RKLLM_LOG_LEVEL", "2")
        self.report["settings"]["rkllm_log_level"] = os.environ["RKLLM_LOG_LEVEL"]
        runtime = Runtime(options.library, identity.profile)
        started = time.monotonic()
        try:
            runtime.init(params)
        except RkllmError:
            runtime.destroy()
            raise
        load_ms = (time.monotonic() - started) * 1000.0
        self.runtime = runtime
        info = logparse.parse_init_lines(self.capture.collect())
        model_class = self.model_class = guess_model_class(options.model)
        self.report["model"].update(
            {
                "class": None if model_class is None else model_class.display,
                "class_key": None if model_class is None else model_class.key,
                "class_source": None if model_class is None else model_class.source,
                "toolkit_version": info.toolkit_version,
                "max_context_limit": info.max_context_limit,
                "target_platform": info.target_platform,
                "npu_core_num": info.npu_core_num,
            }
        )
        sysfs_version, sysfs_note = read_sysfs_driver_version()
        version, source = (
            (info.driver_version, "runtime init line") if info.driver_version else (sysfs_version, "debugfs")
        )
        self.report["driver"] = {
            "version": version,
            "source": source if version else None,
            "sysfs_version": sysfs_version,
            "sysfs_note": sysfs_note,
            "platform": info.platform,
            "minimum": MINIMUM_DRIVER,
        }
        self.report["performance"] = {"load_time_ms": round(load_ms, 1)}
        self.add(evaluate_driver(version, source if version else None))

    def run(
        self,
        role: Role,
        text: str,
        *,
        keep_history: bool,
        abort_after_first_text: bool = False,
        max_new_tokens: int = 0,
        enable_thinking: bool = False,
    ) -> RunMeasurement:
        """One rkllm_run with its measurements; raises RkllmError when the runtime refuses it."""
        runtime = self.require_runtime()
        kv_before = runtime.get_kv_cache_size()[0]
        sink = _CollectingSink(runtime.abort if abort_after_first_text else None)
        started = time.monotonic()
        outcome = runtime.run(
            RunInput(role=role, text=text, enable_thinking=enable_thinking),
            RunOptions(keep_history=keep_history, max_new_tokens=max_new_tokens),
            sink,
        )
        ended = time.monotonic()
        perf = outcome.perf
        return RunMeasurement(
            text="".join(sink.pieces),
            prefill_tokens=0 if perf is None else perf.prefill_tokens,
            prefill_time_ms=0.0 if perf is None else perf.prefill_time_ms,
            generate_tokens=0 if perf is None else perf.generate_tokens,
            generate_time_ms=0.0 if perf is None else perf.generate_time_ms,
            memory_usage_mb=0.0 if perf is None else perf.memory_usage_mb,
            ttft_ms=None if sink.first_text_at is None else (sink.first_text_at - started) * 1000.0,
            wall_ms=(ended - started) * 1000.0,
            kv_before=kv_before,
            kv_after=runtime.get_kv_cache_size()[0],
            finished=perf is not None,
            aborted=outcome.aborted,
            error=outcome.error or sink.error,
            abort_latency_ms=None if sink.abort_at is None else (ended - sink.abort_at) * 1000.0,
        )

    def benchmark(self) -> None:
        """TTFT, prefill and decode speed for the fixed prompt, against the published class figures."""
        self.progress("benchmark: fixed prompt, up to 64 new tokens")
        bench = self.run("user", BENCH_PROMPT, keep_history=False)
        board = self.report["driver"].get("platform") or self.report["model"].get("target_platform")
        reference = reference_for(self.model_class, board)
        self.report["performance"].update(
            {
                "prompt_tokens": bench.prefill_tokens,
                "ttft_ms": None if bench.ttft_ms is None else round(bench.ttft_ms, 1),
                "prefill_time_ms": round(bench.prefill_time_ms, 2),
                "prefill_tokens_per_s": _round(bench.prefill_tokens_per_s),
                "generate_tokens": bench.generate_tokens,
                "generate_time_ms": round(bench.generate_time_ms, 2),
                "decode_tokens_per_s": _round(bench.decode_tokens_per_s),
                "memory_usage_mb": round(bench.memory_usage_mb, 1),
                "reference": None
                if reference is None
                else {**dataclasses.asdict(reference), "speed_factor": self.speed},
            }
        )
        self.add(evaluate_performance(bench, reference, self.speed))

    def kv_checks(self) -> None:
        """Every HISTORY.md assumption a run can decide, in an order where each step sets up the next.

        Tools stay set from the cold run to the forced call, as in the engine (a forced request follows normal
        ones); the template is then restored, emptied of tools, replaced by the raw one, and set up again.
        """
        runtime = self.require_runtime()
        self.progress("KV checks: ~1k-token system prompt with tools")
        self._set_tools(TOOLS_JSON)
        cold = self.run("user", TURN_LIGHT, keep_history=True)
        self.report["performance"]["cold_system_prompt_prefill"] = cold.summary()
        state: dict[str, Any] = {"system_tokens": 0}

        def keep_history() -> CheckResult:
            continued = self.run("user", TURN_THANKS, keep_history=True)
            self.add(evaluate_kv_accounting(cold, continued))  # the engine's cached_tokens, from the same runs
            return evaluate_keep_history(cold, continued)

        self._step("a2_keep_history", 2, "keep_history=1 appends the new turn", keep_history)

        def clear_then_same_turn() -> CheckResult:
            runtime.clear_kv_cache(True)
            state["system_tokens"] = runtime.get_kv_cache_size()[0]
            state["warm"] = warm = self.run("user", TURN_LIGHT, keep_history=True)
            self.report["performance"]["warm_turn_prefill"] = warm.summary()
            return evaluate_clear_keeps_system(cold, warm, state["system_tokens"])

        self._step("a3_clear_keeps_system", 3, "clear_kv_cache(keep_system_prompt=1)", clear_then_same_turn)

        def tool_turn() -> CheckResult:
            if "warm" not in state:
                self._set_tools(TOOLS_JSON)
                state["warm"] = self.run("user", TURN_LIGHT, keep_history=True)
            return evaluate_tool_turn(state["warm"], self.run("tool", TOOL_RESULT_JSON, keep_history=True), cold)

        self._step("a10_tool_turn", 10, 'a role="tool" turn', tool_turn)

        def keep_history_off() -> CheckResult:
            first = self.run("user", TURN_TIME, keep_history=False)
            second = self.run("user", TURN_DAY, keep_history=False)
            return evaluate_keep_history_off(state["system_tokens"], first, second)

        self._step("a7_keep_history_off", 7, "keep_history=0", keep_history_off)

        def forced_call() -> CheckResult:
            if not self._chatml():
                return evaluate_forced_call(False, None)
            system = chatml_system_with_tools(SYSTEM_PROMPT)
            runtime.set_chat_template(system, CHATML_USER_PREFIX, CHATML_POSTFIX_FORCED)
            runtime.clear_kv_cache(False)
            return evaluate_forced_call(True, self.run("user", TURN_LIGHT, keep_history=False))

        self._step("a5_forced_call", 5, "ChatML markers in set_chat_template", forced_call)

        def restore() -> CheckResult:
            if not self._chatml():
                runtime.set_chat_template("", "", "")  # any custom template: the point is what comes back
            self._set_tools(TOOLS_JSON)
            restored = self.run("user", TURN_LIGHT, keep_history=True)
            thinking = None
            if self.model_class is not None and self.model_class.key.startswith("qwen3"):
                thinking = self.run("user", TURN_TIME, keep_history=False, enable_thinking=True)
            return evaluate_template_restore(cold, restored, thinking)

        self._step("a4_template_restore", 4, "set_function_tools after set_chat_template", restore)

        def empty_tools() -> CheckResult:
            self._set_tools("[]")
            return evaluate_empty_tools(cold, self.run("user", TURN_LIGHT, keep_history=True))

        self._step("a1_empty_tools", 1, 'set_function_tools with "[]"', empty_tools)

        def raw_template() -> CheckResult:
            self._set_tools("[]", SHORT_SYSTEM)
            templated = self.run("user", RAW_PROMPT, keep_history=False)
            runtime.set_chat_template("", "", "")
            runtime.clear_kv_cache(False)
            return evaluate_raw_template(templated, self.run("user", RAW_PROMPT, keep_history=False))

        self._step("a6_raw_template", 6, 'set_chat_template("", "", "")', raw_template)

        def cut_then_append() -> CheckResult:
            self._set_tools(TOOLS_JSON)
            self.run("user", TURN_LIGHT, keep_history=True)
            per_run = runtime.profile.per_run_sampling
            cap = CUT_MAX_NEW_TOKENS if per_run else BENCH_MAX_NEW_TOKENS
            cut = self.run("user", BENCH_PROMPT, keep_history=True, max_new_tokens=cap if per_run else 0)
            following = self.run("user", TURN_THANKS, keep_history=True)
            return evaluate_cut_then_append(cap, cut, following, cold)

        self._step("a9_cut_then_append", 9, "a run cut at max_new_tokens", cut_then_append)

        def abort_partial() -> CheckResult:
            return evaluate_abort(self.run("user", BENCH_PROMPT, keep_history=True, abort_after_first_text=True))

        self._step("a8_abort_partial_turn", 8, "an aborted keep_history=1 run", abort_partial)

    def prefix_switch_check(self) -> None:
        """What a switch of static prefix reuses (the planner's "reset" reports cached_tokens 0)."""
        self._step("prefix_switch", None, "a switch of system prompt", self._prefix_switch)

    def _prefix_switch(self) -> CheckResult:
        """The engine's "reset": another system prompt, clear_kv_cache(1), a keep_history=1 run; then on empty KV."""
        runtime = self.require_runtime()
        self._set_tools(TOOLS_JSON)
        self.run("user", TURN_LIGHT, keep_history=True)  # a conversation on the first prefix
        runtime.set_function_tools(SWITCH_SYSTEM_PROMPT, TOOLS_JSON, "tool_response")
        runtime.clear_kv_cache(True)
        kv_after_clear = runtime.get_kv_cache_size()[0]
        switched = self.run("user", TURN_LIGHT, keep_history=True)
        runtime.clear_kv_cache(False)
        return evaluate_prefix_switch(kv_after_clear, switched, self.run("user", TURN_LIGHT, keep_history=True))

    # -- slots ----------------------------------------------------------------------------------------------------

    def slot_checks(self) -> None:
        """Two runtime instances in two worker processes, as the engine's slots: init, concurrency, blocking.

        This process's own instance is released first, so exactly two instances exist, as with two slots.
        """
        self.progress(f"slots: {SLOT_COUNT} runtime instances in {SLOT_COUNT} worker processes")
        memory = self.report["performance"].get("memory_usage_mb") or 0.0
        size = self.report["model"].get("size_bytes") or 0
        needed = max(float(memory), size / (1024 * 1024))
        self.close()
        available = mem_available_mb()
        skipped = evaluate_slots_memory(needed, available)
        block_s = SLOT_BLOCK_S / self.speed if self.report["library"].get("emulator") else SLOT_BLOCK_S
        self.report["slots"] = {
            "count": SLOT_COUNT,
            "needed_per_instance_mb": round(needed, 1),
            "mem_available_mb": _round(available, 0),
            "base_domain_ids": list(range(SLOT_COUNT)),
            "block_s": round(block_s, 3),
            "skipped": skipped,
        }
        if skipped is not None:
            for check_id, title in SLOT_TITLES.items():
                self.add(_unknown_slots(check_id, title, skipped))
            return
        logs = [
            Path(tempfile.mkstemp(prefix=f"rkllm-selfcheck-slot{index}-", suffix=".log")[1])
            for index in range(SLOT_COUNT)
        ]
        workers: list[SlotWorker] = []
        try:
            workers = [SlotWorker(self._slot_config(index), logs[index]) for index in range(SLOT_COUNT)]
            self._slot_steps(workers, available, block_s)
        except SlotWorkerError as err:
            done = {check.id for check in self.checks}
            missing = [check_id for check_id in SLOT_TITLES if check_id not in done]
            for position, check_id in enumerate(missing):
                status: Status = "FAIL" if position == 0 else "UNKNOWN"
                detail = str(err) if position == 0 else f"not run: the slot checks stopped ({err})"
                self.add(CheckResult(check_id, None, SLOT_TITLES[check_id], status, detail))
        finally:
            for worker in workers:
                worker.close()
            for index, log in enumerate(logs):
                with contextlib.suppress(OSError):
                    text = log.read_text(encoding="utf-8", errors="replace")
                    self.capture.lines.extend(f"[slot {index}] {line}" for line in text.splitlines())
                with contextlib.suppress(OSError):
                    log.unlink()
            self.save()

    def _slot_config(self, index: int) -> dict[str, Any]:
        mask = self.options.cpu_mask if self.options.cpu_mask is not None else _cpu_mask_for_board()
        return {
            "library": str(self.options.library),
            "profile": self.report["library"]["profile"],
            "model": str(self.options.model),
            "context_length": self.options.context_length,
            "cpu_mask": mask,
            # One NPU IOMMU domain per instance, as for several models at once (docs/runtime.md §4.3, I#437).
            "base_domain_id": index,
        }

    def _slot_steps(self, workers: list[SlotWorker], available: float | None, block_s: float) -> None:
        replies = [worker.receive(SLOT_INIT_TIMEOUT_S) for worker in workers]  # both loaded at the same time
        instances = [
            SlotInstance(
                base_domain_id=index,
                load_ms=reply.get("load_ms"),
                rss_mb=reply.get("rss_mb"),
                hwm_mb=reply.get("hwm_mb"),
                error=None if reply.get("event") == "ready" else _with_line(reply.get("message"), worker),
            )
            for index, (reply, worker) in enumerate(zip(replies, workers, strict=True))
        ]
        self.add(evaluate_slots_init(instances, available, mem_available_mb()))
        if any(instance.error is not None for instance in instances):
            for check_id, title in list(SLOT_TITLES.items())[1:]:
                self.add(_unknown_slots(check_id, title, "not run: the two instances could not both be loaded"))
            return
        self.progress("slots: each instance alone, then both at once")
        alone = [workers[index].run(SLOT_PROMPTS[index]) for index in range(SLOT_COUNT)]
        together = self._slot_runs_together(workers, block_s=None)
        again = [
            workers[index].run(SLOT_PROMPTS[index]) if together[index].text != alone[index].text else None
            for index in range(SLOT_COUNT)
        ]
        self.add(evaluate_concurrent_output(alone, together, again))
        self.add(evaluate_shared_throughput(alone, together))
        self.progress(f"slots: both at once, slot 0 blocking {block_s:.2f} s in its callback")
        blocked = self._slot_runs_together(workers, block_s=block_s)
        again_first = workers[0].run(SLOT_PROMPTS[0]) if blocked[0].text != alone[0].text else None
        self.add(evaluate_block_resume(alone[0], blocked[0], again_first))
        self.add(evaluate_block_cost(alone[1], blocked[1], blocked[0]))

    @staticmethod
    def _slot_runs_together(workers: list[SlotWorker], block_s: float | None) -> list[SlotRun]:
        """One run per worker, all starting at one moment; with block_s, slot 0's callback blocks that long."""
        start_at = time.monotonic() + SLOT_START_DELAY_S
        for index, worker in enumerate(workers):
            block = block_s if index == 0 else None
            worker.send_run(SLOT_PROMPTS[index], start_at=start_at, block_s=block)
        return [worker.receive_run() for worker in workers]

    def _set_tools(self, tools_json: str, system_prompt: str = SYSTEM_PROMPT) -> None:
        """The engine's static prefix (set_function_tools), with an empty KV so the next run is cold."""
        runtime = self.require_runtime()
        runtime.set_function_tools(system_prompt, tools_json, "tool_response")
        runtime.clear_kv_cache(False)

    def _step(self, check_id: str, assumption: int | None, title: str, body: Callable[[], CheckResult]) -> None:
        self.progress(f"check {check_id}")
        try:
            result = body()
        except RkllmError as err:
            self.fail_step(check_id, assumption, title, err)
            return
        self.add(result)

    def _chatml(self) -> bool:
        """The engine's rule (docs/HISTORY.md): "qwen" in the file name, or an emulator model."""
        return "qwen" in self.options.model.name.lower() or read_emulator_model(self.options.model) is not None

    def require_runtime(self) -> Runtime:
        """The loaded runtime (load() succeeded)."""
        if self.runtime is None:
            raise RuntimeNotInitializedError("the runtime is not loaded")
        return self.runtime

    def close(self) -> None:
        """Release the runtime handle."""
        if self.runtime is not None:
            with contextlib.suppress(RkllmError):
                self.runtime.destroy()
            self.runtime = None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


@contextlib.contextmanager
def _session(options: Options) -> Iterator[SelfCheck]:
    with OutputCapture() as capture:
        check = SelfCheck(options, capture)
        try:
            yield check
        finally:
            check.close()
            capture.collect()


def run_selfcheck(options: Options) -> dict[str, Any]:
    """Run every step and return the report (also written to `options.json_path` as it goes)."""
    with _session(options) as check:
        try:
            check.load()
        except RkllmError as err:
            runtime_line = logparse.last_problem_line(check.capture.collect(), levels="E")
            check.report["errors"].append(str(err) if runtime_line is None else f"{err} ({runtime_line})")
            check.save()
            return check.report
        try:
            check.benchmark()
        except RkllmError as err:
            check.fail_step("performance", None, "speed against the published figures", err)
        try:
            check.kv_checks()
            check.prefix_switch_check()
        except RkllmError as err:
            check.report["errors"].append(f"the KV checks stopped: {err}")
        if options.slots:
            check.slot_checks()
        failed = any(result.status == "FAIL" for result in check.checks)
        check.report["exit_status"] = 1 if failed or check.report["errors"] else 0
        check.save()
    report = check.report
    report["runtime_log"] = check.capture.lines[-LOG_LINES_KEPT:]
    return report


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: object, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table."""
    library = report.get("library", {})
    driver = report.get("driver", {})
    model = report.get("model", {})
    host = report.get("host", {})
    lines = ["rkllm self-check (in-process diagnostic: the integration itself runs the runtime in a worker process)"]
    emulator = ""
    if library.get("emulator"):
        emulator = f", emulator at speed {library.get('emulator_speed'):g}"
    lines.append(
        f"  library   {library.get('path')}: librkllmrt {library.get('version', '?')}, "
        f"ABI {library.get('profile', '?')}"
        f" (from {library.get('version_source', '?')}{emulator})"
    )
    sysfs = driver.get("sysfs_version") or driver.get("sysfs_note") or "-"
    lines.append(
        f"  driver    rknpu {driver.get('version') or '?'} (from {driver.get('source') or '-'}); debugfs: {sysfs}"
    )
    lines.append(
        f"  platform  {driver.get('platform') or '?'} (board: {host.get('board') or '-'}; {host.get('machine')}, "
        f"{host.get('libc') or 'unknown libc'}, kernel {host.get('kernel')})"
    )
    model_class = model.get("class")
    class_text = f"class {model_class} (from {model.get('class_source')})" if model_class else "unknown class"
    lines.append(
        f"  model     {model.get('path')}: {class_text}; toolkit {model.get('toolkit_version') or '?'}, "
        f"max context {model.get('max_context_limit') or '?'}, target {model.get('target_platform') or '?'}"
    )
    for error in report.get("errors", []):
        lines.append(f"  error     {error}")
    performance = report.get("performance", {})
    if performance:
        reference = performance.get("reference") or {}
        factor = reference.get("speed_factor", 1.0) if reference else 1.0

        def scaled(key: str) -> float | None:
            value = reference.get(key)
            return None if value is None else float(value) * factor

        published = "published" if not reference else f"published ({reference['platform']} {reference['dtype']})"
        if reference and factor != 1.0:
            published += f", scaled by speed {factor:g}"
        rows = [
            ("load time", _fmt(performance.get("load_time_ms"), " ms", 0), "-"),
            (
                f"TTFT ({_fmt(performance.get('prompt_tokens'))}-token prompt)",
                _fmt(performance.get("ttft_ms"), " ms", 0),
                _fmt(None if reference.get("ttft_ms") is None else reference["ttft_ms"] / factor, " ms (128 tok)", 0),
            ),
            (
                "prefill",
                _fmt(performance.get("prefill_tokens_per_s"), " tok/s", 0),
                _fmt(scaled("prefill_tokens_per_s"), " tok/s", 0),
            ),
            (
                "decode",
                _fmt(performance.get("decode_tokens_per_s"), " tok/s", 2),
                _fmt(scaled("decode_tokens_per_s"), " tok/s", 2),
            ),
            ("memory", _fmt(performance.get("memory_usage_mb"), " MB", 0), _fmt(reference.get("memory_mb"), " MB", 0)),
        ]  # fmt: skip
        lines.append("")
        lines.append(f"  {'measure':<28} {'measured':>16}   {published}")
        lines.extend(f"  {name:<28} {measured:>16}   {ref}" for name, measured, ref in rows)
    slots = report.get("slots")
    if slots:
        lines.append("")
        if slots.get("skipped"):
            lines.append(f"  slots     {slots['skipped']}")
        else:
            lines.append(
                f"  slots     {slots.get('count')} instances in {slots.get('count')} processes (base_domain_id "
                f"{', '.join(str(domain) for domain in slots.get('base_domain_ids', []))}), "
                f"~{_fmt(slots.get('needed_per_instance_mb'), ' MB', 0)} each, MemAvailable "
                f"{_fmt(slots.get('mem_available_mb'), ' MB', 0)}; slot 0 blocks {_fmt(slots.get('block_s'), ' s', 2)} "
                "in its callback"
            )
    checks = report.get("checks", [])
    if checks:
        titles = [f"{check['assumption'] or '':>2} {check['title']}" for check in checks]
        width = max(len(title) for title in titles)
        lines.append("")
        lines.append(f"  {' #  check':<{width}}  {'result':<7}  detail (numbers: docs/HISTORY.md assumptions)")
        for title, check in zip(titles, checks, strict=True):
            lines.append(f"  {title:<{width}}  {check['status']:<7}  {check['detail']}")
    return "\n".join(lines)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < MIN_CONTEXT:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_CONTEXT}: the KV checks use a ~1k-token system prompt (got {number})"
        )
    return number


def _speed(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a number > 0 (0 would disable the delays being measured), got {value!r}"
        )
    return number


def _cpu_mask(value: str) -> int:
    try:
        mask = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit mask such as 0xf0, got {value!r}") from None
    if not 0 < mask < 256:
        raise argparse.ArgumentTypeError(f"must select 1 to 8 of CPUs 0-7 (0x01..0xff), got {value!r}")
    return mask


def parse_args(argv: list[str] | None) -> Options:
    """Command line → Options; argparse prints one error line and exits 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m rkllm_native.selfcheck",
        description="Measure librkllmrt + a model on this board and check the engine's KV-cache assumptions "
        "(in-process diagnostic; attach the --json report to bug reports).",
    )
    parser.add_argument("--library", required=True, type=Path, help="librkllmrt.so (or the emulator library)")
    parser.add_argument("--model", required=True, type=Path, help=".rkllm model file (or an emulator model)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, help="ABI profile override (default: detected)")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the report (schema 1) to this file")
    parser.add_argument(
        "--context", type=_positive_int, default=DEFAULT_CONTEXT, help=f"max_context_len (default {DEFAULT_CONTEXT})"
    )
    parser.add_argument(
        "--speed", type=_speed, help="emulator only: RKLLM_EMULATOR_SPEED; the published figures are scaled by it"
    )
    parser.add_argument("--cpu-mask", type=_cpu_mask, help="CPU cores for the runtime (default 0xf0, 0x0f on RK3562)")
    parser.add_argument(
        "--no-slots",
        dest="slots",
        action="store_false",
        help=f"skip the slot checks ({SLOT_COUNT} instances in {SLOT_COUNT} processes: more memory and ~1 minute)",
    )
    args = parser.parse_args(argv)
    json_path: Path | None = args.json_path
    if json_path is not None and not json_path.parent.is_dir():
        parser.error(f"--json: directory {json_path.parent} does not exist")
    return Options(
        library=args.library,
        model=args.model,
        profile=args.profile,
        context_length=args.context,
        speed=args.speed,
        json_path=json_path,
        cpu_mask=args.cpu_mask,
        slots=args.slots,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the self-check, print the table, return the exit status (0 pass, 1 a check failed, 2 could not run)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == [SLOT_WORKER_FLAG]:
        return slot_worker_main(arguments[1:])
    options = parse_args(arguments)
    try:
        report = run_selfcheck(options)
    except OSError as err:
        print(f"selfcheck: error: {err}", file=sys.stderr)
        return 2
    status = int(report["exit_status"])
    if status == 2 and report["errors"]:
        # Nothing was measured: the one line that names the problem (the JSON report has the rest).
        print(f"selfcheck: error: {report['errors'][0]}", file=sys.stderr)
        return status
    print(format_report(report))
    if options.json_path is not None:
        print(f"\nreport written to {options.json_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
