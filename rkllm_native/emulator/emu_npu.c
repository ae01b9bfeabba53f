/*
 * emu_npu.c: one emulated NPU, time-shared by every run that computes on it (MODEL_FORMAT.md §8.1).
 *
 * The engine runs several runtime handles, each in its own worker process, on one board. [Inf] The board has
 * one NPU: two runs computing at once each get about half of its throughput, and a run that sits inside its
 * result callback computes nothing (docs/runtime.md §4.3 and Appendix C, items 24-25). To reproduce that across
 * processes the emulator keeps a small table in POSIX shared memory, one entry per run (pid, handle,
 * "computing" flag). A run consumes each emulated delay in quanta of a few milliseconds; a quantum of wall
 * time advances its work by elapsed / (runs computing now), so its rate follows the count as runs start,
 * block in callbacks and end. Entries of dead processes (a crashed worker) are ignored and reclaimed.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "emu.h"

#define EMU_NPU_MAGIC 0x3155504eu /* "NPU1": the layout below; a new layout gets a new shm name too */
#define EMU_NPU_ENTRIES 128       /* runs that can share one NPU at once; more are timed as if alone */
#define EMU_NPU_QUANTUM_NS 2000000ull /* 2 ms of wall time per step: the rate follows the count this closely */

typedef struct {
    _Atomic int32_t pid;         /* owner process; 0 = free */
    _Atomic uint32_t computing;  /* 1 while the run uses the NPU (not while it is inside a callback) */
    _Atomic uint64_t start_time; /* owner's start time (/proc/<pid>/stat field 22): tells a reused pid apart */
    _Atomic uint64_t owner;      /* the handle's address in the owner process (diagnostics only) */
    _Atomic uint64_t serial;     /* bumped by every claim, so cached liveness verdicts expire */
} emu_npu_entry;

typedef struct {
    _Atomic uint32_t magic;
    uint32_t entry_count;
    emu_npu_entry entries[EMU_NPU_ENTRIES];
} emu_npu_table;

/* What this process knows about a foreign entry: whether its (pid, start time) really is that process. */
typedef struct {
    uint64_t serial;
    bool checked;
    bool genuine;
} emu_npu_verdict;

struct emu_npu {
    char *name;
    emu_npu_table *table;
    bool shared; /* false: a process-local table (shared memory was unavailable) */
    int refs;
    pthread_mutex_t verdict_lock;
    emu_npu_verdict verdicts[EMU_NPU_ENTRIES];
    struct emu_npu *next;
};

static pthread_mutex_t emu_npu_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static emu_npu *emu_npu_registry;
static atomic_bool emu_npu_full_warned;

/* Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); 0 when unreadable. */
static uint64_t emu_process_start_time(pid_t pid) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *file = fopen(path, "r");
    if (file == NULL) return 0;
    char buffer[1024];
    size_t got = fread(buffer, 1, sizeof(buffer) - 1, file);
    fclose(file);
    buffer[got] = '\0';
    /* The command name (field 2) is in parentheses and may contain spaces: count fields after the last ')'. */
    char *p = strrchr(buffer, ')');
    if (p == NULL) return 0;
    p++;
    for (int field = 2; field < 22 && *p; field++) {
        while (*p == ' ') p++;
        while (*p && *p != ' ') p++;
    }
    while (*p == ' ') p++;
    return strtoull(p, NULL, 10);
}

static pthread_once_t emu_self_start_once = PTHREAD_ONCE_INIT;
static uint64_t emu_self_start;
static pid_t emu_self_start_pid;

static void emu_read_self_start(void) {
    emu_self_start_pid = getpid();
    emu_self_start = emu_process_start_time(emu_self_start_pid);
}

/* This process's start time; re-read after a fork (a child has its own pid and start time). */
static uint64_t emu_self_start_time(void) {
    pthread_once(&emu_self_start_once, emu_read_self_start);
    if (emu_self_start_pid != getpid()) return emu_process_start_time(getpid());
    return emu_self_start;
}

bool emu_npu_name_valid(const char *name) {
    size_t len = strlen(name);
    if (len == 0 || len > 64) return false;
    for (const char *p = name; *p; p++) {
        bool ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                  *p == '_' || *p == '.';
        if (!ok) return false;
    }
    return true;
}

void emu_npu_shm_name(const char *name, char *out, size_t out_len) {
    snprintf(out, out_len, "/rkllm-emu-npu1-%u-%s", (unsigned)getuid(), name);
}

static emu_npu_table *emu_npu_map(const char *shm_name, emu_str *warning) {
    int fd = shm_open(shm_name, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        emu_str_printf(warning, "shm_open(%s) failed: %s", shm_name, strerror(errno));
        return NULL;
    }
    struct stat info;
    if (fstat(fd, &info) != 0) {
        emu_str_printf(warning, "fstat(%s) failed: %s", shm_name, strerror(errno));
        close(fd);
        return NULL;
    }
    /* Growing an object another process has just created is harmless: both ask for the same size, zeroed. */
    if ((size_t)info.st_size < sizeof(emu_npu_table) && ftruncate(fd, (off_t)sizeof(emu_npu_table)) != 0) {
        emu_str_printf(warning, "ftruncate(%s) failed: %s", shm_name, strerror(errno));
        close(fd);
        return NULL;
    }
    void *mapped = mmap(NULL, sizeof(emu_npu_table), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (mapped == MAP_FAILED) {
        emu_str_printf(warning, "mmap(%s) failed: %s", shm_name, strerror(errno));
        return NULL;
    }
    emu_npu_table *table = mapped;
    uint32_t expected = 0;
    if (!atomic_compare_exchange_strong(&table->magic, &expected, EMU_NPU_MAGIC) && expected != EMU_NPU_MAGIC) {
        emu_str_printf(warning, "%s holds something else (magic %#x)", shm_name, expected);
        munmap(mapped, sizeof(emu_npu_table));
        return NULL;
    }
    table->entry_count = EMU_NPU_ENTRIES;
    return table;
}

emu_npu *emu_npu_attach(const char *name, emu_str *warning) {
    pthread_mutex_lock(&emu_npu_registry_lock);
    for (emu_npu *npu = emu_npu_registry; npu != NULL; npu = npu->next) {
        if (strcmp(npu->name, name) == 0) {
            npu->refs++;
            pthread_mutex_unlock(&emu_npu_registry_lock);
            return npu;
        }
    }
    char shm_name[128];
    emu_npu_shm_name(name, shm_name, sizeof(shm_name));
    emu_npu *npu = emu_xcalloc(1, sizeof(emu_npu));
    npu->name = emu_xstrdup(name);
    npu->table = emu_npu_map(shm_name, warning);
    npu->shared = npu->table != NULL;
    if (npu->table == NULL) {
        /* Handles of this process still share one NPU; other processes are not seen. */
        npu->table = emu_xcalloc(1, sizeof(emu_npu_table));
        atomic_store(&npu->table->magic, EMU_NPU_MAGIC);
        npu->table->entry_count = EMU_NPU_ENTRIES;
    }
    npu->refs = 1;
    pthread_mutex_init(&npu->verdict_lock, NULL);
    npu->next = emu_npu_registry;
    emu_npu_registry = npu;
    pthread_mutex_unlock(&emu_npu_registry_lock);
    return npu;
}

void emu_npu_detach(emu_npu *npu) {
    if (npu == NULL) return;
    pthread_mutex_lock(&emu_npu_registry_lock);
    if (--npu->refs > 0) {
        pthread_mutex_unlock(&emu_npu_registry_lock);
        return;
    }
    for (emu_npu **link = &emu_npu_registry; *link != NULL; link = &(*link)->next) {
        if (*link == npu) {
            *link = npu->next;
            break;
        }
    }
    pthread_mutex_unlock(&emu_npu_registry_lock);
    /* The shared object itself stays (another process may use it); it is 4 KiB per name and user. */
    if (npu->shared) {
        munmap(npu->table, sizeof(emu_npu_table));
    } else {
        free(npu->table);
    }
    pthread_mutex_destroy(&npu->verdict_lock);
    free(npu->name);
    free(npu);
}

/* Whether a foreign entry belongs to a live process that really is its owner (not a reused pid). */
static bool emu_npu_owner_alive(emu_npu *npu, size_t index, int32_t pid) {
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return false;
    emu_npu_entry *entry = &npu->table->entries[index];
    uint64_t serial = atomic_load(&entry->serial);
    uint64_t recorded = atomic_load(&entry->start_time);
    if (recorded == 0) return true; /* being claimed right now, or /proc was unreadable for its owner */
    pthread_mutex_lock(&npu->verdict_lock);
    emu_npu_verdict *verdict = &npu->verdicts[index];
    if (!verdict->checked || verdict->serial != serial) {
        uint64_t actual = emu_process_start_time((pid_t)pid);
        verdict->serial = serial;
        verdict->checked = true;
        verdict->genuine = actual == 0 || actual == recorded;
    }
    bool genuine = verdict->genuine;
    pthread_mutex_unlock(&npu->verdict_lock);
    return genuine;
}

/* Frees an entry whose owner is gone; a claim racing with this wins or loses cleanly on the pid CAS. */
static void emu_npu_reclaim(emu_npu_entry *entry, int32_t dead_pid) {
    int32_t expected = dead_pid;
    atomic_compare_exchange_strong(&entry->pid, &expected, 0);
}

/* Runs computing on this NPU now, this one included when it computes. */
static unsigned emu_npu_computing(emu_npu *npu) {
    unsigned count = 0;
    int32_t self = (int32_t)getpid();
    for (size_t i = 0; i < EMU_NPU_ENTRIES; i++) {
        emu_npu_entry *entry = &npu->table->entries[i];
        int32_t pid = atomic_load(&entry->pid);
        if (pid == 0 || !atomic_load(&entry->computing)) continue;
        if (pid == self) {
            count++;
        } else if (emu_npu_owner_alive(npu, i, pid)) {
            count++;
        } else {
            emu_npu_reclaim(entry, pid);
        }
    }
    return count;
}

void emu_npu_run_begin(emu_npu *npu, emu_npu_run *run, const void *owner) {
    memset(run, 0, sizeof(*run));
    run->entry = -1;
    run->npu = npu;
    if (npu == NULL) return;
    int32_t self = (int32_t)getpid();
    /* First a free entry; else one whose owner died (a crashed worker leaves its entry behind). */
    for (int pass = 0; pass < 2 && run->entry < 0; pass++) {
        for (size_t i = 0; i < EMU_NPU_ENTRIES; i++) {
            emu_npu_entry *entry = &npu->table->entries[i];
            int32_t expected = atomic_load(&entry->pid);
            if (pass == 0 ? expected != 0 : (expected == 0 || expected == self || emu_npu_owner_alive(npu, i, expected))) {
                continue;
            }
            if (!atomic_compare_exchange_strong(&entry->pid, &expected, self)) continue;
            atomic_store(&entry->computing, 0);
            atomic_store(&entry->start_time, 0);
            atomic_fetch_add(&entry->serial, 1);
            atomic_store(&entry->start_time, emu_self_start_time());
            atomic_store(&entry->owner, (uint64_t)(uintptr_t)owner);
            atomic_store(&entry->computing, 1);
            run->entry = (int)i;
            break;
        }
    }
    if (run->entry < 0 && !atomic_exchange(&emu_npu_full_warned, true)) {
        emu_log('W', "emulator: %d runs already share NPU '%s'; further runs are timed as if alone",
                EMU_NPU_ENTRIES, npu->name);
    }
}

void emu_npu_run_computing(emu_npu_run *run, bool computing) {
    if (run->npu == NULL || run->entry < 0) return;
    atomic_store(&run->npu->table->entries[run->entry].computing, computing ? 1u : 0u);
}

void emu_npu_run_end(emu_npu_run *run) {
    if (run->npu == NULL || run->entry < 0) return;
    emu_npu_entry *entry = &run->npu->table->entries[run->entry];
    atomic_store(&entry->computing, 0);
    atomic_store(&entry->owner, 0);
    atomic_store(&entry->pid, 0);
    run->entry = -1;
}

void emu_npu_work(emu_npu_run *run, uint64_t work_ns) {
    if (work_ns == 0) return;
    /* Oversleeping is credited (surplus) rather than lost, so many small delays add up without drift. */
    int64_t owed = (int64_t)work_ns - run->surplus_ns;
    bool shared = run->npu != NULL && run->entry >= 0;
    while (owed > 0) {
        unsigned count = shared ? emu_npu_computing(run->npu) : 1;
        if (count == 0) count = 1;
        uint64_t wall = (uint64_t)owed * count;
        if (shared && wall > EMU_NPU_QUANTUM_NS) wall = EMU_NPU_QUANTUM_NS;
        uint64_t before = emu_now_ns();
        emu_sleep_until_ns(before + wall);
        owed -= (int64_t)((emu_now_ns() - before) / count);
    }
    /* At most one quantum is carried: a process that was stopped or starved for long gets no burst of credit. */
    run->surplus_ns = -owed < (int64_t)EMU_NPU_QUANTUM_NS ? -owed : (int64_t)EMU_NPU_QUANTUM_NS;
}
