import BallastCore
import BallastIO
import CLinux
import CNftables
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// nat mode: the kernel forwards, Ballast decides. Owns the nftables tables `ip ballast` and
/// `ip6 ballast` (and never touches another table), programs them in atomic netlink batches,
/// and keeps the maps in step with health and admin state.
///
/// Shape (per family):
/// ```
/// table ip ballast {
///   map services { type ipv4_addr . inet_service : verdict }      bind → goto svc-<svc>
///   map source-nat { type mark : verdict }                          service mark → jump snat-<svc>
///   map traffic  { type mark : verdict }                          server mark → jump srv-<svc>-<n>
///   set replies  { type ipv4_addr . inet_service }                 every server's address . port
///   map be-<svc> { type mark : ipv4_addr . inet_service }          server mark → address . port
///   map rr-<svc> { type mark : mark; flags interval }              roundrobin/random: weight ranges → mark
///   map mg-<svc> { type mark : mark }                              source: Maglev slot → mark
///   chain prerouting  { type nat hook prerouting priority dstnat; ip daddr . tcp dport vmap @services }
///   chain output      { type nat hook output priority dstnat;     (the same, for the host's own clients) }
///   chain postrouting { type nat hook postrouting priority srcnat; ct mark & 0xffff0000 vmap @source-nat }
///   chain forward     { type filter hook forward priority filter; ct state new ip saddr . tcp sport @replies drop;
///                       ct mark vmap @traffic }
///   chain svc-<svc>   { ct mark set numgen inc mod W map @rr-<svc>; dnat to ct mark map @be-<svc> }
///   chain snat-<svc>  { masquerade }                              (or snat to an address; none: no chain)
///   chain srv-<svc>-<n> { ct state new counter; ct direction original counter; … reply counter }
/// }
/// ```
/// The base chains never change after start: a service is its own chains and maps plus its
/// elements in the three shared maps, so a reload adds and removes exactly those.
/// Every connection is tagged with its server's mark (service id << 16 | server id), so a dead
/// server's flows can be flushed from conntrack by mark.
public final class NatController: @unchecked Sendable {
    public static let tableName = "ballast"

    struct ServiceState {
        var name: String
        var id: UInt32
        var family: UInt16
        var config: ServiceConfig
        var marks: [UInt32]
        /// Who may connect: the service's allow and deny lists as they stand (config and runtime API).
        var access = AccessList()
        /// What is loaded now: usable weights (roundrobin/random) or Maglev slots (source).
        var weights: [Int] = []
        var slots: [Int32] = []
        /// Where each server is now (its DNS name or `set server addr` can move it; nil: its
        /// name has not resolved yet, so it has no `be-` element and no weight).
        var addrs: [SocketAddress?] = []
        /// dsr mode: each server's MAC address (nil: no L2 neighbour), the interface's index
        /// and its own MAC address.
        var macs: [[UInt8]?] = []
        var ifindex: UInt32 = 0
        var devMac: [UInt8] = []
        /// What each server's `be-` element holds: nat mode its address . port, dsr mode its MAC
        /// address (nil: the server has no element).
        var backendData: [[UInt8]?] {
            config.mode == .dsr ? macs : addrs.map { $0.map(NatController.addressData) }
        }
        /// Nothing to send: the maps hold what `o` holds.
        func sameMaps(as o: ServiceState) -> Bool {
            weights == o.weights && slots == o.slots && addrs == o.addrs && macs == o.macs
        }
        var chain: String { "svc-\(name)" }
        var snatChain: String { "snat-\(name)" }
        func serverChain(_ j: Int) -> String { "srv-\(name)-\(j + 1)" }
        /// The same objects in the kernel: what the chains, maps and shared-map elements are
        /// built from. Weights, backups, checks and the like only change what the maps hold
        /// (`updateMaps`); where the service sits in the file changes nothing.
        func same(as o: ServiceState) -> Bool {
            let a = config
            let b = o.config
            return id == o.id && family == o.family && a.binds.map(\.address) == b.binds.map(\.address)
                && a.balance == b.balance
                && a.hashKey == b.hashKey && a.hashTableSize == b.hashTableSize && a.snat == b.snat
                && a.servers.map(\.name) == b.servers.map(\.name)
                && a.servers.map(\.addressKey) == b.servers.map(\.addressKey)
                && access == o.access && a.limits == b.limits
                && a.interface == b.interface && ifindex == o.ifindex && devMac == o.devMac
        }
        var allowSet: String { "allow-\(name)" }
        var denySet: String { "deny-\(name)" }
        var connSet: String { "conns-\(name)" }
        var rateSet: String { "rate-\(name)" }
        var backends: String { "be-\(name)" }
        var sched: String { config.balance == .source ? "mg-\(name)" : "rr-\(name)" }
    }

    let logger: Logger
    let socket: NetlinkSocket
    let lock = Mutex<Void>(())
    var services: [String: ServiceState] = [:]
    var table: ServiceTable?
    var families: Set<UInt16> = []
    var thread: pthread_t?
    let stopping = Atomic<Bool>(false)
    /// Milliseconds the last state change took to reach the kernel (for logs and benchmarks).
    public let lastApplyMicros = Atomic<Int>(0)
    /// Microseconds the last whole-table programming took (start, reload).
    public let lastFullApplyMicros = Atomic<Int>(0)

    /// Opens the netlink socket (before privileges are dropped: the kernel checks the opener).
    public init(logger: Logger) throws(NatError) {
        self.logger = logger
        socket = try NetlinkSocket()
        do {
            wake = try EventLoop(capacity: 1)
        } catch {
            throw NatError("cannot make the nat thread's wake-up: \(error)", errno: error.errno)
        }
    }

    /// The services the kernel forwards: nat and dsr mode.
    public static func natServices(_ config: Config) -> [ServiceConfig] { config.services.filter { $0.mode.isKernel } }

    /// nat services live in `ip`/`ip6 ballast`, dsr services in `netdev ballast`.
    static func family(_ svc: ServiceConfig) -> UInt16 {
        if svc.mode == .dsr { return netdev }
        return svc.binds.first?.address.family == AF_INET6 ? UInt16(NFPROTO_IPV6) : UInt16(NFPROTO_IPV4)
    }

    /// dsr mode: the kernel's neighbour table, and when each server without an entry was last
    /// probed (at most once a second each).
    var neighbours: Neighbours?
    var lastProbe: [ObjectIdentifier: Int64] = [:]

    /// The interfaces of the dsr services loaded differ from `next`'s (their ingress chains are
    /// base chains: the netdev table is then replaced whole).
    func devicesChanged(_ next: [ServiceState]) -> Bool {
        let loaded = services.values.filter { $0.family == NatController.netdev }.compactMap(\.config.interface)
        return Set(loaded) != Set(next.compactMap(\.config.interface))
    }

    // MARK: - Whole tables

    /// Start: replaces each family's `ballast` table in one atomic batch, whatever was there (a
    /// crashed run's leftovers included). Reload: one atomic batch per family with the difference
    /// only: a removed service's objects go, a new one's come, a changed one is rebuilt (its
    /// servers that kept their name and address keep their counters), and the others are not
    /// touched. Established flows keep their server either way: NAT rules see only the first
    /// packet of a connection.
    public func apply(_ table: ServiceTable) throws(NatError) {
        let t1 = monotonicNanos()
        defer { lastFullApplyMicros.store(Int(monotonicNanos() - t1) / 1000, ordering: .relaxed) }
        try lock.withLock { (_: inout Void) throws(NatError) in
            defer { held = false }
            flowStatsAt = 0  // the next read asks the kernel again
            let start = self.table == nil
            if start { highestId = 0 }
            // A service keeps its id (the high half of its flows' marks) across reloads, so live
            // flows and counters keep their meaning; a new one takes an id not used before.
            var next: [String: ServiceState] = [:]
            var taken = Set(services.values.map(\.id))
            refreshNeighbours(table)  // dsr servers' MAC addresses, before their maps are planned
            for (k, svc) in table.services.enumerated() where svc.config.mode.isKernel {
                let fam = NatController.family(svc.config)
                let id: UInt32
                if !start, let old = services[svc.name], old.family == fam {
                    id = old.id
                } else if start {
                    id = UInt32(k + 1)  // as `ballast nft show -c` numbers them
                } else if highestId < 0xFFFF {
                    id = highestId + 1
                } else {
                    id = (1...UInt32(0xFFFF)).first { !taken.contains($0) } ?? 0xFFFF
                }
                highestId = max(highestId, id)
                taken.insert(id)
                var st = ServiceState(
                    name: svc.name, id: id, family: fam, config: svc.config,
                    marks: svc.servers.indices.map { (id << 16) | UInt32($0 + 1) })
                st.access = svc.stats.access.list
                if svc.config.mode == .dsr {
                    let dev = svc.config.interface ?? ""
                    guard let index = Interface.index(dev), let mac = Interface.mac(dev) else {
                        throw NatError("service \(svc.name): interface \(dev) does not exist")
                    }
                    st.ifindex = index
                    st.devMac = mac
                }
                desired(&st, svc)
                next[svc.name] = st
            }
            let unchanged = next.values.filter { st in
                services[st.name].map { $0.same(as: st) && $0.sameMaps(as: st) } ?? false
            }.count
            var changes: [String]
            do throws(NatError) {
                changes = try program(next, whole: start || drifted)
            } catch {
                guard !start && !drifted else {
                    drifted = true
                    throw error
                }
                // The kernel refused the difference: its tables are not what Ballast loaded
                // (someone flushed the ruleset, deleted a chain). Replace them whole instead.
                logger.warning("nat: the kernel refused the difference (\(error)); replacing the tables whole")
                do throws(NatError) {
                    changes = try program(next, whole: true)
                } catch {
                    drifted = true
                    throw error
                }
            }
            drifted = false
            if !start {
                logger.info(
                    "nat: reload: \(changes.isEmpty ? "no change" : changes.joined(separator: ", ")); \(unchanged) services untouched"
                )
            }
            services = next
            self.table = table
        }
    }

    /// Sends `next` to the kernel, one atomic batch per family: the tables whole (`whole`, and
    /// for a family new to the kernel), or the difference from what is loaded. Returns what
    /// changed, for the log. Call with the lock held.
    func program(_ next: [String: ServiceState], whole: Bool) throws(NatError) -> [String] {
        let fams = Set(next.values.map(\.family))
        let tn = NatController.tableName
        var changes: [String] = []
        for fam in fams.union(families).sorted() {
            let b = socket.newBatch(family: fam)
            let mine = next.values.filter { $0.family == fam }.sorted { $0.id < $1.id }
            if !fams.contains(fam) {
                b.table(tn, NFT_MSG_NEWTABLE.rawValue)
                b.table(tn, NFT_MSG_DELTABLE.rawValue)
                changes.append("table \(b.familyName) \(tn) removed")
            } else if whole || !families.contains(fam) || (fam == NatController.netdev && devicesChanged(mine)) {
                // Replace: create (so delete cannot fail), delete, create again. (netdev: also
                // when the set of interfaces changes, which are base chains of their own.)
                b.table(tn, NFT_MSG_NEWTABLE.rawValue)
                b.table(tn, NFT_MSG_DELTABLE.rawValue)
                b.table(tn, NFT_MSG_NEWTABLE.rawValue)
                if fam == NatController.netdev { buildNetdev(b, mine) } else { build(b, mine) }
                changes.append("table \(b.familyName) \(tn) \(families.contains(fam) ? "replaced" : "created")")
            } else {
                let before = changes.count
                for old in services.values.filter({ $0.family == fam }).sorted(by: { $0.id < $1.id }) {
                    if let st = next[old.name], st.same(as: old) { continue }
                    if fam == NatController.netdev {
                        removeDSRService(b, old, keeping: NatController.keptServers(old, next[old.name]))
                    } else {
                        removeService(b, old, keeping: NatController.keptServers(old, next[old.name]))
                    }
                    if next[old.name]?.family != fam { changes.append("\(old.name) removed") }
                }
                for st in mine {
                    let old = services[st.name]
                    if let old, old.same(as: st) {
                        // Same objects: only the maps' contents may differ (weights, backups).
                        if updateMaps(b, st, loaded: old) { changes.append("\(st.name) maps updated") }
                        continue
                    }
                    if fam == NatController.netdev {
                        addDSRService(b, st, keeping: NatController.keptServers(old, st))
                    } else {
                        addService(b, st, keeping: NatController.keptServers(old, st))
                    }
                    changes.append(old?.family == fam ? "\(st.name) rebuilt" : "\(st.name) added")
                }
                let wanted = NatController.replyEnds(mine)
                if fam != NatController.netdev
                    && updateReplies(
                        b, from: NatController.replyEnds(services.values.filter { $0.family == fam }), to: wanted)
                {
                    changes.append("server addresses")
                }
                if changes.count == before { continue }  // nothing of this family changed
            }
            b.finish()
            try socket.send(b)
            // Sent: this family now holds `next` (a later family's failure does not undo it).
            if fams.contains(fam) { families.insert(fam) } else { families.remove(fam) }
            for (name, st) in services where st.family == fam && next[name]?.family != fam { services[name] = nil }
            for st in mine { services[st.name] = st }
        }
        return changes
    }

    /// Reload: the next table's servers may already carry new weights while the controller
    /// still follows the old table; state changes wait for `apply`, which takes them all in
    /// its one batch (and says so in its log line).
    public func holdSync() { lock.withLock { _ in held = true } }
    var held = false

    /// A reload failed part-way: the next apply replaces the tables instead of diffing.
    var drifted = false

    /// The id this run gave last (new services on reload take the next one).
    var highestId: UInt32 = 0

    /// Servers of a rebuilt service whose per-server chain (and so its counters) can stay: same
    /// service id, same position, same name and address.
    static func keptServers(_ old: ServiceState?, _ new: ServiceState?) -> Set<Int> {
        guard let old, let new, old.id == new.id, old.family == new.family else { return [] }
        let a = old.config.servers
        let b = new.config.servers
        return Set(
            (0..<min(a.count, b.count)).filter { a[$0].name == b[$0].name && a[$0].addressKey == b[$0].addressKey })
    }

    /// Removes the tables (stop), unless they are to outlive the process.
    public func remove() {
        lock.withLock { _ in
            for fam in families {
                let b = socket.newBatch(family: fam)
                b.table(NatController.tableName, NFT_MSG_NEWTABLE.rawValue)
                b.table(NatController.tableName, NFT_MSG_DELTABLE.rawValue)
                b.finish()
                do { try socket.send(b) } catch {
                    logger.error("nat: cannot remove table \(NatController.tableName): \(error)")
                }
            }
            families = []
        }
    }

    /// The shared part of a family's table, then every service's objects.
    // MARK: - Desired state

    /// Usable weights (or the Maglev table) from health and admin state, with proxy mode's tier
    /// rule: backups only when no active server is usable, the first one unless `allbackups`.
    func desired(_ st: inout ServiceState, _ svc: Service) {
        let servers = svc.servers
        var w = servers.indices.map { i in !svc.backupFlags[i] && servers[i].usable ? servers[i].weight : 0 }
        if w.allSatisfy({ $0 == 0 }) {
            for i in svc.backupIndices where servers[i].usable {
                w[i] = servers[i].weight
                if !svc.config.allbackups { break }
            }
        }
        st.weights = w
        st.addrs = servers.map { $0.hasAddress.load(ordering: .relaxed) ? $0.address : nil }
        if st.config.mode == .dsr { st.macs = servers.map { $0.link.mac } }
        if st.config.balance == .source {
            st.slots = MaglevTable(names: servers.map(\.name), weights: w, size: st.config.hashTableSize).entries
        }
    }

    /// Brings one service's maps from what is loaded to what `st` wants. Roundrobin/random
    /// replace their ranges and rule; source replaces only the Maglev slots that changed.
    /// False when there is nothing to change.
    func updateMaps(_ b: NftBatch, _ st: ServiceState, loaded before: ServiceState) -> Bool {
        if st.sameMaps(as: before) { return false }
        let tn = NatController.tableName
        // A server that moved (nat: a new address; dsr: a new MAC address, or none): its `be-`
        // element is replaced (nat flows under way keep the old one: conntrack NATs only a
        // connection's first packet).
        let now = st.backendData
        let was = before.backendData
        let moved = now.indices.filter { $0 >= was.count || now[$0] != was[$0] }
        let stale = moved.filter { $0 < was.count && was[$0] != nil }
        if !stale.isEmpty {
            b.elements(tn, st.backends, stale.map { NftBatch.Element(key: le(st.marks[$0]), data: nil) }, delete: true)
        }
        let fresh = backendElements(st, moved)
        if !fresh.isEmpty { b.elements(tn, st.backends, fresh) }
        if st.weights == before.weights && st.slots == before.slots { return true }
        if st.config.balance == .source {
            var changed: [Int] = []
            for k in st.slots.indices where k >= before.slots.count || st.slots[k] != before.slots[k] {
                changed.append(k)
            }
            let removed = changed.filter { $0 < before.slots.count && before.slots[$0] >= 0 }
            if !removed.isEmpty {
                b.elements(tn, st.sched, removed.map { NftBatch.Element(key: le(UInt32($0)), data: nil) }, delete: true)
            }
            let added = slotElements(st, changed)
            if !added.isEmpty { b.elements(tn, st.sched, added) }
        } else {
            b.flushChain(tn, st.chain)
            b.elements(tn, st.sched, [], delete: true)
            let ranges = rangeElements(st)
            if !ranges.isEmpty { b.elements(tn, st.sched, ranges) }
            // The flush took the access rules too: they go back first, in the same batch.
            accessRulesOnly(b, st)
            schedRule(b, st)
        }
        return true
    }

    /// Brings the maps in step with health and admin state: one atomic batch per changed
    /// service. Roundrobin/random replace their ranges and rule; source replaces only the
    /// Maglev slots that changed.
    public func sync() {
        let t1 = monotonicNanos()
        var changed = false
        lock.withLock { _ in
            guard let table, !held else { return }
            if drifted {  // the last attempt failed: try again (this runs at least once a second)
                changed = true
                reprogramWhole(table)
                return
            }
            refreshNeighbours(table)
            for svc in table.services where svc.config.mode.isKernel {
                guard var st = services[svc.name] else { continue }
                let before = st
                desired(&st, svc)
                if st.sameMaps(as: before) { continue }
                changed = true
                let b = socket.newBatch(family: st.family)
                _ = updateMaps(b, st, loaded: before)
                if st.addrs != before.addrs && st.family != NatController.netdev {
                    let others = services.values.filter { $0.family == st.family && $0.name != st.name }
                    _ = updateReplies(
                        b, from: NatController.replyEnds(others + [before]), to: NatController.replyEnds(others + [st]))
                }
                b.finish()
                do {
                    try socket.send(b)
                    services[svc.name] = st
                } catch {
                    // The kernel's tables are not what Ballast loaded (a flushed ruleset, a
                    // deleted chain): put them back whole, with every service as it should be now.
                    logger.warning(
                        "nat: the kernel refused the update of service \(svc.name) (\(error)); replacing the tables whole"
                    )
                    reprogramWhole(table)
                    return
                }
            }
        }
        guard changed else { return }
        let us = Int(monotonicNanos() - t1) / 1000
        lastApplyMicros.store(us, ordering: .relaxed)
    }

    /// Programs every table whole with each service as health and admin state want it now.
    /// Call with the lock held.
    func reprogramWhole(_ table: ServiceTable) {
        var next = services
        for svc in table.services where svc.config.mode.isKernel {
            guard var st = next[svc.name] else { continue }
            desired(&st, svc)
            next[svc.name] = st
        }
        do throws(NatError) {
            _ = try program(next, whole: true)
            logger.notice("nat: tables \(NatController.tableName) programmed again")
            drifted = false
        } catch {
            if !drifted { logger.error("nat: cannot program the kernel: \(error); trying again every second") }
            drifted = true
        }
    }

    /// `on_marked_down: shutdown-sessions` for a nat server: its conntrack entries go, so its
    /// clients get a reset at once instead of hanging.
    public func flush(service: String, server: Server) {
        lock.withLock { _ in
            guard let st = services[service], st.family != NatController.netdev,
                let j = table?.services.first(where: { $0.name == service })?.servers.firstIndex(where: {
                    $0 === server
                })
            else { return }
            do {
                try socket.flushConntrack(
                    mark: st.marks[j], family: st.family == UInt16(NFPROTO_IPV6) ? UInt8(AF_INET6) : UInt8(AF_INET))
                logger.info(
                    "nat: flushed the connections of \(service)/\(server.name) (mark 0x\(String(st.marks[j], radix: 16)))"
                )
            } catch {
                logger.error("nat: cannot flush the connections of \(service)/\(server.name): \(error)")
            }
        }
    }

    /// The kernel's view of one nat server: its live flows (conntrack entries with its mark) and,
    /// with conntrack accounting on, their packets and bytes. Read at most once a second.
    public func flowStats(service: String, server: Int) -> FlowStats {
        lock.withLock { _ in
            refreshCounters()
            guard let st = services[service], server < st.marks.count else { return FlowStats() }
            return flowStatsCache[st.marks[server]] ?? FlowStats()
        }
    }

    /// Clients the kernel refused for a service (its access-list and limit rules' counters).
    public func refused(service: String) -> UInt64 {
        lock.withLock { _ in
            refreshCounters()
            return refusedCache[service] ?? 0
        }
    }

    /// Reads the kernel's counters (conntrack flows by mark, one rule dump per family) at most
    /// once a second, for both the per-server figures and the refusals. Under `lock`.
    private func refreshCounters() {
        let now = monotonicMillis()
        guard now - flowStatsAt > 1000 else { return }
        var all: [UInt32: FlowStats] = [:]
        var refused: [String: UInt64] = [:]
        for fam in families {
            // Live flows from conntrack; cumulative connections and bytes from the counters.
            // (dsr mode has no connection state: counters only.)
            if fam != NatController.netdev,
                let m = try? socket.conntrackByMark(
                    family: fam == UInt16(NFPROTO_IPV6) ? UInt8(AF_INET6) : UInt8(AF_INET))
            {
                for (mark, f) in m { all[mark, default: FlowStats()].flows += f.flows }
            }
            guard let rules = try? socket.ruleCounters(family: fam, table: NatController.tableName) else { continue }
            for st in services.values where st.family == fam {
                refused[st.name] = (rules[st.chain] ?? []).filter { $0.0 == .refused }.reduce(0) { $0 &+ $1.1 }
                for j in st.marks.indices {
                    var f = all[st.marks[j]] ?? FlowStats()
                    for (kind, packets, bytes) in rules["srv-\(st.name)-\(j + 1)"] ?? [] {
                        switch kind {
                        case .newConnections: f.newConnections = packets
                        case .original:
                            f.packetsIn = packets
                            f.bytesIn = bytes
                        case .reply:
                            f.packetsOut = packets
                            f.bytesOut = bytes
                        case .refused:
                            break
                        }
                    }
                    all[st.marks[j]] = f
                }
            }
        }
        flowStatsCache = all
        refusedCache = refused
        flowStatsAt = now
    }

    var refusedCache: [String: UInt64] = [:]
    var flowStatsCache: [UInt32: FlowStats] = [:]
    var flowStatsAt: Int64 = 0

    public func isNat(_ service: String) -> Bool { lock.withLock { _ in services[service] != nil } }

    // MARK: - Thread

    /// What wakes the nat thread. Its descriptors close when the last holder lets go (the
    /// controller and the subscription's closure), so a change announced while Ballast stops
    /// never writes into a descriptor number that was closed and reused.
    let wake: EventLoop
    var subscription: (ServerStates, Int)?

    /// Follows every state change (checks, runtime API, reload, DNS) as it happens.
    public func start(following states: ServerStates) {
        let w = wake
        subscription = (states, states.subscribe { w.wake() })
        thread = NamedThread.start("ballast-nat") { self.run() }
    }

    func run() {
        var verified = monotonicMillis()
        var watched: Int32 = -1
        while !stopping.load(ordering: .relaxed) {
            _ = try? wake.wait(timeoutMs: 1000)
            if stopping.load(ordering: .relaxed) { break }
            // dsr mode: a change of the neighbour table wakes this loop too (sync reads it).
            lock.withLock { _ in
                guard let n = neighbours else { return }
                if watched != n.changes {
                    watched = n.changes
                    try? wake.add(n.changes, Epoll.in, EventToken(index: 0, kind: 1))
                }
                n.drainChanges()
            }
            sync()
            let now = monotonicMillis()
            if now - verified >= 1000 {
                verified = now
                verify()
            }
        }
    }

    /// Once a second: a table another tool removed (`nft flush ruleset` in a firewall reload)
    /// is programmed again at once, not at the next change.
    func verify() {
        lock.withLock { _ in
            guard let table, !held, !drifted else { return }
            for fam in families.sorted() {
                guard let exists = try? socket.tableExists(family: fam, name: NatController.tableName), !exists else {
                    continue
                }
                logger.warning(
                    "nat: table \(fam == UInt16(NFPROTO_IPV6) ? "ip6" : "ip") \(NatController.tableName) is gone from the kernel (flushed by another tool?); programming it again"
                )
                reprogramWhole(table)
                return
            }
        }
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        if let (states, id) = subscription { states.unsubscribe(id) }
        subscription = nil
        wake.wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

}
