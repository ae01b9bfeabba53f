"""Struct layouts printed by `python -m rkllm_native.abi` equal the tables of docs/runtime.md §2-§3.

Every number below is typed in by hand from the document (sizes, offsets) and C's natural alignment, not
computed from the ctypes classes, so a wrong field type or order in abi.py fails here.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rkllm_native import abi

REPO_ROOT = Path(__file__).resolve().parents[2]

COMMON: dict[str, Any] = {
    "RKLLMExtendParam": {
        "size": 120,
        "align": 4,
        "fields": {
            "base_domain_id": 0,
            "embed_flash": 4,
            "enabled_cpus_num": 5,
            "enabled_cpus_mask": 8,
            "n_batch": 12,
            "use_cross_attn": 13,
            "reserved": 14,
        },
    },
    "RKLLMLoraAdapter": {
        "size": 24,
        "align": 8,
        "fields": {"lora_adapter_path": 0, "lora_adapter_name": 8, "scale": 16},
    },
    "RKLLMEmbedInput": {"size": 16, "align": 8, "fields": {"embed": 0, "n_tokens": 8}},
    "RKLLMTokenInput": {"size": 16, "align": 8, "fields": {"input_ids": 0, "n_tokens": 8}},
    "RKLLMLoraParam": {"size": 8, "align": 8, "fields": {"lora_adapter_name": 0}},
    "RKLLMPromptCacheParam": {"size": 16, "align": 8, "fields": {"save_prompt_cache": 0, "prompt_cache_path": 8}},
    "RKLLMCrossAttnParam": {
        "size": 40,
        "align": 8,
        "fields": {"encoder_k_cache": 0, "encoder_v_cache": 8, "encoder_mask": 16, "encoder_pos": 24, "num_tokens": 32},
    },
    "RKLLMResultLastHiddenLayer": {
        "size": 16,
        "align": 8,
        "fields": {"hidden_states": 0, "embd_size": 8, "num_tokens": 12},
    },
    "RKLLMResultLogits": {"size": 16, "align": 8, "fields": {"logits": 0, "vocab_size": 8, "num_tokens": 12}},
    "RKLLMPerfStat": {
        "size": 20,
        "align": 4,
        "fields": {
            "prefill_time_ms": 0,
            "prefill_tokens": 4,
            "generate_time_ms": 8,
            "generate_tokens": 12,
            "memory_usage_mb": 16,
        },
    },
    "RKLLMResult": {
        "size": 72,
        "align": 8,
        "fields": {"text": 0, "token_id": 8, "last_hidden_layer": 16, "logits": 32, "perf": 48},
    },
}

PARAM_HEAD = {
    "model_path": 0,
    "max_context_len": 8,
    "max_new_tokens": 12,
    "top_k": 16,
    "n_keep": 20,
    "top_p": 24,
    "temperature": 28,
    "repeat_penalty": 32,
    "frequency_penalty": 36,
    "presence_penalty": 40,
    "mirostat": 44,
    "mirostat_tau": 48,
    "mirostat_eta": 52,
}
INPUT_HEAD = {"role": 0, "enable_thinking": 8, "input_type": 12}
UNION_AT_16 = {"prompt_input": 16, "embed_input": 16, "token_input": 16, "multimodal_input": 16}

V12X: dict[str, Any] = {
    **COMMON,
    "RKLLMParam": {
        "size": 208,
        "align": 8,
        "fields": {
            **PARAM_HEAD,
            "skip_special_token": 56,
            "is_async": 57,
            "img_start": 64,
            "img_end": 72,
            "img_content": 80,
            "extend_param": 88,
        },
    },
    "RKLLMMultiModalInput": {
        "size": 48,
        "align": 8,
        "fields": {
            "prompt": 0,
            "image_embed": 8,
            "n_image_tokens": 16,
            "n_image": 24,
            "image_width": 32,
            "image_height": 40,
        },
    },
    "RKLLMInput": {"size": 64, "align": 8, "fields": {**INPUT_HEAD, **UNION_AT_16}},
    "RKLLMInferParam": {
        "size": 32,
        "align": 8,
        "fields": {"mode": 0, "lora_params": 8, "prompt_cache_params": 16, "keep_history": 24},
    },
}

V130: dict[str, Any] = {
    **COMMON,
    "RKLLMParam": {
        "size": 184,
        "align": 8,
        "fields": {
            **PARAM_HEAD,
            "skip_special_token": 56,
            "ignore_eos_token": 57,
            "is_async": 58,
            "extend_param": 60,
        },
    },
    "RKLLMMultiModalInput": {"size": 144, "align": 8, "fields": {"prompt": 0, "image": 8, "video": 72}},
    "RKLLMMultiModalInput.image": {
        "size": 64,
        "align": 8,
        "fields": {
            "image_embed": 0,
            "n_image_tokens": 8,
            "n_image": 16,
            "image_start": 24,
            "image_end": 32,
            "image_content": 40,
            "image_width": 48,
            "image_height": 56,
        },
    },
    "RKLLMMultiModalInput.video": {
        "size": 72,
        "align": 8,
        "fields": {
            "video_embed": 0,
            "n_frame_tokens": 8,
            "n_frame_per_video": 16,
            "n_video": 24,
            "video_start": 32,
            "video_end": 40,
            "video_content": 48,
            "frame_width": 56,
            "frame_height": 64,
        },
    },
    "RKLLMInput": {"size": 160, "align": 8, "fields": {**INPUT_HEAD, **UNION_AT_16}},
    "RKLLMSamplingParam": {
        "size": 36,
        "align": 4,
        "fields": {
            "top_k": 0,
            "top_p": 4,
            "temperature": 8,
            "repeat_penalty": 12,
            "frequency_penalty": 16,
            "presence_penalty": 20,
            "mirostat": 24,
            "mirostat_tau": 28,
            "mirostat_eta": 32,
        },
    },
    "RKLLMInferParam": {
        "size": 40,
        "align": 8,
        "fields": {
            "mode": 0,
            "lora_params": 8,
            "prompt_cache_params": 16,
            "sampling_params": 24,
            "keep_history": 32,
            "max_new_tokens": 36,
        },
    },
    "RKLLMCallback": {
        "size": 48,
        "align": 8,
        "fields": {
            "result_callback": 0,
            "result_userdata": 8,
            "tokenizer_callback": 16,
            "tokenizer_userdata": 24,
            "embed_callback": 32,
            "embed_userdata": 40,
        },
    },
}

EXPORTED_FUNCTIONS = {
    "rkllm_createDefaultParam",
    "rkllm_init",
    "rkllm_load_lora",
    "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
    "rkllm_destroy",
    "rkllm_run",
    "rkllm_run_async",
    "rkllm_abort",
    "rkllm_is_running",
    "rkllm_clear_kv_cache",
    "rkllm_get_kv_cache_size",
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_set_cross_attn_params",
}


def _printed_layout(profile: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "rkllm_native.abi", "--profile", profile],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert completed.stderr == ""
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize(("profile", "expected"), [("v12x", V12X), ("v130", V130)])
def test_printed_layout_equals_the_documented_tables(profile: str, expected: dict[str, Any]) -> None:
    printed = _printed_layout(profile)
    assert printed["profile"] == profile
    assert printed["structs"] == expected


@pytest.mark.parametrize("profile", ["v12x", "v130"])
def test_printed_layout_declares_every_exported_function(profile: str) -> None:
    functions = _printed_layout(profile)["functions"]
    assert set(functions) == EXPORTED_FUNCTIONS
    assert functions["rkllm_run"]["argtypes"] == ["LLMHandle", "RKLLMInput*", "RKLLMInferParam*", "void*"]
    assert functions["rkllm_clear_kv_cache"]["argtypes"] == ["LLMHandle", "int", "int*", "int*"]


def test_init_takes_a_bare_callback_on_v12x_and_a_callback_struct_on_v130() -> None:
    assert _printed_layout("v12x")["functions"]["rkllm_init"]["argtypes"] == [
        "LLMHandle*",
        "RKLLMParam*",
        "LLMResultCallback",
    ]
    assert _printed_layout("v130")["functions"]["rkllm_init"]["argtypes"] == [
        "LLMHandle*",
        "RKLLMParam*",
        "RKLLMCallback*",
    ]


def test_enums_match_the_header() -> None:
    enums = _printed_layout("v130")["enums"]
    assert enums["LLMCallState"] == {
        "RKLLM_RUN_NORMAL": 0,
        "RKLLM_RUN_WAITING": 1,
        "RKLLM_RUN_FINISH": 2,
        "RKLLM_RUN_ERROR": 3,
    }
    assert enums["RKLLMInputType"] == {
        "RKLLM_INPUT_PROMPT": 0,
        "RKLLM_INPUT_TOKEN": 1,
        "RKLLM_INPUT_EMBED": 2,
        "RKLLM_INPUT_MULTIMODAL": 3,
    }
    assert enums["RKLLMInferMode"] == {
        "RKLLM_INFER_GENERATE": 0,
        "RKLLM_INFER_GET_LAST_HIDDEN_LAYER": 1,
        "RKLLM_INFER_GET_LOGITS": 2,
    }


def test_default_param_return_slot_is_larger_than_every_param_struct() -> None:
    # rkllm_createDefaultParam writes the library's own sizeof into the slot (§5.5): it must not overrun.
    slot = ctypes.sizeof(abi.RKLLMParamReturnSlot)
    assert slot >= 256
    assert slot > max(ctypes.sizeof(abi.RKLLMParamV12x), ctypes.sizeof(abi.RKLLMParamV130))
    prototype = next(p for p in abi.V130.prototypes if p.name == "rkllm_createDefaultParam")
    assert prototype.restype is abi.RKLLMParamReturnSlot


def test_callbacks_return_int() -> None:
    # A void callback hands garbage to a >=1.2.1 runtime (§8.3).
    assert abi.LLMResultCallback._restype_ is ctypes.c_int
    assert abi.LLMTokenizerCallback._restype_ is ctypes.c_int
    assert abi.LLMGetEmbedCallback._restype_ is ctypes.c_int


def test_bind_reports_a_missing_symbol() -> None:
    # libc exports none of the rkllm functions: bind must fail loudly rather than leave a function unbound.
    libc = ctypes.CDLL(None)
    with pytest.raises(AttributeError, match="rkllm_createDefaultParam"):
        abi.V12X.bind(libc)


def test_abi_cli_rejects_an_unknown_profile() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "rkllm_native.abi", "--profile", "v11x"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "invalid choice: 'v11x'" in completed.stderr
