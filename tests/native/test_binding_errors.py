"""Bad input anywhere gives one line naming the problem and the file or setting, never a crash."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest

from rkllm_native.build import emulator_library
from rkllm_native.errors import (
    InvalidInputError,
    InvalidParameterError,
    InvalidProfileError,
    LibraryLoadError,
    LibraryNotFoundError,
    ModelFileError,
    NotRkllmLibraryError,
    ProfileMismatchError,
    RkllmError,
    RuntimeCallError,
    RuntimeInitError,
    RuntimeNotInitializedError,
)
from rkllm_native.runtime import RunInput, RunOptions, Runtime, RuntimeParams

from .binding_helpers import RecordingSink, write_model


def one_line(error: BaseException) -> str:
    assert isinstance(error, RkllmError)
    text = str(error)
    assert "\n" not in text
    return text


def test_missing_library_path(tmp_path: Path) -> None:
    missing = tmp_path / "librkllmrt.so"
    with pytest.raises(LibraryNotFoundError) as caught:
        Runtime(missing)
    assert one_line(caught.value) == f"librkllmrt not found at {missing}: no such file"


def test_shared_object_that_is_not_librkllmrt(tmp_path: Path) -> None:
    source = tmp_path / "libfoo.c"
    source.write_text("int foo(void) { return 42; }\n")
    library = tmp_path / "libfoo.so"
    gcc = shutil.which("gcc")
    assert gcc is not None
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    with pytest.raises(NotRkllmLibraryError) as caught:
        Runtime(library)
    assert (
        one_line(caught.value) == f"{library} is not librkllmrt: no RKLLM SDK version marker and no rkllm_init symbol"
    )


def test_library_that_dlopen_rejects(tmp_path: Path) -> None:
    # A real ELF ident/type/machine for this host and the version marker, but no loadable body: the file passes
    # detection, dlopen fails, and its reason is kept on one line.
    host_header = emulator_library("v12x").read_bytes()[:20]
    fake = tmp_path / "librkllmrt.so"
    fake.write_bytes(host_header + bytes(44) + b"RKLLM SDK (version: 1.2.3 | target: Linux)\x00rkllm_init\x00")
    with pytest.raises(LibraryLoadError) as caught:
        Runtime(fake)
    assert one_line(caught.value).startswith(f"cannot load {fake}: ")


def test_profile_override_that_contradicts_the_library() -> None:
    library = emulator_library("v12x")
    with pytest.raises(ProfileMismatchError) as caught:
        Runtime(library, "v130")
    assert one_line(caught.value) == (
        f"ABI profile override v130 does not match {library}, which is librkllmrt 1.2.3 (ABI profile v12x); "
        "remove the override or set it to v12x"
    )


def test_profile_override_that_is_not_a_profile() -> None:
    with pytest.raises(InvalidProfileError) as caught:
        Runtime(emulator_library("v130"), cast(Any, "1.3"))
    assert one_line(caught.value) == "invalid ABI profile override '1.3': valid values are v12x, v130"


def test_missing_model_file(runtime: Runtime, tmp_path: Path) -> None:
    missing = tmp_path / "qwen.rkllm"
    with pytest.raises(ModelFileError) as caught:
        runtime.init(RuntimeParams(model_path=missing))
    assert one_line(caught.value) == f"model file {missing}: does not exist"


def test_model_path_that_is_a_directory(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="is not a regular file"):
        runtime.init(RuntimeParams(model_path=tmp_path))


def test_model_file_with_a_syntax_error(runtime: Runtime, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path, "decode_tokens_per_s = fast")
    with pytest.raises(RuntimeInitError) as caught:
        runtime.init(RuntimeParams(model_path=model))
    text = one_line(caught.value)
    assert text.startswith(f"rkllm_init failed for model {model} (return code -1)")
    assert caught.value.model_path == str(model)
    assert f"E rkllm: emulator model {model}:" in capfd.readouterr().out
    assert not runtime.initialized


def test_init_failure_can_be_retried_with_a_good_model(runtime: Runtime, tmp_path: Path) -> None:
    failing = write_model(tmp_path, "fault = init_fail", name="failing.model")
    with pytest.raises(RuntimeInitError, match=str(failing)):
        runtime.init(RuntimeParams(model_path=failing))
    runtime.init(RuntimeParams(model_path=write_model(tmp_path, "default_answer = ok", name="good.model")))
    sink = RecordingSink()
    runtime.run(RunInput(role="user", text="x"), RunOptions(), sink)
    assert sink.text == "ok"


def test_context_longer_than_the_model_allows_is_refused_by_the_runtime(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path, "max_context_limit = 2048")
    with pytest.raises(RuntimeInitError, match=f"rkllm_init failed for model {model}"):
        runtime.init(RuntimeParams(model_path=model, max_context_len=4096))


def test_init_twice_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    model = write_model(tmp_path)
    runtime.init(RuntimeParams(model_path=model))
    with pytest.raises(RuntimeInitError, match="already initialized"):
        runtime.init(RuntimeParams(model_path=model))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_batch": 0}, "n_batch: must be an integer in 1..100, got 0"),
        ({"n_batch": 101}, "n_batch: must be an integer in 1..100, got 101"),
        ({"n_keep": 4096}, "n_keep: must be less than max_context_len (4096) or -1, got 4096"),
        ({"max_context_len": 0}, "max_context_len: must be an integer in 1..2147483647, got 0"),
        ({"max_context_len": 2**31}, "max_context_len: must be an integer in 1..2147483647, got 2147483648"),
        ({"top_p": 1.5}, "top_p: must be between 0.0 and 1.0, got 1.5"),
        ({"temperature": float("nan")}, "temperature: must be a finite number, got nan"),
        ({"mirostat": 3}, "mirostat: must be 0 (off), 1 or 2, got 3"),
        ({"enabled_cpus_num": 2}, "enabled_cpus_mask: 0xf0 selects 4 cores but enabled_cpus_num is 2"),
        ({"enabled_cpus_mask": 0x1F0}, "enabled_cpus_mask: must be an integer in 0..255, got 496"),
        ({"top_k": 1.0}, "top_k: must be an integer in 0..2147483647, got 1.0"),
    ],
)
def test_obviously_bad_settings_are_named(
    runtime: Runtime, tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    params = RuntimeParams(model_path=write_model(tmp_path), **overrides)
    with pytest.raises(InvalidParameterError) as caught:
        runtime.init(params)
    assert one_line(caught.value) == message
    assert not runtime.initialized


@pytest.mark.parametrize(
    ("run_input", "message"),
    [
        (RunInput(role=cast(Any, "assistant"), text="x"), "role must be 'user' or 'tool', got 'assistant'"),
        (RunInput(role="user"), "give exactly one of text (PROMPT input) and token_ids (TOKEN input)"),
        (
            RunInput(role="user", text="x", token_ids=[1]),
            "give exactly one of text (PROMPT input) and token_ids (TOKEN input)",
        ),
        (RunInput(role="user", text="a\x00b"), "prompt text contains a NUL character at index 1"),
        (RunInput(role="user", token_ids=[]), "token_ids is empty"),
        (RunInput(role="user", token_ids=[5, -1]), "token_ids[1] must be a non-negative int32, got -1"),
    ],
)
def test_bad_run_input_is_named(runtime: Runtime, tmp_path: Path, run_input: RunInput, message: str) -> None:
    runtime.init(RuntimeParams(model_path=write_model(tmp_path)))
    sink = RecordingSink()
    with pytest.raises(InvalidInputError) as caught:
        runtime.run(run_input, RunOptions(), sink)
    assert one_line(caught.value) == message
    assert sink.events == []
    assert not runtime.is_running()


def test_calls_before_init_name_the_problem(runtime: Runtime) -> None:
    with pytest.raises(RuntimeNotInitializedError, match="call init"):
        runtime.run(RunInput(role="user", text="x"), RunOptions(), RecordingSink())
    with pytest.raises(RuntimeNotInitializedError):
        runtime.set_function_tools("s", "[]")
    with pytest.raises(RuntimeNotInitializedError):
        runtime.clear_kv_cache(keep_system_prompt=True)
    runtime.abort()  # nothing to abort: a no-op, not an error
    runtime.destroy()  # nothing to destroy: a no-op


def test_context_manager_destroys_the_handle(emulator_lib: Path, tmp_path: Path) -> None:
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=write_model(tmp_path)))
        assert runtime.initialized
    assert not runtime.initialized


def test_non_zero_run_return_without_error_state_raises_the_call_error(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real runtime rejects some inputs with -1 and no ERROR callback; only the return code tells then.
    runtime.init(RuntimeParams(model_path=write_model(tmp_path)))
    refusing = dataclasses.replace(runtime._lib, run=lambda *_args: -1)
    monkeypatch.setattr(runtime, "_lib", refusing)
    sink = RecordingSink()
    with pytest.raises(RuntimeCallError) as caught:
        runtime.run(RunInput(role="user", text="x"), RunOptions(), sink)
    assert one_line(caught.value) == "rkllm_run failed with return code -1 (the runtime logs the reason as 'E rkllm:')"
    assert (caught.value.function, caught.value.return_code) == ("rkllm_run", -1)
    assert sink.events == []
    assert not runtime.is_running()
