#ifndef BALLAST_CRING_H
#define BALLAST_CRING_H

#include <stdint.h>

/// One io_uring instance (liburing, linked statically) with one ring of provided buffers.
/// Every function is called from the thread that created the ring.
typedef struct ballast_ring ballast_ring;

/// A completion, copied out of the completion queue.
typedef struct ballast_cqe {
    uint64_t data;
    int32_t res;
    uint32_t flags;
} ballast_cqe;

/// Creates a ring with `entries` submission slots, for the calling thread only (SINGLE_ISSUER,
/// DEFER_TASKRUN where the kernel has them); with `sqpoll_idle_ms` > 0, a kernel thread polls the
/// submission queue instead (SQPOLL, sleeping after that many ms without work). Returns NULL
/// and sets *err (a positive errno).
ballast_ring *ballast_ring_create(unsigned entries, unsigned sqpoll_idle_ms, int *err);
void ballast_ring_destroy(ballast_ring *r);

/// Registers a provided-buffer ring (group 0) of `entries` (a power of two) slots, empty.
int ballast_ring_setup_buffers(ballast_ring *r, unsigned entries);
/// Gives a buffer to the kernel (visible after ballast_ring_publish).
void ballast_ring_provide(ballast_ring *r, void *addr, unsigned len, uint16_t bid);
void ballast_ring_publish(ballast_ring *r);

/// Queue operations. 0, or -EBUSY when the submission queue stays full after a submit.
int ballast_ring_recv(ballast_ring *r, int fd, uint64_t data);
int ballast_ring_send(ballast_ring *r, int fd, const void *buf, unsigned len, uint64_t data);
int ballast_ring_poll(ballast_ring *r, int fd, unsigned mask, int multishot, uint64_t data);
/// Cancels the operations named by the nonzero words (by their data, a hash lookup each), then
/// closes the descriptors that are >= 0, in that order (hard-linked: each step runs whatever the
/// one before it found).
int ballast_ring_cancel_close(ballast_ring *r, const uint64_t words[4], int fd0, int fd1, uint64_t data);

/// Submits what is queued and waits for at least one completion, at most `timeout_ms`
/// (-1: no limit; 0: do not wait). Returns >= 0, or a negative errno (-ETIME, -EINTR: not errors).
int ballast_ring_submit_wait(ballast_ring *r, int timeout_ms);
/// Submits what is queued without waiting.
int ballast_ring_submit(ballast_ring *r);
/// Copies up to `max` completions into `out` and consumes them; returns how many.
unsigned ballast_ring_reap(ballast_ring *r, ballast_cqe *out, unsigned max);

/// The buffer id of a completion that carries one, or -1.
int ballast_cqe_buffer(const ballast_cqe *c);
/// Whether more completions will follow for this (multishot) operation.
int ballast_cqe_more(const ballast_cqe *c);

#endif
