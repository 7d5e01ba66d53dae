import CRing

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// One thread's io_uring (liburing, linked statically): a submission queue the owner fills during
/// a turn, submitted with the wait for completions in one `io_uring_enter`, and a ring of buffers
/// the kernel picks from when a receive completes (so a connection waiting for data holds none).
///
/// Created and used on one thread (the kernel is told so: `SINGLE_ISSUER | DEFER_TASKRUN`, which
/// runs completion work only while this thread waits; with `sqpoll`, a kernel thread takes the
/// submissions instead). Operations carry a 64-bit word the owner chooses; completions come back
/// with it, in any order. An operation that cannot be queued (the submission queue stays full
/// after a submit: only a kernel refusing every submission does that) is dropped; its
/// connection's timer ends it.
///
/// Only operations whose descriptor the kernel resolves when they are submitted are offered:
/// receive, send, poll, cancel and close. `IORING_OP_SHUTDOWN` and `IORING_OP_SPLICE` always run
/// on a kernel worker thread that resolves the descriptor number there, later — by then a
/// queued close may have freed it and an accept reused it for another connection.
public final class Ring: @unchecked Sendable {
    private let ring: OpaquePointer
    private let cqes: UnsafeMutablePointer<ballast_cqe>
    public let cqeCapacity: Int

    /// Buffers the kernel may pick (group 0): `bufferSize` bytes each, allocated as needed up to
    /// `maxBuffers` (a power of two).
    public let bufferSize: Int
    public let maxBuffers: Int
    /// Each buffer's memory, `allocated` of `maxBuffers` slots (a fixed table, not an array: read
    /// for every operation, without a retain or an exclusivity check).
    private let memory: UnsafeMutablePointer<UnsafeMutableRawPointer>
    private var allocated = 0
    /// Buffer ids whose pages were given back to the system (`MADV_DONTNEED`): reused first.
    private var spare: [UInt16] = []
    /// Buffers the kernel holds (provided, not yet picked by a receive).
    private var inKernel = 0
    /// Free buffers kept in the kernel's pool; beyond this, returned ones give their pages back.
    public static let keepFree = 64
    /// The fewest free buffers the kernel's pool had since the last `tick`.
    private var lowFree = Int.max
    /// Buffers to take out of the pool as they come back: what the pool had to spare (beyond
    /// `keepFree`) for a whole second.
    private var surplus = 0
    private var lastTick: Int64 = 0
    /// Buffers whose pages were given back since the ring was made.
    public private(set) var buffersReleased = 0
    /// Buffers in the pool (in the kernel, with receives, or with sends).
    public var buffersInPool: Int { allocated - spare.count }

    /// Why the kernel refused a ring, if it did (`kernel.io_uring_disabled`, seccomp, an old
    /// kernel): nil when one can be made here.
    public static func probe(sqpoll: Bool = false) -> SysError? {
        do {
            _ = try Ring(entries: 8, bufferSize: 4096, maxBuffers: 8, sqpoll: sqpoll)
            return nil
        } catch {
            return error
        }
    }

    /// `sqpoll`: a kernel thread takes the submissions (idle after 50 ms without any).
    public init(entries: Int, bufferSize: Int, maxBuffers: Int, sqpoll: Bool = false) throws(SysError) {
        var err: Int32 = 0
        guard let r = ballast_ring_create(UInt32(entries), sqpoll ? 50 : 0, &err) else {
            throw SysError("io_uring_setup", err)
        }
        let rc = ballast_ring_setup_buffers(r, UInt32(maxBuffers))
        if rc < 0 {
            ballast_ring_destroy(r)
            throw SysError("io_uring_register", -rc)
        }
        ring = r
        self.bufferSize = bufferSize
        self.maxBuffers = maxBuffers
        cqeCapacity = entries * 2
        cqes = .allocate(capacity: cqeCapacity)
        memory = .allocate(capacity: maxBuffers)
    }

    deinit {
        ballast_ring_destroy(ring)
        cqes.deallocate()
        for k in 0..<allocated { memory[k].deallocate() }
        memory.deallocate()
    }

    /// Adds up to `count` new buffers to the kernel's pool; false when the pool is at its size.
    public func grow(_ count: Int) -> Bool {
        var added = 0
        while added < count, let id = spare.popLast() {
            provide(id)
            added += 1
        }
        let n = min(count - added, maxBuffers - allocated)
        if n > 0 {
            for _ in 0..<n {
                // Page-aligned, so a buffer's pages can be given back on their own.
                let m = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096)
                memory[allocated] = m
                allocated += 1
                provide(UInt16(allocated - 1))
            }
            added += n
        }
        return added > 0
    }

    /// After a receive found no buffer: true when a retry can find one — free buffers were
    /// given to the kernel since (a turn's completions may hold many such receives: only the
    /// first grows the pool), or the pool grew by `count`.
    public func replenish(_ count: Int = 64) -> Bool { inKernel > 0 || grow(count) }

    @inline(__always)
    private func provide(_ id: UInt16) {
        ballast_ring_provide(ring, memory[Int(id)], UInt32(bufferSize), id)
        inKernel += 1
    }

    /// The memory of buffer `id`.
    @inline(__always)
    public func buffer(_ id: Int32) -> UnsafeMutableRawPointer { memory[Int(id)] }

    /// Gives buffer `id` back to the kernel's pool (published with the next submission), or,
    /// while the pool has a surplus (see `tick`), its pages back to the system: a burst grows
    /// the pool, and the pool shrinks again when the burst is over. Only a surplus that lasted a
    /// whole second is given back: a load whose buffers in flight go up and down keeps its pool
    /// (giving back and faulting in again costs a system call and a page fault per message).
    @inline(__always)
    public func recycle(_ id: Int32) {
        if surplus > 0 {
            surplus -= 1
            Sys.discardPages(memory[Int(id)], bufferSize)
            spare.append(UInt16(id))
            buffersReleased += 1
        } else {
            provide(UInt16(id))
        }
    }

    /// Called every turn with the time (ms): once a second, what the pool had to spare in the
    /// past second becomes the surplus to give back.
    @inline(__always)
    public func tick(_ now: Int64) {
        guard now - lastTick >= 1000 else { return }
        lastTick = now
        surplus = lowFree == Int.max ? 0 : max(0, lowFree - Ring.keepFree)
        lowFree = inKernel
    }

    /// A receive on `fd` into a buffer the kernel picks when data arrives.
    @inline(__always)
    public func recv(_ fd: Int32, _ data: UInt64) { _ = ballast_ring_recv(ring, fd, data) }

    @inline(__always)
    public func send(_ fd: Int32, _ buf: UnsafeRawPointer, _ len: Int, _ data: UInt64) {
        _ = ballast_ring_send(ring, fd, buf, UInt32(len), data)
    }

    /// Waits for `mask` (poll(2) bits) on `fd`: once, or every time it becomes ready (`multishot`).
    @inline(__always)
    public func poll(_ fd: Int32, _ mask: UInt32, multishot: Bool = false, _ data: UInt64) {
        _ = ballast_ring_poll(ring, fd, mask, multishot ? 1 : 0, data)
    }

    /// Cancels the operations whose words are given (0: none), then closes `fd0` and `fd1`
    /// (-1: none), in this order, at the next submission. Completions of cancelled operations
    /// still arrive (with -ECANCELED, or their result if they finished first).
    ///
    /// By word, not by descriptor: a cancel by descriptor walks every pending operation of the
    /// ring, so with thousands of idle connections each close would cost thousands of steps.
    public func cancelAndClose(
        _ w0: UInt64, _ w1: UInt64, _ w2: UInt64, _ w3: UInt64, fds fd0: Int32, _ fd1: Int32, _ data: UInt64
    ) {
        var words = (w0, w1, w2, w3)
        let rc = withUnsafePointer(to: &words) {
            $0.withMemoryRebound(to: UInt64.self, capacity: 4) { ballast_ring_cancel_close(ring, $0, fd0, fd1, data) }
        }
        if rc != 0 {
            // The queue cannot take the chain even after a submit. Close the slow way: a
            // shutdown completes whatever waits on the socket, then the close.
            _ = ballast_ring_submit(ring)
            for fd in [fd0, fd1] where fd >= 0 {
                Sys.shutdownBoth(fd)
                Sys.close(fd)
            }
        }
    }

    /// Submits everything queued and waits up to `timeoutMs` (-1: no limit, 0: not at all) for a
    /// completion. Throws only for real failures (not a timeout or a signal).
    @inline(__always)
    public func submitAndWait(timeoutMs: Int32) throws(SysError) {
        let rc = ballast_ring_submit_wait(ring, timeoutMs)
        if rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY {
            throw SysError("io_uring_enter", -rc)
        }
    }

    /// Submits everything queued without waiting.
    public func submit() { _ = ballast_ring_submit(ring) }

    /// Takes the completions that are ready (up to `cqeCapacity`); read each with `completion(at:)`.
    @inline(__always)
    public func reap() -> Int { Int(ballast_ring_reap(ring, cqes, UInt32(cqeCapacity))) }

    /// The `k`th completion of the last `reap`: the caller's word, the result (a count or a
    /// negative errno), and the buffer the kernel picked (-1: none); `more`: a multishot
    /// operation goes on.
    @inline(__always)
    public func completion(at k: Int) -> (data: UInt64, result: Int32, buffer: Int32, more: Bool) {
        let c = cqes + k
        let b = ballast_cqe_buffer(c)
        if b >= 0 {
            inKernel -= 1
            if inKernel < lowFree { lowFree = inKernel }
        } else if c.pointee.res == -ENOBUFS {
            lowFree = 0
        }
        return (c.pointee.data, c.pointee.res, b, ballast_cqe_more(c) != 0)
    }
}
