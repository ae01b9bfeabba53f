/*
 * rkllm.h: the RKLLM runtime C API as the emulator exports it.
 *
 * Typed from docs/runtime.md §2 (v1.3.0) and §3 (v1.2.1–v1.2.3); these layouts are interface facts,
 * not Rockchip's header. One source, two ABI flavours: compile with exactly one of
 * -DRKLLM_EMU_ABI_V130 or -DRKLLM_EMU_ABI_V12X. The sizes and offsets are pinned with _Static_assert
 * below so a typo here cannot silently produce a library that differs from the real one.
 */
#ifndef RKLLM_EMU_RKLLM_H
#define RKLLM_EMU_RKLLM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(RKLLM_EMU_ABI_V130) == defined(RKLLM_EMU_ABI_V12X)
#error "define exactly one of RKLLM_EMU_ABI_V130 and RKLLM_EMU_ABI_V12X"
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CPU0 (1 << 0)
#define CPU1 (1 << 1)
#define CPU2 (1 << 2)
#define CPU3 (1 << 3)
#define CPU4 (1 << 4)
#define CPU5 (1 << 5)
#define CPU6 (1 << 6)
#define CPU7 (1 << 7)

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
} RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#ifdef RKLLM_EMU_ABI_V130
    bool ignore_eos_token;
    bool is_async;
#else
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#ifdef RKLLM_EMU_ABI_V130
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
typedef RKLLMMultiModalInput RKLLMMultiModelInput; /* the 1.2.1/1.2.2 spelling, same layout */
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#ifdef RKLLM_EMU_ABI_V130
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#ifdef RKLLM_EMU_ABI_V130
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#ifdef RKLLM_EMU_ABI_V130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#ifdef RKLLM_EMU_ABI_V130
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);

typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

#if defined(__GNUC__)
#define RKLLM_API __attribute__((visibility("default")))
#else
#define RKLLM_API
#endif

RKLLM_API RKLLMParam rkllm_createDefaultParam(void);
#ifdef RKLLM_EMU_ABI_V130
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback);
#else
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback);
#endif
RKLLM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
RKLLM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
RKLLM_API int rkllm_release_prompt_cache(LLMHandle handle);
RKLLM_API int rkllm_destroy(LLMHandle handle);
RKLLM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                        void *userdata);
RKLLM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                              void *userdata);
RKLLM_API int rkllm_abort(LLMHandle handle);
RKLLM_API int rkllm_is_running(LLMHandle handle);
RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
RKLLM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
RKLLM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                      const char *prompt_postfix);
RKLLM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                       const char *tool_response_str);
RKLLM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);

/* ---- layout pins (docs/runtime.md §0, §2.3, §3, §12; LP64) ---- */
#if UINTPTR_MAX == 0xffffffffffffffffu
_Static_assert(sizeof(RKLLMExtendParam) == 120, "RKLLMExtendParam is 120 bytes");
_Static_assert(offsetof(RKLLMExtendParam, embed_flash) == 4, "ExtendParam.embed_flash @4");
_Static_assert(offsetof(RKLLMExtendParam, enabled_cpus_num) == 5, "ExtendParam.enabled_cpus_num @5");
_Static_assert(offsetof(RKLLMExtendParam, enabled_cpus_mask) == 8, "ExtendParam.enabled_cpus_mask @8");
_Static_assert(offsetof(RKLLMExtendParam, n_batch) == 12, "ExtendParam.n_batch @12");
_Static_assert(offsetof(RKLLMExtendParam, use_cross_attn) == 13, "ExtendParam.use_cross_attn @13");
_Static_assert(offsetof(RKLLMExtendParam, reserved) == 14, "ExtendParam.reserved @14");

_Static_assert(offsetof(RKLLMParam, max_context_len) == 8, "Param.max_context_len @8");
_Static_assert(offsetof(RKLLMParam, max_new_tokens) == 12, "Param.max_new_tokens @12");
_Static_assert(offsetof(RKLLMParam, top_k) == 16, "Param.top_k @16");
_Static_assert(offsetof(RKLLMParam, n_keep) == 20, "Param.n_keep @20");
_Static_assert(offsetof(RKLLMParam, top_p) == 24, "Param.top_p @24");
_Static_assert(offsetof(RKLLMParam, temperature) == 28, "Param.temperature @28");
_Static_assert(offsetof(RKLLMParam, repeat_penalty) == 32, "Param.repeat_penalty @32");
_Static_assert(offsetof(RKLLMParam, frequency_penalty) == 36, "Param.frequency_penalty @36");
_Static_assert(offsetof(RKLLMParam, presence_penalty) == 40, "Param.presence_penalty @40");
_Static_assert(offsetof(RKLLMParam, mirostat) == 44, "Param.mirostat @44");
_Static_assert(offsetof(RKLLMParam, mirostat_tau) == 48, "Param.mirostat_tau @48");
_Static_assert(offsetof(RKLLMParam, mirostat_eta) == 52, "Param.mirostat_eta @52");
_Static_assert(offsetof(RKLLMParam, skip_special_token) == 56, "Param.skip_special_token @56");

_Static_assert(sizeof(RKLLMLoraAdapter) == 24, "RKLLMLoraAdapter is 24 bytes");
_Static_assert(sizeof(RKLLMEmbedInput) == 16, "RKLLMEmbedInput is 16 bytes");
_Static_assert(sizeof(RKLLMTokenInput) == 16, "RKLLMTokenInput is 16 bytes");
_Static_assert(offsetof(RKLLMInput, enable_thinking) == 8, "Input.enable_thinking @8");
_Static_assert(offsetof(RKLLMInput, input_type) == 12, "Input.input_type @12");
_Static_assert(offsetof(RKLLMInput, prompt_input) == 16, "Input union @16");
_Static_assert(sizeof(RKLLMLoraParam) == 8, "RKLLMLoraParam is 8 bytes");
_Static_assert(sizeof(RKLLMPromptCacheParam) == 16, "RKLLMPromptCacheParam is 16 bytes");
_Static_assert(offsetof(RKLLMPromptCacheParam, prompt_cache_path) == 8, "PromptCacheParam.path @8");
_Static_assert(sizeof(RKLLMCrossAttnParam) == 40, "RKLLMCrossAttnParam is 40 bytes");
_Static_assert(offsetof(RKLLMInferParam, lora_params) == 8, "InferParam.lora_params @8");
_Static_assert(offsetof(RKLLMInferParam, prompt_cache_params) == 16, "InferParam.prompt_cache_params @16");
_Static_assert(sizeof(RKLLMResultLastHiddenLayer) == 16, "RKLLMResultLastHiddenLayer is 16 bytes");
_Static_assert(sizeof(RKLLMResultLogits) == 16, "RKLLMResultLogits is 16 bytes");
_Static_assert(sizeof(RKLLMPerfStat) == 20, "RKLLMPerfStat is 20 bytes");
_Static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult is 72 bytes");
_Static_assert(offsetof(RKLLMResult, token_id) == 8, "Result.token_id @8");
_Static_assert(offsetof(RKLLMResult, last_hidden_layer) == 16, "Result.last_hidden_layer @16");
_Static_assert(offsetof(RKLLMResult, logits) == 32, "Result.logits @32");
_Static_assert(offsetof(RKLLMResult, perf) == 48, "Result.perf @48");

#ifdef RKLLM_EMU_ABI_V130
_Static_assert(sizeof(RKLLMParam) == 184, "v1.3.0 RKLLMParam is 184 bytes");
_Static_assert(offsetof(RKLLMParam, ignore_eos_token) == 57, "v1.3.0 Param.ignore_eos_token @57");
_Static_assert(offsetof(RKLLMParam, is_async) == 58, "v1.3.0 Param.is_async @58");
_Static_assert(offsetof(RKLLMParam, extend_param) == 60, "v1.3.0 Param.extend_param @60");
_Static_assert(sizeof(RKLLMMultiModalInput) == 144, "v1.3.0 RKLLMMultiModalInput is 144 bytes");
_Static_assert(offsetof(RKLLMMultiModalInput, image) == 8, "v1.3.0 MultiModalInput.image @8");
_Static_assert(offsetof(RKLLMMultiModalInput, video) == 72, "v1.3.0 MultiModalInput.video @72");
_Static_assert(sizeof(RKLLMInput) == 160, "v1.3.0 RKLLMInput is 160 bytes");
_Static_assert(sizeof(RKLLMSamplingParam) == 36, "v1.3.0 RKLLMSamplingParam is 36 bytes");
_Static_assert(offsetof(RKLLMSamplingParam, mirostat_eta) == 32, "SamplingParam.mirostat_eta @32");
_Static_assert(sizeof(RKLLMInferParam) == 40, "v1.3.0 RKLLMInferParam is 40 bytes");
_Static_assert(offsetof(RKLLMInferParam, sampling_params) == 24, "v1.3.0 InferParam.sampling_params @24");
_Static_assert(offsetof(RKLLMInferParam, keep_history) == 32, "v1.3.0 InferParam.keep_history @32");
_Static_assert(offsetof(RKLLMInferParam, max_new_tokens) == 36, "v1.3.0 InferParam.max_new_tokens @36");
_Static_assert(sizeof(RKLLMCallback) == 48, "v1.3.0 RKLLMCallback is 48 bytes");
#else
_Static_assert(sizeof(RKLLMParam) == 208, "v1.2.x RKLLMParam is 208 bytes");
_Static_assert(offsetof(RKLLMParam, is_async) == 57, "v1.2.x Param.is_async @57");
_Static_assert(offsetof(RKLLMParam, img_start) == 64, "v1.2.x Param.img_start @64");
_Static_assert(offsetof(RKLLMParam, img_end) == 72, "v1.2.x Param.img_end @72");
_Static_assert(offsetof(RKLLMParam, img_content) == 80, "v1.2.x Param.img_content @80");
_Static_assert(offsetof(RKLLMParam, extend_param) == 88, "v1.2.x Param.extend_param @88");
_Static_assert(sizeof(RKLLMMultiModalInput) == 48, "v1.2.x RKLLMMultiModalInput is 48 bytes");
_Static_assert(sizeof(RKLLMInput) == 64, "v1.2.x RKLLMInput is 64 bytes");
_Static_assert(sizeof(RKLLMInferParam) == 32, "v1.2.x RKLLMInferParam is 32 bytes");
_Static_assert(offsetof(RKLLMInferParam, keep_history) == 24, "v1.2.x InferParam.keep_history @24");
#endif
#else
#error "the emulator pins the LP64 layouts (x86_64, aarch64); 32-bit layouts differ (docs/runtime.md §2)"
#endif /* LP64 */

#ifdef __cplusplus
}
#endif

#endif /* RKLLM_EMU_RKLLM_H */
