"""Time to first token of a voice command on the real Assist prompt: cold engine vs warm static prefix.

Run from the repository root with the project venv (no installation needed: the repo root is put on
`sys.path` below):

    .venv/bin/python bench/ttft.py [--reps 5] [--speed 10]

Setup: the demo model `rkllm_native/emulator/models/qwen2.5-1.5b-assist.model` (calibration
qwen2.5-1.5b-rk3588: prefill 338 tok/s, decode 16.69 tok/s, docs/runtime.md §10.1) on both emulator ABIs.
The request is Home Assistant 2026.2.3's real Assist prompt (system = default_instructions + api_prompt,
tools = the Assist tools, from tests/fixtures/assist/assist_dump_2026.2.3.json) with the voice command
"turn on the kitchen light".

- cold: a fresh engine (new worker, model loaded, empty KV cache): the whole prompt is prefilled;
- warm: the same command again as a new conversation right after: same static prefix (system + tools),
  which the engine keeps resident in the KV cache, so only the new user turn is prefilled.

Two latencies per request:
- `call_ready`: the engine's `Perf.ttft_s` = slot grant -> first visible event. The answer is a tool call,
  and the engine emits a call only once it is complete, so this contains the whole call's decoding (~32
  tokens, about 1.9 s at 16.69 tok/s on the board) besides the prefill and the engine's own overhead.
- `first_token`: time to the first generated token = the runtime's perf figures for this run (prefill time
  + one decode step) x speed, plus the engine overhead unscaled. This is the TTFT of the final line.
- `overhead_ms`: the part of `call_ready` not spent inside the runtime (wall `ttft_s` minus the run's
  prefill + generate time): prep calls (set_function_tools, clear_kv_cache, get_kv_cache_size), IPC,
  parsing. It is real time of our code, so it is never multiplied by speed.

Every emulated delay runs `speed` times faster. "board" figures are emulated RK3588 seconds (emulated time
x speed, plus the unscaled overhead); "wall" figures are the raw seconds measured here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402 - after the sys.path set-up above
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from rkllm_engine.engine import Engine, EngineConfig  # noqa: E402
from rkllm_engine.types import ChatMessage, ChatRequest, Finished, Priority, ToolCallStart  # noqa: E402
from rkllm_native.build import emulator_library  # noqa: E402

ASSIST_DUMP = REPO_ROOT / "tests/fixtures/assist/assist_dump_2026.2.3.json"
MODEL = REPO_ROOT / "rkllm_native/emulator/models/qwen2.5-1.5b-assist.model"
CALIBRATION = "qwen2.5-1.5b-rk3588"
COMMAND = "turn on the kitchen light"
PROFILES = ("v12x", "v130")


@dataclass(frozen=True)
class Sample:
    """One request's figures, in wall seconds."""

    prompt_tokens: int
    prefilled_tokens: int
    runtime_first_token_wall_s: float  # prefill + one decode step, from the runtime's perf
    call_ready_wall_s: float  # engine Perf.ttft_s: slot grant -> the complete tool call
    overhead_wall_s: float  # call_ready minus the time the runtime spent on this run

    def first_token_board_s(self, speed: float) -> float:
        """Emulated runtime time scaled to the board, plus our own (unscaled) overhead."""
        return self.runtime_first_token_wall_s * speed + self.overhead_wall_s

    def first_token_wall_s(self) -> float:
        """What the first token took here."""
        return self.runtime_first_token_wall_s + self.overhead_wall_s

    def call_ready_board_s(self, speed: float) -> float:
        """The complete tool call on the board: runtime time scaled, overhead not."""
        return (self.call_ready_wall_s - self.overhead_wall_s) * speed + self.overhead_wall_s


def assist_request() -> ChatRequest:
    """A fresh voice turn: the Assist system prompt and tools plus the command, no history."""
    dump = json.loads(ASSIST_DUMP.read_text())
    return ChatRequest(
        messages=[
            ChatMessage("system", dump["default_instructions"] + dump["api_prompt"]),
            ChatMessage("user", COMMAND),
        ],
        tools=dump["tools"],
        priority=Priority.CONVERSATION,
    )


async def one_request(engine: Engine) -> Sample:
    """Submit the command and read the figures from its Finished event."""
    finished: Finished | None = None
    called = False
    async for event in engine.submit(assist_request()):
        called = called or isinstance(event, ToolCallStart)
        if isinstance(event, Finished):
            finished = event
    if finished is None or not called or finished.perf.ttft_s is None:
        raise SystemExit(f"bench/ttft.py: the model did not answer {COMMAND!r} with a tool call: {finished}")
    perf = finished.perf
    step_ms = perf.generate_time_ms / perf.generate_tokens if perf.generate_tokens else 0.0
    runtime_s = (perf.prefill_time_ms + perf.generate_time_ms) / 1000
    return Sample(
        prompt_tokens=finished.usage.prompt_tokens,
        prefilled_tokens=perf.prefill_tokens,
        runtime_first_token_wall_s=(perf.prefill_time_ms + step_ms) / 1000,
        call_ready_wall_s=perf.ttft_s,
        overhead_wall_s=max(0.0, perf.ttft_s - runtime_s),
    )


async def measure(profile: str, reps: int, speed: float) -> tuple[list[Sample], list[Sample]]:
    """`reps` x (fresh engine: cold request, then warm request)."""
    cold: list[Sample] = []
    warm: list[Sample] = []
    for _ in range(reps):
        engine = Engine(
            EngineConfig(
                library_path=str(emulator_library(profile)),  # type: ignore[arg-type]
                model_path=str(MODEL),
                env={"RKLLM_EMULATOR_SPEED": str(speed)},
            )
        )
        await engine.start()
        try:
            cold.append(await one_request(engine))
            warm.append(await one_request(engine))
        finally:
            await engine.stop()
    return cold, warm


def median(values: list[float]) -> float:
    """Median over the repetitions."""
    return statistics.median(values)


async def main() -> None:
    """Measure both ABI profiles, print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per profile (median reported)")
    parser.add_argument("--speed", type=float, default=10.0, help="emulator speed factor (delays / speed)")
    args = parser.parse_args()
    if args.reps < 1 or args.speed <= 0:
        raise SystemExit("bench/ttft.py: --reps must be >= 1 and --speed > 0")
    speed = args.speed

    print(f"model {MODEL.name} (calibration {CALIBRATION}), command {COMMAND!r}, speed x{speed:g}, reps {args.reps}")
    print("board = emulated runtime time x speed + our unscaled overhead (RK3588 seconds); wall = raw seconds here")
    header = (
        f"{'abi':5} {'phase':5} {'prompt_tok':>10} {'prefilled':>9} {'first_token_board_s':>19} "
        f"{'first_token_wall_s':>18} {'call_ready_board_s':>18} {'call_ready_wall_s':>17} {'overhead_ms':>11}"
    )
    print(header)
    print("-" * len(header))
    all_cold: list[Sample] = []
    all_warm: list[Sample] = []
    for profile in PROFILES:
        cold, warm = await measure(profile, args.reps, speed)
        all_cold += cold
        all_warm += warm
        for phase, samples in (("cold", cold), ("warm", warm)):
            print(
                f"{profile:5} {phase:5} {median([s.prompt_tokens for s in samples]):>10.0f} "
                f"{median([s.prefilled_tokens for s in samples]):>9.0f} "
                f"{median([s.first_token_board_s(speed) for s in samples]):>19.3f} "
                f"{median([s.first_token_wall_s() for s in samples]):>18.4f} "
                f"{median([s.call_ready_board_s(speed) for s in samples]):>18.3f} "
                f"{median([s.call_ready_wall_s for s in samples]):>17.4f} "
                f"{median([s.overhead_wall_s * 1000 for s in samples]):>11.1f}"
            )
    cold_s = median([s.first_token_board_s(speed) for s in all_cold])
    warm_s = median([s.first_token_board_s(speed) for s in all_warm])
    ready_ratio = median([s.call_ready_board_s(speed) for s in all_warm]) / median(
        [s.call_ready_board_s(speed) for s in all_cold]
    )
    print(f"call_ready warm/cold = {ready_ratio:.3f} on the board (includes decoding the whole tool call)")
    print(
        "summary: ttft = time to first token, emulated board seconds, median over both ABIs (target warm/cold <= 0.15)"
    )
    print(
        f"ttft_cold_s={cold_s:.3f} ttft_warm_s={warm_s:.3f} warm_over_cold={warm_s / cold_s:.3f} "
        f"prompt_tokens={median([s.prompt_tokens for s in all_cold]):.0f} profile={CALIBRATION}"
    )


if __name__ == "__main__":
    asyncio.run(main())
