/*
 * emu_text.c: the emulator's tokenizer, tool lists, pattern matching and scripted-answer expansion.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu.h"

/* ---------------------------------------------------------------- tokenizer */

/* The cost model imitates a byte-level BPE tokenizer (Qwen's) closely enough that prompt token counts, and
 * so prefill times, land near the real ones: a single space before a word or a punctuation run belongs to
 * it (" word", " {\""), punctuation merges in pairs (JSON's `":`, `",`, `{"`), letters/digits and other
 * whitespace cut every `chars_per_token` bytes, non-ASCII runs cut by bytes (MODEL_FORMAT.md §5). */
enum { EMU_CLASS_PUNCT = 0, EMU_CLASS_ALNUM = 1, EMU_CLASS_SPACE = 2, EMU_CLASS_NON_ASCII = 3 };

enum { EMU_PUNCT_BYTES_PER_TOKEN = 2 };

static int emu_byte_class(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return EMU_CLASS_ALNUM;
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') return EMU_CLASS_SPACE;
    if (c >= 0x80) return EMU_CLASS_NON_ASCII;
    return EMU_CLASS_PUNCT;
}

static void emu_pieces_push(emu_pieces *pieces, size_t offset, size_t len) {
    if (pieces->len == pieces->cap) {
        pieces->cap = pieces->cap ? pieces->cap * 2 : 64;
        pieces->items = emu_xrealloc(pieces->items, pieces->cap * sizeof(emu_piece));
    }
    pieces->items[pieces->len].offset = offset;
    pieces->items[pieces->len].len = len;
    pieces->len++;
}

/* Qwen's added tokens: one token each, whatever their bytes (MODEL_FORMAT.md §5). Qwen2.5 and Qwen3 both have
 * the chat markers and the tool-call tags as single tokens; <think> and </think> are Qwen3's. */
static const char *const EMU_SPECIAL_TOKENS[] = {
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
};

/* Length of the special token starting at text[i], or 0. */
static size_t emu_special_at(const char *text, size_t len, size_t i) {
    if (text[i] != '<') return 0;
    for (size_t s = 0; s < sizeof EMU_SPECIAL_TOKENS / sizeof EMU_SPECIAL_TOKENS[0]; s++) {
        size_t n = strlen(EMU_SPECIAL_TOKENS[s]);
        if (len - i >= n && memcmp(text + i, EMU_SPECIAL_TOKENS[s], n) == 0) return n;
    }
    return 0;
}

static size_t emu_run_end(const char *text, size_t len, size_t start, int cls) {
    size_t end = start + 1;
    while (end < len && emu_byte_class((unsigned char)text[end]) == cls && emu_special_at(text, len, end) == 0) end++;
    return end;
}

/* Cuts [start, end) every `step` bytes; `prefix` bytes before `start` (an attached space) ride with the
 * first piece without counting towards its length. */
static void emu_pieces_cut(emu_pieces *out, size_t prefix, size_t start, size_t end, size_t step) {
    for (size_t k = start; k < end; k += step) {
        size_t piece_len = (end - k) < step ? (end - k) : step;
        if (k == start) {
            emu_pieces_push(out, k - prefix, piece_len + prefix);
        } else {
            emu_pieces_push(out, k, piece_len);
        }
    }
}

void emu_tokenize(const char *text, size_t len, int chars_per_token, emu_pieces *out) {
    size_t step = chars_per_token > 0 ? (size_t)chars_per_token : 1;
    size_t punct_step = step < EMU_PUNCT_BYTES_PER_TOKEN ? step : EMU_PUNCT_BYTES_PER_TOKEN;
    out->len = 0;
    size_t i = 0;
    while (i < len) {
        size_t special = emu_special_at(text, len, i);
        if (special > 0) {
            emu_pieces_push(out, i, special);
            i += special;
            continue;
        }
        int cls = emu_byte_class((unsigned char)text[i]);
        size_t j = emu_run_end(text, len, i, cls);
        if (cls != EMU_CLASS_SPACE) {
            /* Non-ASCII runs are cut by bytes too, so a piece may end inside a UTF-8 character. */
            emu_pieces_cut(out, 0, i, j, cls == EMU_CLASS_PUNCT ? punct_step : step);
            i = j;
            continue;
        }
        /* A whitespace run whose last byte is a space followed by a word or punctuation gives that space
         * to the next run, as BPE pre-tokenizers do (" word" is one token); the rest is cut on its own. */
        int next_cls = j < len ? emu_byte_class((unsigned char)text[j]) : EMU_CLASS_SPACE;
        bool attach = text[j - 1] == ' ' && (next_cls == EMU_CLASS_ALNUM || next_cls == EMU_CLASS_PUNCT) &&
                      emu_special_at(text, len, j) == 0;
        size_t own_end = attach ? j - 1 : j;
        emu_pieces_cut(out, 0, i, own_end, step);
        if (attach) {
            size_t next_end = emu_run_end(text, len, j, next_cls);
            emu_pieces_cut(out, 1, j, next_end, next_cls == EMU_CLASS_PUNCT ? punct_step : step);
            j = next_end;
        }
        i = j;
    }
}

void emu_pieces_free(emu_pieces *pieces) {
    free(pieces->items);
    pieces->items = NULL;
    pieces->len = pieces->cap = 0;
}

int32_t emu_token_id(const char *bytes, size_t len) {
    /* FNV-1a, masked to 31 bits: stable across runs and builds, never negative (negative ids mean
       "this batch element finished", docs/runtime.md §4.2). */
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        hash ^= (unsigned char)bytes[i];
        hash *= 16777619u;
    }
    return (int32_t)(hash & 0x7fffffffu);
}

void emu_tokenize_ids(const char *text, size_t len, int chars_per_token, emu_tokens *out) {
    emu_pieces pieces = {0};
    emu_tokenize(text, len, chars_per_token, &pieces);
    for (size_t i = 0; i < pieces.len; i++) {
        emu_tokens_push(out, emu_token_id(text + pieces.items[i].offset, pieces.items[i].len));
    }
    emu_pieces_free(&pieces);
}

size_t emu_utf8_incomplete_tail(const char *bytes, size_t len) {
    for (size_t back = 1; back <= 4 && back <= len; back++) {
        unsigned char c = (unsigned char)bytes[len - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation byte: keep looking for the lead byte */
        size_t need = 1;
        if (c >= 0xF0 && c <= 0xF7) {
            need = 4;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 3;
        } else if (c >= 0xC0 && c <= 0xDF) {
            need = 2;
        }
        return need > back ? back : 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- tools */

static void emu_toollist_push(emu_toollist *tools, const char *item, size_t item_len, char *name) {
    tools->names = emu_xrealloc(tools->names, (tools->count + 1) * sizeof(char *));
    tools->json_items = emu_xrealloc(tools->json_items, (tools->count + 1) * sizeof(char *));
    tools->names[tools->count] = name;
    tools->json_items[tools->count] = emu_xstrndup(item, item_len);
    tools->count++;
}

/* function.name of an OpenAI tool (or a bare {"name": …}); NULL when there is none. */
static char *emu_tool_name(const char *item, const char *item_end) {
    const char *value = NULL;
    const char *value_end = NULL;
    const char *name = NULL;
    const char *name_end = NULL;
    if (emu_json_object_get(item, item_end, "function", &value, &value_end) &&
        emu_json_object_get(value, value_end, "name", &name, &name_end) &&
        emu_json_string_span(name, name_end, &name, &name_end)) {
        return emu_xstrndup(name, (size_t)(name_end - name));
    }
    if (emu_json_object_get(item, item_end, "name", &name, &name_end) &&
        emu_json_string_span(name, name_end, &name, &name_end)) {
        return emu_xstrndup(name, (size_t)(name_end - name));
    }
    return NULL;
}

int emu_tools_parse(const char *json, emu_toollist *out, char *err, size_t err_len) {
    const char *end = json + strlen(json);
    const char *p = emu_json_skip_ws(json, end);
    memset(out, 0, sizeof(*out));
    if (p >= end || *p != '[') {
        snprintf(err, err_len, "expected a JSON array of tools");
        return -1;
    }
    const char *after = emu_json_skip_value(p, end);
    if (after == NULL || emu_json_skip_ws(after, end) != end) {
        snprintf(err, err_len, "the tools text is not valid JSON");
        return -1;
    }
    p = emu_json_skip_ws(p + 1, end);
    if (*p == ']') return 0;
    for (;;) {
        const char *item = emu_json_skip_ws(p, end);
        const char *item_end = emu_json_skip_value(item, end);
        if (*item != '{') {
            snprintf(err, err_len, "tool %zu of the array is not a JSON object", out->count);
            emu_tools_free(out);
            return -1;
        }
        emu_toollist_push(out, item, (size_t)(item_end - item), emu_tool_name(item, item_end));
        p = emu_json_skip_ws(item_end, end);
        if (*p == ',') {
            p++;
            continue;
        }
        return 0;
    }
}

void emu_tools_from_system_prompt(const char *system_prompt, emu_toollist *out) {
    memset(out, 0, sizeof(*out));
    /* Scan every <tools>…</tools> block: Qwen's own wording ("within <tools></tools> XML tags") puts an
     * empty pair before the real block, so the first pair alone is not enough. */
    const char *cursor = system_prompt;
    const char *start;
    while ((start = strstr(cursor, "<tools>")) != NULL) {
        start += strlen("<tools>");
        const char *stop = strstr(start, "</tools>");
        if (stop == NULL) return;
        const char *line = start;
        while (line < stop) {
            const char *line_end = memchr(line, '\n', (size_t)(stop - line));
            if (line_end == NULL) line_end = stop;
            const char *item = emu_json_skip_ws(line, line_end);
            const char *item_end = item < line_end && *item == '{' ? emu_json_skip_value(item, line_end) : NULL;
            if (item_end != NULL) emu_toollist_push(out, item, (size_t)(item_end - item), emu_tool_name(item, item_end));
            line = line_end + 1;
        }
        cursor = stop + strlen("</tools>");
    }
}

const char *emu_tools_resolve(const emu_toollist *tools, const char *name, size_t name_len) {
    for (size_t i = 0; i < tools->count; i++) {
        const char *candidate = tools->names[i];
        if (candidate != NULL && strlen(candidate) == name_len && memcmp(candidate, name, name_len) == 0) {
            return candidate;
        }
    }
    /* HA 2026.9 prefixes Assist tools with their domain: intent__HassTurnOn (docs/home-assistant.md §2.3). */
    for (size_t i = 0; i < tools->count; i++) {
        const char *candidate = tools->names[i];
        if (candidate == NULL) continue;
        size_t len = strlen(candidate);
        if (len >= name_len + 2 && memcmp(candidate + len - name_len, name, name_len) == 0 &&
            memcmp(candidate + len - name_len - 2, "__", 2) == 0) {
            return candidate;
        }
    }
    return NULL;
}

void emu_tools_free(emu_toollist *tools) {
    for (size_t i = 0; i < tools->count; i++) {
        free(tools->names[i]);
        free(tools->json_items[i]);
    }
    free(tools->names);
    free(tools->json_items);
    memset(tools, 0, sizeof(*tools));
}

/* ---------------------------------------------------------------- patterns */

static char emu_lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

static bool emu_glob_matches(const char *pattern, const char *text) {
    const char *star_pattern = NULL;
    const char *star_text = NULL;
    while (*text) {
        if (*pattern == '*') {
            star_pattern = ++pattern;
            star_text = text;
        } else if (*pattern == '?' || (*pattern && emu_lower(*pattern) == emu_lower(*text))) {
            pattern++;
            text++;
        } else if (star_pattern != NULL) {
            pattern = star_pattern;
            text = ++star_text;
        } else {
            return false;
        }
    }
    while (*pattern == '*') pattern++;
    return *pattern == '\0';
}

static bool emu_substring_matches(const char *needle, const char *haystack) {
    size_t needle_len = strlen(needle);
    if (needle_len == 0) return true;
    for (const char *start = haystack; *start; start++) {
        size_t i = 0;
        while (i < needle_len && start[i] && emu_lower(start[i]) == emu_lower(needle[i])) i++;
        if (i == needle_len) return true;
    }
    return false;
}

bool emu_pattern_matches(const char *pattern, const char *text) {
    if (strpbrk(pattern, "*?") != NULL) return emu_glob_matches(pattern, text);
    return emu_substring_matches(pattern, text);
}

/* ---------------------------------------------------------------- scripted answers */

/* Expands {{input}} and {{tool:NAME}}; NULL when a named tool was not offered (the rule is skipped). */
char *emu_expand_text(const char *text, const char *input, const emu_toollist *tools) {
    emu_str out = {0};
    emu_str_appendz(&out, "");
    const char *p = text;
    while (*p) {
        const char *open = strstr(p, "{{");
        if (open == NULL) {
            emu_str_appendz(&out, p);
            break;
        }
        emu_str_append(&out, p, (size_t)(open - p));
        const char *close = strstr(open + 2, "}}");
        if (close == NULL) {
            emu_str_appendz(&out, open);
            break;
        }
        const char *inner = open + 2;
        size_t inner_len = (size_t)(close - inner);
        if (inner_len == 5 && memcmp(inner, "input", 5) == 0) {
            emu_str_appendz(&out, input);
        } else if (inner_len > 5 && memcmp(inner, "tool:", 5) == 0) {
            const char *resolved = emu_tools_resolve(tools, inner + 5, inner_len - 5);
            if (resolved == NULL) {
                emu_str_free(&out);
                return NULL;
            }
            emu_str_appendz(&out, resolved);
        } else {
            emu_str_append(&out, open, (size_t)(close + 2 - open));
        }
        p = close + 2;
    }
    return emu_str_steal(&out);
}

static bool emu_rule_applies(const emu_rule *rule, emu_role role, const char *input, const char *last_user_input) {
    if (rule->role != role || !emu_pattern_matches(rule->pattern, input)) return false;
    if (rule->after_pattern == NULL) return true;
    return last_user_input != NULL && emu_pattern_matches(rule->after_pattern, last_user_input);
}

char *emu_select_answer(const emu_model *model, emu_role role, const char *input, const char *last_user_input,
                        const emu_toollist *tools) {
    for (size_t i = 0; i < model->rule_count; i++) {
        const emu_rule *rule = &model->rules[i];
        if (!emu_rule_applies(rule, role, input, last_user_input)) continue;
        char *expanded = emu_expand_text(rule->text, input, tools);
        if (expanded != NULL) return expanded;
    }
    char *fallback = emu_expand_text(model->default_answer, input, tools);
    return fallback != NULL ? fallback : emu_xstrdup(model->default_answer);
}

/* Parses one tool call body {"name": …, "arguments": …} at p; returns the position after it or NULL. */
static const char *emu_parse_tool_call(const char *p, const char *end, char **name, char **arguments) {
    const char *object = emu_json_skip_ws(p, end);
    const char *object_end = emu_json_skip_value(object, end);
    if (object_end == NULL || *object != '{') return NULL;
    const char *value = NULL;
    const char *value_end = NULL;
    const char *name_start = NULL;
    const char *name_end = NULL;
    if (!emu_json_object_get(object, object_end, "name", &value, &value_end) ||
        !emu_json_string_span(value, value_end, &name_start, &name_end)) {
        return NULL;
    }
    *name = emu_xstrndup(name_start, (size_t)(name_end - name_start));
    if (emu_json_object_get(object, object_end, "arguments", &value, &value_end)) {
        *arguments = emu_xstrndup(value, (size_t)(value_end - value));
    } else {
        *arguments = emu_xstrdup("{}");
    }
    return object_end;
}

bool emu_first_tool_call(const char *text, char **name, char **arguments) {
    const char *end = text + strlen(text);
    for (const char *open = strstr(text, "<tool_call>"); open != NULL; open = strstr(open + 1, "<tool_call>")) {
        if (emu_parse_tool_call(open + strlen("<tool_call>"), end, name, arguments) != NULL) return true;
    }
    return false;
}

char *emu_scripted_arguments_for(const emu_model *model, emu_role role, const char *input,
                                 const char *last_user_input, const emu_toollist *tools, const char *name) {
    for (size_t i = 0; i < model->rule_count; i++) {
        const emu_rule *rule = &model->rules[i];
        if (!emu_rule_applies(rule, role, input, last_user_input)) continue;
        char *expanded = emu_expand_text(rule->text, input, tools);
        if (expanded == NULL) continue;
        const char *end = expanded + strlen(expanded);
        for (const char *open = strstr(expanded, "<tool_call>"); open != NULL; open = strstr(open + 1, "<tool_call>")) {
            char *call_name = NULL;
            char *call_arguments = NULL;
            if (emu_parse_tool_call(open + strlen("<tool_call>"), end, &call_name, &call_arguments) == NULL) continue;
            bool same = strcmp(call_name, name) == 0;
            free(call_name);
            if (same) {
                free(expanded);
                return call_arguments;
            }
            free(call_arguments);
        }
        free(expanded);
    }
    return NULL;
}
