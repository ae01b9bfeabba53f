/*
 * emu.h: internal declarations shared by the emulator's C files (never exported: -fvisibility=hidden).
 */
#ifndef RKLLM_EMU_INTERNAL_H
#define RKLLM_EMU_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef RKLLM_EMU_ABI_V130
#define EMU_RUNTIME_VERSION "1.3.0"
#else
#define EMU_RUNTIME_VERSION "1.2.3"
#endif
/* The rknpu driver version the runtime asks for (docs/runtime.md §7: 1.3.0 doc requires 0.9.8). */
#define EMU_WANTED_DRIVER_VERSION "0.9.8"
/* The end-of-turn token the default (Qwen ChatML) template closes an assistant turn with. */
#define EMU_EOS_TEXT "<|im_end|>"

/* ---------------------------------------------------------------- util (emu_util.c) */

/* A growable byte string, always NUL-terminated once anything was appended. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} emu_str;

/* A growable array of token ids (the KV cache is one of these per batch slot). */
typedef struct {
    int32_t *ids;
    size_t len;
    size_t cap;
} emu_tokens;

void *emu_xmalloc(size_t size);
void *emu_xcalloc(size_t count, size_t size);
void *emu_xrealloc(void *ptr, size_t size);
char *emu_xstrdup(const char *text);
char *emu_xstrndup(const char *text, size_t len);

void emu_str_append(emu_str *str, const char *bytes, size_t len);
void emu_str_appendz(emu_str *str, const char *text);
void emu_str_printf(emu_str *str, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *emu_str_cstr(const emu_str *str);
void emu_str_clear(emu_str *str);
void emu_str_free(emu_str *str);
char *emu_str_steal(emu_str *str);

void emu_tokens_push(emu_tokens *tokens, int32_t id);
void emu_tokens_append(emu_tokens *tokens, const int32_t *ids, size_t count);
void emu_tokens_free(emu_tokens *tokens);
size_t emu_common_prefix(const int32_t *a, size_t a_len, const int32_t *b, size_t b_len);

/* Print one runtime log line ("I rkllm: …") to stdout and flush, like the real library. */
void emu_log(char level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Escape newlines and tabs so a logged user string stays on one log line. */
char *emu_escape_for_log(const char *text);

uint64_t emu_now_ns(void);
void emu_sleep_until_ns(uint64_t deadline_ns);
void emu_sleep_ns(uint64_t duration_ns);

/* Compare dotted versions numerically ("0.9.10" > "0.9.8"); suffixes such as "b1" are ignored. */
int emu_version_compare(const char *a, const char *b);
bool emu_file_exists(const char *path);

/* ---------------------------------------------------------------- NPU sharing (emu_npu.c) */

/* One emulated NPU (a shared-memory table of the runs using it), attached once per process and name. */
typedef struct emu_npu emu_npu;

/* A run's place on the NPU. entry < 0: not counted (sharing off, or the table is full). */
typedef struct {
    emu_npu *npu;
    int entry;
    int64_t surplus_ns; /* wall time already slept beyond the work asked for so far */
} emu_npu_run;

/* NPU names are 1-64 of [A-Za-z0-9._-] (they become part of a shared-memory object name). */
bool emu_npu_name_valid(const char *name);
/* The shared-memory object of an NPU name for this user: "/rkllm-emu-npu1-<uid>-<name>". */
void emu_npu_shm_name(const char *name, char *out, size_t out_len);
/* Attaches to the named NPU (refcounted per process). Never fails: when shared memory is unavailable the
   table is process-local and `warning` gets the reason. */
emu_npu *emu_npu_attach(const char *name, emu_str *warning);
void emu_npu_detach(emu_npu *npu);
/* Claims an entry for a run and marks it computing; npu NULL = sharing off (delays are plain sleeps). */
void emu_npu_run_begin(emu_npu *npu, emu_npu_run *run, const void *owner);
/* A run inside its result callback is not computing: it does not slow the other runs. */
void emu_npu_run_computing(emu_npu_run *run, bool computing);
void emu_npu_run_end(emu_npu_run *run);
/* Spends work_ns of NPU time (at full speed): wall time stretches with the number of runs computing. */
void emu_npu_work(emu_npu_run *run, uint64_t work_ns);

/* ---------------------------------------------------------------- JSON scanning (emu_json.c) */

/* Returns the position after the JSON value starting at p (after whitespace), or NULL on a syntax error. */
const char *emu_json_skip_ws(const char *p, const char *end);
const char *emu_json_skip_value(const char *p, const char *end);
/* Finds `key` in the object at p; sets [*value, *value_end) to the raw value text. Returns true if found. */
bool emu_json_object_get(const char *p, const char *end, const char *key, const char **value,
                         const char **value_end);
/* If [p,end) is a JSON string, returns its raw (still escaped) content span. */
bool emu_json_string_span(const char *p, const char *end, const char **content, const char **content_end);
void emu_json_append_string(emu_str *out, const char *text, size_t len);

/* ---------------------------------------------------------------- tools (emu_text.c) */

/* The tools a run may name: parsed from rkllm_set_function_tools' JSON (or a <tools> block). */
typedef struct {
    char **names;      /* function.name of each tool (NULL when a tool has none) */
    char **json_items; /* the raw JSON text of each array element, for the # Tools block */
    size_t count;
} emu_toollist;

/* Parses a JSON array of OpenAI tools. On error returns -1 and writes a reason into err. */
int emu_tools_parse(const char *json, emu_toollist *out, char *err, size_t err_len);
/* Collects the tools of a rendered "<tools>\n{…}\n{…}\n</tools>" block inside a system prompt. */
void emu_tools_from_system_prompt(const char *system_prompt, emu_toollist *out);
/* The name of the tool called NAME or "<domain>__NAME", or NULL. */
const char *emu_tools_resolve(const emu_toollist *tools, const char *name, size_t name_len);
void emu_tools_free(emu_toollist *tools);

/* ---------------------------------------------------------------- tokenizer (emu_text.c) */

typedef struct {
    size_t offset;
    size_t len;
} emu_piece;

typedef struct {
    emu_piece *items;
    size_t len;
    size_t cap;
} emu_pieces;

/* Splits text into token pieces (MODEL_FORMAT.md, "How text becomes tokens"). */
void emu_tokenize(const char *text, size_t len, int chars_per_token, emu_pieces *out);
void emu_pieces_free(emu_pieces *pieces);
int32_t emu_token_id(const char *bytes, size_t len);
/* Appends the ids of every piece of text. */
void emu_tokenize_ids(const char *text, size_t len, int chars_per_token, emu_tokens *out);

/* Length of the trailing incomplete UTF-8 sequence of bytes (0 when the bytes end on a character boundary). */
size_t emu_utf8_incomplete_tail(const char *bytes, size_t len);

/* ---------------------------------------------------------------- model file (emu_model.c) */

typedef enum {
    EMU_ROLE_USER = 0,
    EMU_ROLE_TOOL = 1,
} emu_role;

typedef enum {
    EMU_FAULT_NONE = 0,
    EMU_FAULT_CRASH,
    EMU_FAULT_HANG,
    EMU_FAULT_ERROR,
    EMU_FAULT_INIT_FAIL,
} emu_fault_kind;

typedef struct {
    emu_role role;
    char *pattern;       /* matched against the run's input text */
    char *after_pattern; /* optional: matched against the handle's last user input; NULL = any */
    char *text;          /* escapes already decoded; {{…}} expanded at run time */
    int line;
} emu_rule;

typedef struct {
    char *path;
    char *name;
    char *calibration;
    char *platform;
    char *host_platform;
    char *toolkit_version;
    char *driver_version;
    int max_context_limit;
    double parameters_b;
    double load_time_ms;
    double prefill_tokens_per_s;
    double decode_tokens_per_s;
    double memory_mb;
    int prefill_chunk_tokens;
    double speed;
    bool npu_sharing; /* runs of every handle and process on one NPU slow each other down (§8.1) */
    int chars_per_token;
    bool thinking;
    bool utf8_waiting; /* utf8_split = waiting (true) or raw (false) */
    bool has_template;
    char *system_prompt;
    char *default_answer;
    char *thinking_text;
    emu_fault_kind fault;
    long fault_tokens;
    double abort_delay_ms;
    int hidden_size;
    int vocab_size;
    emu_rule *rules;
    size_t rule_count;
} emu_model;

/* Loads and validates a model file. Returns 0, or -1 with the E lines to print appended to messages. */
int emu_model_load(const char *path, emu_model *out, emu_str *messages);
void emu_model_free(emu_model *model);

/* ---------------------------------------------------------------- answers (emu_text.c) */

/* ASCII case-insensitive match: a glob over the whole text when pattern has * or ?, else a substring. */
bool emu_pattern_matches(const char *pattern, const char *text);

/* Expands {{input}} and {{tool:NAME}}; NULL when a named tool was not offered. */
char *emu_expand_text(const char *text, const char *input, const emu_toollist *tools);
/* Picks the scripted answer for one run and expands {{input}} / {{tool:NAME}} (MODEL_FORMAT.md). */
char *emu_select_answer(const emu_model *model, emu_role role, const char *input, const char *last_user_input,
                        const emu_toollist *tools);
/* Like emu_select_answer, but only rules whose expanded text calls tool `name`; returns its arguments JSON. */
char *emu_scripted_arguments_for(const emu_model *model, emu_role role, const char *input,
                                 const char *last_user_input, const emu_toollist *tools, const char *name);
/* Finds the first <tool_call>{"name": …, "arguments": …}</tool_call> in text: name (raw) and arguments. */
bool emu_first_tool_call(const char *text, char **name, char **arguments);

#endif /* RKLLM_EMU_INTERNAL_H */
