import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Monotonic milliseconds (CLOCK_MONOTONIC): state-change times, rates, durations.
@inline(__always)
public func monotonicMillis() -> Int64 { monotonicNanos() / 1_000_000 }

/// The wall clock (CLOCK_REALTIME), for log timestamps and `show info`'s start time.
public func wallClock() -> timespec {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts
}

/// Monotonic nanoseconds (CLOCK_MONOTONIC): short intervals and time budgets. With `wallClock`,
/// the only place the code base reads a clock.
@inline(__always)
public func monotonicNanos() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

/// One worker's cumulative counters for one service or server: 128 bytes, two cache lines, so
/// two workers never write the same line. Only its worker writes a slot (plain loads and stores,
/// no read-modify-write atomics on the data path); readers sum the slots of all workers.
public struct CounterSlot: Sendable {
    /// Client connections accepted (FRONTEND stot / conn_tot).
    public var accepted: UInt64 = 0
    /// Connections established to a server (BACKEND and server stot, `connect`).
    public var sessions: UInt64 = 0
    /// Times the load balancer chose this server (lbtot), retries included.
    public var picks: UInt64 = 0
    /// Bytes from clients (bin) and to clients (bout).
    public var bytesIn: UInt64 = 0
    public var bytesOut: UInt64 = 0
    /// Bytes to clients that went through a pipe (spliced).
    public var splicedOut: UInt64 = 0
    /// Failed connects (econ), established connections the server reset (eresp).
    public var connectErrors: UInt64 = 0
    public var responseErrors: UInt64 = 0
    /// Connect retries (wretr) and retries that moved to another server (wredis).
    public var retries: UInt64 = 0
    public var redispatches: UInt64 = 0
    /// Client connections refused before reaching a server: bad PROXY header (ereq).
    public var requestErrors: UInt64 = 0
    /// Connections ended by the client's reset (cli_abrt) or the server's (srv_abrt).
    public var clientAborts: UInt64 = 0
    public var serverAborts: UInt64 = 0
    /// Connections closed without a server: queue full or timed out, no server usable (dcon).
    public var denied: UInt64 = 0
    var spare0: UInt64 = 0
    var spare1: UInt64 = 0

    public init() {}

    /// Field by field sum, for readers.
    mutating func add(_ o: CounterSlot) {
        accepted &+= o.accepted
        sessions &+= o.sessions
        picks &+= o.picks
        bytesIn &+= o.bytesIn
        bytesOut &+= o.bytesOut
        splicedOut &+= o.splicedOut
        connectErrors &+= o.connectErrors
        responseErrors &+= o.responseErrors
        retries &+= o.retries
        redispatches &+= o.redispatches
        requestErrors &+= o.requestErrors
        clientAborts &+= o.clientAborts
        serverAborts &+= o.serverAborts
        denied &+= o.denied
    }

    func minus(_ o: CounterSlot) -> CounterSlot {
        var r = CounterSlot()
        r.accepted = accepted &- o.accepted
        r.sessions = sessions &- o.sessions
        r.picks = picks &- o.picks
        r.bytesIn = bytesIn &- o.bytesIn
        r.bytesOut = bytesOut &- o.bytesOut
        r.splicedOut = splicedOut &- o.splicedOut
        r.connectErrors = connectErrors &- o.connectErrors
        r.responseErrors = responseErrors &- o.responseErrors
        r.retries = retries &- o.retries
        r.redispatches = redispatches &- o.redispatches
        r.requestErrors = requestErrors &- o.requestErrors
        r.clientAborts = clientAborts &- o.clientAborts
        r.serverAborts = serverAborts &- o.serverAborts
        r.denied = denied &- o.denied
        return r
    }
}

/// Per-worker counter slots of one service or server. Summed on demand; `clear counters all`
/// moves a baseline instead of writing into slots a worker owns, so a clear never races a worker.
public final class Counters: @unchecked Sendable {
    private let slots: UnsafeMutablePointer<CounterSlot>
    private let count: Int
    private let baseline = Mutex<CounterSlot>(CounterSlot())

    /// `slots`: one per worker (`ServerStates.slots`).
    public init(slots n: Int) {
        count = max(1, n)
        let raw = UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<CounterSlot>.stride, alignment: 128)
        slots = raw.bindMemory(to: CounterSlot.self, capacity: count)
        slots.initialize(repeating: CounterSlot(), count: count)
    }

    deinit {
        slots.deinitialize(count: count)
        UnsafeMutableRawPointer(slots).deallocate()
    }

    /// The slot worker `id` writes (and nobody else).
    @inline(__always)
    public func slot(_ id: Int) -> UnsafeMutablePointer<CounterSlot> { slots + (id < count ? id : count - 1) }

    /// Totals since start (what Prometheus exports: counters never go back).
    public func raw() -> CounterSlot {
        var sum = CounterSlot()
        for k in 0..<count { sum.add(slots[k]) }
        return sum
    }

    /// Totals since the last `clear counters all` (what `show stat` shows).
    public func total() -> CounterSlot {
        let b = baseline.withLock { $0 }
        return raw().minus(b)
    }

    public func clear() {
        let now = raw()
        baseline.withLock { $0 = now }
    }
}

/// Lock-free high-water mark.
@inline(__always)
public func raiseMax(_ max: borrowing Atomic<Int>, to value: Int) {
    var cur = max.load(ordering: .relaxed)
    while value > cur {
        let (done, seen) = max.compareExchange(expected: cur, desired: value, ordering: .relaxed)
        if done { return }
        cur = seen
    }
}

/// A service's statistics: the FRONTEND side (client connections) and the BACKEND side
/// (connections given to servers). Kept by name across reloads.
public final class ServiceStats: Sendable {
    public let counters: Counters
    /// Client connections open (FRONTEND scur) and its maximum.
    public let clients = Atomic<Int>(0)
    public let clientsMax = Atomic<Int>(0)
    /// Connections waiting for a server (qcur) and its maximum.
    public let queued = Atomic<Int>(0)
    public let queuedMax = Atomic<Int>(0)
    /// Connections with a server (connecting or established): BACKEND scur is this plus the queue.
    public let assigned = Atomic<Int>(0)
    public let assignedMax = Atomic<Int>(0)
    /// Monotonic ms of the last connection given to a server (0: never).
    public let lastSession = Atomic<Int64>(0)
    /// When the service's UP/DOWN state last changed, and the time it spent DOWN.
    public let lastChange = Atomic<Int64>(monotonicMillis())
    public let downSince = Atomic<Int64>(0)
    public let downtimeMs = Atomic<Int64>(0)
    public let downTransitions = Atomic<Int>(0)

    /// Who may connect, per-client counts, refusals.
    public let access = AccessState()

    /// `slots`: counter slots, one per worker (`ServerStates.slots`).
    public init(slots: Int = 1) { counters = Counters(slots: slots) }

    public func clearMax() {
        clientsMax.store(clients.load(ordering: .relaxed), ordering: .relaxed)
        queuedMax.store(queued.load(ordering: .relaxed), ordering: .relaxed)
        assignedMax.store(assigned.load(ordering: .relaxed), ordering: .relaxed)
    }

    /// Records the service's availability (any usable server) as seen by a reader; state
    /// changes are noticed when `show stat` or the sampler looks.
    public func observe(up: Bool, now: Int64) {
        let since = downSince.load(ordering: .relaxed)
        if !up && since == 0 {
            downSince.store(now, ordering: .relaxed)
            lastChange.store(now, ordering: .relaxed)
            downTransitions.wrappingAdd(1, ordering: .relaxed)
        } else if up && since != 0 {
            downtimeMs.wrappingAdd(now - since, ordering: .relaxed)
            downSince.store(0, ordering: .relaxed)
            lastChange.store(now, ordering: .relaxed)
        }
    }

    public func downtime(now: Int64) -> Int64 {
        let since = downSince.load(ordering: .relaxed)
        return downtimeMs.load(ordering: .relaxed) + (since != 0 ? now - since : 0)
    }
}
