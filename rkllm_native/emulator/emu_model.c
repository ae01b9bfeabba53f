/*
 * emu_model.c: reads the emulator's "model" file (the format is specified in MODEL_FORMAT.md).
 *
 * The file stands in for a converted .rkllm model: it carries the cost model (calibrated from
 * docs/runtime.md §10), the platform facts the real runtime checks at init, faults to inject, and
 * scripted answers.
 */
#define _GNU_SOURCE /* strcasecmp */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "emu.h"

#define EMU_MODEL_HEADER "rkllm-emulator-model 1"
#define EMU_MODEL_MAX_BYTES (1024 * 1024)

/*
 * Named cost models, RK3588 w8a8. Prefill is the official 128/TTFT figure, decode and memory are the
 * official benchmark (docs/runtime.md §10.1) except where noted. Load time: the one community
 * measurement (Qwen3-1.7B, 2.8 s for 2343 MB, §10.2) scaled by memory, clamped to the 2–15 s rule of
 * thumb for a cold load (§10.2).
 */
typedef struct {
    const char *name;
    double parameters_b;
    double prefill_tokens_per_s;
    double decode_tokens_per_s;
    double memory_mb;
    double load_time_ms; /* NAN = derive from memory */
    bool thinking;
    const char *system_prompt; /* the model's template default when no system message is given */
} emu_calibration;

#define EMU_QWEN25_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
#define EMU_GENERIC_SYSTEM "You are a helpful assistant."

static const emu_calibration emu_calibrations[] = {
    {"qwen2-0.5b-rk3588", 0.5, 877, 41.58, 670, NAN, false, EMU_GENERIC_SYSTEM},
    {"minicpm4-0.5b-rk3588", 0.5, 946, 45.34, 535, NAN, false, EMU_GENERIC_SYSTEM},
    {"qwen3-0.6b-rk3588", 0.6, 643, 32.91, 791, NAN, true, ""},
    {"qwen3.5-0.8b-rk3588", 0.8, 218, 27.05, 1040, NAN, true, ""},
    {"tinyllama-1.1b-rk3588", 1.1, 525, 24.43, 1094, NAN, false, EMU_GENERIC_SYSTEM},
    {"qwen2.5-1.5b-rk3588", 1.5, 338, 16.69, 1689, NAN, false, EMU_QWEN25_SYSTEM},
    /* Qwen3-1.7B is not in the official table. Community (§10.2, runtime 1.2.3): 13.0 tok/s decode,
       load 2.8 s, 2343 MB, prefill 95–176 ms for 15–49 tokens, i.e. ≈280 tok/s average at 49 tokens
       including fixed overhead, and 6–10 ms/token (100–170 tok/s) on long HA prompts (§9). 250 tok/s sits
       between the official 1.5B (338) and 2B (165) w8a8 figures and at the short-prompt end of the
       community numbers. */
    {"qwen3-1.7b-rk3588", 1.7, 250, 13.0, 2343, 2800, true, ""},
    {"internlm2-1.8b-rk3588", 1.8, 337, 15.45, 1776, NAN, false, EMU_GENERIC_SYSTEM},
    {"qwen3.5-2b-rk3588", 2.0, 165, 13.59, 2122, NAN, true, ""},
    {"gemma2-2b-rk3588", 2.0, 214, 10.37, 2779, NAN, false, ""},
    {"telechat2-3b-rk3588", 3.0, 207, 10.18, 2788, NAN, false, EMU_GENERIC_SYSTEM},
    {"phi3-3.8b-rk3588", 3.8, 126, 7.45, 3758, NAN, false, ""},
    {"qwen3.5-4b-rk3588", 4.0, 62, 6.22, 4576, NAN, true, ""},
    {"minicpm3-4b-rk3588", 4.0, 91, 5.94, 4384, NAN, false, EMU_GENERIC_SYSTEM},
    {"chatglm3-6b-rk3588", 6.0, 95, 4.98, 5986, NAN, false, ""},
};

typedef struct {
    const char *path;
    int line;
    emu_str *messages; /* complete "E rkllm: …\n" lines, printed by the caller in the runtime's order */
} emu_parse_ctx;

static void emu_model_message(emu_str *messages, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void emu_model_message(emu_str *messages, const char *fmt, ...) {
    char message[768];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof(message), fmt, args);
    va_end(args);
    emu_str_printf(messages, "E rkllm: %s\n", message);
}

static void emu_model_error(const emu_parse_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void emu_model_error(const emu_parse_ctx *ctx, const char *fmt, ...) {
    char message[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof(message), fmt, args);
    va_end(args);
    if (ctx->line > 0) {
        emu_model_message(ctx->messages, "emulator model %s:%d: %s", ctx->path, ctx->line, message);
    } else {
        emu_model_message(ctx->messages, "emulator model %s: %s", ctx->path, message);
    }
}

static char *emu_trim(char *text) {
    while (*text == ' ' || *text == '\t') text++;
    size_t len = strlen(text);
    while (len > 0 && (text[len - 1] == ' ' || text[len - 1] == '\t' || text[len - 1] == '\r')) text[--len] = '\0';
    return text;
}

/* Decodes \n \t \\ \" in [text, text+len); NULL (with an error printed) on an unknown escape. */
static char *emu_unescape(const emu_parse_ctx *ctx, const char *text, size_t len) {
    emu_str out = {0};
    emu_str_appendz(&out, "");
    for (size_t i = 0; i < len; i++) {
        if (text[i] != '\\') {
            emu_str_append(&out, &text[i], 1);
            continue;
        }
        if (i + 1 >= len) {
            emu_model_error(ctx, "a backslash ends the text (write \\\\ for a backslash)");
            emu_str_free(&out);
            return NULL;
        }
        char next = text[++i];
        const char *decoded = next == 'n' ? "\n" : next == 't' ? "\t" : next == '\\' ? "\\" : next == '"' ? "\"" : NULL;
        if (decoded == NULL) {
            emu_model_error(ctx, "unknown escape '\\%c' (allowed: \\n \\t \\\\ \\\")", next);
            emu_str_free(&out);
            return NULL;
        }
        emu_str_append(&out, decoded, 1);
    }
    return emu_str_steal(&out);
}

/* Parses a double-quoted string at *cursor; advances the cursor past the closing quote. */
static char *emu_parse_quoted(const emu_parse_ctx *ctx, const char **cursor, const char *what) {
    const char *p = *cursor;
    while (*p == ' ' || *p == '\t') p++;
    if (*p != '"') {
        emu_model_error(ctx, "expected a double-quoted %s", what);
        return NULL;
    }
    const char *start = ++p;
    while (*p && *p != '"') {
        if (*p == '\\' && p[1]) p++;
        p++;
    }
    if (*p != '"') {
        emu_model_error(ctx, "the quoted %s has no closing quote", what);
        return NULL;
    }
    char *value = emu_unescape(ctx, start, (size_t)(p - start));
    *cursor = p + 1;
    return value;
}

static bool emu_parse_double(const emu_parse_ctx *ctx, const char *key, const char *value, double minimum,
                             bool minimum_exclusive, double *out) {
    char *end = NULL;
    errno = 0;
    double parsed = strtod(value, &end);
    if (end == value || *end != '\0' || errno != 0 || !isfinite(parsed)) {
        emu_model_error(ctx, "%s must be a number, got '%s'", key, value);
        return false;
    }
    if (minimum_exclusive ? parsed <= minimum : parsed < minimum) {
        emu_model_error(ctx, "%s must be %s %g, got %s", key, minimum_exclusive ? ">" : ">=", minimum, value);
        return false;
    }
    *out = parsed;
    return true;
}

static bool emu_parse_int(const emu_parse_ctx *ctx, const char *key, const char *value, long minimum, long maximum,
                          long *out) {
    char *end = NULL;
    errno = 0;
    long parsed = strtol(value, &end, 10);
    if (end == value || *end != '\0' || errno != 0) {
        emu_model_error(ctx, "%s must be an integer, got '%s'", key, value);
        return false;
    }
    if (parsed < minimum || parsed > maximum) {
        emu_model_error(ctx, "%s must be between %ld and %ld, got %ld", key, minimum, maximum, parsed);
        return false;
    }
    *out = parsed;
    return true;
}

static bool emu_parse_bool(const emu_parse_ctx *ctx, const char *key, const char *value, bool *out) {
    if (strcmp(value, "true") == 0) {
        *out = true;
    } else if (strcmp(value, "false") == 0) {
        *out = false;
    } else {
        emu_model_error(ctx, "%s must be true or false, got '%s'", key, value);
        return false;
    }
    return true;
}

static const char *const emu_platforms[] = {"RK3588", "RK3576", "RK3562", "RV1126B"};

static bool emu_parse_platform(const emu_parse_ctx *ctx, const char *key, const char *value, char **out) {
    for (size_t i = 0; i < sizeof(emu_platforms) / sizeof(emu_platforms[0]); i++) {
        if (strcasecmp(value, emu_platforms[i]) == 0) {
            free(*out);
            *out = emu_xstrdup(emu_platforms[i]);
            return true;
        }
    }
    emu_model_error(ctx, "%s must be one of RK3588, RK3576, RK3562, RV1126B, got '%s'", key, value);
    return false;
}

static bool emu_parse_version(const emu_parse_ctx *ctx, const char *key, const char *value, char **out) {
    if (value[0] < '0' || value[0] > '9' || strspn(value, "0123456789.abrc") != strlen(value)) {
        emu_model_error(ctx, "%s must be a version such as 1.2.3, got '%s'", key, value);
        return false;
    }
    free(*out);
    *out = emu_xstrdup(value);
    return true;
}

static bool emu_parse_fault(const emu_parse_ctx *ctx, const char *value, emu_model *model) {
    static const struct {
        const char *prefix;
        emu_fault_kind kind;
    } counted[] = {
        {"crash_after_tokens:", EMU_FAULT_CRASH},
        {"hang_after_tokens:", EMU_FAULT_HANG},
        {"error_after_tokens:", EMU_FAULT_ERROR},
    };
    if (strcmp(value, "none") == 0) {
        model->fault = EMU_FAULT_NONE;
        return true;
    }
    if (strcmp(value, "init_fail") == 0) {
        model->fault = EMU_FAULT_INIT_FAIL;
        return true;
    }
    for (size_t i = 0; i < sizeof(counted) / sizeof(counted[0]); i++) {
        size_t len = strlen(counted[i].prefix);
        if (strncmp(value, counted[i].prefix, len) == 0) {
            long tokens = 0;
            if (!emu_parse_int(ctx, "the fault's token count", value + len, 0, 1000000000L, &tokens)) return false;
            model->fault = counted[i].kind;
            model->fault_tokens = tokens;
            return true;
        }
    }
    emu_model_error(ctx,
                    "fault must be none, init_fail, crash_after_tokens:N, hang_after_tokens:N or "
                    "error_after_tokens:N, got '%s'",
                    value);
    return false;
}

static const emu_calibration *emu_find_calibration(const char *name) {
    for (size_t i = 0; i < sizeof(emu_calibrations) / sizeof(emu_calibrations[0]); i++) {
        if (strcasecmp(name, emu_calibrations[i].name) == 0) return &emu_calibrations[i];
    }
    return NULL;
}

static bool emu_parse_rule(const emu_parse_ctx *ctx, const char *rest, emu_model *model) {
    const char *p = rest;
    while (*p == ' ' || *p == '\t') p++;
    emu_role role;
    if (strncmp(p, "user", 4) == 0 && (p[4] == ' ' || p[4] == '\t')) {
        role = EMU_ROLE_USER;
        p += 4;
    } else if (strncmp(p, "tool", 4) == 0 && (p[4] == ' ' || p[4] == '\t')) {
        role = EMU_ROLE_TOOL;
        p += 4;
    } else {
        emu_model_error(ctx, "an answer rule reads: answer user|tool \"<pattern>\" [after \"<pattern>\"] = <text>");
        return false;
    }
    char *pattern = emu_parse_quoted(ctx, &p, "pattern");
    if (pattern == NULL) return false;
    char *after_pattern = NULL;
    while (*p == ' ' || *p == '\t') p++;
    if (strncmp(p, "after", 5) == 0 && (p[5] == ' ' || p[5] == '\t' || p[5] == '"')) {
        p += 5;
        after_pattern = emu_parse_quoted(ctx, &p, "after-pattern");
        if (after_pattern == NULL) {
            free(pattern);
            return false;
        }
        while (*p == ' ' || *p == '\t') p++;
    }
    if (*p != '=') {
        emu_model_error(ctx, "expected '=' and the answer text after the pattern");
        free(pattern);
        free(after_pattern);
        return false;
    }
    p++;
    while (*p == ' ' || *p == '\t') p++;
    char *text = emu_unescape(ctx, p, strlen(p));
    if (text == NULL) {
        free(pattern);
        free(after_pattern);
        return false;
    }
    model->rules = emu_xrealloc(model->rules, (model->rule_count + 1) * sizeof(emu_rule));
    emu_rule *rule = &model->rules[model->rule_count++];
    rule->role = role;
    rule->pattern = pattern;
    rule->after_pattern = after_pattern;
    rule->text = text;
    rule->line = ctx->line;
    return true;
}

static bool emu_replace_text(const emu_parse_ctx *ctx, const char *value, char **slot) {
    char *decoded = emu_unescape(ctx, value, strlen(value));
    if (decoded == NULL) return false;
    free(*slot);
    *slot = decoded;
    return true;
}

static bool emu_parse_key(const emu_parse_ctx *ctx, const char *key, const char *value, emu_model *model,
                          const emu_calibration **calibration) {
    long number = 0;
    if (strcmp(key, "name") == 0) return emu_replace_text(ctx, value, &model->name);
    if (strcmp(key, "calibration") == 0) {
        const emu_calibration *found = emu_find_calibration(value);
        if (found == NULL) {
            emu_str known = {0};
            for (size_t i = 0; i < sizeof(emu_calibrations) / sizeof(emu_calibrations[0]); i++) {
                emu_str_printf(&known, "%s%s", i ? ", " : "", emu_calibrations[i].name);
            }
            emu_model_error(ctx, "unknown calibration '%s' (known: %s)", value, emu_str_cstr(&known));
            emu_str_free(&known);
            return false;
        }
        *calibration = found;
        free(model->calibration);
        model->calibration = emu_xstrdup(found->name);
        return true;
    }
    if (strcmp(key, "platform") == 0) return emu_parse_platform(ctx, key, value, &model->platform);
    if (strcmp(key, "host_platform") == 0) return emu_parse_platform(ctx, key, value, &model->host_platform);
    if (strcmp(key, "toolkit_version") == 0) return emu_parse_version(ctx, key, value, &model->toolkit_version);
    if (strcmp(key, "driver_version") == 0) return emu_parse_version(ctx, key, value, &model->driver_version);
    if (strcmp(key, "max_context_limit") == 0) {
        if (!emu_parse_int(ctx, key, value, 16, 1 << 20, &number)) return false;
        model->max_context_limit = (int)number;
        return true;
    }
    if (strcmp(key, "parameters_b") == 0) return emu_parse_double(ctx, key, value, 0, true, &model->parameters_b);
    if (strcmp(key, "load_time_ms") == 0) return emu_parse_double(ctx, key, value, 0, false, &model->load_time_ms);
    if (strcmp(key, "prefill_tokens_per_s") == 0) {
        return emu_parse_double(ctx, key, value, 0, true, &model->prefill_tokens_per_s);
    }
    if (strcmp(key, "decode_tokens_per_s") == 0) {
        return emu_parse_double(ctx, key, value, 0, true, &model->decode_tokens_per_s);
    }
    if (strcmp(key, "memory_mb") == 0) return emu_parse_double(ctx, key, value, 0, false, &model->memory_mb);
    if (strcmp(key, "prefill_chunk_tokens") == 0) {
        if (!emu_parse_int(ctx, key, value, 1, 1 << 20, &number)) return false;
        model->prefill_chunk_tokens = (int)number;
        return true;
    }
    if (strcmp(key, "speed") == 0) return emu_parse_double(ctx, key, value, 0, false, &model->speed);
    if (strcmp(key, "npu_sharing") == 0) return emu_parse_bool(ctx, key, value, &model->npu_sharing);
    if (strcmp(key, "chars_per_token") == 0) {
        if (!emu_parse_int(ctx, key, value, 1, 64, &number)) return false;
        model->chars_per_token = (int)number;
        return true;
    }
    if (strcmp(key, "thinking") == 0) {
        bool thinking = false;
        if (!emu_parse_bool(ctx, key, value, &thinking)) return false;
        model->thinking = thinking;
        return true;
    }
    if (strcmp(key, "utf8_split") == 0) {
        if (strcmp(value, "waiting") == 0) {
            model->utf8_waiting = true;
        } else if (strcmp(value, "raw") == 0) {
            model->utf8_waiting = false;
        } else {
            emu_model_error(ctx, "utf8_split must be waiting or raw, got '%s'", value);
            return false;
        }
        return true;
    }
    if (strcmp(key, "has_template") == 0) return emu_parse_bool(ctx, key, value, &model->has_template);
    if (strcmp(key, "system_prompt") == 0) return emu_replace_text(ctx, value, &model->system_prompt);
    if (strcmp(key, "default_answer") == 0) {
        if (strstr(value, "{{tool:") != NULL) {
            emu_model_error(ctx, "default_answer cannot name a tool ({{tool:…}} is only for answer rules)");
            return false;
        }
        return emu_replace_text(ctx, value, &model->default_answer);
    }
    if (strcmp(key, "thinking_text") == 0) {
        if (strstr(value, "{{tool:") != NULL) {
            emu_model_error(ctx, "thinking_text cannot name a tool ({{tool:…}} is only for answer rules)");
            return false;
        }
        return emu_replace_text(ctx, value, &model->thinking_text);
    }
    if (strcmp(key, "fault") == 0) return emu_parse_fault(ctx, value, model);
    if (strcmp(key, "abort_delay_ms") == 0) return emu_parse_double(ctx, key, value, 0, false, &model->abort_delay_ms);
    if (strcmp(key, "hidden_size") == 0) {
        if (!emu_parse_int(ctx, key, value, 1, 65536, &number)) return false;
        model->hidden_size = (int)number;
        return true;
    }
    if (strcmp(key, "vocab_size") == 0) {
        if (!emu_parse_int(ctx, key, value, 1, 1 << 20, &number)) return false;
        model->vocab_size = (int)number;
        return true;
    }
    emu_model_error(ctx, "unknown key '%s' (see MODEL_FORMAT.md)", key);
    return false;
}

static bool emu_parse_line(const emu_parse_ctx *ctx, char *line, emu_model *model,
                           const emu_calibration **calibration) {
    if (strncmp(line, "answer", 6) == 0 && (line[6] == ' ' || line[6] == '\t')) {
        return emu_parse_rule(ctx, line + 6, model);
    }
    char *p = line;
    while ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_') p++;
    char *key_end = p;
    while (*p == ' ' || *p == '\t') p++;
    if (key_end == line || *p != '=') {
        emu_model_error(ctx, "expected 'key = value' or an answer rule, got '%.60s'", line);
        return false;
    }
    *key_end = '\0';
    char *value = emu_trim(p + 1);
    return emu_parse_key(ctx, line, value, model, calibration);
}

static void emu_model_defaults(emu_model *model) {
    memset(model, 0, sizeof(*model));
    model->max_context_limit = 4096;
    model->parameters_b = NAN;
    model->load_time_ms = NAN;
    model->prefill_tokens_per_s = NAN;
    model->decode_tokens_per_s = NAN;
    model->memory_mb = NAN;
    model->prefill_chunk_tokens = 16;
    model->speed = 1.0;
    model->npu_sharing = true;
    model->chars_per_token = 6;
    model->thinking = false;
    model->utf8_waiting = true;
    model->has_template = true;
    model->fault = EMU_FAULT_NONE;
    model->hidden_size = 1536;
    model->vocab_size = 151936;
}

/* Fills what the file left unset: calibration first, then the §10.2 rules of thumb. */
static void emu_model_finish(emu_model *model, const emu_calibration *calibration, bool thinking_set,
                             bool system_prompt_set) {
    if (model->name == NULL) model->name = emu_xstrdup(calibration ? calibration->name : "rkllm-emulator");
    if (model->platform == NULL) model->platform = emu_xstrdup("RK3588");
    if (model->host_platform == NULL) model->host_platform = emu_xstrdup("RK3588");
    if (model->toolkit_version == NULL) model->toolkit_version = emu_xstrdup("1.2.1");
    if (model->driver_version == NULL) model->driver_version = emu_xstrdup(EMU_WANTED_DRIVER_VERSION);
    if (calibration != NULL) {
        if (isnan(model->parameters_b)) model->parameters_b = calibration->parameters_b;
        if (isnan(model->prefill_tokens_per_s)) model->prefill_tokens_per_s = calibration->prefill_tokens_per_s;
        if (isnan(model->decode_tokens_per_s)) model->decode_tokens_per_s = calibration->decode_tokens_per_s;
        if (isnan(model->memory_mb)) model->memory_mb = calibration->memory_mb;
        if (isnan(model->load_time_ms) && !isnan(calibration->load_time_ms)) {
            model->load_time_ms = calibration->load_time_ms;
        }
        if (!thinking_set) model->thinking = calibration->thinking;
        if (!system_prompt_set) model->system_prompt = emu_xstrdup(calibration->system_prompt);
    }
    if (isnan(model->parameters_b)) model->parameters_b = 1.5;
    /* §10.2 rules of thumb: decode ≈ 24 / params_B^0.9 for w8a8; the official table's prefill is ≈20×
       decode at 128 tokens (the rule allows 20–40×); memory fits 160 + 1020 MB per billion parameters
       (Qwen2 0.5B 670 MB, Qwen2.5 1.5B 1689 MB). */
    if (isnan(model->decode_tokens_per_s)) model->decode_tokens_per_s = 24.0 / pow(model->parameters_b, 0.9);
    if (isnan(model->prefill_tokens_per_s)) model->prefill_tokens_per_s = 20.0 * model->decode_tokens_per_s;
    if (isnan(model->memory_mb)) model->memory_mb = 160.0 + 1020.0 * model->parameters_b;
    if (isnan(model->load_time_ms)) {
        double scaled = 2800.0 * model->memory_mb / 2343.0;
        model->load_time_ms = scaled < 2000.0 ? 2000.0 : scaled > 15000.0 ? 15000.0 : scaled;
    }
    if (model->system_prompt == NULL) model->system_prompt = emu_xstrdup(EMU_GENERIC_SYSTEM);
    if (model->default_answer == NULL) model->default_answer = emu_xstrdup("I am the RKLLM emulator. You said: {{input}}");
    if (model->thinking_text == NULL) model->thinking_text = emu_xstrdup("Let me think about this request.");
}

int emu_model_load(const char *path, emu_model *out, emu_str *messages) {
    emu_parse_ctx ctx = {.path = path, .line = 0, .messages = messages};
    emu_model_defaults(out);
    FILE *file = fopen(path, "rb");
    if (file == NULL) {
        emu_model_message(messages, "failed to open model file '%s': %s", path, strerror(errno));
        return -1;
    }
    char *content = emu_xmalloc(EMU_MODEL_MAX_BYTES + 1);
    size_t size = fread(content, 1, EMU_MODEL_MAX_BYTES + 1, file);
    bool read_failed = ferror(file) != 0;
    fclose(file);
    if (read_failed) {
        emu_model_message(messages, "failed to read model file '%s'", path);
        free(content);
        return -1;
    }
    content[size < EMU_MODEL_MAX_BYTES ? size : EMU_MODEL_MAX_BYTES] = '\0';

    const emu_calibration *calibration = NULL;
    bool header_seen = false;
    bool thinking_set = false;
    bool system_prompt_set = false;
    bool ok = true;
    char *cursor = content;
    size_t usable = size < EMU_MODEL_MAX_BYTES ? size : EMU_MODEL_MAX_BYTES;
    /* A real .rkllm file (binary) must fail exactly like a foreign file fails in the real runtime. */
    bool binary = memchr(content, '\0', usable) != NULL;
    if (usable >= 3 && memcmp(cursor, "\xEF\xBB\xBF", 3) == 0) cursor += 3;
    while (ok && !binary && *cursor) {
        ctx.line++;
        char *newline = strchr(cursor, '\n');
        if (newline != NULL) *newline = '\0';
        char *line = emu_trim(cursor);
        cursor = newline != NULL ? newline + 1 : cursor + strlen(cursor);
        if (*line == '\0' || *line == '#') continue;
        if (!header_seen) {
            if (strcmp(line, EMU_MODEL_HEADER) != 0) break;
            header_seen = true;
            if (size > EMU_MODEL_MAX_BYTES) {
                ctx.line = 0;
                emu_model_error(&ctx, "the file is larger than %d bytes", EMU_MODEL_MAX_BYTES);
                ok = false;
            }
            continue;
        }
        if (strncmp(line, "thinking", 8) == 0 && (line[8] == ' ' || line[8] == '=')) thinking_set = true;
        if (strncmp(line, "system_prompt", 13) == 0 && (line[13] == ' ' || line[13] == '=')) system_prompt_set = true;
        ok = emu_parse_line(&ctx, line, out, &calibration);
    }
    free(content);
    if (!ok || !header_seen) {
        emu_model_message(messages, "invalid rkllm model!");
        emu_model_free(out);
        return -1;
    }
    out->path = emu_xstrdup(path);
    emu_model_finish(out, calibration, thinking_set, system_prompt_set);
    return 0;
}

void emu_model_free(emu_model *model) {
    free(model->path);
    free(model->name);
    free(model->calibration);
    free(model->platform);
    free(model->host_platform);
    free(model->toolkit_version);
    free(model->driver_version);
    free(model->system_prompt);
    free(model->default_answer);
    free(model->thinking_text);
    for (size_t i = 0; i < model->rule_count; i++) {
        free(model->rules[i].pattern);
        free(model->rules[i].after_pattern);
        free(model->rules[i].text);
    }
    free(model->rules);
    memset(model, 0, sizeof(*model));
}
