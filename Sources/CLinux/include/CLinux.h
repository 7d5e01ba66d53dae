#ifndef BALLAST_CLINUX_H
#define BALLAST_CLINUX_H

// GNU-only system calls that Swift's Glibc module does not expose: epoll, eventfd,
// signalfd, splice, pipe2, accept4 and the pipe size fcntls. Compiled with _GNU_SOURCE in shim.c.

#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <signal.h>

typedef struct {
    uint32_t events;
    uint64_t data;
} ballast_epoll_event;

extern const uint32_t BALLAST_EPOLLIN;
extern const uint32_t BALLAST_EPOLLOUT;
extern const uint32_t BALLAST_EPOLLERR;
extern const uint32_t BALLAST_EPOLLHUP;
extern const uint32_t BALLAST_EPOLLRDHUP;
extern const uint32_t BALLAST_EPOLLET;
extern const int BALLAST_EPOLL_CTL_ADD;
extern const int BALLAST_EPOLL_CTL_MOD;
extern const int BALLAST_EPOLL_CTL_DEL;

int ballast_epoll_create(void);
int ballast_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
// Fills `events` (an array of `max` entries) and returns how many are ready, or -1 with errno.
int ballast_epoll_wait(int epfd, ballast_epoll_event *events, int max, int timeout_ms);

int ballast_eventfd(unsigned int initval);
int ballast_eventfd_write(int fd, uint64_t value);
int ballast_eventfd_read(int fd, uint64_t *value);

int ballast_signalfd(const int *signals, int count);
int ballast_block_signals(const int *signals, int count);
int ballast_signalfd_read(int fd);

int ballast_pipe2(int fds[2]);
int ballast_set_pipe_size(int fd, int size);
int ballast_get_pipe_size(int fd);
ssize_t ballast_splice(int fd_in, int fd_out, size_t len);

int ballast_accept4(int fd, struct sockaddr *addr, socklen_t *len);
int ballast_socket_nonblock(int domain, int type, int protocol);

// Byte order helpers (macros in C, unavailable in Swift).
uint16_t ballast_htons(uint16_t v);
uint16_t ballast_ntohs(uint16_t v);

int ballast_errno_eagain(void);

// Names the calling thread (visible in top -H, ps -L, /proc/PID/task/TID/comm).
void ballast_set_thread_name(const char *name);

/// Keeps large short-lived buffers (runtime API replies) in the heap: mmap threshold and trim
/// threshold raised, so they are not mapped and faulted in afresh each time.
void ballast_tune_malloc(void);

/// Privilege drop for nat mode: keep the permitted capabilities across setuid (call before it),
/// then reduce them to CAP_NET_ADMIN, effective (call after it). 0 on success, else -1 and errno.
int ballast_keep_caps_across_setuid(void);
int ballast_only_net_admin(void);
/// 1 when the calling thread has CAP_NET_ADMIN in its effective set.
int ballast_has_net_admin(void);

// The interface's index (0: no such interface) and its MAC address (`out`, 6 bytes; 0 on
// success, -1 with errno).
unsigned int ballast_if_index(const char *name);
int ballast_if_mac(const char *name, unsigned char *out);
// Sends one empty UDP datagram to `addr` (port 9, discard) out of interface `device`: the kernel
// resolves the address's L2 neighbour (ARP, NDP) to send it. 0 or -1 with errno.
int ballast_neighbour_probe(const struct sockaddr *addr, socklen_t len, const char *device);

#endif
