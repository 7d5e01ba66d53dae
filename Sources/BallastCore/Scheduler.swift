import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// How a service picks a server for a new connection (`balance:`).
public enum Balance: String, Sendable, CaseIterable {
    /// Smooth weighted round robin (nginx).
    case roundrobin
    /// Fewest active connections relative to weight (Ci/Wi), round robin among ties.
    case leastconn
    /// Maglev consistent hash of the client address (`hash_key: source-port` adds the port).
    case source
    /// Power of two choices: two servers drawn by weight, the less loaded one wins.
    case random
    /// The first server in config order below its maxconn.
    case first
}

public enum HashKey: String, Sendable, CaseIterable {
    case source
    case sourcePort = "source-port"
}

/// What a scheduler may ask about server `i` while picking. It borrows the service's server list
/// for the duration of one pick (unsafe buffers over unmanaged references), so a pick neither
/// allocates nor touches reference counts.
public struct PickView {
    public let servers: UnsafeBufferPointer<Unmanaged<Server>>
    /// Per server: in the backup tier.
    public let backup: UnsafeBufferPointer<Bool>
    /// The tier being picked (false: active servers, true: backups).
    public let tier: Bool
    /// A server to skip (redispatch after a failed connect), or -1.
    public let exclude: Int
    /// Servers this connection already failed to reach (bit i: server i, for i < 64), skipped too.
    public let tried: UInt64
    public let now: Int64
    /// Static policies (source) ignore slow start, as HAProxy's static algorithms do.
    public let staticWeights: Bool
    /// The client's source hash (only `source` reads it).
    public let hash: UInt32
    /// `ServerStates.version` when the pick began: a precomputed order older than it is rebuilt.
    public let version: UInt64

    /// Runs `body` with a view over `servers`; the view must not escape `body`.
    @inline(__always)
    public static func with<R>(
        servers: [Unmanaged<Server>], backup: [Bool], tier: Bool, exclude: Int, tried: UInt64 = 0, now: Int64,
        staticWeights: Bool, hash: UInt32, version: UInt64, _ body: (PickView) -> R
    ) -> R {
        servers.withUnsafeBufferPointer { sp in
            backup.withUnsafeBufferPointer { bp in
                body(
                    PickView(
                        servers: sp, backup: bp, tier: tier, exclude: exclude, tried: tried, now: now,
                        staticWeights: staticWeights, hash: hash, version: version))
            }
        }
    }

    public init(
        servers: UnsafeBufferPointer<Unmanaged<Server>>, backup: UnsafeBufferPointer<Bool>, tier: Bool, exclude: Int,
        tried: UInt64 = 0, now: Int64, staticWeights: Bool, hash: UInt32, version: UInt64
    ) {
        self.version = version
        self.tried = tried
        self.servers = servers
        self.backup = backup
        self.tier = tier
        self.exclude = exclude
        self.now = now
        self.staticWeights = staticWeights
        self.hash = hash
    }

    public var count: Int { servers.count }

    /// In the tier, usable (up, ready, weight > 0), below maxconn, not excluded.
    @inline(__always)
    public func eligible(_ i: Int) -> Bool {
        i != exclude && (i >= 64 || tried & (1 << UInt64(i)) == 0) && backup[i] == tier
            && servers[i]._withUnsafeGuaranteedRef { $0.usable && $0.hasRoom }
    }

    /// Current weight; 0 for servers outside the tier or not usable.
    @inline(__always)
    public func weight(_ i: Int) -> Int {
        guard backup[i] == tier else { return 0 }
        let now = self.now
        let staticWeights = self.staticWeights
        return servers[i]._withUnsafeGuaranteedRef { s in
            guard s.usable else { return 0 }
            return staticWeights ? s.weight : s.effectiveWeight(now: now)
        }
    }

    /// The weight set for the server (runtime API, agent), ignoring slow start; 0 outside the
    /// tier or not usable.
    @inline(__always)
    public func setWeight(_ i: Int) -> Int {
        guard backup[i] == tier else { return 0 }
        return servers[i]._withUnsafeGuaranteedRef { $0.usable ? $0.weight : 0 }
    }

    /// Active connections on all workers.
    @inline(__always)
    public func load(_ i: Int) -> Int { servers[i]._withUnsafeGuaranteedRef { $0.active.load(ordering: .relaxed) } }
}

/// A per-worker scheduling policy. Each worker owns one instance per service, so picking takes no
/// lock; shared facts (state, weights, connection counts) are read through the `PickView`.
///
/// The seam for a new policy: a `Balance` case, a class here, a line in `makeScheduler`.
public protocol Scheduler: AnyObject {
    /// Returns an eligible server index, or nil when none is eligible.
    func pick(_ view: PickView) -> Int?
}

/// Where a process's server state changes are announced: one per process (the runtime makes
/// it and hands it to every table it builds), so nothing about it is process-wide. Every change
/// of a server's health, admin state, weight or address goes through `changed()` exactly once:
/// the version moves (schedulers that precompute, Maglev and the shared round-robin order,
/// rebuild when it does) and every subscriber is told (nat mode wakes its thread). It also
/// carries the number of per-worker counter slots, fixed before any table is built.
public final class ServerStates: Sendable {
    public let version = Atomic<UInt64>(1)
    /// Counter slots per server and service: one per worker.
    public let slots: Int
    private let subscribers = Mutex<[(id: Int, call: @Sendable () -> Void)]>([])
    private let nextID = Atomic<Int>(1)

    public init(slots: Int = 1) { self.slots = max(1, slots) }

    /// A server's state changed: the version moves and the subscribers are told (on the
    /// changing thread; a subscriber only kicks its own thread).
    public func changed() {
        version.wrappingAdd(1, ordering: .releasing)
        for s in subscribers.withLock({ $0 }) { s.call() }
    }

    /// Calls `body` after every change until `unsubscribe(id)`.
    @discardableResult
    public func subscribe(_ body: @escaping @Sendable () -> Void) -> Int {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        subscribers.withLock { $0.append((id, body)) }
        return id
    }

    public func unsubscribe(_ id: Int) { subscribers.withLock { $0.removeAll { $0.id == id } } }
}

/// A service's place in its round-robin order, shared by all workers (one atomic increment
/// per pick).
public final class SharedTurn: Sendable {
    public let value = Atomic<Int>(0)
    public init() {}
}

public func makeScheduler(
    _ balance: Balance, servers: [ServerConfig], tableSize: Int, seed: UInt64, turn: SharedTurn? = nil
) -> Scheduler {
    switch balance {
    case .roundrobin: return SmoothWeightedRoundRobin(count: servers.count, turn: turn)
    case .leastconn: return LeastConnections(count: servers.count)
    case .source: return MaglevScheduler(names: servers.map(\.name), tableSize: tableSize)
    case .random: return PowerOfTwoChoices(count: servers.count, seed: seed)
    case .first: return FirstAvailable(count: servers.count)
    }
}

/// nginx's smooth weighted round robin: every pick adds each eligible server's weight to its
/// running score, takes the highest score and subtracts the total. Weights 5,1,1 give
/// a a b a c a a — spread out, never a burst of one server — and over any window of
/// sum(weights) picks each server gets exactly its weight. A weight change takes effect at the
/// next pick without resetting the other scores, so it shifts the share without a burst.
///
/// With a `SharedTurn` (the proxy's workers), the order is global, as in HAProxy with several
/// threads: each worker derives the same sequence (one period of the smooth order above, built
/// again after a state or weight change, never per connection) and every pick takes the next
/// position with one atomic increment, so the service's picks across all workers follow the
/// weights exactly, with no lock. While a server ramps up (`slowstart`), or when one period
/// would be very long (sum of weights × servers over 2^20), each worker runs the smooth order
/// on its own instead (exact per worker; across workers within one pick per worker and server).
public final class SmoothWeightedRoundRobin: Scheduler {
    // A raw buffer, not an array: no uniqueness or exclusivity checks in the loop.
    private let current: UnsafeMutablePointer<Int>
    private let count: Int
    private let turn: SharedTurn?
    /// One period of the smooth order for a tier, and what it was built from.
    struct Order {
        var sequence = UnsafeMutableBufferPointer<Int32>(start: nil, count: 0)
        var valid = false
        var version: UInt64 = 0
        var weights: [Int] = []
    }
    /// Per tier (active, backup); raw memory, as `current`.
    private let orders: UnsafeMutablePointer<Order>

    public init(count: Int, turn: SharedTurn? = nil) {
        self.count = count
        self.turn = turn
        current = .allocate(capacity: max(count, 1))
        current.initialize(repeating: 0, count: max(count, 1))
        orders = .allocate(capacity: 2)
        orders.initialize(repeating: Order(), count: 2)
    }

    deinit {
        current.deallocate()
        orders[0].sequence.deallocate()
        orders[1].sequence.deallocate()
        orders.deinitialize(count: 2)
        orders.deallocate()
    }

    public func pick(_ view: PickView) -> Int? {
        if let turn {
            let order = orders + (view.tier ? 1 : 0)
            let version = view.version
            if version != order.pointee.version { rebuild(view, order, version) }
            if order.pointee.valid { return pickShared(view, order.pointee.sequence, turn) }
        }
        return pickLocal(view)
    }

    private func pickShared(_ view: PickView, _ seq: UnsafeMutableBufferPointer<Int32>, _ turn: SharedTurn) -> Int? {
        let n = seq.count
        guard n > 0 else { return nil }
        var k = Int(UInt(bitPattern: turn.value.wrappingAdd(1, ordering: .relaxed).oldValue) % UInt(n))
        // Past servers that cannot take this connection right now (full, excluded).
        for _ in 0..<n {
            let i = Int(seq[k])
            if view.eligible(i) { return i }
            k = k + 1 == n ? 0 : k + 1
        }
        return nil
    }

    private func pickLocal(_ view: PickView) -> Int? {
        var total = 0
        var best = -1
        var bestScore = Int.min
        for i in 0..<count {
            guard view.eligible(i) else { continue }
            let w = view.weight(i)
            if w <= 0 { continue }
            current[i] &+= w
            total &+= w
            if current[i] > bestScore {
                bestScore = current[i]
                best = i
            }
        }
        guard best >= 0 else { return nil }
        current[best] &-= total
        return best
    }

    /// One period of the smooth order for the weights usable now (divided by their greatest
    /// common divisor). Runs after a state or weight change; during a slow start it only finds
    /// that the shared order cannot be used yet, and looks again at the next pick.
    private func rebuild(_ view: PickView, _ order: UnsafeMutablePointer<Order>, _ version: UInt64) {
        var weights = [Int](repeating: 0, count: count)
        for i in 0..<count {
            let w = view.weight(i)
            if w != view.setWeight(i) {
                order.pointee.valid = false
                order.pointee.version = 0  // ramping: look again next time
                return
            }
            weights[i] = w
        }
        order.pointee.version = version
        if order.pointee.valid && weights == order.pointee.weights { return }
        order.pointee.weights = weights
        var g = 0
        for w in weights where w > 0 {
            var (a, b) = (g, w)
            while b != 0 { (a, b) = (b, a % b) }
            g = a
        }
        let scaled = g > 0 ? weights.map { $0 / g } : weights
        let period = scaled.reduce(0, +)
        guard period.multipliedReportingOverflow(by: max(count, 1)).partialValue <= 1 << 20 else {
            order.pointee.valid = false
            return
        }
        order.pointee.sequence.deallocate()
        let seq = UnsafeMutableBufferPointer<Int32>.allocate(capacity: period)
        var score = [Int](repeating: 0, count: count)
        for k in 0..<period {
            var best = -1
            for i in 0..<count where scaled[i] > 0 {
                score[i] += scaled[i]
                if best < 0 || score[i] > score[best] { best = i }
            }
            score[best] -= period
            seq[k] = Int32(best)
        }
        order.pointee.sequence = seq
        order.pointee.valid = true
    }
}

/// Fewest active connections relative to weight: minimise Ci/Wi, compared as Ci·Wj < Cj·Wi so
/// no division; the scan starts one further each time, so ties rotate (round robin among equals).
public final class LeastConnections: Scheduler {
    private let count: Int
    private var start = 0

    public init(count: Int) { self.count = count }

    public func pick(_ view: PickView) -> Int? {
        var best = -1
        var bestLoad = 0
        var bestWeight = 1
        for k in 0..<count {
            let i = (start + k) % count
            guard view.eligible(i) else { continue }
            let w = view.weight(i)
            if w <= 0 { continue }
            let l = view.load(i)
            if best < 0 || l * bestWeight < bestLoad * w {
                best = i
                bestLoad = l
                bestWeight = w
            }
        }
        guard best >= 0 else { return nil }
        start = (best + 1) % count
        return best
    }
}

/// Power of two choices (HAProxy `random(2)`, nginx `random two least_conn`): two draws by weight
/// among eligible servers, the one with fewer connections relative to weight wins.
public final class PowerOfTwoChoices: Scheduler {
    private let count: Int
    private var state: UInt64

    public init(count: Int, seed: UInt64) {
        self.count = count
        state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed
    }

    @inline(__always)
    private func next() -> UInt64 {
        // xorshift64*
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }

    private func draw(_ view: PickView, total: Int) -> Int {
        var r = Int(next() % UInt64(total))
        for i in 0..<count {
            guard view.eligible(i) else { continue }
            let w = view.weight(i)
            if w <= 0 { continue }
            if r < w { return i }
            r -= w
        }
        return -1
    }

    public func pick(_ view: PickView) -> Int? {
        var total = 0
        for i in 0..<count where view.eligible(i) {
            let w = view.weight(i)
            if w > 0 { total += w }
        }
        guard total > 0 else { return nil }
        let a = draw(view, total: total)
        let b = draw(view, total: total)
        if a == b { return a }
        let la = view.load(a)
        let lb = view.load(b)
        let wa = view.weight(a)
        let wb = view.weight(b)
        return la * wb <= lb * wa ? a : b
    }
}

/// The first eligible server in config order: fills servers one after another (consolidation).
public final class FirstAvailable: Scheduler {
    private let count: Int

    public init(count: Int) { self.count = count }

    public func pick(_ view: PickView) -> Int? {
        for i in 0..<count where view.eligible(i) && view.weight(i) > 0 { return i }
        return nil
    }
}

/// Maglev lookup over the servers that are usable now. The table is rebuilt (off the per-
/// connection path) when a server's state or weight changes; a server that is merely full at
/// the moment is skipped by probing the following slots.
public final class MaglevScheduler: Scheduler {
    private let names: [String]
    private let tableSize: Int
    /// One table per tier (active servers, backups), each with the state version and the
    /// weights it was built from.
    private var tables: [MaglevTable?] = [nil, nil]
    private var builtVersion: [UInt64] = [0, 0]
    private var builtWeights: [[Int]]

    public init(names: [String], tableSize: Int) {
        self.names = names
        self.tableSize = tableSize
        builtWeights = [[], []]
    }

    public func pick(_ view: PickView) -> Int? {
        let t = view.tier ? 1 : 0
        let version = view.version
        if tables[t] == nil || version != builtVersion[t] { rebuild(view, t, version) }
        guard let table = tables[t] else { return nil }
        var slot = Int(JHash.scale(view.hash, UInt32(tableSize)))
        // Probe forward past servers that cannot take this connection right now (full, excluded).
        for _ in 0..<min(tableSize, 64) {
            let s = table.entries[slot]
            if s < 0 { return nil }
            if view.eligible(Int(s)) { return Int(s) }
            slot = slot + 1 == tableSize ? 0 : slot + 1
        }
        for i in 0..<names.count where view.eligible(i) { return i }
        return nil
    }

    /// Rebuilds from the servers usable now, with their configured weights. Runs only after a
    /// state or weight change, never per connection.
    private func rebuild(_ view: PickView, _ t: Int, _ version: UInt64) {
        var weights = [Int](repeating: 0, count: names.count)
        for i in 0..<names.count { weights[i] = view.weight(i) }
        builtVersion[t] = version
        if tables[t] != nil && weights == builtWeights[t] { return }
        builtWeights[t] = weights
        tables[t] = MaglevTable(names: names, weights: weights, size: tableSize)
    }
}
