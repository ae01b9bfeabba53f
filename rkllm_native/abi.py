"""ctypes declarations of librkllmrt's C ABI, one profile per incompatible header family.

`v12x` is the header of 1.2.1, 1.2.2 and 1.2.3; `v130` is 1.3.0 (docs/runtime.md §2-§3). Struct layouts are
interface facts from the header; `python -m rkllm_native.abi --profile v12x|v130` prints them as JSON so anyone
can compare them with `rkllm.h`.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

ProfileName = Literal["v12x", "v130"]
PROFILE_NAMES: Final[tuple[ProfileName, ...]] = ("v12x", "v130")

# The ctypes "structure or union class" type, as mypy and ctypes see it.
CStructType = type[ctypes.Structure] | type[ctypes.Union]


class LLMCallState(enum.IntEnum):
    """State argument of the result callback (identical in 1.2.1-1.3.0)."""

    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(enum.IntEnum):
    """Which member of the `RKLLMInput` union is valid."""

    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(enum.IntEnum):
    """What a run produces: generated text, the last hidden layer, or logits."""

    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


class CallbackReturn(enum.IntEnum):
    """Values the result callback returns to the runtime (1.2.1+; RELEASE_BUFFER only in 1.3.0)."""

    CONTINUE = 0
    PAUSE = 1
    RELEASE_BUFFER = 2


# CPU masks for `RKLLMExtendParam.enabled_cpus_mask` (CPU0..CPU7 in the header).
CPU_MASKS: Final[tuple[int, ...]] = tuple(1 << core for core in range(8))


# ---------------------------------------------------------------------------------------------------------------
# Structs identical in both profiles (docs/runtime.md §3: "identical to 1.3.0")
# ---------------------------------------------------------------------------------------------------------------


class RKLLMExtendParam(ctypes.Structure):
    """Extended init settings: NPU IOMMU domain, CPU cores, batch size (120 bytes since 1.2.1)."""

    _fields_ = [
        ("base_domain_id", ctypes.c_int32),
        ("embed_flash", ctypes.c_int8),
        ("enabled_cpus_num", ctypes.c_int8),
        ("enabled_cpus_mask", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint8),
        ("use_cross_attn", ctypes.c_int8),
        ("reserved", ctypes.c_uint8 * 104),
    ]


class RKLLMLoraAdapter(ctypes.Structure):
    """Argument of rkllm_load_lora: one adapter file, the name runs select it by, and its scale."""

    _fields_ = [
        ("lora_adapter_path", ctypes.c_char_p),
        ("lora_adapter_name", ctypes.c_char_p),
        ("scale", ctypes.c_float),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    """Float embeddings input, n_tokens x n_embed."""

    _fields_ = [("embed", ctypes.POINTER(ctypes.c_float)), ("n_tokens", ctypes.c_size_t)]


class RKLLMTokenInput(ctypes.Structure):
    """Raw token-id input."""

    _fields_ = [("input_ids", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_size_t)]

    input_ids: Any
    n_tokens: int


class RKLLMLoraParam(ctypes.Structure):
    """Per-run LoRA selection by adapter name."""

    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    """Per-run request to save the prefill state to a file."""

    _fields_ = [("save_prompt_cache", ctypes.c_int), ("prompt_cache_path", ctypes.c_char_p)]


class RKLLMCrossAttnParam(ctypes.Structure):
    """Encoder K/V caches for custom encoder-decoder models (rkllm_set_cross_attn_params)."""

    _fields_ = [
        ("encoder_k_cache", ctypes.POINTER(ctypes.c_float)),
        ("encoder_v_cache", ctypes.POINTER(ctypes.c_float)),
        ("encoder_mask", ctypes.POINTER(ctypes.c_float)),
        ("encoder_pos", ctypes.POINTER(ctypes.c_int32)),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMResultLastHiddenLayer(ctypes.Structure):
    """Hidden states of the last layer (GET_LAST_HIDDEN_LAYER mode); freed by the runtime at the next callback."""

    _fields_ = [
        ("hidden_states", ctypes.POINTER(ctypes.c_float)),
        ("embd_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMResultLogits(ctypes.Structure):
    """Logits (GET_LOGITS mode)."""

    _fields_ = [
        ("logits", ctypes.POINTER(ctypes.c_float)),
        ("vocab_size", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
    ]


class RKLLMPerfStat(ctypes.Structure):
    """Run statistics, filled only in the FINISH callback."""

    _fields_ = [
        ("prefill_time_ms", ctypes.c_float),
        ("prefill_tokens", ctypes.c_int),
        ("generate_time_ms", ctypes.c_float),
        ("generate_tokens", ctypes.c_int),
        ("memory_usage_mb", ctypes.c_float),
    ]

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float


class RKLLMResult(ctypes.Structure):
    """What each result callback receives (72 bytes in 1.2.1-1.3.0)."""

    _fields_ = [
        ("text", ctypes.c_char_p),
        ("token_id", ctypes.c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]

    text: bytes | None
    token_id: int
    perf: RKLLMPerfStat


# `int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state)`; int since 1.2.1.
LLMResultCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(RKLLMResult), ctypes.c_void_p, ctypes.c_int)


# ---------------------------------------------------------------------------------------------------------------
# v12x (1.2.1, 1.2.2, 1.2.3) — docs/runtime.md §3
# ---------------------------------------------------------------------------------------------------------------


# RKLLMParam offsets 0-56 are the same in both profiles (docs/runtime.md §3: "offsets 0-55 are the same as 1.3.0",
# then skip_special_token @56); the profiles differ from there on.
_PARAM_HEAD: list[tuple[str, Any]] = [
        ("model_path", ctypes.c_char_p),
        ("max_context_len", ctypes.c_int32),
        ("max_new_tokens", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_keep", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
        ("skip_special_token", ctypes.c_bool),
]


class RKLLMParamV12x(ctypes.Structure):
    """Init parameters of 1.2.1-1.2.3: 208 bytes, with the img_* tag strings."""

    _fields_ = [
        *_PARAM_HEAD,
        ("is_async", ctypes.c_bool),
        ("img_start", ctypes.c_char_p),
        ("img_end", ctypes.c_char_p),
        ("img_content", ctypes.c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInputV12x(ctypes.Structure):
    """Multimodal input of 1.2.1-1.2.3 (named RKLLMMultiModelInput before 1.2.3; same layout)."""

    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMInputUnionV12x(ctypes.Union):
    """The anonymous union inside RKLLMInput (48 bytes in 1.2.x)."""

    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInputV12x),
    ]


class RKLLMInputV12x(ctypes.Structure):
    """One run input of 1.2.1-1.2.3 (64 bytes)."""

    _anonymous_ = ("input_data",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("input_data", RKLLMInputUnionV12x),
    ]


class RKLLMInferParamV12x(ctypes.Structure):
    """Per-run settings of 1.2.1-1.2.3 (32 bytes): no sampling, no max_new_tokens."""

    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("keep_history", ctypes.c_int),
    ]


# ---------------------------------------------------------------------------------------------------------------
# v130 (1.3.0) — docs/runtime.md §2
# ---------------------------------------------------------------------------------------------------------------


class RKLLMParamV130(ctypes.Structure):
    """Init parameters of 1.3.0: 184 bytes, img_* removed, ignore_eos_token added."""

    _fields_ = [
        *_PARAM_HEAD,
        ("ignore_eos_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMImageInputV130(ctypes.Structure):
    """The `image` sub-struct of 1.3.0's RKLLMMultiModalInput (anonymous struct type in the header)."""

    _fields_ = [
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_start", ctypes.c_char_p),
        ("image_end", ctypes.c_char_p),
        ("image_content", ctypes.c_char_p),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMVideoInputV130(ctypes.Structure):
    """The `video` sub-struct of 1.3.0's RKLLMMultiModalInput (anonymous struct type in the header)."""

    _fields_ = [
        ("video_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_frame_tokens", ctypes.c_size_t),
        ("n_frame_per_video", ctypes.c_size_t),
        ("n_video", ctypes.c_size_t),
        ("video_start", ctypes.c_char_p),
        ("video_end", ctypes.c_char_p),
        ("video_content", ctypes.c_char_p),
        ("frame_width", ctypes.c_size_t),
        ("frame_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInputV130(ctypes.Structure):
    """Multimodal input of 1.3.0 (144 bytes): prompt plus image and video sub-structs."""

    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image", RKLLMImageInputV130),
        ("video", RKLLMVideoInputV130),
    ]


class RKLLMInputUnionV130(ctypes.Union):
    """The anonymous union inside RKLLMInput (144 bytes in 1.3.0)."""

    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInputV130),
    ]


class RKLLMInputV130(ctypes.Structure):
    """One run input of 1.3.0 (160 bytes)."""

    _anonymous_ = ("input_data",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("input_data", RKLLMInputUnionV130),
    ]


class RKLLMSamplingParam(ctypes.Structure):
    """Per-run sampling override (new in 1.3.0, 36 bytes)."""

    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
    ]


class RKLLMInferParamV130(ctypes.Structure):
    """Per-run settings of 1.3.0 (40 bytes): sampling pointer inserted before keep_history, max_new_tokens last."""

    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", ctypes.POINTER(RKLLMSamplingParam)),
        ("keep_history", ctypes.c_int),
        ("max_new_tokens", ctypes.c_int32),
    ]


# `int (*LLMTokenizerCallback)(void*, const char* text, int32_t text_len, int32_t* tokens, int32_t n_tokens_max)`
LLMTokenizerCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32
)
# `int (*LLMGetEmbedCallback)(void*, int32_t* tokens, uint64_t num_tokens, void* embed, uint64_t len)`
LLMGetEmbedCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64
)


class RKLLMCallback(ctypes.Structure):
    """The 1.3.0 callback bundle passed to rkllm_init by pointer (48 bytes); only result_callback is required."""

    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", ctypes.c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", ctypes.c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", ctypes.c_void_p),
    ]


# ---------------------------------------------------------------------------------------------------------------
# rkllm_createDefaultParam's return slot
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_PARAM_RETURN_SLOT_SIZE: Final = 256


class RKLLMParamReturnSlot(ctypes.Structure):
    """A 256-byte, 8-aligned buffer as restype of rkllm_createDefaultParam.

    The function returns RKLLMParam by value and the callee writes its own sizeof into the caller's slot, so a
    slot larger than every known RKLLMParam (208/184) cannot be overrun by a mismatched library
    (docs/runtime.md §5.5). The binding declares it but never calls the function.
    """

    _fields_ = [("storage", ctypes.c_uint64 * (DEFAULT_PARAM_RETURN_SLOT_SIZE // 8))]


# ---------------------------------------------------------------------------------------------------------------
# Function prototypes (§2.4)
# ---------------------------------------------------------------------------------------------------------------

LLMHandle = ctypes.c_void_p
LLMHandlePointer = ctypes.POINTER(ctypes.c_void_p)
_IntPointer = ctypes.POINTER(ctypes.c_int)

NativeFunction = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Prototype:
    """One exported function: its argument types and return type."""

    name: str
    argtypes: tuple[Any, ...]
    restype: Any


def _prototypes(
    param: CStructType,
    input_struct: CStructType,
    infer_param: CStructType,
    init_callback_arg: object,
) -> tuple[Prototype, ...]:
    """Every function of §2.4, with the profile's struct types plugged in."""
    run_args = (LLMHandle, ctypes.POINTER(input_struct), ctypes.POINTER(infer_param), ctypes.c_void_p)
    return (
        Prototype("rkllm_createDefaultParam", (), RKLLMParamReturnSlot),
        Prototype("rkllm_init", (LLMHandlePointer, ctypes.POINTER(param), init_callback_arg), ctypes.c_int),
        Prototype("rkllm_load_lora", (LLMHandle, ctypes.POINTER(RKLLMLoraAdapter)), ctypes.c_int),
        Prototype("rkllm_load_prompt_cache", (LLMHandle, ctypes.c_char_p), ctypes.c_int),
        Prototype("rkllm_release_prompt_cache", (LLMHandle,), ctypes.c_int),
        Prototype("rkllm_destroy", (LLMHandle,), ctypes.c_int),
        Prototype("rkllm_run", run_args, ctypes.c_int),
        Prototype("rkllm_run_async", run_args, ctypes.c_int),
        Prototype("rkllm_abort", (LLMHandle,), ctypes.c_int),
        Prototype("rkllm_is_running", (LLMHandle,), ctypes.c_int),
        Prototype("rkllm_clear_kv_cache", (LLMHandle, ctypes.c_int, _IntPointer, _IntPointer), ctypes.c_int),
        Prototype("rkllm_get_kv_cache_size", (LLMHandle, _IntPointer), ctypes.c_int),
        Prototype(
            "rkllm_set_chat_template", (LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p), ctypes.c_int
        ),
        Prototype(
            "rkllm_set_function_tools", (LLMHandle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p), ctypes.c_int
        ),
        Prototype("rkllm_set_cross_attn_params", (LLMHandle, ctypes.POINTER(RKLLMCrossAttnParam)), ctypes.c_int),
    )


@dataclass(frozen=True, slots=True)
class BoundLibrary:
    """The library's functions with prototypes applied; attribute names drop the `rkllm_` prefix."""

    createDefaultParam: NativeFunction  # the C name; declared, never called (§5.5)
    init: NativeFunction
    load_lora: NativeFunction
    load_prompt_cache: NativeFunction
    release_prompt_cache: NativeFunction
    destroy: NativeFunction
    run: NativeFunction
    run_async: NativeFunction
    abort: NativeFunction
    is_running: NativeFunction
    clear_kv_cache: NativeFunction
    get_kv_cache_size: NativeFunction
    set_chat_template: NativeFunction
    set_function_tools: NativeFunction
    set_cross_attn_params: NativeFunction


@dataclass(frozen=True, slots=True)
class AbiProfile:
    """Everything that differs between the two header families, plus the shared declarations."""

    name: ProfileName
    versions: tuple[str, ...]
    param_struct: type[RKLLMParamV12x] | type[RKLLMParamV130]
    input_struct: type[RKLLMInputV12x] | type[RKLLMInputV130]
    input_union: type[RKLLMInputUnionV12x] | type[RKLLMInputUnionV130]  # RKLLMInput's anonymous union
    infer_param_struct: type[RKLLMInferParamV12x] | type[RKLLMInferParamV130]
    multimodal_input_struct: type[RKLLMMultiModalInputV12x] | type[RKLLMMultiModalInputV130]
    sampling_param_struct: type[RKLLMSamplingParam] | None
    callback_struct: type[RKLLMCallback] | None
    # Per-run sampling and max_new_tokens exist only in RKLLMInferParam of 1.3.0.
    per_run_sampling: bool
    # The callback may return 2 (release output buffer) only from 1.3.0 on.
    callback_returns: tuple[CallbackReturn, ...]
    # Header names → ctypes classes, in header order; nested anonymous struct types as "Outer.member".
    structs: Mapping[str, CStructType]
    prototypes: tuple[Prototype, ...]

    def bind(self, cdll: ctypes.CDLL) -> BoundLibrary:
        """Apply argtypes/restype to every exported function; a missing symbol raises AttributeError."""
        bound: dict[str, NativeFunction] = {}
        for prototype in self.prototypes:
            function = getattr(cdll, prototype.name)
            function.argtypes = list(prototype.argtypes)
            function.restype = prototype.restype
            bound[prototype.name.removeprefix("rkllm_")] = function
        return BoundLibrary(**bound)


_COMMON_HEAD: Final[tuple[tuple[str, CStructType], ...]] = (("RKLLMExtendParam", RKLLMExtendParam),)
_COMMON_TAIL: Final[tuple[tuple[str, CStructType], ...]] = (
    ("RKLLMLoraParam", RKLLMLoraParam),
    ("RKLLMPromptCacheParam", RKLLMPromptCacheParam),
    ("RKLLMCrossAttnParam", RKLLMCrossAttnParam),
)
_RESULT_STRUCTS: Final[tuple[tuple[str, CStructType], ...]] = (
    ("RKLLMResultLastHiddenLayer", RKLLMResultLastHiddenLayer),
    ("RKLLMResultLogits", RKLLMResultLogits),
    ("RKLLMPerfStat", RKLLMPerfStat),
    ("RKLLMResult", RKLLMResult),
)

V12X: Final = AbiProfile(
    name="v12x",
    versions=("1.2.1", "1.2.2", "1.2.3"),
    param_struct=RKLLMParamV12x,
    input_struct=RKLLMInputV12x,
    input_union=RKLLMInputUnionV12x,
    infer_param_struct=RKLLMInferParamV12x,
    multimodal_input_struct=RKLLMMultiModalInputV12x,
    sampling_param_struct=None,
    callback_struct=None,
    per_run_sampling=False,
    callback_returns=(CallbackReturn.CONTINUE, CallbackReturn.PAUSE),
    structs=dict(
        (
            *_COMMON_HEAD,
            ("RKLLMParam", RKLLMParamV12x),
            ("RKLLMLoraAdapter", RKLLMLoraAdapter),
            ("RKLLMEmbedInput", RKLLMEmbedInput),
            ("RKLLMTokenInput", RKLLMTokenInput),
            ("RKLLMMultiModalInput", RKLLMMultiModalInputV12x),
            ("RKLLMInput", RKLLMInputV12x),
            *_COMMON_TAIL,
            ("RKLLMInferParam", RKLLMInferParamV12x),
            *_RESULT_STRUCTS,
        )
    ),
    # 1.2.x: `rkllm_init(LLMHandle*, RKLLMParam*, LLMResultCallback callback)`, a bare function pointer.
    prototypes=_prototypes(RKLLMParamV12x, RKLLMInputV12x, RKLLMInferParamV12x, LLMResultCallback),
)

V130: Final = AbiProfile(
    name="v130",
    versions=("1.3.0",),
    param_struct=RKLLMParamV130,
    input_struct=RKLLMInputV130,
    input_union=RKLLMInputUnionV130,
    infer_param_struct=RKLLMInferParamV130,
    multimodal_input_struct=RKLLMMultiModalInputV130,
    sampling_param_struct=RKLLMSamplingParam,
    callback_struct=RKLLMCallback,
    per_run_sampling=True,
    callback_returns=tuple(CallbackReturn),
    structs=dict(
        (
            *_COMMON_HEAD,
            ("RKLLMParam", RKLLMParamV130),
            ("RKLLMLoraAdapter", RKLLMLoraAdapter),
            ("RKLLMEmbedInput", RKLLMEmbedInput),
            ("RKLLMTokenInput", RKLLMTokenInput),
            ("RKLLMMultiModalInput", RKLLMMultiModalInputV130),
            ("RKLLMMultiModalInput.image", RKLLMImageInputV130),
            ("RKLLMMultiModalInput.video", RKLLMVideoInputV130),
            ("RKLLMInput", RKLLMInputV130),
            *_COMMON_TAIL,
            ("RKLLMSamplingParam", RKLLMSamplingParam),
            ("RKLLMInferParam", RKLLMInferParamV130),
            *_RESULT_STRUCTS,
            ("RKLLMCallback", RKLLMCallback),
        )
    ),
    # 1.3.0: `rkllm_init(LLMHandle*, RKLLMParam*, RKLLMCallback* callback)`.
    prototypes=_prototypes(RKLLMParamV130, RKLLMInputV130, RKLLMInferParamV130, ctypes.POINTER(RKLLMCallback)),
)

PROFILES: Final[Mapping[ProfileName, AbiProfile]] = {"v12x": V12X, "v130": V130}


# ---------------------------------------------------------------------------------------------------------------
# Layout report
# ---------------------------------------------------------------------------------------------------------------


def _field_offsets(struct: CStructType) -> dict[str, int]:
    """Offsets of a struct's members by header name; members of an anonymous union appear at the union's offset."""
    anonymous = set(getattr(struct, "_anonymous_", ()))
    offsets: dict[str, int] = {}
    for field in struct._fields_:
        name, field_type = field[0], field[1]
        offset: int = getattr(struct, name).offset
        if name in anonymous:
            members: list[tuple[str, object]] = getattr(field_type, "_fields_", [])
            for member_name, _member_type in members:
                offsets[member_name] = offset + getattr(field_type, member_name).offset
        else:
            offsets[name] = offset
    return offsets


def _enum_values(enum_type: type[enum.IntEnum]) -> dict[str, int]:
    return {member.name: member.value for member in enum_type}


_C_SCALAR_NAMES: Final[Mapping[object, str]] = {
    ctypes.c_int: "int",
    ctypes.c_void_p: "void*",
    ctypes.c_char_p: "const char*",
    ctypes.c_float: "float",
    ctypes.c_uint64: "uint64_t",
    ctypes.c_size_t: "size_t",
    LLMResultCallback: "LLMResultCallback",
    LLMTokenizerCallback: "LLMTokenizerCallback",
    LLMGetEmbedCallback: "LLMGetEmbedCallback",
    RKLLMParamReturnSlot: "RKLLMParam",
}


def _c_type_name(ctype: object, struct_names: Mapping[object, str]) -> str:
    """Spell a ctypes type the way rkllm.h does (`RKLLMParam*`, `const char*`, `LLMHandle*` …)."""
    if ctype is None:
        return "void"
    if ctype is LLMHandlePointer:
        return "LLMHandle*"
    if ctype in struct_names:
        return struct_names[ctype]
    if ctype in _C_SCALAR_NAMES:
        return _C_SCALAR_NAMES[ctype]
    pointee = getattr(ctype, "_type_", None)
    if isinstance(pointee, type):
        return _c_type_name(pointee, struct_names) + "*"
    name: str = getattr(ctype, "__name__", repr(ctype))
    return name


def layout(profile: AbiProfile) -> dict[str, Any]:
    """The profile's structs (size, align, field offsets), enums and function prototypes, keyed by header names."""
    struct_names: dict[object, str] = {struct: name for name, struct in profile.structs.items()}
    return {
        "profile": profile.name,
        "versions": list(profile.versions),
        "structs": {
            name: {"size": ctypes.sizeof(struct), "align": ctypes.alignment(struct), "fields": _field_offsets(struct)}
            for name, struct in profile.structs.items()
        },
        "enums": {
            "LLMCallState": _enum_values(LLMCallState),
            "RKLLMInputType": _enum_values(RKLLMInputType),
            "RKLLMInferMode": _enum_values(RKLLMInferMode),
        },
        "functions": {
            prototype.name: {
                "restype": _c_type_name(prototype.restype, struct_names),
                # Every function but createDefaultParam/init takes the handle (a void*) first.
                "argtypes": [
                    "LLMHandle" if index == 0 and arg is LLMHandle else _c_type_name(arg, struct_names)
                    for index, arg in enumerate(prototype.argtypes)
                ],
            }
            for prototype in profile.prototypes
        },
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: print the JSON layout of one profile (or both) so it can be diffed against rkllm.h."""
    parser = argparse.ArgumentParser(
        prog="python -m rkllm_native.abi", description="Print librkllmrt struct layouts as JSON."
    )
    parser.add_argument("--profile", choices=PROFILE_NAMES, help="ABI profile; omit to print both")
    args = parser.parse_args(argv)
    if args.profile is None:
        report: dict[str, Any] = {name: layout(profile) for name, profile in PROFILES.items()}
    else:
        report = layout(PROFILES[args.profile])
    try:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `… | head`: the reader has what it wanted; exit quietly like other command-line tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
