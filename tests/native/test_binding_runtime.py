"""The Runtime binding against both emulator flavours: generation, callbacks, KV cache, and configuration calls."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rkllm_native.build import emulator_library
from rkllm_native.detect import detect_version, identify_library
from rkllm_native.errors import (
    InvalidParameterError,
    LoraAdapterFileError,
    PromptCacheFileError,
    RuntimeCallError,
    UnsupportedOnProfileError,
)
from rkllm_native.runtime import PerfStat, RunInput, RunOptions, Runtime, RuntimeParams, SamplingParams

from .binding_helpers import RecordingSink, write_model

HELLO_ANSWER = "Hello there, friend."
TOOLS_JSON = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "HassTurnOn",
                "description": "Turns on a device",
                "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
            },
        }
    ]
)


@pytest.fixture
def chat_model(tmp_path: Path) -> Path:
    return write_model(
        tmp_path,
        f'answer user "hello" = {HELLO_ANSWER}',
        'answer user "light" = <tool_call>\\n{"name": "{{tool:HassTurnOn}}", "arguments": {"name": "Kitchen"}}'
        "\\n</tool_call>",
        'answer tool "*" = Done, the light is on.',
        "default_answer = You said: {{input}}",
    )


@pytest.fixture
def chat_runtime(runtime: Runtime, chat_model: Path) -> Runtime:
    runtime.init(RuntimeParams(model_path=chat_model, max_context_len=1024))
    return runtime


def run_text(runtime: Runtime, text: str, opts: RunOptions | None = None) -> tuple[RecordingSink, PerfStat | None]:
    sink = RecordingSink()
    outcome = runtime.run(RunInput(role="user", text=text), opts or RunOptions(), sink)
    sink.run_returned = True
    assert outcome.error is None
    assert not outcome.aborted
    return sink, outcome.perf


def test_emulator_libraries_are_detected_as_123_and_130() -> None:
    assert detect_version(emulator_library("v12x")) == "1.2.3"
    assert detect_version(emulator_library("v130")) == "1.3.0"
    assert identify_library(emulator_library("v12x")).profile == "v12x"
    assert identify_library(emulator_library("v130")).profile == "v130"


def test_runtime_reports_version_and_profile(runtime: Runtime, binding_profile: str) -> None:
    assert runtime.profile.name == binding_profile
    assert runtime.version == ("1.3.0" if binding_profile == "v130" else "1.2.3")
    assert not runtime.initialized


def test_run_streams_the_answer_then_finish_with_perf(chat_runtime: Runtime) -> None:
    sink = RecordingSink()
    outcome = chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), sink)
    assert sink.text == HELLO_ANSWER
    assert sink.kinds[-1] == "finish"
    assert sink.kinds.count("finish") == 1
    assert outcome.return_code == 0
    assert (outcome.aborted, outcome.paused, outcome.error) == (False, False, None)
    assert outcome.perf is not None
    assert outcome.perf == sink.events[-1].perf
    assert outcome.perf.prefill_tokens > 0
    assert outcome.perf.generate_tokens == len(sink.texts)
    assert outcome.perf.memory_usage_mb > 0
    assert all(event.token_id >= 0 for event in sink.events if event.kind == "text")


def test_token_input_reaches_the_runtime_as_tokens(chat_runtime: Runtime) -> None:
    sink = RecordingSink()
    outcome = chat_runtime.run(RunInput(role="user", token_ids=[11, 22, 33]), RunOptions(), sink)
    # TOKEN input has no text for the answer rules: the default answer with an empty {{input}}.
    assert sink.text == "You said: "
    assert outcome.perf is not None
    assert outcome.perf.prefill_tokens == 3


@pytest.mark.parametrize("utf8_split", ["waiting", "raw"])
@pytest.mark.parametrize("chars_per_token", [1, 3])
def test_utf8_split_across_tokens_decodes_exactly(
    runtime: Runtime, tmp_path: Path, utf8_split: str, chars_per_token: int
) -> None:
    answer = "Grüße 😀 日本語"
    model = write_model(
        tmp_path,
        f"utf8_split = {utf8_split}",
        f"chars_per_token = {chars_per_token}",
        f"default_answer = {answer}",
    )
    runtime.init(RuntimeParams(model_path=model))
    sink = RecordingSink()
    outcome = runtime.run(RunInput(role="user", text="greet me"), RunOptions(), sink)
    assert sink.text == answer
    assert "\ufffd" not in sink.text
    assert outcome.perf is not None
    # Tokens that end inside a character produce no text of their own (WAITING, or bytes held by the decoder).
    assert len(sink.texts) < outcome.perf.generate_tokens


def test_enable_thinking_reaches_the_runtime(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path, "thinking = true", "thinking_text = pondering", "default_answer = done")
    runtime.init(RuntimeParams(model_path=model))
    thinking = RecordingSink()
    runtime.run(RunInput(role="user", text="x", enable_thinking=True), RunOptions(), thinking)
    assert thinking.text == "<think>\npondering\n</think>\n\ndone"
    plain = RecordingSink()
    runtime.run(RunInput(role="user", text="x", enable_thinking=False), RunOptions(), plain)
    assert plain.text == "done"


def test_error_state_reaches_the_sink_and_the_outcome(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path, "fault = error_after_tokens:3", "default_answer = one two three four five six")
    runtime.init(RuntimeParams(model_path=model))
    sink = RecordingSink()
    outcome = runtime.run(RunInput(role="user", text="go"), RunOptions(), sink)
    assert outcome.return_code == -1
    assert outcome.error is not None
    assert "error after 3 generated tokens" in outcome.error
    assert sink.errors == [outcome.error]
    assert sink.text == "one two three"  # three tokens: "one", " two", " three"
    assert "finish" not in sink.kinds
    assert outcome.perf is None


def test_context_overflow_is_an_error_not_a_crash(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path, f"default_answer = {HELLO_ANSWER}")
    runtime.init(RuntimeParams(model_path=model, max_context_len=64))
    sink = RecordingSink()
    outcome = runtime.run(RunInput(role="user", text="word " * 100), RunOptions(), sink)
    assert outcome.return_code == -1
    assert outcome.error is not None
    assert "greater than max context" in outcome.error
    assert sink.errors == [outcome.error]
    assert sink.texts == []
    # The handle stays usable.
    assert run_text(runtime, "short")[0].text == HELLO_ANSWER


def test_pause_from_the_sink_stops_and_keeps_the_kv_cache(chat_runtime: Runtime) -> None:
    system_size = chat_runtime.get_kv_cache_size()[0]
    sink = RecordingSink(pause_after_texts=3)
    outcome = chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), sink)
    assert outcome.paused
    assert not outcome.aborted
    assert outcome.return_code == 0
    assert len(sink.texts) == 3
    assert "finish" not in sink.kinds
    paused_size = chat_runtime.get_kv_cache_size()[0]
    assert paused_size > system_size
    # Resuming with new content appends to the paused KV (the paused turn stays in front of it).
    resumed, perf = run_text(chat_runtime, "hello", RunOptions(keep_history=True))
    assert resumed.text == HELLO_ANSWER
    assert perf is not None
    assert chat_runtime.get_kv_cache_size()[0] >= paused_size + perf.prefill_tokens + perf.generate_tokens


def test_keep_history_grows_the_kv_by_the_turn_and_clear_shrinks_it_back(chat_runtime: Runtime) -> None:
    run_text(chat_runtime, "hello")
    system_size = chat_runtime.get_kv_cache_size()[0]  # keep_history=0 leaves only the system prompt
    assert system_size > 0
    sizes = [system_size]
    for _ in range(2):
        _sink, perf = run_text(chat_runtime, "hello", RunOptions(keep_history=True))
        assert perf is not None
        size = chat_runtime.get_kv_cache_size()[0]
        assert size - sizes[-1] >= perf.prefill_tokens + perf.generate_tokens
        sizes.append(size)
    chat_runtime.clear_kv_cache(keep_system_prompt=True)
    assert chat_runtime.get_kv_cache_size() == [system_size]
    chat_runtime.clear_kv_cache(keep_system_prompt=False)
    assert chat_runtime.get_kv_cache_size() == [0]


def test_ranged_clear_while_paused_deletes_that_range(chat_runtime: Runtime) -> None:
    sink = RecordingSink(pause_after_texts=4)
    assert chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), sink).paused
    size = chat_runtime.get_kv_cache_size()[0]
    chat_runtime.clear_kv_cache(True, start_pos=[size - 2], end_pos=[size])
    assert chat_runtime.get_kv_cache_size() == [size - 2]


def test_ranged_clear_when_not_paused_is_refused_by_the_runtime(chat_runtime: Runtime) -> None:
    run_text(chat_runtime, "hello")
    with pytest.raises(RuntimeCallError) as caught:
        chat_runtime.clear_kv_cache(True, start_pos=[0], end_pos=[1])
    assert caught.value.function == "rkllm_clear_kv_cache"
    assert caught.value.return_code == -1


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ([0], None, "start_pos/end_pos: give both ranges or neither"),
        ([0, 1], [2, 3], "start_pos: needs 1 entries (one per batch slot), got 2"),
    ],
)
def test_ranged_clear_arguments_are_checked(
    chat_runtime: Runtime, start: list[int], end: list[int] | None, message: str
) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        chat_runtime.clear_kv_cache(True, start_pos=start, end_pos=end)
    assert str(caught.value) == message


def test_kv_cache_size_has_one_entry_per_batch_slot(runtime: Runtime, chat_model: Path) -> None:
    runtime.init(RuntimeParams(model_path=chat_model, n_batch=2))
    assert runtime.get_kv_cache_size() == [0, 0]
    with pytest.raises(InvalidParameterError, match=r"^n_batch: run"):
        runtime.run(RunInput(role="user", text="hello"), RunOptions(), RecordingSink())


def test_prompt_cache_save_then_load_shortens_the_next_prefill(chat_runtime: Runtime, tmp_path: Path) -> None:
    prompt = "hello " + "the long static part of a prompt " * 20
    cache = tmp_path / "prompt_cache.bin"
    run_text(chat_runtime, prompt, RunOptions(save_prompt_cache_path=str(cache)))
    assert cache.is_file()

    chat_runtime.clear_kv_cache(keep_system_prompt=False)
    _sink, full = run_text(chat_runtime, prompt)
    chat_runtime.clear_kv_cache(keep_system_prompt=False)
    chat_runtime.load_prompt_cache(cache)
    _sink, cached = run_text(chat_runtime, prompt)
    assert full is not None
    assert cached is not None
    assert cached.prefill_tokens < full.prefill_tokens / 4

    chat_runtime.release_prompt_cache()
    chat_runtime.clear_kv_cache(keep_system_prompt=False)
    _sink, released = run_text(chat_runtime, prompt)
    assert released is not None
    assert released.prefill_tokens == full.prefill_tokens


def test_missing_prompt_cache_file_names_the_path(chat_runtime: Runtime, tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(PromptCacheFileError) as caught:
        chat_runtime.load_prompt_cache(missing)
    assert str(caught.value) == f"prompt cache file {missing}: does not exist"


def test_foreign_prompt_cache_file_is_refused_by_the_runtime(chat_runtime: Runtime, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"not a prompt cache")
    with pytest.raises(RuntimeCallError) as caught:
        chat_runtime.load_prompt_cache(foreign)
    assert caught.value.function == "rkllm_load_prompt_cache"
    assert str(foreign) in str(caught.value)


def test_function_tools_reach_the_model(chat_runtime: Runtime) -> None:
    assert run_text(chat_runtime, "turn on the light")[0].text.startswith("You said:")  # tool not offered yet
    chat_runtime.set_function_tools("You control a home.", TOOLS_JSON)
    answer = run_text(chat_runtime, "turn on the light")[0].text
    assert answer == '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen"}}\n</tool_call>'
    sink = RecordingSink()
    chat_runtime.run(RunInput(role="tool", text='[{"success": true}]'), RunOptions(), sink)
    assert sink.text == "Done, the light is on."


@pytest.mark.parametrize(
    ("tools_json", "message"),
    [
        ("[{", "tools_json: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 3)"),
        ('{"type": "function"}', "tools_json: must be a JSON array of tools, got a JSON dict"),
    ],
)
def test_invalid_tools_json_is_refused_before_the_runtime(chat_runtime: Runtime, tools_json: str, message: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        chat_runtime.set_function_tools("system", tools_json)
    assert str(caught.value) == message


def test_function_tools_fail_without_a_chat_template(runtime: Runtime, tmp_path: Path) -> None:
    runtime.init(RuntimeParams(model_path=write_model(tmp_path, "has_template = false")))
    with pytest.raises(RuntimeCallError) as caught:
        runtime.set_function_tools("system", TOOLS_JSON)
    assert caught.value.function == "rkllm_set_function_tools"
    assert "no chat template" in str(caught.value)


def test_chat_template_replaces_the_system_part(chat_runtime: Runtime) -> None:
    chat_runtime.set_chat_template("A", "<u>", "</u>")
    run_text(chat_runtime, "hello")
    assert chat_runtime.get_kv_cache_size() == [1]  # the system part is the one token "A"
    chat_runtime.set_chat_template("", "", "")
    run_text(chat_runtime, "hello")
    assert chat_runtime.get_kv_cache_size() == [0]


def test_lora_adapter_is_loaded_and_selected_by_name(chat_runtime: Runtime, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.rkllm"
    adapter.write_bytes(b"lora")
    chat_runtime.load_lora(adapter, "house", scale=0.5)
    assert run_text(chat_runtime, "hello", RunOptions(lora_name="house"))[0].text == HELLO_ANSWER
    with pytest.raises(InvalidParameterError) as caught:
        chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(lora_name="garden"), RecordingSink())
    assert str(caught.value) == "lora_name: adapter 'garden' is not loaded (loaded: house)"


def test_missing_lora_file_names_the_path(chat_runtime: Runtime, tmp_path: Path) -> None:
    missing = tmp_path / "missing.rkllm"
    with pytest.raises(LoraAdapterFileError) as caught:
        chat_runtime.load_lora(missing, "x")
    assert str(caught.value) == f"LoRA adapter file {missing}: does not exist"


def test_per_run_sampling_and_max_new_tokens_on_v130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_EMULATOR_SPEED", raising=False)
    model = write_model(tmp_path, "default_answer = one two three four five six seven eight")
    with Runtime(emulator_library("v130")) as runtime:
        assert runtime.profile.per_run_sampling
        runtime.init(RuntimeParams(model_path=model))
        sampling = SamplingParams(temperature=0.2, top_k=5)
        sink, perf = run_text(runtime, "go", RunOptions(max_new_tokens=3, sampling=sampling))
        assert sink.text == "one two three"  # "one", " two", " three"
        assert perf is not None
        assert perf.generate_tokens == 3
        with pytest.raises(InvalidParameterError, match=r"^sampling\.top_p: must be between 0\.0 and 1\.0, got 1\.5$"):
            runtime.run(RunInput(role="user", text="go"), RunOptions(sampling=SamplingParams(top_p=1.5)), sink)


def test_per_run_sampling_is_refused_on_v12x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_EMULATOR_SPEED", raising=False)
    with Runtime(emulator_library("v12x")) as runtime:
        assert not runtime.profile.per_run_sampling
        runtime.init(RuntimeParams(model_path=write_model(tmp_path)))
        for options, feature in (
            (RunOptions(sampling=SamplingParams()), "per-run sampling"),
            (RunOptions(max_new_tokens=5), "per-run max_new_tokens"),
        ):
            with pytest.raises(UnsupportedOnProfileError) as caught:
                runtime.run(RunInput(role="user", text="go"), options, RecordingSink())
            assert str(caught.value) == (
                f"{feature} needs librkllmrt 1.3.0 (ABI v130); the loaded runtime is 1.2.3 (v12x)"
            )


def test_ignore_eos_token_generates_to_max_new_tokens_on_v130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLM_EMULATOR_SPEED", raising=False)
    model = write_model(tmp_path, "default_answer = short")
    with Runtime(emulator_library("v130")) as runtime:
        runtime.init(RuntimeParams(model_path=model, ignore_eos_token=True, max_new_tokens=12))
        _sink, perf = run_text(runtime, "go")
        assert perf is not None
        assert perf.generate_tokens == 12
    with Runtime(emulator_library("v12x")) as runtime, pytest.raises(UnsupportedOnProfileError):
        runtime.init(RuntimeParams(model_path=model, ignore_eos_token=True))


def test_is_running_is_true_only_inside_a_run(chat_runtime: Runtime) -> None:
    seen: list[tuple[bool, bool]] = []

    class ProbingSink(RecordingSink):
        def on_text(self, text: str, token_id: int) -> bool:
            seen.append((chat_runtime.is_running(), chat_runtime.native_is_running()))
            return super().on_text(text, token_id)

    chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), ProbingSink())
    assert seen
    assert all(flags == (True, True) for flags in seen)
    assert not chat_runtime.is_running()
    assert not chat_runtime.native_is_running()


def test_a_failing_sink_stops_the_run_and_its_exception_reaches_the_caller(chat_runtime: Runtime) -> None:
    class FailingSink(RecordingSink):
        def on_text(self, text: str, token_id: int) -> bool:
            super().on_text(text, token_id)
            if len(self.texts) == 2:
                raise ValueError("sink broke")
            return False

    sink = FailingSink()
    with pytest.raises(ValueError, match="sink broke"):
        chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), sink)
    assert len(sink.texts) == 2
    assert "finish" not in sink.kinds
    chat_runtime.clear_kv_cache(keep_system_prompt=True)
    assert run_text(chat_runtime, "hello")[0].text == HELLO_ANSWER


def test_nothing_escapes_the_callback_into_c(chat_runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    class ExitingSink(RecordingSink):
        def on_finish(self, perf: PerfStat) -> None:
            raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger="rkllm_native.runtime"):
        outcome = chat_runtime.run(RunInput(role="user", text="hello"), RunOptions(), ExitingSink())
    assert outcome.return_code == 0
    assert outcome.perf is not None
    assert "unexpected failure in the librkllmrt result callback" in caplog.text


def test_two_runtimes_keep_their_events_apart(emulator_lib: Path, tmp_path: Path) -> None:
    first_model = write_model(tmp_path, "default_answer = alpha beta gamma", name="first.model")
    second_model = write_model(tmp_path, "default_answer = one two three", name="second.model")
    with Runtime(emulator_lib) as first, Runtime(emulator_lib) as second:
        first.init(RuntimeParams(model_path=first_model))
        second.init(RuntimeParams(model_path=second_model))

        class InterleavingSink(RecordingSink):
            def on_text(self, text: str, token_id: int) -> bool:
                # A run of the other runtime inside this run's callback must not leak into this sink.
                if len(self.texts) == 0:
                    inner = RecordingSink()
                    second.run(RunInput(role="user", text="x"), RunOptions(), inner)
                    assert inner.text == "one two three"
                return super().on_text(text, token_id)

        sink = InterleavingSink()
        first.run(RunInput(role="user", text="x"), RunOptions(), sink)
        assert sink.text == "alpha beta gamma"
