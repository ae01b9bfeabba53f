"""One emulated NPU shared by every run (MODEL_FORMAT.md §8.1): concurrent runs slow each other, blocked ones don't.

The engine keeps several runtime handles ("slots"), each in its own worker process, and pauses a generation by
blocking in its token callback. These tests check what that relies on, on the emulator: two runs at once each
take about twice as long as alone (two handles of one process, and two processes), a run blocked in its callback
costs the other run nothing and continues as if nothing happened, and `speed = 0` / `npu_sharing = false` turn
the model off. Durations are the runtime's own perf figures (emulated time), compared with generous ratios.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rkllm_native.build import emulator_library
from rkllm_native.errors import RuntimeInitError
from rkllm_native.runtime import PerfStat, RunInput, RunOptions, Runtime, RuntimeParams
from tests.conftest import REPO_ROOT

from .binding_helpers import RecordingSink, write_model

ANSWER_TOKENS = 100
ANSWER = " ".join(["w"] * ANSWER_TOKENS)  # "w", " w", …: one token each
PROMPT = "x " * 300  # ≈ 320 prompt tokens with the template
# 100 tokens at 200 tok/s = 0.5 s and ≈ 320 tokens at 1000 tok/s ≈ 0.32 s alone: long against the 2 ms quanta.
TIMED_MODEL = (
    "speed = 1",
    "decode_tokens_per_s = 200",
    "prefill_tokens_per_s = 1000",
    f"default_answer = {ANSWER}",
)
# Two at once: each run at least this much slower than the model's own rates (it says 2x). Against the nominal rates,
# not a measured "alone" run, this is a lower bound on time: a loaded machine only lengthens it.
SLOWER = 1.5
# A run next to a blocked one (or with sharing off): at most this much slower than alone. The model says 1x, shared
# says 2x; the bound sits between them, far enough from 1x that a loaded machine's jitter does not reach it.
UNHINDERED = 1.7
NOMINAL = PerfStat(prefill_time_ms=1.0, prefill_tokens=1, generate_time_ms=5.0, generate_tokens=1, memory_usage_mb=0)
_names = itertools.count()


@pytest.fixture
def npu_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An NPU of this test's own, so runs of other tests (or leftovers) never count."""
    name = f"test-{os.getpid()}-{next(_names)}"
    monkeypatch.setenv("RKLLM_EMULATOR_NPU", name)
    monkeypatch.delenv("RKLLM_EMULATOR_NPU_SHARING", raising=False)
    monkeypatch.delenv("RKLLM_EMULATOR_SPEED", raising=False)
    yield name
    Path(f"/dev/shm/rkllm-emu-npu1-{os.getuid()}-{name}").unlink(missing_ok=True)


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    opened: list[Runtime] = []
    yield opened
    for runtime in opened:
        runtime.destroy()


def open_runtime(opened: list[Runtime], model: Path, profile: str = "v130") -> Runtime:
    runtime = Runtime(emulator_library("v130" if profile == "v130" else "v12x"))
    opened.append(runtime)
    runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1))
    return runtime


@dataclass
class Timed:
    perf: PerfStat
    text: str


def run_once(runtime: Runtime, sink: RecordingSink | None = None, text: str = PROMPT) -> Timed:
    sink = sink if sink is not None else RecordingSink()
    outcome = runtime.run(RunInput(role="user", text=text), RunOptions(), sink)
    assert outcome.perf is not None, sink.errors
    return Timed(outcome.perf, sink.text)


def run_together(runtimes: list[Runtime]) -> list[Timed]:
    """Starts one run per runtime at the same moment and waits for all of them."""
    barrier = threading.Barrier(len(runtimes))
    results: list[Timed | BaseException | None] = [None] * len(runtimes)

    def one(index: int) -> None:
        barrier.wait()
        try:
            results[index] = run_once(runtimes[index])
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            results[index] = err

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(runtimes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    finished: list[Timed] = []
    for result in results:
        assert isinstance(result, Timed), result
        finished.append(result)
    return finished


def slow_down(together: PerfStat, alone: PerfStat) -> tuple[float, float]:
    """How much longer prefill and decode took (per token) than alone."""
    prefill = (together.prefill_time_ms / together.prefill_tokens) / (alone.prefill_time_ms / alone.prefill_tokens)
    decode = (together.generate_time_ms / together.generate_tokens) / (alone.generate_time_ms / alone.generate_tokens)
    return prefill, decode


def test_two_handles_of_one_process_each_run_about_half_as_fast(
    npu_name: str, runtimes: list[Runtime], tmp_path: Path
) -> None:
    model = write_model(tmp_path, *TIMED_MODEL)
    first, second = open_runtime(runtimes, model), open_runtime(runtimes, model)
    alone = run_once(first)
    first.clear_kv_cache(False)
    assert alone.perf.generate_tokens == ANSWER_TOKENS
    together = run_together([first, second])
    for result in together:
        assert result.text == alone.text
        assert result.perf.prefill_tokens == alone.perf.prefill_tokens
        prefill, decode = slow_down(result.perf, NOMINAL)
        print(f"two handles at once: prefill {prefill:.2f}x, decode {decode:.2f}x slower than the model's rates")
        assert prefill > SLOWER
        assert decode > SLOWER


DRIVER = """
import json, sys
from rkllm_native.runtime import RunInput, RunOptions, Runtime, RuntimeParams
from tests.native.binding_helpers import RecordingSink
runtime = Runtime(sys.argv[1])
runtime.init(RuntimeParams(model_path=sys.argv[2], max_new_tokens=-1))
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # "go"
sink = RecordingSink()
outcome = runtime.run(RunInput(role="user", text=sys.argv[3]), RunOptions(), sink)
perf = outcome.perf
print(json.dumps({"text": sink.text, "perf": None if perf is None else [perf.prefill_time_ms, perf.prefill_tokens,
      perf.generate_time_ms, perf.generate_tokens, perf.memory_usage_mb]}), flush=True)
runtime.destroy()
"""


def run_in_processes(count: int, model: Path, profile: str) -> list[Timed]:
    """`count` worker-like processes, each with its own runtime handle; their runs start together."""
    library = emulator_library("v130" if profile == "v130" else "v12x")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(library), str(model), PROMPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        for _ in range(count)
    ]
    try:

        def reply(child: subprocess.Popen[str]) -> dict[str, object]:
            assert child.stdout is not None
            while line := child.stdout.readline():
                if line.startswith("{"):
                    parsed: dict[str, object] = json.loads(line)
                    return parsed
            raise AssertionError(f"the driver ended early: {child.wait(timeout=30)} {child.stderr}")

        for child in children:
            assert reply(child) == {"ready": True}
        for child in children:  # both are initialised: start them as close together as two writes
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            answer = reply(child)
            perf = answer["perf"]
            assert isinstance(perf, list)
            results.append(Timed(PerfStat(*perf), str(answer["text"])))
        return results
    finally:
        for child in children:
            child.communicate(timeout=60)


@pytest.mark.parametrize("profile", ["v12x", "v130"])
def test_two_worker_processes_each_run_about_half_as_fast(npu_name: str, tmp_path: Path, profile: str) -> None:
    model = write_model(tmp_path, *TIMED_MODEL)
    [alone] = run_in_processes(1, model, profile)
    together = run_in_processes(2, model, profile)
    for result in together:
        assert result.text == alone.text == ANSWER
        prefill, decode = slow_down(result.perf, NOMINAL)
        print(f"two processes at once ({profile}): prefill {prefill:.2f}x, decode {decode:.2f}x slower than nominal")
        assert prefill > SLOWER
        assert decode > SLOWER


class BlockingSink(RecordingSink):
    """Blocks inside the callback of its first token until released, as the engine pauses a generation."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.blocked_for = 0.0

    def on_text(self, text: str, token_id: int) -> bool:
        paused = super().on_text(text, token_id)
        if not self.blocked.is_set():
            started = time.monotonic()
            self.blocked.set()
            assert self.release.wait(timeout=60)
            self.blocked_for = time.monotonic() - started
        return paused


def test_a_run_blocked_in_its_callback_costs_the_other_nothing_and_continues_unchanged(
    npu_name: str, runtimes: list[Runtime], tmp_path: Path
) -> None:
    model = write_model(tmp_path, *TIMED_MODEL)
    paused_one, other = open_runtime(runtimes, model), open_runtime(runtimes, model)
    alone = run_once(other)
    other.clear_kv_cache(False)
    sink = BlockingSink()
    outcome: list[Timed] = []
    blocked_run = threading.Thread(target=lambda: outcome.append(run_once(paused_one, sink)))
    blocked_run.start()
    try:
        assert sink.blocked.wait(timeout=30)
        # The whole of the other run happens while the first one sits in its callback.
        beside = run_once(other)
    finally:
        sink.release.set()
        blocked_run.join(timeout=60)
    assert beside.text == alone.text
    prefill, decode = slow_down(beside.perf, alone.perf)
    print(f"beside a blocked run: prefill {prefill:.2f}x, decode {decode:.2f}x of alone")
    assert prefill < UNHINDERED
    assert decode < UNHINDERED
    # The blocked run went on as if nothing happened; its perf counts NPU time only, not the block (§7).
    [resumed] = outcome
    assert resumed.text == alone.text
    assert resumed.perf.generate_tokens == alone.perf.generate_tokens
    assert sink.blocked_for * 1000 > alone.perf.generate_time_ms  # the block outlasted a whole generation…
    assert resumed.perf.generate_time_ms < UNHINDERED * alone.perf.generate_time_ms  # …and is not in the perf


def test_sharing_off_or_speed_0_leaves_runs_independent(
    npu_name: str, runtimes: list[Runtime], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = write_model(tmp_path, *TIMED_MODEL, "npu_sharing = false", name="off.model")
    first, second = open_runtime(runtimes, off), open_runtime(runtimes, off)
    alone = run_once(first)
    first.clear_kv_cache(False)
    for result in run_together([first, second]):
        assert slow_down(result.perf, alone.perf)[1] < UNHINDERED
    # The environment overrides the model file, both ways.
    monkeypatch.setenv("RKLLM_EMULATOR_NPU_SHARING", "on")
    forced = [open_runtime(runtimes, off), open_runtime(runtimes, off)]
    for result in run_together(forced):
        assert slow_down(result.perf, NOMINAL)[1] > SLOWER
    monkeypatch.setenv("RKLLM_EMULATOR_NPU_SHARING", "off")
    shared = write_model(tmp_path, *TIMED_MODEL, name="shared.model")
    for result in run_together([open_runtime(runtimes, shared), open_runtime(runtimes, shared)]):
        assert slow_down(result.perf, alone.perf)[1] < UNHINDERED
    # speed 0 never sleeps, shared or not.
    monkeypatch.delenv("RKLLM_EMULATOR_NPU_SHARING")
    monkeypatch.setenv("RKLLM_EMULATOR_SPEED", "0")
    instant = [open_runtime(runtimes, shared), open_runtime(runtimes, shared)]
    for result in run_together(instant):
        assert result.perf.generate_time_ms < 50
        assert result.text == ANSWER


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("RKLLM_EMULATOR_NPU_SHARING", "maybe", "E rkllm: RKLLM_EMULATOR_NPU_SHARING must be on or off, got 'maybe'"),
        (
            "RKLLM_EMULATOR_NPU",
            "../etc",
            "E rkllm: RKLLM_EMULATOR_NPU must be 1-64 letters, digits, '.', '_' or '-', got '../etc'",
        ),
    ],
)
def test_a_bad_npu_setting_fails_init_with_one_line(
    npu_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    line: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with Runtime(emulator_library("v12x")) as runtime, pytest.raises(RuntimeInitError):
        runtime.init(RuntimeParams(model_path=write_model(tmp_path, "default_answer = x")))
    assert capfd.readouterr().out.splitlines() == [line]


def test_a_bad_npu_sharing_key_names_the_line(npu_name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path, "npu_sharing = yes")
    with Runtime(emulator_library("v12x")) as runtime, pytest.raises(RuntimeInitError):
        runtime.init(RuntimeParams(model_path=model))
    assert f"E rkllm: emulator model {model}:4: npu_sharing must be true or false, got 'yes'" in capfd.readouterr().out


CRASH_DRIVER = """
import sys, threading
from rkllm_native.runtime import RunInput, RunOptions, Runtime, RuntimeParams
from tests.native.binding_helpers import RecordingSink
runtime = Runtime(sys.argv[1])
runtime.init(RuntimeParams(model_path=sys.argv[2], max_new_tokens=-1))
runtime.run(RunInput(role="user", text="crash"), RunOptions(), RecordingSink())
"""


def test_a_crashed_worker_does_not_slow_the_npu_forever(npu_name: str, runtimes: list[Runtime], tmp_path: Path) -> None:
    # A worker dies in the middle of a run (while computing): its table entry stays behind with a dead pid.
    crashing = write_model(tmp_path, *TIMED_MODEL, "fault = crash_after_tokens:5", name="crash.model")
    child = subprocess.run(
        [sys.executable, "-c", CRASH_DRIVER, str(emulator_library("v130")), str(crashing)],
        capture_output=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert child.returncode < 0  # killed by SIGSEGV
    healthy = write_model(tmp_path, *TIMED_MODEL, name="healthy.model")
    runtime = open_runtime(runtimes, healthy)
    first = run_once(runtime)
    runtime.clear_kv_cache(False)
    second = run_once(runtime)
    for result in (first, second):
        rate = result.perf.generate_tokens / (result.perf.generate_time_ms / 1000)
        assert rate > 200 / UNHINDERED  # the dead worker's entry is not counted
