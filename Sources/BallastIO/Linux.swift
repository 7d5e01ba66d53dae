import CLinux

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Linux-only readiness notification (after swift-nio's `Linux.swift`).
public enum Epoll {
    public static let `in` = BALLAST_EPOLLIN
    public static let out = BALLAST_EPOLLOUT
    public static let err = BALLAST_EPOLLERR
    public static let hup = BALLAST_EPOLLHUP
    public static let rdhup = BALLAST_EPOLLRDHUP
    public static let edgeTriggered = BALLAST_EPOLLET

    /// The corresponding C function is `epoll_create1(EPOLL_CLOEXEC)`.
    public static func create() throws(SysError) -> Int32 {
        Int32(try Sys.checkBlocking("epoll_create1") { Int(ballast_epoll_create()) })
    }

    /// The corresponding C function is `epoll_ctl(EPOLL_CTL_ADD)`.
    @inline(never)
    public static func add(_ epfd: Int32, _ fd: Int32, events: UInt32, data: UInt64) throws(SysError) {
        _ = try Sys.checkBlocking("epoll_ctl") { Int(ballast_epoll_ctl(epfd, BALLAST_EPOLL_CTL_ADD, fd, events, data)) }
    }

    /// The corresponding C function is `epoll_ctl(EPOLL_CTL_MOD)`.
    @inline(never)
    public static func modify(_ epfd: Int32, _ fd: Int32, events: UInt32, data: UInt64) throws(SysError) {
        _ = try Sys.checkBlocking("epoll_ctl") { Int(ballast_epoll_ctl(epfd, BALLAST_EPOLL_CTL_MOD, fd, events, data)) }
    }

    /// The corresponding C function is `epoll_ctl(EPOLL_CTL_DEL)`.
    @inline(never)
    public static func remove(_ epfd: Int32, _ fd: Int32) {
        _ = ballast_epoll_ctl(epfd, BALLAST_EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events into a preallocated array. The corresponding C function is `epoll_wait`.
    @inline(never)
    public static func wait(
        _ epfd: Int32, _ events: UnsafeMutablePointer<ballast_epoll_event>, max: Int32, timeoutMs: Int32
    ) throws(SysError) -> Int {
        let r = ballast_epoll_wait(epfd, events, max, timeoutMs)
        if r >= 0 { return Int(r) }
        if errno == EINTR { return 0 }
        throw SysError("epoll_wait", errno)
    }
}

/// A counter fd used to wake an event loop from another thread.
public enum EventFd {
    /// The corresponding C function is `eventfd(0, EFD_NONBLOCK|EFD_CLOEXEC)`.
    public static func create() throws(SysError) -> Int32 {
        Int32(try Sys.checkBlocking("eventfd") { Int(ballast_eventfd(0)) })
    }

    /// The corresponding C function is `write` on an eventfd.
    public static func signal(_ fd: Int32) {
        _ = ballast_eventfd_write(fd, 1)
    }

    /// Reads and resets the counter. The corresponding C function is `read` on an eventfd.
    public static func drain(_ fd: Int32) {
        var v: UInt64 = 0
        _ = ballast_eventfd_read(fd, &v)
    }
}

/// Kernel pipes for splice.
public enum Pipe {
    /// A nonblocking pipe; returns (read end, write end). The corresponding C function is `pipe2`.
    public static func create() throws(SysError) -> (Int32, Int32) {
        var fds: (Int32, Int32) = (-1, -1)
        _ = try Sys.checkBlocking("pipe2") {
            withUnsafeMutablePointer(to: &fds) {
                $0.withMemoryRebound(to: Int32.self, capacity: 2) { Int(ballast_pipe2($0)) }
            }
        }
        return fds
    }

    /// Sets the capacity and returns what the kernel granted. The corresponding C function is `fcntl(F_SETPIPE_SZ)`.
    public static func setSize(_ fd: Int32, _ size: Int) throws(SysError) -> Int {
        try Sys.checkBlocking("fcntl(F_SETPIPE_SZ)") { Int(ballast_set_pipe_size(fd, Int32(size))) }
    }
}

/// Process signals delivered through a descriptor, so no thread runs a signal handler.
public enum SignalFd {
    /// Blocks `signals` in the calling thread (threads started afterwards inherit the mask).
    /// The corresponding C function is `pthread_sigmask(SIG_BLOCK)`.
    public static func block(_ signals: [Int32]) {
        _ = signals.withUnsafeBufferPointer { ballast_block_signals($0.baseAddress, Int32($0.count)) }
    }

    /// The corresponding C function is `signalfd`.
    public static func create(_ signals: [Int32]) throws(SysError) -> Int32 {
        let r = signals.withUnsafeBufferPointer { ballast_signalfd($0.baseAddress, Int32($0.count)) }
        if r < 0 { throw SysError("signalfd", errno) }
        return r
    }

    /// The next pending signal number, or nil when none.
    public static func next(_ fd: Int32) -> Int32? {
        let r = ballast_signalfd_read(fd)
        return r > 0 ? r : nil
    }
}

/// A thread of Ballast's own (workers, checker, admin, nat): a pthread with a name `top -H` and
/// `ps -L` show, running `body` to its end. The body keeps what it captures alive until then.
public enum NamedThread {
    private final class Box {
        let name: String
        let body: () -> Void
        init(_ name: String, _ body: @escaping () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Starts the thread; returns its id, for `pthread_join`.
    public static func start(_ name: String, _ body: @escaping () -> Void) -> pthread_t {
        var tid = pthread_t()
        let box = Unmanaged.passRetained(Box(name, body)).toOpaque()
        let r = pthread_create(
            &tid, nil,
            { arg in
                let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
                ballast_set_thread_name(box.name)
                box.body()
                return nil
            }, box)
        precondition(r == 0, "pthread_create failed: \(r)")
        return tid
    }
}

/// A count other threads raise and one thread waits on, with a deadline: the one-shot reply of
/// a cross-thread request (`perform` on the checker, `show sess` from the workers), without
/// sleeping in a loop. The corresponding C functions are `pthread_mutex_*` and `pthread_cond_*`
/// (on `CLOCK_MONOTONIC`).
public final class Completion: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var count = 0

    public init() {
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// One more answer.
    public func signal() {
        pthread_mutex_lock(mutex)
        count += 1
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }

    /// Waits until `n` answers have come or `timeoutMs` has passed; true when they all came.
    public func wait(for n: Int = 1, timeoutMs: Int64) -> Bool {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let ns = Int64(ts.tv_nsec) + (timeoutMs % 1000) * 1_000_000
        ts.tv_sec += Int(timeoutMs / 1000) + Int(ns / 1_000_000_000)
        ts.tv_nsec = Int(ns % 1_000_000_000)
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while count < n {
            if pthread_cond_timedwait(cond, mutex, &ts) == ETIMEDOUT { return count >= n }
        }
        return true
    }
}
