"""500 runs in a row keep the process size flat: no buffer, callback or run state leaks per run."""

from __future__ import annotations

import gc
from pathlib import Path

from rkllm_native.runtime import RunInput, RunOptions, Runtime, RuntimeParams

from .binding_helpers import RecordingSink, write_model

WARM_UP_RUNS = 50
MEASURED_RUNS = 500
ALLOWED_GROWTH_KB = 8 * 1024


def vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_500_runs_keep_rss_stable(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path, "default_answer = Grüße aus dem Emulator, {{input}}!")
    runtime.init(RuntimeParams(model_path=model))
    adapter = tmp_path / "adapter.bin"
    adapter.write_bytes(b"lora")
    runtime.load_lora(adapter, "a")

    def one_run(index: int) -> None:
        sink = RecordingSink()
        options = RunOptions(keep_history=index % 2 == 0, lora_name="a" if index % 3 == 0 else None)
        text = f"request number {index}"
        outcome = runtime.run(RunInput(role="user", text=text), options, sink)
        assert outcome.perf is not None
        assert sink.text == f"Grüße aus dem Emulator, {text}!"
        if index % 2 == 0:
            runtime.clear_kv_cache(keep_system_prompt=True)

    for index in range(WARM_UP_RUNS):
        one_run(index)
    gc.collect()
    before = vm_rss_kb()
    for index in range(MEASURED_RUNS):
        one_run(index)
    gc.collect()
    growth = vm_rss_kb() - before
    print(f"VmRSS growth over {MEASURED_RUNS} runs after warm-up: {growth} kB")
    assert growth < ALLOWED_GROWTH_KB
