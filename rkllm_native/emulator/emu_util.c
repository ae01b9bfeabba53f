/*
 * emu_util.c: memory, strings, token arrays, logging and precise sleeping for the emulator.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "emu.h"

/* Out of memory is not an input error the caller can fix; the real runtime would fail hard too. */
static void emu_out_of_memory(void) {
    fputs("E rkllm: emulator: out of memory\n", stdout);
    fflush(stdout);
    abort();
}

void *emu_xmalloc(size_t size) {
    void *ptr = malloc(size ? size : 1);
    if (ptr == NULL) emu_out_of_memory();
    return ptr;
}

void *emu_xcalloc(size_t count, size_t size) {
    void *ptr = calloc(count ? count : 1, size ? size : 1);
    if (ptr == NULL) emu_out_of_memory();
    return ptr;
}

void *emu_xrealloc(void *ptr, size_t size) {
    void *grown = realloc(ptr, size ? size : 1);
    if (grown == NULL) emu_out_of_memory();
    return grown;
}

char *emu_xstrndup(const char *text, size_t len) {
    char *copy = emu_xmalloc(len + 1);
    memcpy(copy, text, len);
    copy[len] = '\0';
    return copy;
}

char *emu_xstrdup(const char *text) { return emu_xstrndup(text, strlen(text)); }

static void emu_str_reserve(emu_str *str, size_t extra) {
    size_t needed = str->len + extra + 1;
    if (needed <= str->cap) return;
    size_t cap = str->cap ? str->cap : 64;
    while (cap < needed) cap *= 2;
    str->data = emu_xrealloc(str->data, cap);
    str->cap = cap;
}

void emu_str_append(emu_str *str, const char *bytes, size_t len) {
    emu_str_reserve(str, len);
    if (len) memcpy(str->data + str->len, bytes, len);
    str->len += len;
    str->data[str->len] = '\0';
}

void emu_str_appendz(emu_str *str, const char *text) { emu_str_append(str, text, strlen(text)); }

void emu_str_printf(emu_str *str, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    int needed = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (needed > 0) {
        emu_str_reserve(str, (size_t)needed);
        vsnprintf(str->data + str->len, (size_t)needed + 1, fmt, args);
        str->len += (size_t)needed;
    }
    va_end(args);
}

const char *emu_str_cstr(const emu_str *str) { return str->data ? str->data : ""; }

void emu_str_clear(emu_str *str) {
    str->len = 0;
    if (str->data) str->data[0] = '\0';
}

void emu_str_free(emu_str *str) {
    free(str->data);
    str->data = NULL;
    str->len = str->cap = 0;
}

char *emu_str_steal(emu_str *str) {
    char *data = str->data ? str->data : emu_xstrdup("");
    str->data = NULL;
    str->len = str->cap = 0;
    return data;
}

static void emu_tokens_reserve(emu_tokens *tokens, size_t extra) {
    size_t needed = tokens->len + extra;
    if (needed <= tokens->cap) return;
    size_t cap = tokens->cap ? tokens->cap : 256;
    while (cap < needed) cap *= 2;
    tokens->ids = emu_xrealloc(tokens->ids, cap * sizeof(int32_t));
    tokens->cap = cap;
}

void emu_tokens_push(emu_tokens *tokens, int32_t id) {
    emu_tokens_reserve(tokens, 1);
    tokens->ids[tokens->len++] = id;
}

void emu_tokens_append(emu_tokens *tokens, const int32_t *ids, size_t count) {
    if (count == 0) return;
    emu_tokens_reserve(tokens, count);
    memcpy(tokens->ids + tokens->len, ids, count * sizeof(int32_t));
    tokens->len += count;
}

void emu_tokens_free(emu_tokens *tokens) {
    free(tokens->ids);
    tokens->ids = NULL;
    tokens->len = tokens->cap = 0;
}

size_t emu_common_prefix(const int32_t *a, size_t a_len, const int32_t *b, size_t b_len) {
    size_t limit = a_len < b_len ? a_len : b_len;
    size_t i = 0;
    while (i < limit && a[i] == b[i]) i++;
    return i;
}

void emu_log(char level, const char *fmt, ...) {
    /* One formatted buffer, one write: lines from concurrent handles never interleave mid-line. */
    emu_str line = {0};
    emu_str_printf(&line, "%c rkllm: ", level);
    va_list args;
    va_start(args, fmt);
    va_list copy;
    va_copy(copy, args);
    int needed = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (needed > 0) {
        char *message = emu_xmalloc((size_t)needed + 1);
        vsnprintf(message, (size_t)needed + 1, fmt, args);
        emu_str_append(&line, message, (size_t)needed);
        free(message);
    }
    va_end(args);
    emu_str_append(&line, "\n", 1);
    fwrite(line.data, 1, line.len, stdout);
    fflush(stdout);
    emu_str_free(&line);
}

char *emu_escape_for_log(const char *text) {
    emu_str out = {0};
    emu_str_appendz(&out, "");
    for (const char *p = text; *p; p++) {
        if (*p == '\n') {
            emu_str_append(&out, "\\n", 2);
        } else if (*p == '\r') {
            emu_str_append(&out, "\\r", 2);
        } else if (*p == '\t') {
            emu_str_append(&out, "\\t", 2);
        } else {
            emu_str_append(&out, p, 1);
        }
    }
    return emu_str_steal(&out);
}

uint64_t emu_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

void emu_sleep_until_ns(uint64_t deadline_ns) {
    struct timespec until = {.tv_sec = (time_t)(deadline_ns / 1000000000ull),
                             .tv_nsec = (long)(deadline_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
    }
}

void emu_sleep_ns(uint64_t duration_ns) {
    if (duration_ns == 0) return;
    emu_sleep_until_ns(emu_now_ns() + duration_ns);
}

int emu_version_compare(const char *a, const char *b) {
    while (*a || *b) {
        char *a_end = NULL;
        char *b_end = NULL;
        long a_part = strtol(a, &a_end, 10);
        long b_part = strtol(b, &b_end, 10);
        if (a_end == a) a_part = 0;
        if (b_end == b) b_part = 0;
        if (a_part != b_part) return a_part < b_part ? -1 : 1;
        a = a_end;
        b = b_end;
        /* skip a suffix such as "b1", then the dot */
        while (*a && *a != '.') a++;
        while (*b && *b != '.') b++;
        if (*a == '.') a++;
        if (*b == '.') b++;
    }
    return 0;
}

bool emu_file_exists(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISREG(info.st_mode);
}
