import CLinux

/// What a readiness event is about, as its owner registered it: an index into the owner's table,
/// the owner's kind of object (0...254; 255 is the loop's own wake-up), and a generation, so that
/// an event still queued for an object that was closed and whose index was reused misses.
/// Layout in epoll's 64-bit data: index (32 bits) | kind (8) | generation (24).
public struct EventToken: Equatable, Sendable {
    public let raw: UInt64

    @inline(__always)
    public init(index: Int32, kind: UInt8 = 0, generation: UInt32 = 0) {
        raw = UInt64(UInt32(bitPattern: index)) | (UInt64(kind) << 32) | (UInt64(generation & 0xFF_FFFF) << 40)
    }

    @inline(__always)
    init(raw: UInt64) { self.raw = raw }

    @inline(__always)
    public var index: Int32 { Int32(bitPattern: UInt32(truncatingIfNeeded: raw)) }
    @inline(__always)
    public var kind: UInt8 { UInt8(truncatingIfNeeded: raw >> 32) }
    /// The low 24 bits of the generation it was made with.
    @inline(__always)
    public var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 40) }

    /// Whether this token was made with `generation` (compared on the 24 bits a token keeps).
    @inline(__always)
    public func matches(_ generation: UInt32) -> Bool { self.generation == generation & 0xFF_FFFF }

    /// The kind of the event `wait` reports when another thread called `wake()`.
    public static let wakeKind: UInt8 = 255
    public var isWake: Bool { kind == EventToken.wakeKind }
}

/// One thread's event loop: an epoll instance, an eventfd other threads kick with `wake()`, and
/// a preallocated event array. The worker, the health checker, the Sentinel watcher and the
/// runtime API's thread each own one; nothing else in the code base calls epoll.
///
/// `wait` returns the number of events; read each with `event(at:)`. A wake-up is drained inside
/// `wait` and still reported (token kind `EventToken.wakeKind`) so the owner knows to look at its
/// inbox. Both descriptors close when the loop is released, never earlier: a late `wake()` from
/// another thread cannot hit a reused descriptor number.
public final class EventLoop: @unchecked Sendable {
    private let epfd: Int32
    private let wakeFd: Int32
    private let events: UnsafeMutablePointer<ballast_epoll_event>
    public let capacity: Int32

    public init(capacity: Int32 = 64) throws(SysError) {
        self.capacity = capacity
        epfd = try Epoll.create()
        let w: Int32
        do {
            w = try EventFd.create()
        } catch {
            Sys.close(epfd)
            throw error
        }
        wakeFd = w
        events = .allocate(capacity: Int(capacity))
        do {
            try Epoll.add(epfd, wakeFd, events: Epoll.in, data: EventToken(index: 0, kind: EventToken.wakeKind).raw)
        } catch {
            events.deallocate()
            Sys.close(wakeFd)
            Sys.close(epfd)
            throw error
        }
    }

    /// The epoll instance's descriptor (an io_uring polls it to wait on both at once).
    public var descriptor: Int32 { epfd }

    deinit {
        events.deallocate()
        Sys.close(wakeFd)
        Sys.close(epfd)
    }

    /// Starts watching `fd`. The corresponding C function is `epoll_ctl(EPOLL_CTL_ADD)`.
    @inline(__always)
    public func add(_ fd: Int32, _ interest: UInt32, _ token: EventToken) throws(SysError) {
        try Epoll.add(epfd, fd, events: interest, data: token.raw)
    }

    /// Changes what `fd` is watched for and the token its events carry.
    @inline(__always)
    public func modify(_ fd: Int32, _ interest: UInt32, _ token: EventToken) throws(SysError) {
        try Epoll.modify(epfd, fd, events: interest, data: token.raw)
    }

    /// Stops watching `fd` (before it is closed, so a queued event cannot outlive it).
    @inline(__always)
    public func remove(_ fd: Int32) { Epoll.remove(epfd, fd) }

    /// Wakes the loop's thread. Callable from any thread.
    public func wake() { EventFd.signal(wakeFd) }

    /// Waits up to `timeoutMs` (-1: until an event) and returns how many events are ready
    /// (0 after a signal interrupted the wait).
    @inline(__always)
    public func wait(timeoutMs: Int32) throws(SysError) -> Int {
        let n = try Epoll.wait(epfd, events, max: capacity, timeoutMs: timeoutMs)
        for k in 0..<n where EventToken(raw: events[k].data).isWake {
            EventFd.drain(wakeFd)
            break
        }
        return n
    }

    /// The `k`th event of the last `wait`.
    @inline(__always)
    public func event(at k: Int) -> (token: EventToken, events: UInt32) {
        (EventToken(raw: events[k].data), events[k].events)
    }
}
