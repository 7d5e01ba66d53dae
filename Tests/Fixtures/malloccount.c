// LD_PRELOAD shim for the allocation test: counts malloc-family calls made by threads whose name
// starts with "ballast-w" (the data-plane workers) and writes the running total, as decimal text,
// to $MALLOC_COUNT_FILE every 20 ms. Built by the test with the system C compiler.
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/prctl.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static atomic_long worker_allocations;

static int in_worker(void) {
    char name[17] = {0};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    return strncmp(name, "ballast-w", 9) == 0;
}

static void count(void) {
    if (in_worker()) atomic_fetch_add(&worker_allocations, 1);
}

void *malloc(size_t n) { count(); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { count(); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { count(); return __libc_realloc(p, n); }
void *memalign(size_t a, size_t n) { count(); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { count(); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    count();
    void *p = __libc_memalign(a, n);
    if (!p) return 12;
    *out = p;
    return 0;
}

static void *reporter(void *arg) {
    const char *path = arg;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return NULL;
    char buf[32];
    for (;;) {
        long v = atomic_load(&worker_allocations);
        int len = 0;
        char tmp[32];
        do { tmp[len++] = '0' + (char)(v % 10); v /= 10; } while (v > 0);
        for (int i = 0; i < len; i++) buf[i] = tmp[len - 1 - i];
        buf[len] = '\n';
        pwrite(fd, buf, (size_t)len + 1, 0);
        ftruncate(fd, len + 1);
        usleep(20000);
    }
    return NULL;
}

__attribute__((constructor)) static void start_reporter(void) {
    const char *path = getenv("MALLOC_COUNT_FILE");
    if (!path) return;
    pthread_t t;
    pthread_create(&t, NULL, reporter, (void *)path);
    pthread_detach(t);
}
