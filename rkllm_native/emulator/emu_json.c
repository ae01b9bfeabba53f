/*
 * emu_json.c: just enough JSON scanning to read tool names and tool-call arguments.
 *
 * The emulator never builds a DOM: it validates syntax by skipping values and hands out raw text spans,
 * so arguments are echoed byte for byte as the model file wrote them.
 */
#include <stdio.h>
#include <string.h>

#include "emu.h"

#define EMU_JSON_MAX_DEPTH 64

const char *emu_json_skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static const char *emu_json_skip_string(const char *p, const char *end) {
    if (p >= end || *p != '"') return NULL;
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            p++;
            if (p >= end) return NULL;
            if (*p == 'u') {
                for (int i = 1; i <= 4; i++) {
                    if (p + i >= end) return NULL;
                    char h = p[i];
                    bool hex = (h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F');
                    if (!hex) return NULL;
                }
                p += 4;
            } else if (strchr("\"\\/bfnrt", *p) == NULL) {
                return NULL;
            }
        }
        p++;
    }
    return NULL;
}

static const char *emu_json_skip_number(const char *p, const char *end) {
    const char *start = p;
    if (p < end && *p == '-') p++;
    const char *digits = p;
    while (p < end && *p >= '0' && *p <= '9') p++;
    if (p == digits) return NULL;
    if (p < end && *p == '.') {
        p++;
        const char *frac = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == frac) return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        const char *exp = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == exp) return NULL;
    }
    return p > start ? p : NULL;
}

static const char *emu_json_skip_literal(const char *p, const char *end, const char *word) {
    size_t len = strlen(word);
    if ((size_t)(end - p) < len || memcmp(p, word, len) != 0) return NULL;
    return p + len;
}

static const char *emu_json_skip_value_depth(const char *p, const char *end, int depth) {
    if (depth > EMU_JSON_MAX_DEPTH) return NULL;
    p = emu_json_skip_ws(p, end);
    if (p >= end) return NULL;
    switch (*p) {
    case '"':
        return emu_json_skip_string(p, end);
    case '{': {
        p = emu_json_skip_ws(p + 1, end);
        if (p < end && *p == '}') return p + 1;
        for (;;) {
            p = emu_json_skip_string(emu_json_skip_ws(p, end), end);
            if (p == NULL) return NULL;
            p = emu_json_skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = emu_json_skip_value_depth(p + 1, end, depth + 1);
            if (p == NULL) return NULL;
            p = emu_json_skip_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == '}') return p + 1;
            return NULL;
        }
    }
    case '[': {
        p = emu_json_skip_ws(p + 1, end);
        if (p < end && *p == ']') return p + 1;
        for (;;) {
            p = emu_json_skip_value_depth(p, end, depth + 1);
            if (p == NULL) return NULL;
            p = emu_json_skip_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == ']') return p + 1;
            return NULL;
        }
    }
    case 't':
        return emu_json_skip_literal(p, end, "true");
    case 'f':
        return emu_json_skip_literal(p, end, "false");
    case 'n':
        return emu_json_skip_literal(p, end, "null");
    default:
        return emu_json_skip_number(p, end);
    }
}

const char *emu_json_skip_value(const char *p, const char *end) { return emu_json_skip_value_depth(p, end, 0); }

bool emu_json_string_span(const char *p, const char *end, const char **content, const char **content_end) {
    p = emu_json_skip_ws(p, end);
    const char *after = emu_json_skip_string(p, end);
    if (after == NULL) return false;
    *content = p + 1;
    *content_end = after - 1;
    return true;
}

bool emu_json_object_get(const char *p, const char *end, const char *key, const char **value,
                         const char **value_end) {
    size_t key_len = strlen(key);
    p = emu_json_skip_ws(p, end);
    if (p >= end || *p != '{') return false;
    p = emu_json_skip_ws(p + 1, end);
    if (p < end && *p == '}') return false;
    for (;;) {
        const char *name = NULL;
        const char *name_end = NULL;
        if (!emu_json_string_span(p, end, &name, &name_end)) return false;
        p = emu_json_skip_ws(name_end + 1, end);
        if (p >= end || *p != ':') return false;
        const char *start = emu_json_skip_ws(p + 1, end);
        const char *after = emu_json_skip_value(start, end);
        if (after == NULL) return false;
        if ((size_t)(name_end - name) == key_len && memcmp(name, key, key_len) == 0) {
            *value = start;
            *value_end = after;
            return true;
        }
        p = emu_json_skip_ws(after, end);
        if (p < end && *p == ',') {
            p = emu_json_skip_ws(p + 1, end);
            continue;
        }
        return false;
    }
}

void emu_json_append_string(emu_str *out, const char *text, size_t len) {
    emu_str_append(out, "\"", 1);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        switch (c) {
        case '"':
            emu_str_append(out, "\\\"", 2);
            break;
        case '\\':
            emu_str_append(out, "\\\\", 2);
            break;
        case '\n':
            emu_str_append(out, "\\n", 2);
            break;
        case '\r':
            emu_str_append(out, "\\r", 2);
            break;
        case '\t':
            emu_str_append(out, "\\t", 2);
            break;
        default:
            if (c < 0x20) {
                emu_str_printf(out, "\\u%04x", c);
            } else {
                emu_str_append(out, (const char *)&text[i], 1);
            }
        }
    }
    emu_str_append(out, "\"", 1);
}
