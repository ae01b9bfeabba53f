/*
 * emu_runtime.c: the exported RKLLM API (docs/runtime.md §2.4) on top of the emulator's model file.
 *
 * Behaviour follows docs/runtime.md §4; where the real runtime's behaviour is only inferred, the code
 * says so with an [Inf] comment and MODEL_FORMAT.md documents the choice.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu.h"
#include "rkllm.h"

/* The version marker detect.py scans for (docs/runtime.md §5.1); `used` keeps it in the .so. */
__attribute__((used)) static const char emu_sdk_marker[] =
    "RKLLM SDK (version: " EMU_RUNTIME_VERSION " | target: Linux | build: emulator)";

#define EMU_DEFAULT_PROMPT_CACHE "./prompt_cache.bin"
#define EMU_PROMPT_CACHE_MAGIC "RKEMUPC1"
#define EMU_FORM_CALL_OPEN "<tool_call>\n{\"name\": \""
#define EMU_FORM_CALL_ARGS "\", \"arguments\": "

/* ---------------------------------------------------------------- handle */

typedef struct {
    emu_tokens kv;
    size_t sys_len;        /* leading KV tokens that are the system prompt */
    bool eos_pending;      /* the last answer ended with the end-of-turn token, not yet in the KV (§6) */
    char *last_user_input; /* input text of the last user run, for `after` rules */
} emu_slot;

typedef struct {
    emu_model model;
    double speed; /* 0 = never sleep */
    emu_npu *npu; /* the NPU this handle's runs share; NULL = sharing off or speed 0 (MODEL_FORMAT.md §8.1) */
    int max_context_len;
    int max_new_tokens;
    int n_keep;
    int n_batch;
    bool skip_special_token;
    bool ignore_eos_token;
    bool use_cross_attn;
    LLMResultCallback callback;
    void *callback_userdata;

    bool custom_template;
    char *template_system;
    char *template_prefix;
    char *template_postfix;
    bool tools_set;
    char *tools_system;
    char *tool_response_tag;
    emu_toollist tools;

    char **lora_names;
    size_t lora_count;
    int cross_attn_tokens;

    emu_slot *slots;
    atomic_int *kv_published; /* per slot: what rkllm_get_kv_cache_size reports, readable during a run */
    emu_tokens prompt_cache;
    bool prompt_cache_loaded;
    bool paused;
    bool paused_keep_history;
    uint64_t run_sequence;

    pthread_mutex_t lock;
    atomic_int busy;
    atomic_int abort_requested;
    _Atomic uint64_t abort_effective_ns;
    pthread_t async_thread;
    bool async_thread_started;
} emu_handle;

/* One input of a run, copied out of the caller's RKLLMInput (so rkllm_run_async owns its data). */
typedef struct {
    emu_role role;
    bool enable_thinking;
    RKLLMInputType type;
    char *text;          /* PROMPT or MULTIMODAL prompt; NULL for TOKEN/EMBED */
    int32_t *token_ids;  /* TOKEN */
    size_t token_count;  /* TOKEN */
    size_t extra_tokens; /* EMBED n_tokens, MULTIMODAL image/video tokens */
} emu_input;

typedef struct {
    RKLLMInferMode mode;
    bool keep_history;
    int max_new_tokens; /* resolved; <= 0 = unlimited */
    bool save_prompt_cache;
    char *prompt_cache_path;
} emu_infer;

/* Per-slot state of one run. */
typedef struct {
    const char *input_text;
    emu_tokens turn;
    emu_tokens prefill;
    size_t prefilled;
    size_t prompt_end;
    char *answer;
    emu_pieces pieces;
    size_t next_piece;
    emu_str carry;
    size_t generated;
    bool finished;
    float *hidden;
    float *logits;
} emu_slot_run;

static int emu_popcount(uint32_t mask) {
    int count = 0;
    for (; mask; mask &= mask - 1) count++;
    return count;
}

static int emu_npu_cores(const char *platform) {
    if (strcmp(platform, "RK3588") == 0) return 3;
    if (strcmp(platform, "RK3576") == 0) return 2;
    return 1; /* RK3562, RV1126B */
}

static void emu_publish_kv(emu_handle *h, size_t slot) {
    atomic_store(&h->kv_published[slot], (int)h->slots[slot].kv.len);
}

static uint64_t emu_scaled_ns(const emu_handle *h, double seconds) {
    if (h->speed <= 0.0 || seconds <= 0.0) return 0;
    return (uint64_t)(seconds * 1e9 / h->speed);
}

static int emu_log_level(void) {
    const char *value = getenv("RKLLM_LOG_LEVEL");
    return value != NULL ? atoi(value) : 0;
}

/* ---------------------------------------------------------------- init */

static int emu_init(LLMHandle *handle_out, RKLLMParam *param, LLMResultCallback callback, void *callback_userdata) {
    if (handle_out == NULL) {
        emu_log('E', "rkllm_init: the handle pointer is NULL");
        return -1;
    }
    *handle_out = NULL;
    if (param == NULL) {
        emu_log('E', "rkllm_init: param is NULL");
        return -1;
    }
    if (param->model_path == NULL) {
        emu_log('E', "rkllm_init: param->model_path is NULL");
        return -1;
    }
    if (callback == NULL) {
        emu_log('E', "rkllm_init: the result callback is NULL");
        return -1;
    }
    const char *speed_env = getenv("RKLLM_EMULATOR_SPEED");
    double env_speed = NAN;
    if (speed_env != NULL && *speed_env != '\0') {
        char *end = NULL;
        env_speed = strtod(speed_env, &end);
        if (end == speed_env || *end != '\0' || !(env_speed >= 0.0) || !isfinite(env_speed)) {
            emu_log('E', "RKLLM_EMULATOR_SPEED must be a number >= 0, got '%s'", speed_env);
            return -1;
        }
    }

    const char *sharing_env = getenv("RKLLM_EMULATOR_NPU_SHARING");
    int env_sharing = -1; /* -1 = the model file's npu_sharing decides */
    if (sharing_env != NULL && *sharing_env != '\0') {
        if (strcmp(sharing_env, "on") == 0 || strcmp(sharing_env, "1") == 0 || strcmp(sharing_env, "true") == 0) {
            env_sharing = 1;
        } else if (strcmp(sharing_env, "off") == 0 || strcmp(sharing_env, "0") == 0 ||
                   strcmp(sharing_env, "false") == 0) {
            env_sharing = 0;
        } else {
            emu_log('E', "RKLLM_EMULATOR_NPU_SHARING must be on or off, got '%s'", sharing_env);
            return -1;
        }
    }
    const char *npu_name = getenv("RKLLM_EMULATOR_NPU");
    if (npu_name == NULL || *npu_name == '\0') {
        npu_name = "default";
    } else if (!emu_npu_name_valid(npu_name)) {
        emu_log('E', "RKLLM_EMULATOR_NPU must be 1-64 letters, digits, '.', '_' or '-', got '%s'", npu_name);
        return -1;
    }

    emu_model model;
    emu_str model_messages = {0};
    bool model_ok = emu_model_load(param->model_path, &model, &model_messages) == 0;
    const char *driver = model_ok ? model.driver_version : EMU_WANTED_DRIVER_VERSION;
    emu_log('I', "rkllm-runtime version: %s, rknpu driver version: %s, platform: %s", EMU_RUNTIME_VERSION, driver,
            model_ok ? model.host_platform : "RK3588");
    if (emu_version_compare(driver, EMU_WANTED_DRIVER_VERSION) < 0) {
        emu_log('W', "Warning: Your rknpu driver version is too low, please upgrade to %s", EMU_WANTED_DRIVER_VERSION);
    }

    const RKLLMExtendParam *extend = &param->extend_param;
    int failed = 0;
    if (extend->n_batch < 1 || extend->n_batch > 100) {
        emu_log('E', "The n_batch must be between 1 and 100, but got %d", extend->n_batch);
        failed = 1;
    } else if (param->max_context_len <= 0) {
        /* [Inf] the real runtime's reaction to a non-positive context is not documented (§4.5). */
        emu_log('E', "max_context_len must be greater than 0, but got %d", param->max_context_len);
        failed = 1;
    } else if (param->n_keep >= param->max_context_len) {
        emu_log('E', "The n_keep must be less than the max_context_len");
        failed = 1;
    }
    if (!failed) {
        emu_log('I', "loading rkllm model from %s", param->model_path);
        if (!model_ok) {
            fwrite(emu_str_cstr(&model_messages), 1, model_messages.len, stdout);
            fflush(stdout);
            failed = 1;
        }
    }
    emu_str_free(&model_messages);
    if (failed) {
        if (model_ok) emu_model_free(&model);
        return -1;
    }

    emu_log('I', "rkllm-toolkit version: %s, max_context_limit: %d, npu_core_num: %d, target_platform: %s",
            model.toolkit_version, model.max_context_limit, emu_npu_cores(model.platform), model.platform);
    int cpus = extend->enabled_cpus_num;
    if (strcmp(model.platform, model.host_platform) != 0) {
        emu_log('E', "the model's target_platform does not match the real platform");
        failed = 1;
    } else if (emu_version_compare(EMU_RUNTIME_VERSION, model.toolkit_version) < 0) {
        emu_log('E',
                "The rkllm-runtime version is lower than the rkllm-toolkit version. Please update rkllm-runtime "
                "to %s or higher.",
                model.toolkit_version);
        failed = 1;
    } else if (param->max_context_len > model.max_context_limit) {
        emu_log('E', "max_context[%d] must be less than the model's max_context_limit[%d]", param->max_context_len,
                model.max_context_limit);
        failed = 1;
    } else {
        if (cpus == 0 && extend->enabled_cpus_mask == 0) {
            cpus = 4; /* [Inf] an all-zero CPU setting means the runtime default of 4 cores (§4.5). */
        } else if (emu_popcount(extend->enabled_cpus_mask) != cpus) {
            emu_log('E', "Mismatch between enabled CPUs mask and expected count. Please check the configuration.");
            failed = 1;
        }
        if (!failed && cpus < emu_npu_cores(model.host_platform)) {
            emu_log('E', "The number of enabled CPUs must be greater than or equal to the number of NPU cores.");
            failed = 1;
        }
    }
    if (!failed && model.fault == EMU_FAULT_INIT_FAIL) {
        emu_log('E', "emulated init failure (fault = init_fail in %s)", model.path);
        failed = 1;
    }
    if (failed) {
        emu_model_free(&model);
        return -1;
    }

    emu_handle *h = emu_xcalloc(1, sizeof(emu_handle));
    h->model = model;
    h->speed = isnan(env_speed) ? model.speed : env_speed;
    h->max_context_len = param->max_context_len;
    h->max_new_tokens = param->max_new_tokens;
    h->n_keep = param->n_keep < 0 ? -1 : param->n_keep;
    h->n_batch = extend->n_batch;
    h->skip_special_token = param->skip_special_token;
#ifdef RKLLM_EMU_ABI_V130
    h->ignore_eos_token = param->ignore_eos_token;
#endif
    h->use_cross_attn = extend->use_cross_attn != 0;
    h->callback = callback;
    h->callback_userdata = callback_userdata;
    h->slots = emu_xcalloc((size_t)h->n_batch, sizeof(emu_slot));
    h->kv_published = emu_xcalloc((size_t)h->n_batch, sizeof(atomic_int));
    for (int i = 0; i < h->n_batch; i++) atomic_init(&h->kv_published[i], 0);
    pthread_mutex_init(&h->lock, NULL);
    atomic_init(&h->busy, 0);
    atomic_init(&h->abort_requested, 0);
    atomic_init(&h->abort_effective_ns, 0);
    bool sharing = env_sharing >= 0 ? env_sharing == 1 : model.npu_sharing;
    if (sharing && h->speed > 0.0) {
        emu_str warning = {0};
        h->npu = emu_npu_attach(npu_name, &warning);
        if (warning.len > 0) {
            emu_log('W', "emulator: NPU '%s' is shared only by the handles of this process: %s", npu_name,
                    emu_str_cstr(&warning));
        }
        emu_str_free(&warning);
    }

    emu_sleep_ns(emu_scaled_ns(h, model.load_time_ms / 1000.0));
    emu_log('I', "Enabled cpus num: %d", cpus);
    *handle_out = h;
    return 0;
}

RKLLM_API RKLLMParam rkllm_createDefaultParam(void) {
    /* [Inf] the defaults of §4.5's table; the context and CPU values are the official demos' (§6). */
    RKLLMParam param;
    memset(&param, 0, sizeof(param));
    param.model_path = NULL;
    param.max_context_len = 4096;
    param.max_new_tokens = -1;
    param.top_k = 40;
    param.n_keep = -1;
    param.top_p = 0.9f;
    param.temperature = 0.8f;
    param.repeat_penalty = 1.1f;
    param.frequency_penalty = 0.0f;
    param.presence_penalty = 0.0f;
    param.mirostat = 0;
    param.mirostat_tau = 5.0f;
    param.mirostat_eta = 0.1f;
    param.skip_special_token = true;
    param.is_async = false;
    param.extend_param.base_domain_id = 0;
    param.extend_param.embed_flash = 1;
    param.extend_param.enabled_cpus_num = 4;
    param.extend_param.enabled_cpus_mask = CPU4 | CPU5 | CPU6 | CPU7;
    param.extend_param.n_batch = 1;
    param.extend_param.use_cross_attn = 0;
    return param;
}

#ifdef RKLLM_EMU_ABI_V130
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    if (callback == NULL) {
        if (handle != NULL) *handle = NULL;
        emu_log('E', "rkllm_init: the RKLLMCallback pointer is NULL");
        return -1;
    }
    /* Tokenizer and embedding callbacks are only used for models without them (§2.2); emulated models
       always have both, so they are accepted and ignored. */
    return emu_init(handle, param, callback->result_callback, callback->result_userdata);
}
#else
RKLLM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    return emu_init(handle, param, callback, NULL);
}
#endif

/* ---------------------------------------------------------------- configuration calls */

/* Claims the handle for a configuration change; fails while a run is in progress. */
static bool emu_begin_change(emu_handle *h, const char *what) {
    pthread_mutex_lock(&h->lock);
    if (atomic_load(&h->busy)) {
        pthread_mutex_unlock(&h->lock);
        /* [Inf] the real runtime's reaction to reconfiguration during a run is undocumented (§4.3). */
        emu_log('E', "%s: rkllm_run is running on this handle", what);
        return false;
    }
    return true;
}

static void emu_end_change(emu_handle *h) { pthread_mutex_unlock(&h->lock); }

RKLLM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                      const char *prompt_postfix) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (system_prompt == NULL || prompt_prefix == NULL || prompt_postfix == NULL) {
        emu_log('E', "rkllm_set_chat_template: system_prompt, prompt_prefix and prompt_postfix must not be NULL");
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_set_chat_template")) return -1;
    emu_log('W', "Calling rkllm_set_chat_template will disable the internal automatic chat template parsing, "
                 "including enable_thinking. Make sure your custom prompt is complete and valid.");
    char *escaped[3] = {emu_escape_for_log(system_prompt), emu_escape_for_log(prompt_prefix),
                        emu_escape_for_log(prompt_postfix)};
    emu_log('I', "reset chat template:");
    emu_log('I', "system_prompt: %s", escaped[0]);
    emu_log('I', "prompt_prefix: %s", escaped[1]);
    emu_log('I', "prompt_postfix: %s", escaped[2]);
    for (int i = 0; i < 3; i++) free(escaped[i]);
    free(h->template_system);
    free(h->template_prefix);
    free(h->template_postfix);
    h->template_system = emu_xstrdup(system_prompt);
    h->template_prefix = emu_xstrdup(prompt_prefix);
    h->template_postfix = emu_xstrdup(prompt_postfix);
    /* [Inf] the custom template replaces the built-in one, tools block included (I#429), until a later
       rkllm_set_function_tools re-renders the built-in template: the last of the two calls wins (§4.7). */
    h->custom_template = true;
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                       const char *tool_response_str) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (system_prompt == NULL || tools == NULL || tool_response_str == NULL) {
        emu_log('E', "rkllm_set_function_tools: system_prompt, tools and tool_response_str must not be NULL");
        return -1;
    }
    if (!h->model.has_template) {
        emu_log('E', "Failed to set function tools, possibly because the chat_template is empty.");
        return -1;
    }
    char reason[160];
    emu_toollist parsed;
    if (emu_tools_parse(tools, &parsed, reason, sizeof(reason)) != 0) {
        emu_log('E', "Failed to set function tools: %s", reason);
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_set_function_tools")) {
        emu_tools_free(&parsed);
        return -1;
    }
    emu_tools_free(&h->tools);
    h->tools = parsed;
    free(h->tools_system);
    free(h->tool_response_tag);
    h->tools_system = emu_xstrdup(system_prompt);
    h->tool_response_tag = emu_xstrdup(*tool_response_str ? tool_response_str : "tool_response");
    h->tools_set = true;
    h->custom_template = false; /* [Inf] back to the built-in template with tools (see set_chat_template) */
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (lora_adapter == NULL || lora_adapter->lora_adapter_path == NULL) {
        emu_log('E', "rkllm_load_lora: the adapter or its lora_adapter_path is NULL");
        return -1;
    }
    if (lora_adapter->lora_adapter_name == NULL || *lora_adapter->lora_adapter_name == '\0') {
        emu_log('E', "rkllm_load_lora: lora_adapter_name must be a non-empty string");
        return -1;
    }
    if (!emu_file_exists(lora_adapter->lora_adapter_path)) {
        emu_log('E', "lora adapter file '%s' does not exist", lora_adapter->lora_adapter_path);
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_load_lora")) return -1;
    bool known = false;
    for (size_t i = 0; i < h->lora_count; i++) known = known || strcmp(h->lora_names[i], lora_adapter->lora_adapter_name) == 0;
    if (!known) {
        h->lora_names = emu_xrealloc(h->lora_names, (h->lora_count + 1) * sizeof(char *));
        h->lora_names[h->lora_count++] = emu_xstrdup(lora_adapter->lora_adapter_name);
    }
    emu_log('I', "load lora adapter '%s' from '%s' (scale %.2f)", lora_adapter->lora_adapter_name,
            lora_adapter->lora_adapter_path, (double)lora_adapter->scale);
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (prompt_cache_path == NULL) {
        emu_log('E', "rkllm_load_prompt_cache: prompt_cache_path is NULL");
        return -1;
    }
    FILE *file = fopen(prompt_cache_path, "rb");
    if (file == NULL) {
        emu_log('E', "prompt cache file '%s' does not exist", prompt_cache_path);
        return -1;
    }
    char magic[8];
    uint32_t count = 0;
    emu_tokens loaded = {0};
    bool ok = fread(magic, 1, 8, file) == 8 && memcmp(magic, EMU_PROMPT_CACHE_MAGIC, 8) == 0 &&
              fread(&count, sizeof(count), 1, file) == 1 && count <= (1u << 24);
    if (ok) {
        loaded.ids = emu_xmalloc((count ? count : 1) * sizeof(int32_t));
        loaded.cap = count ? count : 1;
        ok = fread(loaded.ids, sizeof(int32_t), count, file) == count && fgetc(file) == EOF;
        loaded.len = count;
    }
    fclose(file);
    if (!ok) {
        emu_tokens_free(&loaded);
        emu_log('E', "prompt cache file '%s' is not a prompt cache saved by this runtime", prompt_cache_path);
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_load_prompt_cache")) {
        emu_tokens_free(&loaded);
        return -1;
    }
    emu_tokens_free(&h->prompt_cache);
    h->prompt_cache = loaded;
    h->prompt_cache_loaded = true;
    emu_log('I', "load prompt cache from '%s'", prompt_cache_path);
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_release_prompt_cache(LLMHandle handle) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (!emu_begin_change(h, "rkllm_release_prompt_cache")) return -1;
    emu_tokens_free(&h->prompt_cache);
    h->prompt_cache_loaded = false;
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (cross_attn_params == NULL) {
        emu_log('E', "rkllm_set_cross_attn_params: cross_attn_params is NULL");
        return -1;
    }
    if (!h->use_cross_attn) {
        /* [Inf] cross attention must be enabled at init through extend_param.use_cross_attn (§2.3). */
        emu_log('E', "cross attention is not enabled (extend_param.use_cross_attn = 0)");
        return -1;
    }
    if (cross_attn_params->num_tokens < 0 ||
        (cross_attn_params->num_tokens > 0 &&
         (cross_attn_params->encoder_k_cache == NULL || cross_attn_params->encoder_v_cache == NULL))) {
        emu_log('E', "rkllm_set_cross_attn_params: num_tokens must be >= 0 and the k/v caches must be set");
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_set_cross_attn_params")) return -1;
    h->cross_attn_tokens = cross_attn_params->num_tokens;
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if ((start_pos == NULL) != (end_pos == NULL)) {
        emu_log('E', "rkllm_clear_kv_cache: start_pos and end_pos must both be NULL or both be set");
        return -1;
    }
    if (!emu_begin_change(h, "rkllm_clear_kv_cache")) return -1;
    if (start_pos == NULL) {
        for (int i = 0; i < h->n_batch; i++) {
            emu_slot *slot = &h->slots[i];
            if (keep_system_prompt) {
                if (slot->kv.len > slot->sys_len) slot->kv.len = slot->sys_len;
            } else {
                slot->kv.len = 0;
                slot->sys_len = 0;
            }
            slot->eos_pending = false;
            emu_publish_kv(h, (size_t)i);
        }
        h->paused = false;
        emu_end_change(h);
        return 0;
    }
    /* Ranged clearing is only valid while paused with keep_history == 0 (rkllm.h comment, §4.2). */
    if (!h->paused || h->paused_keep_history) {
        emu_end_change(h);
        emu_log('E', "rkllm_clear_kv_cache: a range can only be cleared while a keep_history=0 run is paused");
        return -1;
    }
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot *slot = &h->slots[i];
        if (start_pos[i] < 0 || end_pos[i] < start_pos[i] || (size_t)end_pos[i] > slot->kv.len) {
            emu_end_change(h);
            emu_log('E', "rkllm_clear_kv_cache: range [%d, %d) of batch %d is outside the kv cache (size %zu)",
                    start_pos[i], end_pos[i], i, slot->kv.len);
            return -1;
        }
    }
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot *slot = &h->slots[i];
        size_t start = (size_t)start_pos[i];
        size_t end = (size_t)end_pos[i];
        if (keep_system_prompt && start < slot->sys_len) start = slot->sys_len < end ? slot->sys_len : end;
        memmove(slot->kv.ids + start, slot->kv.ids + end, (slot->kv.len - end) * sizeof(int32_t));
        slot->kv.len -= end - start;
        if (slot->sys_len > start) slot->sys_len = start;
        emu_publish_kv(h, (size_t)i);
    }
    emu_end_change(h);
    return 0;
}

RKLLM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    emu_handle *h = handle;
    if (h == NULL || cache_sizes == NULL) return -1;
    for (int i = 0; i < h->n_batch; i++) cache_sizes[i] = atomic_load(&h->kv_published[i]);
    return 0;
}

/* Cooperative: the run checks the flag at every token and prefill chunk (§4.3); abort_delay_ms models the
   reported latency before it takes effect (I#400). */
static void emu_request_abort(emu_handle *h) {
    atomic_store(&h->abort_effective_ns, emu_now_ns() + emu_scaled_ns(h, h->model.abort_delay_ms / 1000.0));
    atomic_store(&h->abort_requested, 1);
}

RKLLM_API int rkllm_abort(LLMHandle handle) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    emu_request_abort(h);
    return 0;
}

RKLLM_API int rkllm_is_running(LLMHandle handle) {
    emu_handle *h = handle;
    if (h == NULL) return 0;
    return atomic_load(&h->busy) ? 1 : 0; /* 1 while running, as the runtime really does (I#502) */
}

/* ---------------------------------------------------------------- input conversion */

static void emu_input_free(emu_input *input) {
    free(input->text);
    free(input->token_ids);
    memset(input, 0, sizeof(*input));
}

static void emu_inputs_free(emu_input *inputs, int count) {
    if (inputs == NULL) return;
    for (int i = 0; i < count; i++) emu_input_free(&inputs[i]);
    free(inputs);
}

static void emu_infer_free(emu_infer *infer) {
    free(infer->prompt_cache_path);
    memset(infer, 0, sizeof(*infer));
}

static int emu_convert_input(const RKLLMInput *in, int index, emu_input *out) {
    memset(out, 0, sizeof(*out));
    if (in->role == NULL) {
        emu_log('E', "rkllm_run: input %d has no role; set RKLLMInput.role to \"user\" or \"tool\"", index);
        return -1;
    }
    if (strcmp(in->role, "user") == 0) {
        out->role = EMU_ROLE_USER;
    } else if (strcmp(in->role, "tool") == 0) {
        out->role = EMU_ROLE_TOOL;
    } else {
        /* [Inf] §4.6 lists only "user" and "tool". */
        emu_log('E', "rkllm_run: unsupported role '%s' (expected \"user\" or \"tool\")", in->role);
        return -1;
    }
    out->enable_thinking = in->enable_thinking;
    out->type = in->input_type;
    switch (in->input_type) {
    case RKLLM_INPUT_PROMPT:
        if (in->prompt_input == NULL) {
            emu_log('E', "rkllm_run: prompt_input is NULL");
            return -1;
        }
        out->text = emu_xstrdup(in->prompt_input);
        return 0;
    case RKLLM_INPUT_TOKEN:
        if (in->token_input.input_ids == NULL || in->token_input.n_tokens == 0) {
            emu_log('E', "rkllm_run: token_input is empty (input_ids NULL or n_tokens 0)");
            return -1;
        }
        out->token_count = in->token_input.n_tokens;
        out->token_ids = emu_xmalloc(out->token_count * sizeof(int32_t));
        memcpy(out->token_ids, in->token_input.input_ids, out->token_count * sizeof(int32_t));
        return 0;
    case RKLLM_INPUT_EMBED:
        if (in->embed_input.embed == NULL || in->embed_input.n_tokens == 0) {
            emu_log('E', "rkllm_run: embed_input is empty (embed NULL or n_tokens 0)");
            return -1;
        }
        out->extra_tokens = in->embed_input.n_tokens;
        return 0;
    case RKLLM_INPUT_MULTIMODAL: {
        const RKLLMMultiModalInput *mm = &in->multimodal_input;
        if (mm->prompt == NULL || strstr(mm->prompt, "<image>") == NULL) {
            emu_log('E', "multimodal input must contain the <image> tag, for plain text input, please use "
                         "prompt_input");
            return -1;
        }
#ifdef RKLLM_EMU_ABI_V130
        size_t image_tokens = mm->image.n_image * mm->image.n_image_tokens;
        size_t video_tokens = mm->video.n_video * mm->video.n_frame_per_video * mm->video.n_frame_tokens;
        if ((image_tokens > 0 && mm->image.image_embed == NULL) || (video_tokens > 0 && mm->video.video_embed == NULL)) {
            emu_log('E', "rkllm_run: multimodal_input has image or video tokens but no embeddings");
            return -1;
        }
        out->extra_tokens = image_tokens + video_tokens;
#else
        size_t image_tokens = mm->n_image * mm->n_image_tokens;
        if (image_tokens > 0 && mm->image_embed == NULL) {
            emu_log('E', "rkllm_run: multimodal_input has image tokens but no image_embed");
            return -1;
        }
        out->extra_tokens = image_tokens;
#endif
        out->text = emu_xstrdup(mm->prompt);
        return 0;
    }
    default:
        emu_log('E', "rkllm_run: unsupported input_type %d", (int)in->input_type);
        return -1;
    }
}

#ifdef RKLLM_EMU_ABI_V130
/* [Inf] the runtime's accepted ranges are undocumented; these follow the meaning of each field (§4.5). */
static bool emu_sampling_valid(const RKLLMSamplingParam *s) {
    const char *problem = NULL;
    double value = 0;
    if (s->top_k < 0) {
        problem = "top_k must be >= 0";
        value = s->top_k;
    } else if (!(s->top_p >= 0.0f && s->top_p <= 1.0f)) {
        problem = "top_p must be in [0, 1]";
        value = s->top_p;
    } else if (!(s->temperature >= 0.0f) || !isfinite(s->temperature)) {
        problem = "temperature must be >= 0";
        value = s->temperature;
    } else if (!(s->repeat_penalty >= 0.0f) || !isfinite(s->repeat_penalty)) {
        problem = "repeat_penalty must be >= 0";
        value = s->repeat_penalty;
    } else if (!(s->frequency_penalty >= -2.0f && s->frequency_penalty <= 2.0f)) {
        problem = "frequency_penalty must be in [-2, 2]";
        value = s->frequency_penalty;
    } else if (!(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f)) {
        problem = "presence_penalty must be in [-2, 2]";
        value = s->presence_penalty;
    } else if (s->mirostat < 0 || s->mirostat > 2) {
        problem = "mirostat must be 0, 1 or 2";
        value = s->mirostat;
    } else if (!(s->mirostat_tau >= 0.0f) || !(s->mirostat_eta >= 0.0f)) {
        problem = "mirostat_tau and mirostat_eta must be >= 0";
        value = !(s->mirostat_tau >= 0.0f) ? s->mirostat_tau : s->mirostat_eta;
    }
    if (problem != NULL) {
        emu_log('E', "rkllm_run: invalid sampling_params: %s, got %g", problem, value);
        return false;
    }
    return true;
}
#endif

static int emu_convert_infer(const emu_handle *h, const RKLLMInferParam *in, emu_infer *out) {
    memset(out, 0, sizeof(*out));
    if (in == NULL) {
        emu_log('E', "rkllm_run: rkllm_infer_params is NULL");
        return -1;
    }
    if (in->mode != RKLLM_INFER_GENERATE && in->mode != RKLLM_INFER_GET_LAST_HIDDEN_LAYER &&
        in->mode != RKLLM_INFER_GET_LOGITS) {
        emu_log('E', "rkllm_run: unsupported infer mode %d", (int)in->mode);
        return -1;
    }
    out->mode = in->mode;
    if (in->lora_params != NULL) {
        const char *name = in->lora_params->lora_adapter_name;
        bool known = false;
        for (size_t i = 0; name != NULL && i < h->lora_count; i++) known = known || strcmp(h->lora_names[i], name) == 0;
        if (!known) {
            emu_log('E', "rkllm_run: lora adapter '%s' has not been loaded with rkllm_load_lora",
                    name != NULL ? name : "(NULL)");
            return -1;
        }
        /* LoRA does not change scripted answers: the emulator only checks that the name was loaded. */
    }
    if (in->prompt_cache_params != NULL && in->prompt_cache_params->save_prompt_cache) {
        out->save_prompt_cache = true;
        const char *path = in->prompt_cache_params->prompt_cache_path;
        out->prompt_cache_path = emu_xstrdup(path != NULL ? path : EMU_DEFAULT_PROMPT_CACHE);
    }
    out->keep_history = in->keep_history != 0;
    out->max_new_tokens = h->max_new_tokens;
#ifdef RKLLM_EMU_ABI_V130
    if (in->sampling_params != NULL && !emu_sampling_valid(in->sampling_params)) {
        emu_infer_free(out);
        return -1;
    }
    if (in->max_new_tokens > 0) out->max_new_tokens = in->max_new_tokens;
#endif
    return 0;
}

/* ---------------------------------------------------------------- templates and answers */

static bool emu_thinking_output(const emu_handle *h, const emu_input *in) {
    return !h->custom_template && h->model.has_template && h->model.thinking && in->enable_thinking;
}

/* [Inf] Qwen3's template closes an empty <think></think> when thinking is off; the emulator adds it when
   the model thinks but the run disabled it, or the run asked for thinking the model cannot do. */
static bool emu_empty_think_block(const emu_handle *h, const emu_input *in) {
    return !h->custom_template && h->model.has_template && !emu_thinking_output(h, in) &&
           (h->model.thinking || in->enable_thinking);
}

static void emu_render_system(const emu_handle *h, emu_str *out) {
    if (h->custom_template) {
        emu_str_appendz(out, h->template_system);
        return;
    }
    if (!h->model.has_template) return;
    const char *system = h->tools_set && *h->tools_system ? h->tools_system : h->model.system_prompt;
    if (!h->tools_set || h->tools.count == 0) {
        if (*system) emu_str_printf(out, "<|im_start|>system\n%s<|im_end|>\n", system);
        return;
    }
    /* The Qwen2.5 / Hermes tools block (docs/openai-api.md §3.1). */
    emu_str_appendz(out, "<|im_start|>system\n");
    if (*system) emu_str_printf(out, "%s\n\n", system);
    emu_str_appendz(out, "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                         "You are provided with function signatures within <tools></tools> XML tags:\n<tools>");
    for (size_t i = 0; i < h->tools.count; i++) emu_str_printf(out, "\n%s", h->tools.json_items[i]);
    emu_str_appendz(out, "\n</tools>\n\nFor each function call, return a json object with function name and "
                         "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                         "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
}

static void emu_render_turn(const emu_handle *h, const emu_input *in, emu_str *out) {
    if (h->custom_template) {
        /* [Inf] user and tool turns both use prefix + text + postfix under a custom template (§4.7). */
        emu_str_printf(out, "%s%s%s", h->template_prefix, in->text, h->template_postfix);
        return;
    }
    if (!h->model.has_template) {
        emu_str_appendz(out, in->text);
        return;
    }
    emu_str_appendz(out, "<|im_start|>user\n");
    if (in->role == EMU_ROLE_TOOL) {
        const char *tag = h->tool_response_tag != NULL ? h->tool_response_tag : "tool_response";
        emu_str_printf(out, "<%s>\n%s\n</%s>", tag, in->text, tag);
    } else {
        emu_str_appendz(out, in->text);
    }
    emu_str_appendz(out, "<|im_end|>\n<|im_start|>assistant\n");
    if (emu_empty_think_block(h, in)) emu_str_appendz(out, "<think>\n\n</think>\n\n");
}

static bool emu_ends_with(const char *text, const char *suffix) {
    size_t text_len = strlen(text);
    size_t suffix_len = strlen(suffix);
    return text_len >= suffix_len && memcmp(text + text_len - suffix_len, suffix, suffix_len) == 0;
}

/* The tools a scripted answer may name: those of the template the run uses. A custom template (an engine
   that renders its own prompt) replaces the built-in one, tools block included (I#429), so its tools are the
   <tools> block of its system prompt, never a list left by an earlier rkllm_set_function_tools. */
static void emu_active_tools(const emu_handle *h, emu_toollist *out, bool *owned) {
    if (!h->custom_template) {
        *out = h->tools;
        *owned = false;
        return;
    }
    emu_tools_from_system_prompt(h->template_system, out);
    *owned = true;
}

/* Forced tool-call continuation (MODEL_FORMAT.md): the engine prefilled part of the assistant turn
   through the template postfix, so the emulator continues from inside it. NULL = no forced form. */
static char *emu_continue_prefill(const emu_handle *h, const emu_input *in, const char *input_text,
                                  const char *last_user, const emu_toollist *tools, const char *answer) {
    const char *postfix = h->template_postfix;
    emu_str out = {0};
    if (emu_ends_with(postfix, EMU_FORM_CALL_OPEN)) {
        char *name = NULL;
        char *arguments = NULL;
        if (emu_first_tool_call(answer, &name, &arguments)) {
            emu_str_printf(&out, "%s%s%s}\n</tool_call>", name, EMU_FORM_CALL_ARGS, arguments);
            free(name);
            free(arguments);
            return emu_str_steal(&out);
        }
        for (size_t i = 0; i < tools->count; i++) {
            if (tools->names[i] == NULL) continue;
            emu_str_printf(&out, "%s%s{}}\n</tool_call>", tools->names[i], EMU_FORM_CALL_ARGS);
            return emu_str_steal(&out);
        }
        return NULL; /* no tool to name: the model ignores the prefill */
    }
    const char *open = NULL;
    for (const char *p = strstr(postfix, EMU_FORM_CALL_OPEN); p != NULL; p = strstr(p + 1, EMU_FORM_CALL_OPEN)) open = p;
    if (open != NULL && emu_ends_with(postfix, EMU_FORM_CALL_ARGS)) {
        const char *name_start = open + strlen(EMU_FORM_CALL_OPEN);
        size_t name_len = strlen(name_start) - strlen(EMU_FORM_CALL_ARGS);
        if (memchr(name_start, '"', name_len) == NULL) {
            char *name = emu_xstrndup(name_start, name_len);
            char *arguments = emu_scripted_arguments_for(&h->model, in->role, input_text, last_user, tools, name);
            emu_str_printf(&out, "%s}\n</tool_call>", arguments != NULL ? arguments : "{}");
            free(arguments);
            free(name);
            return emu_str_steal(&out);
        }
    }
    if (emu_ends_with(postfix, "{")) {
        /* JSON-mode prefill: continue the object the engine opened. */
        const char *body = answer;
        while (*body == ' ' || *body == '\n' || *body == '\t' || *body == '\r') body++;
        if (*body == '{') {
            emu_str_appendz(&out, body + 1);
        } else {
            emu_str_appendz(&out, "\"text\": ");
            emu_json_append_string(&out, answer, strlen(answer));
            emu_str_appendz(&out, "}");
        }
        return emu_str_steal(&out);
    }
    return NULL;
}

static char *emu_build_answer(const emu_handle *h, const emu_input *in, const char *input_text,
                              const char *last_user) {
    emu_toollist tools;
    bool owned = false;
    emu_active_tools(h, &tools, &owned);
    char *answer = emu_select_answer(&h->model, in->role, input_text, last_user, &tools);
    if (h->custom_template) {
        char *continued = emu_continue_prefill(h, in, input_text, last_user, &tools, answer);
        if (continued != NULL) {
            free(answer);
            answer = continued;
        }
    } else if (emu_thinking_output(h, in)) {
        char *thought = emu_expand_text(h->model.thinking_text, input_text, &tools);
        emu_str out = {0};
        emu_str_printf(&out, "<think>\n%s\n</think>\n\n%s", thought != NULL ? thought : "", answer);
        free(thought);
        free(answer);
        answer = emu_str_steal(&out);
    }
    if (owned) emu_tools_free(&tools);
    return answer;
}

/* ---------------------------------------------------------------- the run */

/* Makes room for `need` more tokens by deleting from position n_keep (§4.6). -1 = the context is not enough. */
static int emu_make_room(emu_handle *h, size_t slot_index, size_t need, bool decoding, emu_str *error) {
    emu_slot *slot = &h->slots[slot_index];
    size_t max_context = (size_t)h->max_context_len;
    if (slot->kv.len + need <= max_context) return 0;
    size_t keep = h->n_keep >= 0 ? (size_t)h->n_keep : slot->sys_len;
    size_t discard = slot->kv.len + need - max_context;
    /* [Inf] while decoding, half of the deletable history goes at once (llama.cpp-style shift), so the
       shift is logged once per half window rather than once per token. */
    if (decoding && slot->kv.len > keep && (slot->kv.len - keep) / 2 > discard) discard = (slot->kv.len - keep) / 2;
    if (keep + discard > slot->kv.len) {
        emu_str_printf(error, "the context is not enough! history_s: %zu, cur_input_s: %zu, discard_s: %zu, max_context: %zu!",
                       slot->kv.len, need, discard, max_context);
        return -1;
    }
    emu_log('I', "context to be full[%zu + %zu], delete the kv cache in [%zu, %zu), total: %zu", slot->kv.len, need,
            keep, keep + discard, slot->kv.len - discard + need);
    memmove(slot->kv.ids + keep, slot->kv.ids + keep + discard, (slot->kv.len - keep - discard) * sizeof(int32_t));
    slot->kv.len -= discard;
    if (slot->sys_len > keep) slot->sys_len = keep;
    emu_publish_kv(h, slot_index);
    return 0;
}

static bool emu_starts_with(const emu_tokens *tokens, const emu_tokens *prefix) {
    return tokens->len >= prefix->len &&
           emu_common_prefix(tokens->ids, tokens->len, prefix->ids, prefix->len) == prefix->len;
}

static bool emu_abort_effective(emu_handle *h) {
    return atomic_load(&h->abort_requested) && emu_now_ns() >= atomic_load(&h->abort_effective_ns);
}

static int32_t emu_opaque_token(uint64_t sequence, size_t slot, size_t index) {
    uint64_t key[3] = {sequence, (uint64_t)slot, (uint64_t)index};
    return emu_token_id((const char *)key, sizeof(key));
}

static float emu_pseudo_value(int32_t token, size_t index) {
    uint32_t mixed = (uint32_t)token * 2654435761u ^ (uint32_t)index * 40503u;
    mixed ^= mixed >> 15;
    return (float)(mixed % 20001u) / 10000.0f - 1.0f;
}

static void emu_write_prompt_cache(const char *path, const int32_t *ids, size_t count) {
    FILE *file = fopen(path, "wb");
    uint32_t stored = (uint32_t)count;
    bool ok = file != NULL && fwrite(EMU_PROMPT_CACHE_MAGIC, 1, 8, file) == 8 &&
              fwrite(&stored, sizeof(stored), 1, file) == 1 && fwrite(ids, sizeof(int32_t), count, file) == count;
    if (file != NULL && fclose(file) != 0) ok = false;
    if (!ok) emu_log('E', "failed to save prompt cache to '%s': %s", path, strerror(errno));
}

static void emu_print_perf(const RKLLMPerfStat *perf) {
    /* [Inf] the layout of the RKLLM_LOG_LEVEL=1 table is not documented; it carries TTFT, tokens/s and
       memory like the runtime's (§4.9). */
    double prefill_per_token = perf->prefill_tokens ? perf->prefill_time_ms / perf->prefill_tokens : 0.0;
    double generate_per_token = perf->generate_tokens ? perf->generate_time_ms / perf->generate_tokens : 0.0;
    emu_log('I', "--------------------------------------------------------------------------------------");
    emu_log('I', " Stage         Total Time (ms)  Tokens    Time per Token (ms)      Tokens per Second");
    emu_log('I', "--------------------------------------------------------------------------------------");
    emu_log('I', " Prefill       %-16.2f %-9d %-24.2f %.2f", (double)perf->prefill_time_ms, perf->prefill_tokens,
            prefill_per_token, prefill_per_token > 0 ? 1000.0 / prefill_per_token : 0.0);
    emu_log('I', " Generate      %-16.2f %-9d %-24.2f %.2f", (double)perf->generate_time_ms, perf->generate_tokens,
            generate_per_token, generate_per_token > 0 ? 1000.0 / generate_per_token : 0.0);
    emu_log('I', "--------------------------------------------------------------------------------------");
    emu_log('I', " Time to first token (ms): %.2f", (double)perf->prefill_time_ms + generate_per_token);
    emu_log('I', " Peak Memory Usage (GB): %.2f", (double)perf->memory_usage_mb / 1024.0);
    emu_log('I', "--------------------------------------------------------------------------------------");
}

typedef enum { EMU_END_FINISH, EMU_END_PAUSE, EMU_END_ABORT, EMU_END_ERROR } emu_end;

typedef struct {
    emu_handle *h;
    emu_input *inputs;
    emu_infer infer;
    void *userdata;
    emu_npu_run npu;      /* this run's place on the shared NPU (§8.1) */
    uint64_t callback_ns; /* time spent inside callbacks, which is not generate time (§7) */
} emu_job;

static void emu_free_job(emu_job *job) {
    emu_inputs_free(job->inputs, job->h->n_batch);
    job->inputs = NULL;
    emu_infer_free(&job->infer);
}

/* Every callback goes through here. [Inf] A run inside its callback computes nothing: it does not slow the runs
   of other handles, and the time it spends there (a caller blocking to pause it) is not perf time (§7, §8). */
static int emu_callback(emu_job *job, RKLLMResult *results, LLMCallState state) {
    emu_npu_run_computing(&job->npu, false);
    uint64_t entered = emu_now_ns();
    int verdict = job->h->callback(results, job->userdata, state);
    job->callback_ns += emu_now_ns() - entered;
    emu_npu_run_computing(&job->npu, true);
    return verdict;
}

/* Emits the ERROR callback with the message as text ([Inf] community code reads text on ERROR, §4.2). */
static void emu_emit_error(emu_job *job, const char *message) {
    emu_log('E', "%s", message);
    RKLLMResult *results = emu_xcalloc((size_t)job->h->n_batch, sizeof(RKLLMResult));
    for (int i = 0; i < job->h->n_batch; i++) {
        results[i].text = message;
        results[i].token_id = -1;
    }
    emu_callback(job, results, RKLLM_RUN_ERROR);
    free(results);
}

/* Prepares every slot's prompt: what to reuse, what to prefill. -1 with error set when it cannot fit. */
static int emu_prepare(emu_job *job, emu_slot_run *runs, const emu_tokens *system_tokens, emu_str *error) {
    emu_handle *h = job->h;
    bool resume = h->paused; /* [Inf] after a pause the next run continues the kept KV (§4.2) */
    h->paused = false;
    int log_level = emu_log_level();
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot *slot = &h->slots[i];
        emu_slot_run *run = &runs[i];
        const emu_input *in = &job->inputs[i];
        bool raw = in->type == RKLLM_INPUT_TOKEN || in->type == RKLLM_INPUT_EMBED;
        bool system_resident = slot->sys_len == system_tokens->len && emu_starts_with(&slot->kv, system_tokens);
        bool append = resume || (job->infer.keep_history && slot->kv.len > 0 && (raw || system_resident));
        bool rebuilt = !append && job->infer.keep_history && slot->kv.len > 0;
        if (rebuilt) {
            /* [Inf] a new system prompt invalidates the history that was computed under the old one. */
            emu_log('I', "the system prompt changed, the kv cache of batch %d is rebuilt", i);
        }
        if (log_level >= 2) {
            emu_log('I', "current kv cache size: %zu", slot->kv.len);
            emu_log('I', "keep history status: %d", job->infer.keep_history ? 1 : 0);
        }
        /* The previous answer's end-of-turn token closes it at the start of a templated turn; raw (TOKEN/EMBED)
           turns bring their own markers, and a fresh prompt drops the old answer anyway. */
        bool close_turn = append && !raw && slot->eos_pending;
        slot->eos_pending = false;
        if (append) {
            size_t turn_len = run->turn.len + (close_turn ? 1 : 0);
            if (turn_len > (size_t)h->max_context_len) {
                emu_str_printf(error, "the length of prompt is greater than max context (prompt: %zu tokens, max context: %d)",
                               turn_len, h->max_context_len);
                return -1;
            }
            if (emu_make_room(h, (size_t)i, turn_len, false, error) != 0) return -1;
            if (close_turn) emu_tokens_push(&run->prefill, emu_token_id(EMU_EOS_TEXT, strlen(EMU_EOS_TEXT)));
            emu_tokens_append(&run->prefill, run->turn.ids, run->turn.len);
            continue;
        }
        emu_tokens prompt = {0};
        if (!raw) emu_tokens_append(&prompt, system_tokens->ids, system_tokens->len);
        emu_tokens_append(&prompt, run->turn.ids, run->turn.len);
        if (prompt.len > (size_t)h->max_context_len) {
            emu_str_printf(error, "the length of prompt is greater than max context (prompt: %zu tokens, max context: %d)",
                           prompt.len, h->max_context_len);
            emu_tokens_free(&prompt);
            return -1;
        }
        /* Reuse the longest matching prefix of the resident KV or of a loaded prompt cache (§4.6, §4.9). [Inf] A
           rebuild under a changed system prompt starts from nothing: not even the leading tokens the old and the
           new system prompt share are kept, so the whole new prompt is prefilled (MODEL_FORMAT.md §6). */
        size_t reuse = rebuilt ? 0 : emu_common_prefix(slot->kv.ids, slot->kv.len, prompt.ids, prompt.len);
        if (i == 0 && h->prompt_cache_loaded) {
            size_t cached = emu_common_prefix(h->prompt_cache.ids, h->prompt_cache.len, prompt.ids, prompt.len);
            if (cached > reuse) {
                slot->kv.len = 0;
                emu_tokens_append(&slot->kv, h->prompt_cache.ids, cached);
                reuse = cached;
            }
        }
        slot->kv.len = reuse;
        slot->sys_len = raw ? 0 : system_tokens->len;
        if (slot->sys_len > reuse) slot->sys_len = reuse; /* grows back as the prefill re-adds it */
        emu_publish_kv(h, (size_t)i);
        if (reuse > 0) emu_log('I', "kv cache matches %zu / %zu tokens of prompt", reuse, prompt.len);
        emu_tokens_append(&run->prefill, prompt.ids + reuse, prompt.len - reuse);
        emu_tokens_free(&prompt);
    }
    return 0;
}

/* Sleeps the prefill time chunk by chunk, filling the KV; false when an abort took effect. */
static bool emu_prefill(emu_job *job, emu_slot_run *runs, const emu_tokens *system_tokens) {
    emu_handle *h = job->h;
    uint64_t per_token_ns = emu_scaled_ns(h, 1.0 / h->model.prefill_tokens_per_s);
    size_t chunk = (size_t)h->model.prefill_chunk_tokens;
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot *slot = &h->slots[i];
        emu_slot_run *run = &runs[i];
        bool raw = job->inputs[i].type == RKLLM_INPUT_TOKEN || job->inputs[i].type == RKLLM_INPUT_EMBED;
        while (run->prefilled < run->prefill.len) {
            if (emu_abort_effective(h)) return false;
            size_t take = run->prefill.len - run->prefilled < chunk ? run->prefill.len - run->prefilled : chunk;
            emu_npu_work(&job->npu, per_token_ns * take);
            emu_tokens_append(&slot->kv, run->prefill.ids + run->prefilled, take);
            run->prefilled += take;
            /* Once the system prompt is complete it stays resident, even if this run is aborted later. */
            if (!raw && slot->sys_len < system_tokens->len && emu_starts_with(&slot->kv, system_tokens)) {
                slot->sys_len = system_tokens->len;
            }
            emu_publish_kv(h, (size_t)i);
        }
        run->prompt_end = slot->kv.len;
    }
    return !emu_abort_effective(h);
}

/* Delivers the hidden-layer or logits result of GET_LAST_HIDDEN_LAYER / GET_LOGITS modes (§4.2). */
static void emu_emit_tensors(emu_job *job, emu_slot_run *runs) {
    emu_handle *h = job->h;
    RKLLMResult *results = emu_xcalloc((size_t)h->n_batch, sizeof(RKLLMResult));
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot_run *run = &runs[i];
        results[i].token_id = -1;
        size_t tokens = run->turn.len;
        if (job->infer.mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) {
            size_t dim = (size_t)h->model.hidden_size;
            run->hidden = emu_xmalloc(tokens * dim * sizeof(float));
            for (size_t t = 0; t < tokens; t++) {
                for (size_t d = 0; d < dim; d++) run->hidden[t * dim + d] = emu_pseudo_value(run->turn.ids[t], d);
            }
            results[i].last_hidden_layer.hidden_states = run->hidden;
            results[i].last_hidden_layer.embd_size = (int)dim;
            results[i].last_hidden_layer.num_tokens = (int)tokens;
        } else {
            size_t vocab = (size_t)h->model.vocab_size;
            int32_t last = tokens ? run->turn.ids[tokens - 1] : 0;
            run->logits = emu_xmalloc(vocab * sizeof(float));
            for (size_t v = 0; v < vocab; v++) run->logits[v] = emu_pseudo_value(last, v);
            results[i].logits.logits = run->logits;
            results[i].logits.vocab_size = (int)vocab;
            results[i].logits.num_tokens = 1;
        }
    }
    emu_callback(job, results, RKLLM_RUN_NORMAL);
    /* The buffers are only valid until the next callback (§4.2); a return of 2 (v1.3.0) frees them now,
       which is the same moment here because the next callback is FINISH. */
    for (int i = 0; i < h->n_batch; i++) {
        free(runs[i].hidden);
        free(runs[i].logits);
        runs[i].hidden = NULL;
        runs[i].logits = NULL;
    }
    free(results);
}

/* Next generated piece of a slot: its bytes and id. false when the slot has nothing more to say. */
static bool emu_next_piece(const emu_handle *h, emu_slot_run *run, const char **bytes, size_t *len, bool *is_eos) {
    *is_eos = false;
    if (run->next_piece < run->pieces.len) {
        const emu_piece *piece = &run->pieces.items[run->next_piece++];
        *bytes = run->answer + piece->offset;
        *len = piece->len;
        return true;
    }
    if (h->ignore_eos_token && run->pieces.len > 0) {
        /* [Inf] past EOS the emulator repeats its answer until max_new_tokens or a full context. */
        run->next_piece = 0;
        return emu_next_piece(h, run, bytes, len, is_eos);
    }
    *is_eos = true;
    return false;
}

/* The decode loop; returns how the run ended. error is set for EMU_END_ERROR. */
static emu_end emu_decode(emu_job *job, emu_slot_run *runs, emu_str *error, size_t *total_generated) {
    emu_handle *h = job->h;
    uint64_t per_token_ns = emu_scaled_ns(h, 1.0 / h->model.decode_tokens_per_s);
    RKLLMResult *results = emu_xcalloc((size_t)h->n_batch, sizeof(RKLLMResult));
    emu_str *texts = emu_xcalloc((size_t)h->n_batch, sizeof(emu_str));
    emu_end end = EMU_END_FINISH;
    int32_t eos_id = emu_token_id(EMU_EOS_TEXT, strlen(EMU_EOS_TEXT));
    for (;;) {
        bool any_active = false;
        for (int i = 0; i < h->n_batch; i++) any_active = any_active || !runs[i].finished;
        if (!any_active) break;
        if (emu_abort_effective(h)) {
            end = EMU_END_ABORT;
            break;
        }
        const emu_model *model = &h->model;
        if (model->fault != EMU_FAULT_NONE && (long)*total_generated >= model->fault_tokens) {
            if (model->fault == EMU_FAULT_CRASH) {
                fflush(stdout);
                raise(SIGSEGV);
                abort(); /* in case SIGSEGV is ignored */
            }
            if (model->fault == EMU_FAULT_HANG) {
                emu_npu_run_computing(&job->npu, false); /* a hung run is stuck, not computing */
                for (;;) emu_sleep_ns(1000000000ull); /* unresponsive: ignores abort, never returns */
            }
            if (model->fault == EMU_FAULT_ERROR) {
                emu_str_printf(error, "emulated fault: runtime error after %zu generated tokens", *total_generated);
                end = EMU_END_ERROR;
                break;
            }
        }
        bool waiting = false;
        bool slept = false;
        for (int i = 0; i < h->n_batch; i++) {
            emu_slot_run *run = &runs[i];
            emu_slot *slot = &h->slots[i];
            RKLLMResult *result = &results[i];
            memset(result, 0, sizeof(*result));
            result->token_id = -1;
            if (run->finished) continue;
            if (job->infer.max_new_tokens > 0 && run->generated >= (size_t)job->infer.max_new_tokens) {
                run->finished = true;
                continue;
            }
            if (h->ignore_eos_token && slot->kv.len >= (size_t)h->max_context_len) {
                run->finished = true;
                continue;
            }
            const char *bytes = NULL;
            size_t len = 0;
            bool is_eos = false;
            bool has_piece = emu_next_piece(h, run, &bytes, &len, &is_eos);
            if (!slept && (has_piece || !h->skip_special_token)) {
                /* One decode step per delivered token; [Inf] it starts when the callback returned (§4.3). */
                emu_npu_work(&job->npu, per_token_ns);
                slept = true;
            }
            if (!has_piece) {
                run->finished = true;
                if (h->skip_special_token) {
                    /* [Inf] The sampled end-of-turn token is not fed back through the model in this run: it
                       enters the KV with the next appended turn, whose prefill counts it (§6). So after every
                       finished run the KV holds exactly the reused, prefilled and generated tokens. */
                    slot->eos_pending = true;
                    continue;
                }
                if (emu_make_room(h, (size_t)i, 1, true, error) != 0) {
                    end = EMU_END_ERROR;
                    break;
                }
                emu_tokens_push(&slot->kv, eos_id);
                emu_publish_kv(h, (size_t)i);
                /* [Inf] with skip_special_token off, the end-of-turn token is delivered as text (and counted). */
                bytes = EMU_EOS_TEXT;
                len = strlen(EMU_EOS_TEXT);
            } else {
                if (emu_make_room(h, (size_t)i, 1, true, error) != 0) {
                    end = EMU_END_ERROR;
                    break;
                }
                emu_tokens_push(&slot->kv, emu_token_id(bytes, len));
                emu_publish_kv(h, (size_t)i);
            }
            run->generated++;
            (*total_generated)++;
            result->token_id = emu_token_id(bytes, len);
            emu_str_append(&run->carry, bytes, len);
            bool incomplete = emu_utf8_incomplete_tail(run->carry.data, run->carry.len) > 0;
            if (incomplete && h->model.utf8_waiting) {
                /* Hold the bytes back; they arrive with the next piece (§4.2 WAITING). */
                waiting = true;
                continue;
            }
            emu_str_clear(&texts[i]);
            emu_str_append(&texts[i], run->carry.data, run->carry.len);
            emu_str_clear(&run->carry);
            result->text = texts[i].data;
        }
        if (end == EMU_END_ERROR) break;
        bool delivered = false;
        for (int i = 0; i < h->n_batch; i++) delivered = delivered || results[i].token_id >= 0;
        if (!delivered) continue;
        /* With one batch element an incomplete character is a WAITING callback; with several, the element's
           text is NULL in a NORMAL callback (the multi-batch docs say to NULL-check, §4.2). */
        LLMCallState state = (h->n_batch == 1 && waiting) ? RKLLM_RUN_WAITING : RKLLM_RUN_NORMAL;
        int verdict = emu_callback(job, results, state);
        if (verdict == 1) {
            end = EMU_END_PAUSE;
            break;
        }
        /* 0 = continue; 2 = release the output buffer (v1.3.0), nothing to release for text. [Inf] other
           values continue as well. */
    }
    for (int i = 0; i < h->n_batch; i++) emu_str_free(&texts[i]);
    free(texts);
    free(results);
    return end;
}

static void emu_finish_kv(emu_handle *h, bool keep_history, bool paused) {
    for (int i = 0; i < h->n_batch; i++) {
        emu_slot *slot = &h->slots[i];
        if (slot->sys_len > slot->kv.len) slot->sys_len = slot->kv.len;
        /* keep_history=0: only the system prompt stays resident for the next run (§4.6). */
        if (!paused && !keep_history) {
            slot->kv.len = slot->sys_len;
            slot->eos_pending = false;
        }
        emu_publish_kv(h, (size_t)i);
    }
}

/* Runs one job with the handle already marked busy; frees the job's contents and clears busy. */
static int emu_run_job(emu_job *job) {
    emu_handle *h = job->h;
    uint64_t started = emu_now_ns();
    emu_npu_run_begin(h->npu, &job->npu, h);
    job->callback_ns = 0;
    h->run_sequence++;
    emu_slot_run *runs = emu_xcalloc((size_t)h->n_batch, sizeof(emu_slot_run));
    emu_str system_text = {0};
    emu_tokens system_tokens = {0};
    emu_str error = {0};
    int chars_per_token = h->model.chars_per_token;
    emu_render_system(h, &system_text);
    emu_tokenize_ids(emu_str_cstr(&system_text), system_text.len, chars_per_token, &system_tokens);

    for (int i = 0; i < h->n_batch; i++) {
        emu_input *in = &job->inputs[i];
        emu_slot_run *run = &runs[i];
        if (in->type == RKLLM_INPUT_TOKEN) {
            /* [Inf] token and embedding inputs are already templated by the caller (rkllama style, §4.7). */
            emu_tokens_append(&run->turn, in->token_ids, in->token_count);
            run->input_text = "";
        } else if (in->type == RKLLM_INPUT_EMBED) {
            for (size_t t = 0; t < in->extra_tokens; t++) emu_tokens_push(&run->turn, emu_opaque_token(h->run_sequence, (size_t)i, t));
            run->input_text = "";
        } else {
            emu_str turn_text = {0};
            emu_render_turn(h, in, &turn_text);
            emu_tokenize_ids(emu_str_cstr(&turn_text), turn_text.len, chars_per_token, &run->turn);
            emu_str_free(&turn_text);
            for (size_t t = 0; t < in->extra_tokens; t++) emu_tokens_push(&run->turn, emu_opaque_token(h->run_sequence, (size_t)i, t));
            run->input_text = in->text;
        }
        if (job->infer.mode == RKLLM_INFER_GENERATE) {
            run->answer = emu_build_answer(h, in, run->input_text, h->slots[i].last_user_input);
            emu_tokenize(run->answer, strlen(run->answer), chars_per_token, &run->pieces);
        }
        if (in->role == EMU_ROLE_USER) {
            free(h->slots[i].last_user_input);
            h->slots[i].last_user_input = emu_xstrdup(run->input_text);
        }
    }

    emu_end end = EMU_END_FINISH;
    size_t prefill_tokens = 0;
    size_t generated = 0;
    uint64_t prefill_done = started;
    if (emu_prepare(job, runs, &system_tokens, &error) != 0) {
        end = EMU_END_ERROR;
    } else {
        for (int i = 0; i < h->n_batch; i++) prefill_tokens += runs[i].prefill.len;
        if (!emu_prefill(job, runs, &system_tokens)) end = EMU_END_ABORT;
        prefill_done = emu_now_ns();
    }
    if (end == EMU_END_FINISH) {
        if (job->infer.mode == RKLLM_INFER_GENERATE) {
            end = emu_decode(job, runs, &error, &generated);
        } else {
            emu_emit_tensors(job, runs);
        }
    }
    uint64_t finished = emu_now_ns();
    /* Callbacks only run after the prefill; the time the caller kept them is its own, not the NPU's. */
    uint64_t generate_ns = finished - prefill_done;
    generate_ns = job->callback_ns < generate_ns ? generate_ns - job->callback_ns : 0;

    int status = 0;
    switch (end) {
    case EMU_END_FINISH: {
        RKLLMPerfStat perf = {
            .prefill_time_ms = (float)((double)(prefill_done - started) / 1e6),
            .prefill_tokens = (int)prefill_tokens,
            .generate_time_ms = (float)((double)generate_ns / 1e6),
            .generate_tokens = (int)generated,
            .memory_usage_mb = (float)h->model.memory_mb,
        };
        RKLLMResult *results = emu_xcalloc((size_t)h->n_batch, sizeof(RKLLMResult));
        for (int i = 0; i < h->n_batch; i++) {
            results[i].token_id = -1;
            results[i].perf = perf;
        }
        emu_callback(job, results, RKLLM_RUN_FINISH);
        free(results);
        if (emu_log_level() >= 1) emu_print_perf(&perf);
        break;
    }
    case EMU_END_PAUSE:
        /* [Inf] a pause stops at once: no FINISH, rkllm_run returns 0, the KV cache is kept (§4.2). */
        h->paused = true;
        h->paused_keep_history = job->infer.keep_history;
        break;
    case EMU_END_ABORT:
        /* [Inf] no FINISH after an abort and rkllm_run returns 0 (undocumented, §4.3). */
        emu_log('I', "rkllm_run was aborted");
        break;
    case EMU_END_ERROR:
        emu_emit_error(job, emu_str_cstr(&error));
        status = -1;
        break;
    }
    if (job->infer.save_prompt_cache && (end == EMU_END_FINISH || end == EMU_END_PAUSE)) {
        emu_write_prompt_cache(job->infer.prompt_cache_path, h->slots[0].kv.ids,
                               runs[0].prompt_end < h->slots[0].kv.len ? runs[0].prompt_end : h->slots[0].kv.len);
    }
    emu_finish_kv(h, job->infer.keep_history, end == EMU_END_PAUSE);
    emu_npu_run_end(&job->npu);

    for (int i = 0; i < h->n_batch; i++) {
        emu_tokens_free(&runs[i].turn);
        emu_tokens_free(&runs[i].prefill);
        emu_pieces_free(&runs[i].pieces);
        emu_str_free(&runs[i].carry);
        free(runs[i].answer);
        free(runs[i].hidden);
        free(runs[i].logits);
    }
    free(runs);
    emu_str_free(&system_text);
    emu_tokens_free(&system_tokens);
    emu_str_free(&error);
    emu_free_job(job);
    atomic_store(&h->abort_requested, 0);
    /* Last touch of the handle: once busy is 0, rkllm_destroy on another thread may free it. */
    atomic_store(&h->busy, 0);
    return status;
}

/* Copies and validates the caller's run arguments into a job; -1 (E line printed) when they are bad. */
static int emu_make_job(emu_handle *h, RKLLMInput *inputs, RKLLMInferParam *infer, void *userdata, emu_job *job) {
    memset(job, 0, sizeof(*job));
    job->h = h;
#ifdef RKLLM_EMU_ABI_V130
    job->userdata = userdata != NULL ? userdata : h->callback_userdata; /* §4.2: NULL falls back */
#else
    job->userdata = userdata;
#endif
    if (inputs == NULL) {
        emu_log('E', "rkllm_run: rkllm_input is NULL");
        return -1;
    }
    if (emu_convert_infer(h, infer, &job->infer) != 0) return -1;
    job->inputs = emu_xcalloc((size_t)h->n_batch, sizeof(emu_input));
    for (int i = 0; i < h->n_batch; i++) {
        if (emu_convert_input(&inputs[i], i, &job->inputs[i]) != 0) {
            emu_inputs_free(job->inputs, h->n_batch);
            job->inputs = NULL;
            emu_infer_free(&job->infer);
            return -1;
        }
    }
    return 0;
}

/* Marks the handle busy; one run at a time per handle (§4.3). */
static bool emu_claim(emu_handle *h) {
    pthread_mutex_lock(&h->lock);
    bool was_busy = atomic_load(&h->busy) != 0;
    if (!was_busy) {
        atomic_store(&h->abort_requested, 0);
        atomic_store(&h->busy, 1);
    }
    pthread_mutex_unlock(&h->lock);
    if (was_busy) {
        /* [Inf] the runtime is not re-entrant on one handle (§4.3); the emulator refuses the second call. */
        emu_log('E', "rkllm_run: another rkllm_run is already running on this handle");
    }
    return !was_busy;
}

RKLLM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                        void *userdata) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    /* Claim first: while busy, configuration calls are refused, so validation reads a stable handle. */
    if (!emu_claim(h)) return -1;
    emu_job job;
    if (emu_make_job(h, rkllm_input, rkllm_infer_params, userdata, &job) != 0) {
        atomic_store(&h->busy, 0);
        return -1;
    }
    /* Callbacks run on this thread, before rkllm_run returns ([Inf] §4.3, reported by GatekeeperZA). */
    return emu_run_job(&job);
}

static void *emu_async_main(void *arg) {
    emu_job *job = arg;
    emu_run_job(job);
    free(job);
    return NULL;
}

RKLLM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                              void *userdata) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    if (!emu_claim(h)) return -1;
    emu_job *job = emu_xmalloc(sizeof(emu_job));
    if (emu_make_job(h, rkllm_input, rkllm_infer_params, userdata, job) != 0) {
        free(job);
        atomic_store(&h->busy, 0);
        return -1;
    }
    /* The previous async run has cleared busy, so its thread is exiting: reap it before starting anew. */
    if (h->async_thread_started) {
        pthread_join(h->async_thread, NULL);
        h->async_thread_started = false;
    }
    int rc = pthread_create(&h->async_thread, NULL, emu_async_main, job);
    if (rc != 0) {
        emu_log('E', "rkllm_run_async: cannot start the inference thread: %s", strerror(rc));
        emu_free_job(job);
        free(job);
        atomic_store(&h->busy, 0);
        return -1;
    }
    h->async_thread_started = true;
    return 0;
}

RKLLM_API int rkllm_destroy(LLMHandle handle) {
    emu_handle *h = handle;
    if (h == NULL) return -1;
    /* Stop a run still in progress on another thread, then free everything. */
    if (atomic_load(&h->busy)) emu_request_abort(h);
    while (atomic_load(&h->busy)) emu_sleep_ns(1000000ull);
    if (h->async_thread_started) pthread_join(h->async_thread, NULL);
    for (int i = 0; i < h->n_batch; i++) {
        emu_tokens_free(&h->slots[i].kv);
        free(h->slots[i].last_user_input);
    }
    free(h->slots);
    free(h->kv_published);
    emu_tokens_free(&h->prompt_cache);
    for (size_t i = 0; i < h->lora_count; i++) free(h->lora_names[i]);
    free(h->lora_names);
    emu_tools_free(&h->tools);
    free(h->tools_system);
    free(h->tool_response_tag);
    free(h->template_system);
    free(h->template_prefix);
    free(h->template_postfix);
    pthread_mutex_destroy(&h->lock);
    emu_npu_detach(h->npu);
    emu_model_free(&h->model);
    free(h);
    return 0;
}
