"""Does the worker + engine path keep up with a fast decoder? Raw callback rate vs tokens delivered.

Run from the repository root with the project venv (no installation needed: the repo root is put on
`sys.path` below):

    .venv/bin/python bench/stream_overhead.py [--reps 5] [--decode 2500] [--tokens 2400]

An emulator model decodes at `--decode` tokens/s (speed 1, prefill practically free) and answers every
prompt with a `--tokens`-token text. For each ABI profile:

- raw: `Runtime.run` in this process; tokens = `on_text` callbacks, time = the `run` call's wall time;
- delivered: `Engine.submit(...)` through the worker process, the framed protocol, the client, the
  scheduler and the output parser; tokens = `usage.completion_tokens` (the TextDelta events are counted
  too, as a check), time = from `submit` to the `Finished` event.

Rates are tokens / wall seconds. The CPU columns are CPU microseconds per token of all our processes
(raw: this process; delivered: this process + the worker): the intrinsic cost, which other processes'
load does not change. Raw and delivered runs alternate (one pair per repetition, after one
warm-up pair), so both see the same load from other processes; delivered_over_raw is the median of the
per-pair ratios. The summary line reports the profile with the lower ratio (target >= 0.95).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402 - after the sys.path set-up above
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from rkllm_engine.engine import Engine, EngineConfig  # noqa: E402
from rkllm_engine.types import ChatMessage, ChatRequest, Finished, TextDelta  # noqa: E402
from rkllm_native.build import emulator_library  # noqa: E402
from rkllm_native.runtime import PerfStat, RunInput, RunOptions, Runtime, RuntimeParams  # noqa: E402

PROFILES = ("v12x", "v130")
CONTEXT = 8192
PROMPT = "Tell me a long story."


@dataclass(frozen=True)
class Rate:
    """Tokens, wall seconds and CPU seconds (all our processes) of one run."""

    tokens: int
    seconds: float
    cpu_s: float

    @property
    def cpu_us_per_token(self) -> float:
        """CPU microseconds per token: our intrinsic cost, independent of other processes' load."""
        return self.cpu_s / self.tokens * 1e6

    @property
    def per_s(self) -> float:
        """Tokens per second."""
        return self.tokens / self.seconds


def long_answer(tokens: int) -> str:
    """Text of exactly `tokens` emulator tokens: words of <= 6 letters, each with its leading space one token."""
    words = ["tok", "word", "fast", "npu", "text", "long", "run", "yes"]
    return " ".join(words[i % len(words)] for i in range(tokens))


def write_model(directory: Path, decode: float, tokens: int) -> Path:
    """Model file (rkllm_native/emulator/MODEL_FORMAT.md): fast prefill, `decode` tok/s, one long answer."""
    path = directory / "stream.model"
    path.write_text(
        "rkllm-emulator-model 1\n"
        "name = stream-overhead\n"
        "load_time_ms = 10\n"
        f"max_context_limit = {CONTEXT}\n"
        "prefill_tokens_per_s = 1000000\n"
        f"decode_tokens_per_s = {decode}\n"
        f"default_answer = {long_answer(tokens)}\n"
    )
    return path


class CountingSink:
    """Counts text callbacks; the cheapest sink possible, i.e. the raw ceiling."""

    def __init__(self) -> None:
        self.pieces = 0

    def on_text(self, text: str, token_id: int) -> bool:
        """One decoded piece."""
        self.pieces += 1
        return False

    def on_finish(self, perf: PerfStat) -> None:
        """Nothing to do at the end."""

    def on_error(self, message: str) -> None:
        """A run error ends the bench."""
        raise SystemExit(f"bench/stream_overhead.py: runtime error: {message}")


@contextlib.contextmanager
def runtime_stdout_silenced() -> Iterator[None]:
    """The runtime prints its I/W/E lines to fd 1 (like the real library); keep them out of the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids() -> list[int]:
    """Our direct children (the engine's worker process)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def cpu_of_us() -> float:
    """CPU seconds of this process and its children so far (children still running are read live)."""
    return process_cpu_s(os.getpid()) + sum(process_cpu_s(pid) for pid in child_pids())


def raw_run(runtime: Runtime) -> Rate:
    """One in-process Runtime.run: callbacks / wall time of the call."""
    sink = CountingSink()
    cpu_start = process_cpu_s(os.getpid())
    start = time.perf_counter()
    runtime.run(RunInput(role="user", text=PROMPT), RunOptions(keep_history=False), sink)
    return Rate(sink.pieces, time.perf_counter() - start, process_cpu_s(os.getpid()) - cpu_start)


async def delivered_run(engine: Engine) -> tuple[Rate, int]:
    """One Engine.submit through the worker: completion tokens / (submit -> Finished), and the TextDelta count."""
    deltas = 0
    finished: Finished | None = None
    cpu_start = cpu_of_us()
    start = time.perf_counter()
    async for event in engine.submit(ChatRequest(messages=[ChatMessage("user", PROMPT)])):
        if isinstance(event, TextDelta):
            deltas += 1
        elif isinstance(event, Finished):
            finished = event
    elapsed = time.perf_counter() - start
    cpu_s = cpu_of_us() - cpu_start
    if finished is None:
        raise SystemExit("bench/stream_overhead.py: the generation ended without Finished")
    return Rate(finished.usage.completion_tokens, elapsed, cpu_s), deltas


async def measure(profile: str, model: Path, reps: int, max_new_tokens: int) -> list[tuple[Rate, Rate, int]]:
    """(raw, delivered, text deltas) per repetition.

    Raw and delivered runs alternate so both see the same load from other processes sharing the CPUs.
    """
    engine = Engine(
        EngineConfig(
            library_path=str(emulator_library(profile)),  # type: ignore[arg-type]
            model_path=str(model),
            context_length=CONTEXT,
            max_new_tokens=max_new_tokens,
            env={"RKLLM_EMULATOR_SPEED": "1"},
        )
    )
    await engine.start()
    pairs: list[tuple[Rate, Rate, int]] = []
    try:
        with runtime_stdout_silenced(), Runtime(emulator_library(profile), profile) as runtime:  # type: ignore[arg-type]
            runtime.init(RuntimeParams(model_path=model, max_context_len=CONTEXT, max_new_tokens=max_new_tokens))
            for rep in range(reps + 1):
                raw = raw_run(runtime)
                delivered, deltas = await delivered_run(engine)
                if rep:  # the first pair is the warm-up
                    pairs.append((raw, delivered, deltas))
    finally:
        await engine.stop()
    return pairs


async def main() -> None:
    """Measure both profiles, print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="measured runs per path and profile (after a warm-up)")
    parser.add_argument("--decode", type=float, default=2500.0, help="emulated decode tokens/s (>= 2000)")
    parser.add_argument("--tokens", type=int, default=2400, help="answer length in tokens")
    args = parser.parse_args()
    if args.reps < 1 or args.decode <= 0 or not 1 <= args.tokens < CONTEXT // 2:
        raise SystemExit(f"bench/stream_overhead.py: need --reps >= 1, --decode > 0, 1 <= --tokens < {CONTEXT // 2}")
    os.environ["RKLLM_EMULATOR_SPEED"] = "1"  # for the in-process raw runs
    max_new_tokens = args.tokens + 16

    print(f"decode {args.decode:g} tok/s emulated (speed 1), answer {args.tokens} tokens, median of {args.reps}")
    header = (
        f"{'abi':5} {'raw_tokens':>10} {'raw_tok_s':>10} {'raw_cpu_us/tok':>14} {'delivered_tokens':>16} "
        f"{'text_deltas':>11} {'delivered_tok_s':>15} {'deliv_cpu_us/tok':>16} {'delivered_over_raw':>18}"
    )
    print(header)
    print("-" * len(header))
    summaries: list[tuple[float, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="rkllm-bench-") as tmp:
        model = write_model(Path(tmp), args.decode, args.tokens)
        for profile in PROFILES:
            pairs = await measure(profile, model, args.reps, max_new_tokens)
            raw_tok_s = statistics.median(raw.per_s for raw, _, _ in pairs)
            delivered_tok_s = statistics.median(delivered.per_s for _, delivered, _ in pairs)
            ratio = statistics.median(delivered.per_s / raw.per_s for raw, delivered, _ in pairs)
            summaries.append((ratio, raw_tok_s, delivered_tok_s, profile))
            print(
                f"{profile:5} {statistics.median(raw.tokens for raw, _, _ in pairs):>10.0f} {raw_tok_s:>10.1f} "
                f"{statistics.median(raw.cpu_us_per_token for raw, _, _ in pairs):>14.0f} "
                f"{statistics.median(delivered.tokens for _, delivered, _ in pairs):>16.0f} "
                f"{statistics.median(deltas for _, _, deltas in pairs):>11.0f} {delivered_tok_s:>15.1f} "
                f"{statistics.median(delivered.cpu_us_per_token for _, delivered, _ in pairs):>16.0f} {ratio:>18.3f}"
            )
    ratio, raw_tok_s, delivered_tok_s, profile = min(summaries)
    print(f"summary: the lower of the two profiles ({profile}); target delivered_over_raw >= 0.95")
    print(f"raw_tok_s={raw_tok_s:.1f} delivered_tok_s={delivered_tok_s:.1f} delivered_over_raw={ratio:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
