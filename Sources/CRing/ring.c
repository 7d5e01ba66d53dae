#define _GNU_SOURCE
#include "CRing.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>

struct ballast_ring {
    struct io_uring ring;
    int sqpoll;
    struct io_uring_buf_ring *br;
    unsigned br_entries;
    int br_mask;
    int br_added;
};

ballast_ring *ballast_ring_create(unsigned entries, unsigned sqpoll_idle_ms, int *err) {
    ballast_ring *r = calloc(1, sizeof(*r));
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.cq_entries = entries * 4;
    if (sqpoll_idle_ms > 0) {
        // The kernel's thread submits; DEFER_TASKRUN does not go with it.
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER;
        p.sq_thread_idle = sqpoll_idle_ms;
        r->sqpoll = 1;
    } else {
        // Task work (completing a recv) runs when this thread waits, not by interrupting it.
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    }
    int ret = io_uring_queue_init_params(entries, &r->ring, &p);
    if (ret == -EINVAL && !r->sqpoll) {
        // Kernels before 6.1 lack DEFER_TASKRUN.
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN;
        p.cq_entries = entries * 4;
        ret = io_uring_queue_init_params(entries, &r->ring, &p);
    }
    if (ret < 0) {
        *err = -ret;
        free(r);
        return NULL;
    }
    if (!(p.features & IORING_FEAT_EXT_ARG) || !(p.features & IORING_FEAT_NODROP)) {
        io_uring_queue_exit(&r->ring);
        free(r);
        *err = EOPNOTSUPP;
        return NULL;
    }
    // Each io_uring_enter then skips the descriptor lookup (5.18+; harmless where refused).
    (void)io_uring_register_ring_fd(&r->ring);
    return r;
}

void ballast_ring_destroy(ballast_ring *r) {
    if (!r) return;
    if (r->br) {
        io_uring_unregister_buf_ring(&r->ring, 0);
        munmap(r->br, r->br_entries * sizeof(struct io_uring_buf));
    }
    io_uring_queue_exit(&r->ring);
    free(r);
}


int ballast_ring_setup_buffers(ballast_ring *r, unsigned entries) {
    size_t size = entries * sizeof(struct io_uring_buf);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) return -errno;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)mem;
    reg.ring_entries = entries;
    reg.bgid = 0;
    int ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret < 0) {
        munmap(mem, size);
        return ret;
    }
    r->br = mem;
    r->br_entries = entries;
    r->br_mask = io_uring_buf_ring_mask(entries);
    io_uring_buf_ring_init(r->br);
    return 0;
}

void ballast_ring_provide(ballast_ring *r, void *addr, unsigned len, uint16_t bid) {
    io_uring_buf_ring_add(r->br, addr, len, bid, r->br_mask, r->br_added);
    r->br_added++;
}

void ballast_ring_publish(ballast_ring *r) {
    if (r->br_added) {
        io_uring_buf_ring_advance(r->br, r->br_added);
        r->br_added = 0;
    }
}

static struct io_uring_sqe *sqe_for(ballast_ring *r) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        ballast_ring_publish(r);
        io_uring_submit(&r->ring);
        // With SQPOLL the kernel's thread frees slots as it takes them.
        if (r->sqpoll) io_uring_sqring_wait(&r->ring);
        sqe = io_uring_get_sqe(&r->ring);
    }
    return sqe;
}

int ballast_ring_recv(ballast_ring *r, int fd, uint64_t data) {
    struct io_uring_sqe *sqe = sqe_for(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_recv(sqe, fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
    sqe->buf_group = 0;
    io_uring_sqe_set_data64(sqe, data);
    return 0;
}

int ballast_ring_send(ballast_ring *r, int fd, const void *buf, unsigned len, uint64_t data) {
    struct io_uring_sqe *sqe = sqe_for(r);
    if (!sqe) return -EBUSY;
    io_uring_prep_send(sqe, fd, buf, len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, data);
    return 0;
}

int ballast_ring_poll(ballast_ring *r, int fd, unsigned mask, int multishot, uint64_t data) {
    struct io_uring_sqe *sqe = sqe_for(r);
    if (!sqe) return -EBUSY;
    if (multishot)
        io_uring_prep_poll_multishot(sqe, fd, mask);
    else
        io_uring_prep_poll_add(sqe, fd, mask);
    io_uring_sqe_set_data64(sqe, data);
    return 0;
}

int ballast_ring_cancel_close(ballast_ring *r, const uint64_t words[4], int fd0, int fd1, uint64_t data) {
    unsigned need = (fd0 >= 0) + (fd1 >= 0);
    for (int k = 0; k < 4; k++) need += words[k] != 0;
    if (need == 0) return 0;
    // One chain must be in one submission: make room for all of it.
    if (io_uring_sq_space_left(&r->ring) < need) {
        ballast_ring_publish(r);
        io_uring_submit(&r->ring);
        if (io_uring_sq_space_left(&r->ring) < need) return -EBUSY;
    }
    unsigned left = need;
    struct io_uring_sqe *sqe;
    for (int k = 0; k < 4; k++) {
        if (!words[k]) continue;
        sqe = io_uring_get_sqe(&r->ring);
        io_uring_prep_cancel64(sqe, words[k], 0);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS | (--left ? IOSQE_IO_HARDLINK : 0);
        io_uring_sqe_set_data64(sqe, data);
    }
    int fds[2] = {fd0, fd1};
    for (int k = 0; k < 2; k++) {
        if (fds[k] < 0) continue;
        sqe = io_uring_get_sqe(&r->ring);
        io_uring_prep_close(sqe, fds[k]);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS | (--left ? IOSQE_IO_HARDLINK : 0);
        io_uring_sqe_set_data64(sqe, data);
    }
    return 0;
}

int ballast_ring_submit_wait(ballast_ring *r, int timeout_ms) {
    ballast_ring_publish(r);
    struct io_uring_cqe *cqe = NULL;
    if (timeout_ms < 0) return io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, NULL, NULL);
    if (timeout_ms == 0) return io_uring_submit_and_get_events(&r->ring);
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000, .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    return io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
}

int ballast_ring_submit(ballast_ring *r) {
    ballast_ring_publish(r);
    return io_uring_submit(&r->ring);
}

unsigned ballast_ring_reap(ballast_ring *r, ballast_cqe *out, unsigned max) {
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max) break;
        out[n].data = cqe->user_data;
        out[n].res = cqe->res;
        out[n].flags = cqe->flags;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return n;
}


int ballast_cqe_buffer(const ballast_cqe *c) {
    return (c->flags & IORING_CQE_F_BUFFER) ? (int)(c->flags >> IORING_CQE_BUFFER_SHIFT) : -1;
}

int ballast_cqe_more(const ballast_cqe *c) { return (c->flags & IORING_CQE_F_MORE) != 0; }
