"""The emulator libraries build in both ABI flavours and look like the real librkllmrt from the outside.

Checked here: the exported symbol list, the embedded version marker, the struct layouts a C consumer of our
rkllm.h sees (against docs/runtime.md §2-§3), that the layout pins really stop a wrong header from compiling,
that a bad model file fails rkllm_init with a line naming the file and line, and the build script's
staleness, atomic-rename and missing-compiler behaviour.
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from rkllm_native import abi, build
from rkllm_native.build import EmulatorBuildError, Profile, emulator_library

PROFILES: tuple[Profile, ...] = ("v12x", "v130")
MARKERS = {
    "v12x": b"RKLLM SDK (version: 1.2.3 | target: Linux | build: emulator)",
    "v130": b"RKLLM SDK (version: 1.3.0 | target: Linux | build: emulator)",
}
DEFINES = {"v12x": "-DRKLLM_EMU_ABI_V12X", "v130": "-DRKLLM_EMU_ABI_V130"}

# docs/runtime.md §2.3 (v1.3.0) and §3 (v1.2.1-v1.2.3), LP64.
COMMON_LAYOUT = {
    "sizeof(RKLLMExtendParam)": 120,
    "offsetof(RKLLMExtendParam, n_batch)": 12,
    "offsetof(RKLLMParam, n_keep)": 20,
    "offsetof(RKLLMParam, skip_special_token)": 56,
    "offsetof(RKLLMInput, input_type)": 12,
    "offsetof(RKLLMInput, prompt_input)": 16,
    "offsetof(RKLLMInferParam, prompt_cache_params)": 16,
    "sizeof(RKLLMResult)": 72,
    "offsetof(RKLLMResult, perf)": 48,
    "sizeof(RKLLMPerfStat)": 20,
}
PROFILE_LAYOUT = {
    "v12x": {
        "sizeof(RKLLMParam)": 208,
        "offsetof(RKLLMParam, is_async)": 57,
        "offsetof(RKLLMParam, extend_param)": 88,
        "sizeof(RKLLMInput)": 64,
        "sizeof(RKLLMInferParam)": 32,
        "offsetof(RKLLMInferParam, keep_history)": 24,
    },
    "v130": {
        "sizeof(RKLLMParam)": 184,
        "offsetof(RKLLMParam, ignore_eos_token)": 57,
        "offsetof(RKLLMParam, is_async)": 58,
        "offsetof(RKLLMParam, extend_param)": 60,
        "sizeof(RKLLMInput)": 160,
        "sizeof(RKLLMInferParam)": 40,
        "offsetof(RKLLMInferParam, sampling_params)": 24,
        "offsetof(RKLLMInferParam, keep_history)": 32,
        "offsetof(RKLLMInferParam, max_new_tokens)": 36,
        "sizeof(RKLLMCallback)": 48,
        "sizeof(RKLLMSamplingParam)": 36,
    },
}

# A C consumer of our rkllm.h: prints the layouts with --layout, else inits (and optionally runs) a model.
HARNESS = r"""
#include <stdio.h>
#include <string.h>
#include "rkllm.h"

static int on_result(RKLLMResult *result, void *userdata, LLMCallState state) {
    (void)userdata;
    if (state == RKLLM_RUN_NORMAL && result->text) fputs(result->text, stdout);
    if (state == RKLLM_RUN_FINISH) printf("\n[finish %d]\n", result->perf.generate_tokens);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--layout") == 0) {
#define SHOW(expr) printf("%s=%zu\n", #expr, (size_t)(expr))
        SHOW(sizeof(RKLLMExtendParam)); SHOW(offsetof(RKLLMExtendParam, n_batch));
        SHOW(offsetof(RKLLMParam, n_keep)); SHOW(offsetof(RKLLMParam, skip_special_token));
        SHOW(offsetof(RKLLMInput, input_type)); SHOW(offsetof(RKLLMInput, prompt_input));
        SHOW(offsetof(RKLLMInferParam, prompt_cache_params)); SHOW(sizeof(RKLLMResult));
        SHOW(offsetof(RKLLMResult, perf)); SHOW(sizeof(RKLLMPerfStat));
        SHOW(sizeof(RKLLMParam)); SHOW(offsetof(RKLLMParam, is_async)); SHOW(offsetof(RKLLMParam, extend_param));
        SHOW(sizeof(RKLLMInput)); SHOW(sizeof(RKLLMInferParam)); SHOW(offsetof(RKLLMInferParam, keep_history));
#ifdef RKLLM_EMU_ABI_V130
        SHOW(offsetof(RKLLMParam, ignore_eos_token)); SHOW(offsetof(RKLLMInferParam, sampling_params));
        SHOW(offsetof(RKLLMInferParam, max_new_tokens)); SHOW(sizeof(RKLLMCallback));
        SHOW(sizeof(RKLLMSamplingParam));
#endif
        return 0;
    }
    RKLLMParam param;
    memset(&param, 0, sizeof(param));
    param.model_path = argv[1];
    param.max_context_len = 4096;
    param.max_new_tokens = 256;
    param.n_keep = -1;
    param.skip_special_token = true;
    param.extend_param.n_batch = 1;
    param.extend_param.enabled_cpus_num = 4;
    param.extend_param.enabled_cpus_mask = CPU4 | CPU5 | CPU6 | CPU7;
    LLMHandle handle = &param;
#ifdef RKLLM_EMU_ABI_V130
    RKLLMCallback callback;
    memset(&callback, 0, sizeof(callback));
    callback.result_callback = on_result;
    int rc = rkllm_init(&handle, &param, &callback);
#else
    int rc = rkllm_init(&handle, &param, on_result);
#endif
    printf("[init %d %s]\n", rc, handle ? "handle" : "null");
    if (rc != 0) return 3;
    if (argc > 2) {
        RKLLMInput input;
        memset(&input, 0, sizeof(input));
        input.role = "user";
        input.input_type = RKLLM_INPUT_PROMPT;
        input.prompt_input = argv[2];
        RKLLMInferParam infer;
        memset(&infer, 0, sizeof(infer));
        printf("[run %d]\n", rkllm_run(handle, &input, &infer, NULL));
    }
    return rkllm_destroy(handle);
}
"""


def tool(name: str) -> str:
    """Absolute path of a build tool (gcc, nm) the emulator build needs anyway."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not on PATH"
    return path


@pytest.fixture(scope="module")
def libraries() -> dict[str, Path]:
    return {profile: emulator_library(profile) for profile in PROFILES}


@pytest.fixture(scope="module")
def harnesses(libraries: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C harness compiled per profile against our rkllm.h and linked to the emulator library."""
    directory = tmp_path_factory.mktemp("harness")
    source = directory / "harness.c"
    source.write_text(HARNESS, encoding="utf-8")
    built = {}
    for profile, library in libraries.items():
        executable = directory / f"harness-{profile}"
        subprocess.run(
            [
                tool("gcc"),
                "-std=c11",
                "-Wall",
                "-Werror",
                DEFINES[profile],
                f"-I{build.EMULATOR_DIR}",
                "-o",
                str(executable),
                str(source),
                f"-L{library.parent}",
                f"-l:{library.name}",
                f"-Wl,-rpath,{library.parent}",
            ],
            check=True,
            capture_output=True,
        )
        built[profile] = executable
    return built


def run_harness(harness: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RKLLM_EMULATOR_SPEED": "0"}
    return subprocess.run([str(harness), *args], capture_output=True, text=True, timeout=30, env=env, check=False)


@pytest.mark.parametrize("profile", PROFILES)
def test_exports_exactly_the_runtime_api(libraries: dict[str, Path], profile: abi.ProfileName) -> None:
    listing = subprocess.run(
        [tool("nm"), "-D", "--defined-only", str(libraries[profile])], capture_output=True, text=True, check=True
    ).stdout
    defined = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    # The binding binds every function it declares (test_binding_abi pins that list to the documented API).
    assert defined == {prototype.name for prototype in abi.PROFILES[profile].prototypes}


@pytest.mark.parametrize("profile", PROFILES)
def test_embeds_the_version_marker_of_its_profile(libraries: dict[str, Path], profile: str) -> None:
    data = libraries[profile].read_bytes()
    assert MARKERS[profile] in data
    other = "v130" if profile == "v12x" else "v12x"
    assert MARKERS[other] not in data


@pytest.mark.parametrize("profile", PROFILES)
def test_header_layouts_match_the_documented_abi(harnesses: dict[str, Path], profile: str) -> None:
    output = run_harness(harnesses[profile], "--layout").stdout
    layout = {key: int(value) for key, value in (line.split("=") for line in output.splitlines())}
    assert layout == {**COMMON_LAYOUT, **PROFILE_LAYOUT[profile]}


def test_layout_pins_reject_a_header_with_a_wrong_field(tmp_path: Path) -> None:
    # A plausible typo (n_keep as int64_t) must stop the build instead of producing a silently wrong library.
    header = (build.EMULATOR_DIR / "rkllm.h").read_text(encoding="utf-8")
    assert "    int32_t n_keep;\n" in header
    (tmp_path / "rkllm.h").write_text(header.replace("    int32_t n_keep;\n", "    int64_t n_keep;\n"))
    (tmp_path / "use.c").write_text('#include "rkllm.h"\n')
    result = subprocess.run(
        [tool("gcc"), "-std=c11", "-fsyntax-only", "-DRKLLM_EMU_ABI_V130", str(tmp_path / "use.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "Param.top_p @24" in result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_model_syntax_error_names_file_and_line(harnesses: dict[str, Path], profile: str, tmp_path: Path) -> None:
    model = tmp_path / "typo.model"
    model.write_text("# demo\nrkllm-emulator-model 1\nspeeed = 2\n", encoding="utf-8")
    result = run_harness(harnesses[profile], str(model))
    lines = result.stdout.splitlines()
    assert f"E rkllm: emulator model {model}:3: unknown key 'speeed' (see MODEL_FORMAT.md)" in lines
    assert lines.index("E rkllm: invalid rkllm model!") == len(lines) - 2
    assert lines[-1] == "[init -1 null]"


def test_foreign_file_is_an_invalid_model(harnesses: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "Qwen2.5-1.5B-rk3588-w8a8.rkllm"
    fake.write_bytes(b"RKLLM\x00\x01\x02binary weights")
    lines = run_harness(harnesses["v12x"], str(fake)).stdout.splitlines()
    assert [line for line in lines if line.startswith("E ")] == ["E rkllm: invalid rkllm model!"]


@pytest.mark.parametrize("profile", PROFILES)
def test_demo_model_answers_through_the_c_api(harnesses: dict[str, Path], profile: str) -> None:
    model = build.EMULATOR_DIR / "models" / "qwen2-0.5b-chat.model"
    result = run_harness(harnesses[profile], str(model), "hello")
    version = "1.3.0" if profile == "v130" else "1.2.3"
    assert f"I rkllm: rkllm-runtime version: {version}, rknpu driver version: 0.9.8, platform: RK3588" in result.stdout
    # 16 tokens: a space joins the next word, "running" and "emulator" are cut at 6 bytes (MODEL_FORMAT.md §5).
    assert "Hello! I am a small chat model running on the RKLLM emulator.\n[finish 16]\n[run 0]" in result.stdout
    assert result.returncode == 0


def test_rebuilds_when_a_source_changes_and_never_exposes_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "emulator"
    sources.mkdir()
    for path in [*build.EMULATOR_DIR.glob("*.c"), *build.EMULATOR_DIR.glob("*.h")]:
        shutil.copy2(path, sources / path.name)
    monkeypatch.setattr(build, "EMULATOR_DIR", sources)
    monkeypatch.setattr(build, "BUILD_DIR", sources / "build")

    # Two builds at once (two workers starting together) both succeed and leave one complete library.
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build.build_library("v12x"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [sources / "build" / "librkllmrt-emu-v12x.so"] * 2
    assert [path.name for path in (sources / "build").iterdir()] == ["librkllmrt-emu-v12x.so"]
    first = results[0].stat().st_mtime_ns

    assert emulator_library("v12x").stat().st_mtime_ns == first  # up to date: no rebuild
    changed = sources / "emu_util.c"
    os.utime(changed, ns=(first + 10**9, first + 10**9))
    assert emulator_library("v12x").stat().st_mtime_ns > first


def test_missing_compiler_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc-1234")
    with pytest.raises(EmulatorBuildError) as raised:
        build.build_library("v130")
    assert str(raised.value) == (
        "cannot build the RKLLM emulator: C compiler 'no-such-cc-1234' not found on PATH (install gcc, or set CC)"
    )
    assert raised.value.code == "emulator_build_failed"


def test_compile_error_is_reported_as_its_first_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tmp_path / "emulator"
    sources.mkdir()
    (sources / "broken.c").write_text("int broken(void) { return missing_symbol; }\n", encoding="utf-8")
    monkeypatch.setattr(build, "EMULATOR_DIR", sources)
    monkeypatch.setattr(build, "BUILD_DIR", sources / "build")
    with pytest.raises(EmulatorBuildError) as raised:
        build.build_library("v12x")
    message = str(raised.value)
    assert message.startswith("building librkllmrt-emu-v12x.so failed: ")
    assert "missing_symbol" in message
    assert "\n" not in message
    assert list((sources / "build").iterdir()) == []  # the temporary file is gone
