#define _GNU_SOURCE
#include <malloc.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <sys/syscall.h>
#include "CLinux.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <signal.h>
#include <pthread.h>
#include <sys/prctl.h>

const uint32_t BALLAST_EPOLLIN = EPOLLIN;
const uint32_t BALLAST_EPOLLOUT = EPOLLOUT;
const uint32_t BALLAST_EPOLLERR = EPOLLERR;
const uint32_t BALLAST_EPOLLHUP = EPOLLHUP;
const uint32_t BALLAST_EPOLLRDHUP = EPOLLRDHUP;
const uint32_t BALLAST_EPOLLET = EPOLLET;
const int BALLAST_EPOLL_CTL_ADD = EPOLL_CTL_ADD;
const int BALLAST_EPOLL_CTL_MOD = EPOLL_CTL_MOD;
const int BALLAST_EPOLL_CTL_DEL = EPOLL_CTL_DEL;

int ballast_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int ballast_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev;
    ev.events = events;
    ev.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &ev);
}

int ballast_epoll_wait(int epfd, ballast_epoll_event *events, int max, int timeout_ms) {
    // struct epoll_event is packed on x86_64; copy into the unpacked Swift-visible layout.
    struct epoll_event raw[256];
    if (max > 256) max = 256;
    int n = epoll_wait(epfd, raw, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        events[i].events = raw[i].events;
        events[i].data = raw[i].data.u64;
    }
    return n;
}

int ballast_eventfd(unsigned int initval) { return eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC); }

int ballast_eventfd_write(int fd, uint64_t value) {
    return (int)write(fd, &value, sizeof(value));
}

int ballast_eventfd_read(int fd, uint64_t *value) {
    return (int)read(fd, value, sizeof(*value));
}

int ballast_block_signals(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int ballast_signalfd(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

int ballast_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof(info));
    if (n != (ssize_t)sizeof(info)) return -1;
    return (int)info.ssi_signo;
}

int ballast_pipe2(int fds[2]) { return pipe2(fds, O_NONBLOCK | O_CLOEXEC); }

int ballast_set_pipe_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }

int ballast_get_pipe_size(int fd) { return fcntl(fd, F_GETPIPE_SZ); }

ssize_t ballast_splice(int fd_in, int fd_out, size_t len) {
    return splice(fd_in, NULL, fd_out, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

int ballast_accept4(int fd, struct sockaddr *addr, socklen_t *len) {
    return accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int ballast_socket_nonblock(int domain, int type, int protocol) {
    return socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
}

uint16_t ballast_htons(uint16_t v) { return htons(v); }
uint16_t ballast_ntohs(uint16_t v) { return ntohs(v); }
int ballast_errno_eagain(void) { return EAGAIN; }

void ballast_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

void ballast_tune_malloc(void) {
    mallopt(M_MMAP_THRESHOLD, 16 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
}

int ballast_keep_caps_across_setuid(void) {
    return prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0);
}

int ballast_only_net_admin(void) {
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    d[0].effective = d[0].permitted = (1u << CAP_NET_ADMIN);
    if (syscall(SYS_capset, &h, d) != 0) return -1;
    return prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
}

int ballast_has_net_admin(void) {
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    if (syscall(SYS_capget, &h, d) != 0) return 0;
    return (d[0].effective >> CAP_NET_ADMIN) & 1;
}

unsigned int ballast_if_index(const char *name) { return if_nametoindex(name); }

int ballast_if_mac(const char *name, unsigned char *out) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct ifreq r;
    memset(&r, 0, sizeof r);
    strncpy(r.ifr_name, name, IFNAMSIZ - 1);
    int rc = ioctl(fd, SIOCGIFHWADDR, &r);
    int saved = errno;
    close(fd);
    if (rc < 0) { errno = saved; return -1; }
    memcpy(out, r.ifr_hwaddr.sa_data, 6);
    return 0;
}

int ballast_neighbour_probe(const struct sockaddr *addr, socklen_t len, const char *device) {
    int fd = socket(addr->sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int rc = setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, device, (socklen_t)strlen(device));
    if (rc == 0) rc = (int)sendto(fd, "", 0, 0, addr, len);
    int saved = errno;
    close(fd);
    if (rc < 0) { errno = saved; return -1; }
    return 0;
}
