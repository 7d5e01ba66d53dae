#ifndef BALLAST_MALLOC_COUNT_H
#define BALLAST_MALLOC_COUNT_H
// Linked into a benchmark executable, this target's malloc family replaces libc's for the whole
// process and counts every call, so a benchmark can report allocations per operation exactly.
long ballast_malloc_count(void);
#endif
