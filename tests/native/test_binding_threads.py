"""abort(), busy runs and destroy() from another thread while run() blocks in rkllm_run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rkllm_native.errors import RuntimeBusyError, RuntimeNotInitializedError
from rkllm_native.runtime import RunInput, RunOptions, RunOutcome, Runtime, RuntimeParams

from .binding_helpers import RecordingSink, write_model

LONG_ANSWER = " ".join(f"word{index}" for index in range(200))  # 400 tokens: 20 s at 20 tok/s
# The tests wait for events (a first text, run() returning) with generous timeouts, never for the clock. A run that
# ends long before its natural end with `aborted` and no finish was ended by the abort; no late event is proven by
# destroy(), after which the runtime can call nobody back.


class RunThread:
    """Runs `runtime.run` on its own thread and records when it returned."""

    def __init__(self, runtime: Runtime, text: str, sink: RecordingSink) -> None:
        self.sink = sink
        self.outcome: RunOutcome | None = None
        self.error: BaseException | None = None
        self.returned_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(runtime, text), daemon=True)

    def _run(self, runtime: Runtime, text: str) -> None:
        try:
            self.outcome = runtime.run(RunInput(role="user", text=text), RunOptions(), self.sink)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc
        finally:
            self.returned_at = time.monotonic()
            self.sink.run_returned = True

    def start(self) -> RunThread:
        self._thread.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "run() did not return"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def slow_decode_runtime(runtime: Runtime, tmp_path: Path) -> Runtime:
    model = write_model(tmp_path, "speed = 1", "decode_tokens_per_s = 20", f"default_answer = {LONG_ANSWER}")
    runtime.init(RuntimeParams(model_path=model))
    return runtime


def test_abort_mid_prefill_returns_promptly_without_events(runtime: Runtime, tmp_path: Path) -> None:
    # About 2000 prompt tokens at 10 tok/s: 200 s of prefill, in chunks of 16 tokens (1.6 s); join() waits 60 s.
    model = write_model(tmp_path, "speed = 1", "prefill_tokens_per_s = 10", "prefill_chunk_tokens = 16")
    runtime.init(RuntimeParams(model_path=model))
    sink = RecordingSink()
    worker = RunThread(runtime, "word " * 1000, sink).start()
    wait_for(runtime.native_is_running)  # inside rkllm_run: an abort cannot come before the run
    runtime.abort()
    worker.join()  # long before the prefill's natural end: the abort ended it
    assert worker.error is None
    assert worker.outcome is not None
    assert worker.outcome.aborted
    assert worker.outcome.perf is None
    assert not runtime.is_running()
    runtime.destroy()  # a barrier: after it nothing can call the sink back
    assert sink.events == []


def test_abort_mid_decode_returns_promptly_and_no_event_follows(slow_decode_runtime: Runtime) -> None:
    runtime = slow_decode_runtime
    sink = RecordingSink()
    worker = RunThread(runtime, "tell me everything", sink).start()
    assert sink.first_text.wait(30)
    runtime.abort()
    texts_at_abort = len(sink.texts)
    worker.join()
    assert worker.error is None
    assert worker.outcome is not None
    assert worker.outcome.aborted
    assert not worker.outcome.paused
    assert worker.returned_at is not None
    assert 0 < len(sink.texts) == texts_at_abort < 400  # silenced at the abort, long before the answer's end
    assert LONG_ANSWER.startswith(sink.text)
    assert "finish" not in sink.kinds
    runtime.destroy()  # a barrier: after it nothing can call the sink back
    assert len(sink.texts) == texts_at_abort
    assert all(not event.after_return for event in sink.events)


def test_abort_when_idle_is_a_no_op_and_not_sticky(slow_decode_runtime: Runtime, tmp_path: Path) -> None:
    runtime = slow_decode_runtime
    runtime.abort()
    runtime.destroy()
    runtime.init(RuntimeParams(model_path=write_model(tmp_path, "default_answer = still answering", name="fast.model")))
    runtime.abort()
    sink = RecordingSink()
    outcome = runtime.run(RunInput(role="user", text="x"), RunOptions(), sink)
    assert not outcome.aborted
    assert sink.text == "still answering"


def test_second_run_while_one_runs_is_refused(slow_decode_runtime: Runtime) -> None:
    runtime = slow_decode_runtime
    worker = RunThread(runtime, "first", RecordingSink()).start()
    try:
        assert worker.sink.first_text.wait(30)
        with pytest.raises(RuntimeBusyError) as caught:
            runtime.run(RunInput(role="user", text="second"), RunOptions(), RecordingSink())
        assert str(caught.value) == "a run is already in progress on this runtime; runs are one at a time"
        assert runtime.is_running()
    finally:
        runtime.abort()
        worker.join()
    assert worker.outcome is not None
    assert worker.outcome.aborted


def test_destroy_during_a_run_aborts_it_and_is_idempotent(slow_decode_runtime: Runtime) -> None:
    runtime = slow_decode_runtime
    worker = RunThread(runtime, "first", RecordingSink()).start()
    assert worker.sink.first_text.wait(30)
    runtime.destroy()  # the run had 20 s to go: its aborted outcome shows destroy() ended it
    worker.join()
    assert worker.outcome is not None
    assert worker.outcome.aborted
    assert not runtime.initialized
    runtime.destroy()
    with pytest.raises(RuntimeNotInitializedError) as caught:
        runtime.get_kv_cache_size()
    assert str(caught.value) == "the runtime has no model loaded: call init() first (or it was destroyed)"


def test_abort_delay_of_the_runtime_is_waited_out(runtime: Runtime, tmp_path: Path) -> None:
    # [Inf] I#400 saw an abort take about 1.3 s; the emulator models it with abort_delay_ms.
    model = write_model(
        tmp_path, "speed = 1", "decode_tokens_per_s = 50", "abort_delay_ms = 300", f"default_answer = {LONG_ANSWER}"
    )
    runtime.init(RuntimeParams(model_path=model))
    sink = RecordingSink()
    worker = RunThread(runtime, "x", sink).start()
    assert sink.first_text.wait(30)
    aborted_at = time.monotonic()
    runtime.abort()
    texts_at_abort = len(sink.texts)
    worker.join()
    assert worker.outcome is not None
    assert worker.outcome.aborted
    assert worker.returned_at is not None
    # The runtime kept generating for another 0.3 s, but the sink was silenced at once.
    assert len(sink.texts) == texts_at_abort
    assert worker.returned_at - aborted_at > 0.25  # a lower bound: load only lengthens it


def test_sink_may_abort_from_inside_the_callback(slow_decode_runtime: Runtime) -> None:
    runtime = slow_decode_runtime

    class AbortingSink(RecordingSink):
        def on_text(self, text: str, token_id: int) -> bool:
            super().on_text(text, token_id)
            if len(self.texts) == 2:
                runtime.abort()
            return False

    sink = AbortingSink()
    outcome = runtime.run(RunInput(role="user", text="x"), RunOptions(), sink)
    assert outcome.aborted  # after 2 of 400 tokens (20 s): the abort from the callback ended it
    assert len(sink.texts) == 2
