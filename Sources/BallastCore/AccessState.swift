import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Why a client was refused at accept.
public enum Refusal: Int, Sendable, CaseIterable {
    case denied = 0
    case notAllowed
    case connectionLimit
    case rateLimit

    public var text: String {
        switch self {
        case .denied: return "deny list"
        case .notAllowed: return "not in the allow list"
        case .connectionLimit: return "over conn_per_source"
        case .rateLimit: return "over new_conn_rate_per_source"
        }
    }
}

/// A service's access list as it stands (the config's, with the runtime API's changes), its
/// per-client counts, and what it refused. Lives in `ServiceStats`, so it is carried over
/// reloads by service name: a reload that leaves the config's lists as they were keeps the
/// runtime changes; one that changes them takes the config's.
public final class AccessState: Sendable {
    private let current = Mutex<(effective: AccessList, configured: AccessList?)>((AccessList(), nil))
    /// Whether there is anything to check at all: accept skips the lock when not.
    public let active = Atomic<Bool>(false)
    public let tracker = SourceTracker()
    private let refused: [Counter] = Refusal.allCases.map { _ in Counter() }
    private let last = Mutex<sockaddr_storage>(sockaddr_storage())

    public init() {}

    /// At table build: the config's lists (and limits, which only switch the check on).
    public func apply(_ configured: AccessList, limits: SourceLimits) {
        current.withLock {
            if $0.configured != configured {
                $0.effective = configured
                $0.configured = configured
            }
            active.store(!$0.effective.isEmpty || !limits.isEmpty, ordering: .relaxed)
        }
    }

    public var list: AccessList { current.withLock { $0.effective } }

    /// Replaces the effective list (runtime API); `limits` as configured.
    public func set(_ list: AccessList, limits: SourceLimits) {
        current.withLock {
            $0.effective = list
            active.store(!list.isEmpty || !limits.isEmpty, ordering: .relaxed)
        }
    }

    /// The access-list part of the decision at accept.
    public func check(_ address: sockaddr_storage) -> AccessList.Verdict {
        current.withLock { $0.effective.check(address) }
    }

    public func count(_ r: Refusal, from address: sockaddr_storage) {
        refused[r.rawValue].value.add(1, ordering: .relaxed)
        last.withLock { $0 = address }
    }

    public func refusals(_ r: Refusal) -> UInt64 { refused[r.rawValue].value.load(ordering: .relaxed) }

    /// Connections refused for any reason (HAProxy's `dcon`).
    public var totalRefused: UInt64 { Refusal.allCases.reduce(0) { $0 &+ refusals($1) } }

    public var lastRefused: sockaddr_storage { last.withLock { $0 } }

    public func clearCounters() {
        for a in refused { a.value.store(0, ordering: .relaxed) }
    }
}

final class Counter: Sendable {
    let value = Atomic<UInt64>(0)
}

/// Connections open and recent new connections per client address, for `limits`. Sharded by
/// address so the workers rarely meet on a lock; an entry goes away once its client has no
/// connection left and its rate window has passed (`sweep`, once a second).
public final class SourceTracker: Sendable {
    struct Key: Hashable {
        var hi: UInt64
        var lo: UInt64
    }

    struct Entry {
        var open = 0
        /// Rate window: new connections in the current and the previous period.
        var window: Int64 = 0
        var current = 0
        var previous = 0
    }

    private static let shards = 16
    final class Shard: Sendable {
        let map = Mutex<[Key: Entry]>([:])
    }

    private let maps: [Shard] = (0..<SourceTracker.shards).map { _ in Shard() }

    public init() {}

    static func key(_ a: sockaddr_storage) -> Key {
        var s = a
        let family = Int32(a.ss_family)
        return withUnsafeBytes(of: &s) { raw -> Key in
            if family == AF_INET {
                let v = raw.load(
                    fromByteOffset: MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_addr)!, as: UInt32.self)
                return Key(hi: 0, lo: UInt64(v) | 0xFFFF_0000_0000)
            }
            let o = MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_addr)!
            let hi = raw.loadUnaligned(fromByteOffset: o, as: UInt64.self)
            let lo = raw.loadUnaligned(fromByteOffset: o + 8, as: UInt64.self)
            // An IPv4-mapped address counts as the IPv4 client it is.
            if hi == 0 && lo & 0xFFFF_FFFF == 0xFFFF_0000 {  // ::ffff:a.b.c.d (bytes 10 and 11 are ff)
                return Key(hi: 0, lo: (lo >> 32) | 0xFFFF_0000_0000)
            }
            return Key(hi: hi, lo: lo)
        }
    }

    private func shard(_ k: Key) -> Int {
        Int(truncatingIfNeeded: (k.lo ^ k.hi ^ (k.lo >> 29)) % UInt64(SourceTracker.shards))
    }

    /// Counts a new connection from `address` unless it is over a limit (then counts nothing).
    public func admit(_ address: sockaddr_storage, limits: SourceLimits, now: Int64) -> Refusal? {
        let k = Self.key(address)
        return maps[shard(k)].map.withLock { m -> Refusal? in
            var e = m[k] ?? Entry()
            if let max = limits.connections, e.open >= max { return .connectionLimit }
            if let rate = limits.rate {
                let period = limits.ratePeriodMs
                let w = now / period
                if w != e.window {
                    e.previous = w == e.window + 1 ? e.current : 0
                    e.current = 0
                    e.window = w
                }
                // The previous period weighs what is left of it in a sliding period (as
                // HAProxy's frequency counters do).
                let elapsed = now - w * period
                let estimate = e.current + e.previous * Int(period - elapsed) / Int(period)
                if estimate >= rate {
                    m[k] = e
                    return .rateLimit
                }
                e.current += 1
            }
            e.open += 1
            m[k] = e
            return nil
        }
    }

    /// A counted connection closed.
    public func release(_ address: sockaddr_storage) {
        let k = Self.key(address)
        maps[shard(k)].map.withLock { m in
            guard var e = m[k] else { return }
            e.open -= 1
            m[k] = e
        }
    }

    /// Forgets clients with nothing open whose rate windows are over.
    public func sweep(now: Int64, periodMs: Int64) {
        let w = now / max(1, periodMs)
        for shard in maps {
            shard.map.withLock { m in
                m = m.filter { $0.value.open > 0 || $0.value.window >= w - 1 }
            }
        }
    }

    /// Clients tracked now (for tests and `show info`-style views).
    public var tracked: Int { maps.reduce(0) { $0 + $1.map.withLock { $0.count } } }
}
