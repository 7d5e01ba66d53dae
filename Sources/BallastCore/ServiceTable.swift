import Synchronization

/// Administrative state of a server (set by an operator; health comes with checks).
public enum AdminState: UInt8, Sendable, CaseIterable {
    case ready = 0
    case drain = 1
    case maint = 2
}

/// One server as the data plane sees it. Identity survives reloads as long as the service name,
/// server name and address stay the same, so its connection count stays true across a reload.
public final class Server: Sendable {
    public let name: String
    /// Where new connections and checks go. It moves when the server's DNS name resolves to
    /// another address or an operator says `set server addr`; connections already made keep
    /// theirs. Read under a lock (once per connect, never per byte).
    public var address: SocketAddress { addressBox.withLock { $0 } }
    private let addressBox: Mutex<SocketAddress>
    /// The DNS name the address comes from (nil: a numeric address).
    public let hostname: String?
    /// False while a DNS name has not resolved yet (`init_addr: none`): out of service, shown
    /// as HAProxy shows it, `MAINT (resolution)`.
    public let hasAddress: Atomic<Bool>
    /// Current weight (0...256) and connection limit (0: none); atomics so a reload or the runtime
    /// API can change them while connections stay attached to the same object.
    public let weightValue: Atomic<Int>
    public let maxconnValue: Atomic<Int>
    /// Connections established or being established to this server, on all workers.
    public let active = Atomic<Int>(0)
    /// AdminState raw value.
    public let admin = Atomic<UInt8>(AdminState.ready.rawValue)
    /// Health: true until a check says otherwise (no checks: always up).
    public let up = Atomic<Bool>(true)
    /// dsr mode: true while the server has no L2 neighbour on the service's interface (no
    /// MAC address to send its frames to): DOWN for that reason, never black-holed.
    public let noNeighbour = Atomic<Bool>(false)
    /// dsr mode: the server's MAC address on the service's interface, and why there is none.
    public var link: (mac: [UInt8]?, reason: String) { linkBox.withLock { $0 } }
    private let linkBox = Mutex<(mac: [UInt8]?, reason: String)>((nil, ""))
    /// Slow start: after the server becomes usable again its weight ramps up over this long.
    public let slowstartMs: Atomic<Int64>
    /// PROXY protocol header to send: 0 none, else `ProxyProtocol.Version` raw value.
    public let sendProxy: Atomic<UInt8>
    /// Consecutive failed connects seen by the proxy (passive observation).
    public let connectFailures = Atomic<Int>(0)
    /// Monotonic ms when the server last became usable; 0 when it has not come back since start.
    public let upSince = Atomic<Int64>(0)

    // Statistics (the runtime API and /metrics). Cumulative counters live in per-worker slots.
    public let counters: Counters
    /// Where this server's changes are announced.
    public let states: ServerStates
    public let activeMax = Atomic<Int>(0)
    /// Monotonic ms of the last connection given to this server (0: never).
    public let lastSession = Atomic<Int64>(0)
    /// Monotonic ms of the last change between UP, DOWN, MAINT and DRAIN.
    public let lastChange = Atomic<Int64>(monotonicMillis())
    /// Monotonic ms since when the server is DOWN or in maintenance (0: it is not), and the
    /// time spent so before.
    public let downSince = Atomic<Int64>(0)
    public let downtimeMs = Atomic<Int64>(0)
    /// UP→DOWN transitions (chkdown) and failed checks while UP (chkfail).
    public let downTransitions = Atomic<Int>(0)
    public let failedChecks = Atomic<Int>(0)
    /// The weight the config gives (HAProxy's initial weight: `set weight 50%` is relative to it).
    public let initialWeight: Atomic<Int>

    public init(config: ServerConfig, states: ServerStates = ServerStates()) {
        self.states = states
        counters = Counters(slots: states.slots)
        name = config.name
        addressBox = Mutex(config.address)
        hostname = config.hostname
        hasAddress = Atomic(config.resolved)
        weightValue = Atomic(config.weight)
        initialWeight = Atomic(config.weight)
        maxconnValue = Atomic(config.maxconn)
        slowstartMs = Atomic(config.slowstart.value)
        sendProxy = Atomic(config.sendProxy?.rawValue ?? 0)
        admin.store(config.state.rawValue, ordering: .relaxed)
        // `init_state: down|fully-down` (the default of role and require checks): no traffic
        // before the first check has answered.
        if let c = config.check, c.effectiveInitState == .down || c.effectiveInitState == .fullyDown {
            up.store(false, ordering: .relaxed)
        }
        if config.state == .maint || !up.load(ordering: .relaxed) || !config.resolved {
            downSince.store(monotonicMillis(), ordering: .relaxed)
        }
    }

    /// Out of service for statistics: DOWN by health, in maintenance, or without an address.
    public var isDown: Bool {
        !up.load(ordering: .relaxed) || admin.load(ordering: .relaxed) == AdminState.maint.rawValue
            || !hasAddress.load(ordering: .relaxed) || noNeighbour.load(ordering: .relaxed)
    }

    /// dsr mode: the server's neighbour entry, as the kernel has it now (`mac` nil: none, for
    /// `reason`). Announced when the address or the reachability changed; true then.
    @discardableResult
    public func setLink(_ mac: [UInt8]?, reason: String, now: Int64 = monotonicMillis()) -> Bool {
        let wasDown = isDown
        let changed = linkBox.withLock { l -> Bool in
            let c = l.mac != mac || (mac == nil && l.reason != reason)
            l = (mac, reason)
            return c
        }
        let had = !noNeighbour.exchange(mac == nil, ordering: .relaxed)
        guard changed || had != (mac != nil) else { return false }
        if mac != nil && !had { upSince.store(max(now, 1), ordering: .relaxed) }
        noteChange(wasDown: wasDown, now: now)
        states.changed()
        return true
    }

    // Every change of what schedulers read goes through the setters below; each announces it
    // exactly once on `states` (version bump, subscribers), unless the caller batches several
    // (`announce: false`, as a reload does) and announces once itself.

    /// Moves the server to `new` (new connections and checks go there; established ones stay
    /// where they are). Returns the address it had, nil when it had none.
    @discardableResult
    public func setAddress(
        _ new: SocketAddress, now: Int64 = monotonicMillis(), announce: Bool = true
    ) -> SocketAddress? {
        let wasDown = isDown
        let had = hasAddress.load(ordering: .relaxed)
        let old = addressBox.withLock { a in
            let o = a
            a = new
            return o
        }
        hasAddress.store(true, ordering: .relaxed)
        if !had { upSince.store(max(now, 1), ordering: .relaxed) }
        noteChange(wasDown: wasDown, now: now)
        if announce { states.changed() }
        return had ? old : nil
    }

    /// Records a change of health or admin state: last change time, downtime, DOWN transitions.
    /// Call after the change, with `wasDown` read before it.
    public func noteChange(wasDown: Bool, now: Int64 = monotonicMillis()) {
        lastChange.store(now, ordering: .relaxed)
        let down = isDown
        if down && !wasDown {
            downSince.store(max(now, 1), ordering: .relaxed)
            downTransitions.wrappingAdd(1, ordering: .relaxed)
        } else if !down && wasDown {
            let since = downSince.load(ordering: .relaxed)
            if since > 0 { downtimeMs.wrappingAdd(now - since, ordering: .relaxed) }
            downSince.store(0, ordering: .relaxed)
        }
    }

    /// Marks the server up or down by health; true when that changed it.
    @discardableResult
    public func setUp(_ value: Bool, now: Int64 = monotonicMillis()) -> Bool {
        guard swapUp(value, now: now) else { return false }
        states.changed()
        return true
    }

    /// Sets the health and records the change; true when it changed (not announced).
    private func swapUp(_ value: Bool, now: Int64) -> Bool {
        let wasDown = isDown
        let (changed, _) = up.compareExchange(expected: !value, desired: value, ordering: .relaxed)
        if changed { noteChange(wasDown: wasDown, now: now) }
        return changed
    }

    /// A health check's transition: coming up starts slow start afresh and forgets the failed
    /// connects the proxy saw; announced once, whether the health or only the ramp changed
    /// (a check that comes up while the runtime API had forced the server up).
    public func checkTransition(up value: Bool, now: Int64) {
        if value {
            upSince.store(max(now, 1), ordering: .relaxed)
            connectFailures.store(0, ordering: .relaxed)
        }
        _ = swapUp(value, now: now)
        states.changed()
    }

    /// Changes the connection limit (0: none).
    public func setMaxconn(_ value: Int, announce: Bool = true) {
        maxconnValue.store(value, ordering: .relaxed)
        if announce { states.changed() }
    }

    /// Total time DOWN or in maintenance, in ms.
    public func downtime(now: Int64) -> Int64 {
        let since = downSince.load(ordering: .relaxed)
        return downtimeMs.load(ordering: .relaxed) + (since > 0 ? now - since : 0)
    }

    public func clearMax() { activeMax.store(active.load(ordering: .relaxed), ordering: .relaxed) }

    /// The weight schedulers use now: the configured weight, ramped up linearly (at least 1)
    /// during slow start after the server came back. Static policies (source) use `weight`.
    @inline(__always)
    public func effectiveWeight(now: Int64) -> Int {
        let w = weight
        let ramp = slowstartMs.load(ordering: .relaxed)
        guard ramp > 0, w > 0 else { return w }
        let since = upSince.load(ordering: .relaxed)
        guard since > 0 else { return w }
        let elapsed = max(0, now - since)
        if elapsed >= ramp { return w }
        return max(1, Int((Int64(w) * elapsed + ramp - 1) / ramp))
    }

    /// Changes the administrative state; a server that becomes usable starts its slow start.
    public func setAdmin(_ state: AdminState, now: Int64, announce: Bool = true) {
        let was = usable
        let wasDown = isDown
        let old = admin.exchange(state.rawValue, ordering: .relaxed)
        if !was && usable { upSince.store(max(now, 1), ordering: .relaxed) }
        if old != state.rawValue { noteChange(wasDown: wasDown, now: now) }
        if announce { states.changed() }
    }

    /// Changes the weight (0...256); a server that becomes usable starts its slow start.
    public func setWeight(_ weight: Int, now: Int64, announce: Bool = true) {
        let was = usable
        weightValue.store(weight, ordering: .relaxed)
        if !was && usable { upSince.store(max(now, 1), ordering: .relaxed) }
        if announce { states.changed() }
    }

    public var adminState: AdminState { AdminState(rawValue: admin.load(ordering: .relaxed)) ?? .ready }

    public var weight: Int { weightValue.load(ordering: .relaxed) }
    public var maxconn: Int { maxconnValue.load(ordering: .relaxed) }

    /// Takes new connections: up, ready, and a weight above zero.
    @inline(__always)
    public var usable: Bool {
        up.load(ordering: .relaxed) && admin.load(ordering: .relaxed) == AdminState.ready.rawValue && weight > 0
            && hasAddress.load(ordering: .relaxed) && !noNeighbour.load(ordering: .relaxed)
    }

    /// Below maxconn (or no limit).
    @inline(__always)
    public var hasRoom: Bool { maxconn == 0 || active.load(ordering: .relaxed) < maxconn }

    /// Reserves a connection slot if the server is below maxconn. Lock-free.
    @inline(__always)
    public func tryAcquire() -> Bool {
        let maxconn = self.maxconn
        if maxconn == 0 {
            active.wrappingAdd(1, ordering: .relaxed)
            return true
        }
        var cur = active.load(ordering: .relaxed)
        while cur < maxconn {
            let (exchanged, original) = active.compareExchange(
                expected: cur, desired: cur + 1, ordering: .relaxed)
            if exchanged { return true }
            cur = original
        }
        return false
    }

    @inline(__always)
    public func release() { active.wrappingSubtract(1, ordering: .relaxed) }
}

/// One service in a snapshot.
public final class Service: Sendable {
    public let config: ServiceConfig
    /// Counters and gauges, carried over reloads by service name.
    public let stats: ServiceStats
    public let servers: [Server]
    /// Indices of servers with `backup: false` and `backup: true`, in config order.
    public let activeIndices: [Int]
    public let backupIndices: [Int]
    /// The same servers without reference counting, for `PickView` (kept alive by `servers`).
    public let handles: [Unmanaged<Server>]
    public let backupFlags: [Bool]
    /// Round robin's place in its order, shared by the workers.
    public let turn = SharedTurn()

    /// Where its servers' changes are announced.
    public let states: ServerStates

    public init(config: ServiceConfig, stats: ServiceStats, servers: [Server], states: ServerStates) {
        self.states = states
        self.config = config
        self.stats = stats
        self.servers = servers
        handles = servers.map { Unmanaged.passUnretained($0) }
        backupFlags = config.servers.map(\.backup)
        activeIndices = config.servers.indices.filter { !config.servers[$0].backup }
        backupIndices = config.servers.indices.filter { config.servers[$0].backup }
    }

    public var name: String { config.name }
}

/// The immutable picture the workers read: services and servers. Published as a whole; a change
/// makes a new table with a higher generation.
public final class ServiceTable: Sendable {
    public let generation: UInt64
    public let config: Config
    public let services: [Service]

    public init(generation: UInt64, config: Config, services: [Service]) {
        self.generation = generation
        self.config = config
        self.services = services
    }

    /// Builds a table from a config, reusing `Server` objects of `previous` whose service, name
    /// and address are unchanged (so live connection counts carry over).
    /// Builds a table from a config, reusing the `Server` objects of `previous` whose service,
    /// name and address are unchanged (so live connection counts carry over). Weight, maxconn and
    /// slow start follow the new config; `state` is applied when the config changed it, so a state
    /// set at run time survives a reload that does not mention it.
    public static func build(
        config: Config, generation: UInt64, previous: ServiceTable?, now: Int64, states: ServerStates
    ) -> ServiceTable {
        var old: [String: (Server, ServerConfig)] = [:]
        var oldStats: [String: ServiceStats] = [:]
        if let previous {
            for svc in previous.services {
                oldStats[svc.name] = svc.stats
                for (k, s) in svc.servers.enumerated() { old["\(svc.name)/\(s.name)"] = (s, svc.config.servers[k]) }
            }
        }
        let services = config.services.map { sc in
            let stats = oldStats[sc.name] ?? ServiceStats(slots: states.slots)
            // Runtime access-list changes stay unless the config's lists changed.
            stats.access.apply(sc.access, limits: sc.limits)
            return Service(
                config: sc, stats: stats,
                servers: sc.servers.map { c -> Server in
                    guard let (o, oc) = old["\(sc.name)/\(c.name)"],
                        oc.addressKey == c.addressKey || o.address == c.address && c.hostname == nil
                    else {
                        return Server(config: c, states: states)
                    }
                    // The address this load gives (a name resolved again, a runtime `set server
                    // addr` dropped because the config changed the service): new connections go
                    // there. A name that did not resolve now keeps the address it had.
                    if c.resolved, o.address != c.address || !o.hasAddress.load(ordering: .relaxed) {
                        o.setAddress(c.address, now: now, announce: false)
                    }
                    o.setMaxconn(c.maxconn, announce: false)
                    o.slowstartMs.store(c.slowstart.value, ordering: .relaxed)
                    o.sendProxy.store(c.sendProxy?.rawValue ?? 0, ordering: .relaxed)
                    // A weight set at run time stays unless the config's weight changed.
                    o.initialWeight.store(c.weight, ordering: .relaxed)
                    if oc.weight != c.weight { o.setWeight(c.weight, now: now, announce: false) }
                    if oc.state != c.state { o.setAdmin(c.state, now: now, announce: false) }
                    return o
                }, states: states)
        }
        states.changed()  // once for the whole table
        return ServiceTable(generation: generation, config: config, services: services)
    }
}
