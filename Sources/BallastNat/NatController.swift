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
///   map be-<svc> { type mark : ipv4_addr . inet_service }          server mark → address . port
///   map rr-<svc> { type mark : mark; flags interval }              roundrobin/random: weight ranges → mark
///   map mg-<svc> { type mark : mark }                              source: Maglev slot → mark
///   chain prerouting  { type nat hook prerouting priority dstnat; ip daddr . tcp dport vmap @services }
///   chain output      { type nat hook output priority dstnat;     (the same, for the host's own clients) }
///   chain postrouting { type nat hook postrouting priority srcnat; ct mark & 0xffff0000 vmap @source-nat }
///   chain forward     { type filter hook forward priority filter; ct mark vmap @traffic }
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
        /// What is loaded now: usable weights (roundrobin/random) or Maglev slots (source).
        var weights: [Int] = []
        var slots: [Int32] = []
        var chain: String { "svc-\(name)" }
        var snatChain: String { "snat-\(name)" }
        func serverChain(_ j: Int) -> String { "srv-\(name)-\(j + 1)" }
        /// The same objects in the kernel: what the chains, maps and shared-map elements are
        /// built from. Weights, backups, checks and the like only change what the maps hold
        /// (`updateMaps`); where the service sits in the file changes nothing.
        func same(as o: ServiceState) -> Bool {
            let a = config, b = o.config
            return id == o.id && family == o.family && a.binds.map(\.address) == b.binds.map(\.address) && a.balance == b.balance
                && a.hashKey == b.hashKey && a.hashTableSize == b.hashTableSize && a.snat == b.snat
                && a.servers.map(\.name) == b.servers.map(\.name) && a.servers.map(\.address) == b.servers.map(\.address)
        }
        var backends: String { "be-\(name)" }
        var sched: String { config.balance == .source ? "mg-\(name)" : "rr-\(name)" }
    }

    private let logger: Logger
    private let socket: NetlinkSocket
    private let lock = Mutex<Void>(())
    private var services: [String: ServiceState] = [:]
    private var table: ServiceTable?
    private var families: Set<UInt16> = []
    private var wakeFd: Int32 = -1
    private var thread: pthread_t?
    private let stopping = Atomic<Bool>(false)
    /// Milliseconds the last state change took to reach the kernel (for logs and benchmarks).
    public let lastApplyMicros = Atomic<Int>(0)
    /// Microseconds the last whole-table programming took (start, reload).
    public let lastFullApplyMicros = Atomic<Int>(0)

    /// Opens the netlink socket (before privileges are dropped: the kernel checks the opener).
    public init(logger: Logger) throws(NatError) {
        self.logger = logger
        socket = try NetlinkSocket()
    }

    public static func natServices(_ config: Config) -> [ServiceConfig] { config.services.filter { $0.mode == .nat } }

    static func family(_ svc: ServiceConfig) -> UInt16 {
        svc.binds.first?.address.family == AF_INET6 ? UInt16(NFPROTO_IPV6) : UInt16(NFPROTO_IPV4)
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
            for (k, svc) in table.services.enumerated() where svc.config.mode == .nat {
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
                desired(&st, svc)
                next[svc.name] = st
            }
            let unchanged = next.values.filter { st in
                services[st.name].map { $0.same(as: st) && $0.weights == st.weights && $0.slots == st.slots } ?? false
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
                logger.info("nat: reload: \(changes.isEmpty ? "no change" : changes.joined(separator: ", ")); \(unchanged) services untouched")
            }
            services = next
            self.table = table
        }
    }

    /// Sends `next` to the kernel, one atomic batch per family: the tables whole (`whole`, and
    /// for a family new to the kernel), or the difference from what is loaded. Returns what
    /// changed, for the log. Call with the lock held.
    private func program(_ next: [String: ServiceState], whole: Bool) throws(NatError) -> [String] {
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
            } else if whole || !families.contains(fam) {
                // Replace: create (so delete cannot fail), delete, create again.
                b.table(tn, NFT_MSG_NEWTABLE.rawValue)
                b.table(tn, NFT_MSG_DELTABLE.rawValue)
                b.table(tn, NFT_MSG_NEWTABLE.rawValue)
                build(b, mine)
                changes.append("table \(b.familyName) \(tn) \(families.contains(fam) ? "replaced" : "created")")
            } else {
                let before = changes.count
                for old in services.values.filter({ $0.family == fam }).sorted(by: { $0.id < $1.id }) {
                    if let st = next[old.name], st.same(as: old) { continue }
                    removeService(b, old, keeping: NatController.keptServers(old, next[old.name]))
                    if next[old.name]?.family != fam { changes.append("\(old.name) removed") }
                }
                for st in mine {
                    let old = services[st.name]
                    if let old, old.same(as: st) {
                        // Same objects: only the maps' contents may differ (weights, backups).
                        if updateMaps(b, st, loaded: old) { changes.append("\(st.name) maps updated") }
                        continue
                    }
                    addService(b, st, keeping: NatController.keptServers(old, st))
                    changes.append(old?.family == fam ? "\(st.name) rebuilt" : "\(st.name) added")
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
    private var held = false

    /// A reload failed part-way: the next apply replaces the tables instead of diffing.
    private var drifted = false

    /// The id this run gave last (new services on reload take the next one).
    private var highestId: UInt32 = 0

    /// Servers of a rebuilt service whose per-server chain (and so its counters) can stay: same
    /// service id, same position, same name and address.
    static func keptServers(_ old: ServiceState?, _ new: ServiceState?) -> Set<Int> {
        guard let old, let new, old.id == new.id, old.family == new.family else { return [] }
        let a = old.config.servers, b = new.config.servers
        return Set((0..<min(a.count, b.count)).filter { a[$0].name == b[$0].name && a[$0].address == b[$0].address })
    }

    /// Removes the tables (stop), unless they are to outlive the process.
    public func remove() {
        lock.withLock { _ in
            for fam in families {
                let b = socket.newBatch(family: fam)
                b.table(NatController.tableName, NFT_MSG_NEWTABLE.rawValue)
                b.table(NatController.tableName, NFT_MSG_DELTABLE.rawValue)
                b.finish()
                do { try socket.send(b) } catch { logger.error("nat: cannot remove table \(NatController.tableName): \(error)") }
            }
            families = []
        }
    }

    /// The shared part of a family's table, then every service's objects.
    private func build(_ b: NftBatch, _ list: [ServiceState]) {
        let t = NatController.tableName
        let v6 = b.family == UInt16(NFPROTO_IPV6)
        b.chain(t, "prerouting", hook: UInt32(NF_INET_PRE_ROUTING.rawValue), priority: -100)
        b.chain(t, "output", hook: UInt32(NF_INET_LOCAL_OUT.rawValue), priority: -100)
        b.chain(t, "postrouting", hook: UInt32(NF_INET_POST_ROUTING.rawValue), priority: 100)
        // Per-server traffic counters on the forward path: `ct mark vmap @traffic` jumps to the
        // server's chain, which counts new connections and bytes each way (one map lookup and
        // three cheap rules per packet, whatever the number of servers).
        b.chain(t, "forward", hook: UInt32(NF_INET_FORWARD.rawValue), priority: 0, type: "filter")
        // Services are found by one lookup of `daddr . dport` (whatever their number), and each
        // service's objects are its own: a reload adds or removes elements, never base rules.
        b.map(t, "services", keyType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), keyLen: v6 ? 20 : 8, dataType: NFT_DATA_VERDICT.rawValue)
        b.map(t, "source-nat", dataType: NFT_DATA_VERDICT.rawValue)
        b.map(t, "traffic", dataType: NFT_DATA_VERDICT.rawValue)
        for chain in ["prerouting", "output"] {
            b.rule(
                t, chain,
                [
                    Expr.metaL4proto(Expr.reg1), Expr.cmpEq(Expr.reg1, [UInt8(IPPROTO_TCP)]),
                    Expr.payload(network: true, offset: v6 ? 24 : 16, len: v6 ? 16 : 4, dreg: Expr.reg1),
                    Expr.payload(network: false, offset: 2, len: 2, dreg: Expr.reg32(v6 ? 4 : 1)),
                    Expr.vmap("services", setID: b.setID("services"), sreg: Expr.reg1),
                ], "daddr . dport → service")
        }
        b.rule(t, "forward", [Expr.ctMarkLoad(Expr.reg1), Expr.vmap("traffic", setID: b.setID("traffic"), sreg: Expr.reg1)], "per-server counters")
        // Flows Ballast did not balance are none of postrouting's business. The rule also keeps
        // a conntrack expression in the table at all times: the kernel turns conntrack off in
        // a namespace when the last one goes, and established flows would lose their NAT the
        // moment a service's chain is emptied (no usable server).
        b.rule(t, "postrouting", [Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000), Expr.cmpEq(Expr.reg1, [0, 0, 0, 0]), Expr.accept()], "not balanced by Ballast")
        b.rule(t, "postrouting", [Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000), Expr.vmap("source-nat", setID: b.setID("source-nat"), sreg: Expr.reg1)], "service → its source NAT")
        for st in list { addService(b, st, keeping: []) }
    }

    /// A service's own objects: its chain and maps, its servers' counter chains, its source-NAT
    /// chain, and its elements in the shared maps. `keeping`: servers whose chain exists already.
    private func addService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        b.chain(t, st.chain)
        b.map(t, st.backends, interval: false, dataType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), dataLen: v6 ? 20 : 8)
        b.elements(t, st.backends, st.config.servers.enumerated().map { j, s in
            NftBatch.Element(key: le(st.marks[j]), data: NatController.addressData(s.address))
        })
        if st.config.balance == .source {
            b.map(t, st.sched, interval: false, dataType: 19, dataLen: 4, size: UInt32(st.config.hashTableSize))
            let slots = slotElements(st, Array(st.slots.indices))
            if !slots.isEmpty { b.elements(t, st.sched, slots) }
        } else {
            b.map(t, st.sched, interval: true, dataType: 19, dataLen: 4)
            let ranges = rangeElements(st)
            if !ranges.isEmpty { b.elements(t, st.sched, ranges) }
        }
        schedRule(b, st)
        let fresh = st.config.servers.indices.filter { !keeping.contains($0) }
        for j in fresh {
            let chain = st.serverChain(j)
            b.chain(t, chain)
            b.rule(t, chain, Expr.ctStateNew(Expr.reg1) + [Expr.counter()], "\(chain): new connections")
            b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: false) + [Expr.counter()], "\(chain): client to server")
            b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: true) + [Expr.counter()], "\(chain): server to client")
        }
        if !fresh.isEmpty { b.elements(t, "traffic", fresh.map { NftBatch.Element(key: le(st.marks[$0]), data: nil, jump: st.serverChain($0)) }) }
        switch st.config.snat {
        case .none: break
        case .masquerade:
            b.chain(t, st.snatChain)
            b.rule(t, st.snatChain, [Expr.masquerade()], "\(st.name): masquerade")
        case .address(let a):
            b.chain(t, st.snatChain)
            let nfproto = UInt32(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4)
            b.rule(t, st.snatChain, [Expr.immediate(Expr.reg1, NatController.hostBytes(a)), Expr.snat(family: nfproto, addrReg: Expr.reg1)], "\(st.name): snat to \(a.hostText)")
        }
        if st.config.snat != .none { b.elements(t, "source-nat", [NftBatch.Element(key: le(st.id << 16), data: nil, jump: st.snatChain)]) }
        b.elements(t, "services", st.config.binds.map { NftBatch.Element(key: NatController.addressData($0.address), data: nil, jump: st.chain, goto: true) })
    }

    /// Takes a service's objects out (the reverse order of `addService`: references first).
    private func removeService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        b.elements(t, "services", st.config.binds.map { NftBatch.Element(key: NatController.addressData($0.address), data: nil) }, delete: true)
        if st.config.snat != .none {
            b.elements(t, "source-nat", [NftBatch.Element(key: le(st.id << 16), data: nil)], delete: true)
            b.flushChain(t, st.snatChain)
            b.deleteChain(t, st.snatChain)
        }
        let gone = st.config.servers.indices.filter { !keeping.contains($0) }
        if !gone.isEmpty { b.elements(t, "traffic", gone.map { NftBatch.Element(key: le(st.marks[$0]), data: nil) }, delete: true) }
        for j in gone {
            b.flushChain(t, st.serverChain(j))
            b.deleteChain(t, st.serverChain(j))
        }
        b.flushChain(t, st.chain)
        b.deleteChain(t, st.chain)
        b.deleteMap(t, st.backends)
        b.deleteMap(t, st.sched)
    }

    // MARK: - Expressions

    /// The service chain's one rule: pick a server mark, tag the flow, DNAT to that server.
    private func schedRule(_ b: NftBatch, _ st: ServiceState) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        var e: [OpaquePointer] = []
        switch st.config.balance {
        case .source:
            let withPort = st.config.hashKey == .sourcePort
            // Source address (and port) in consecutive 32-bit registers from reg 2, hashed like
            // SourceHash in proxy mode: the same Maglev slot for the same client.
            e.append(Expr.payload(network: true, offset: v6 ? 8 : 12, len: v6 ? 16 : 4, dreg: Expr.reg2))
            if withPort { e.append(Expr.payload(network: false, offset: 0, len: 2, dreg: Expr.reg32(v6 ? 8 : 5))) }
            let len: UInt32 = (v6 ? 16 : 4) + (withPort ? 4 : 0)
            e.append(Expr.jhash(sreg: Expr.reg2, len: len, modulus: UInt32(st.config.hashTableSize), seed: SourceHash.seed, dreg: Expr.reg1))
            e.append(Expr.lookup(st.sched, setID: b.setID(st.sched), sreg: Expr.reg1, dreg: Expr.reg1))
        default:
            let total = st.weights.reduce(0, +)
            guard total > 0 else { return }  // nothing usable: no NAT; the client gets a reset
            e.append(Expr.numgen(random: st.config.balance == .random, modulus: UInt32(total), dreg: Expr.reg1))
            e.append(Expr.hton(Expr.reg1))
            e.append(Expr.lookup(st.sched, setID: b.setID(st.sched), sreg: Expr.reg1, dreg: Expr.reg1))
        }
        e.append(Expr.ctMarkSet(Expr.reg1))
        b.rule(t, st.chain, e, "\(st.name): \(st.config.balance.rawValue)")
        // Then DNAT to the server the mark names (two rules, the shape nft itself prints).
        b.rule(
            t, st.chain,
            [
                Expr.metaL4proto(Expr.reg1), Expr.cmpEq(Expr.reg1, [UInt8(IPPROTO_TCP)]), Expr.ctMarkLoad(Expr.reg1),
                Expr.lookup(st.backends, setID: b.setID(st.backends), sreg: Expr.reg1, dreg: Expr.reg1),
                Expr.dnat(family: UInt32(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4), addrReg: Expr.reg1, protoReg: Expr.reg32(v6 ? 4 : 1)),
            ], "\(st.name): dnat")
    }

    private func le(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    private func be(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    static func hostBytes(_ a: SocketAddress) -> [UInt8] {
        switch a {
        case .v4(let s): return withUnsafeBytes(of: s.sin_addr) { Array($0) }
        case .v6(let s): return withUnsafeBytes(of: s.sin6_addr) { Array($0) }
        }
    }

    /// `address . port` as nftables stores a concatenation: each field in 32-bit words.
    static func addressData(_ a: SocketAddress) -> [UInt8] {
        hostBytes(a) + [UInt8(a.port >> 8), UInt8(a.port & 0xff), 0, 0]
    }

    /// Weighted ranges `lo-hi : mark` over the usable servers (big-endian keys, interval ends).
    private func rangeElements(_ st: ServiceState) -> [NftBatch.Element] {
        var out: [NftBatch.Element] = []
        var lo: UInt32 = 0
        for (j, w) in st.weights.enumerated() where w > 0 {
            out.append(NftBatch.Element(key: be(lo), data: le(st.marks[j])))
            lo += UInt32(w)
            out.append(NftBatch.Element(key: be(lo), data: nil, intervalEnd: true))
        }
        return out
    }

    private func slotElements(_ st: ServiceState, _ slots: [Int]) -> [NftBatch.Element] {
        slots.compactMap { k in
            let s = st.slots[k]
            return s < 0 ? nil : NftBatch.Element(key: le(UInt32(k)), data: le(st.marks[Int(s)]))
        }
    }

    // MARK: - Desired state

    /// Usable weights (or the Maglev table) from health and admin state, with proxy mode's tier
    /// rule: backups only when no active server is usable, the first one unless `allbackups`.
    private func desired(_ st: inout ServiceState, _ svc: Service) {
        let servers = svc.servers
        var w = servers.indices.map { i in !svc.backupFlags[i] && servers[i].usable ? servers[i].weight : 0 }
        if w.allSatisfy({ $0 == 0 }) {
            for i in svc.backupIndices where servers[i].usable {
                w[i] = servers[i].weight
                if !svc.config.allbackups { break }
            }
        }
        st.weights = w
        if st.config.balance == .source {
            st.slots = MaglevTable(names: servers.map(\.name), weights: w, size: st.config.hashTableSize).entries
        }
    }

    /// Brings one service's maps from what is loaded to what `st` wants. Roundrobin/random
    /// replace their ranges and rule; source replaces only the Maglev slots that changed.
    /// False when there is nothing to change.
    private func updateMaps(_ b: NftBatch, _ st: ServiceState, loaded before: ServiceState) -> Bool {
        if st.weights == before.weights && st.slots == before.slots { return false }
        let tn = NatController.tableName
        if st.config.balance == .source {
            var changed: [Int] = []
            for k in st.slots.indices where k >= before.slots.count || st.slots[k] != before.slots[k] { changed.append(k) }
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
            for svc in table.services where svc.config.mode == .nat {
                guard var st = services[svc.name] else { continue }
                let before = st
                desired(&st, svc)
                if st.weights == before.weights && st.slots == before.slots { continue }
                changed = true
                let b = socket.newBatch(family: st.family)
                _ = updateMaps(b, st, loaded: before)
                b.finish()
                do {
                    try socket.send(b)
                    services[svc.name] = st
                } catch {
                    // The kernel's tables are not what Ballast loaded (a flushed ruleset, a
                    // deleted chain): put them back whole, with every service as it should be now.
                    logger.warning("nat: the kernel refused the update of service \(svc.name) (\(error)); replacing the tables whole")
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
    private func reprogramWhole(_ table: ServiceTable) {
        var next = services
        for svc in table.services where svc.config.mode == .nat {
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
            guard let st = services[service], let j = table?.services.first(where: { $0.name == service })?.servers.firstIndex(where: { $0 === server }) else { return }
            do {
                try socket.flushConntrack(mark: st.marks[j], family: st.family == UInt16(NFPROTO_IPV6) ? UInt8(AF_INET6) : UInt8(AF_INET))
                logger.info("nat: flushed the connections of \(service)/\(server.name) (mark 0x\(String(st.marks[j], radix: 16)))")
            } catch {
                logger.error("nat: cannot flush the connections of \(service)/\(server.name): \(error)")
            }
        }
    }

    /// The kernel's view of one nat server: its live flows (conntrack entries with its mark) and,
    /// with conntrack accounting on, their packets and bytes. Read at most once a second.
    public func flowStats(service: String, server: Int) -> FlowStats {
        lock.withLock { _ in
            let now = monotonicMillis()
            if now - flowStatsAt > 1000 {
                var all: [UInt32: FlowStats] = [:]
                for fam in families {
                    // Live flows from conntrack; cumulative connections and bytes from the counters.
                    if let m = try? socket.conntrackByMark(family: fam == UInt16(NFPROTO_IPV6) ? UInt8(AF_INET6) : UInt8(AF_INET)) {
                        for (mark, f) in m { all[mark, default: FlowStats()].flows += f.flows }
                    }
                    guard let rules = try? socket.ruleCounters(family: fam, table: NatController.tableName) else { continue }
                    for st in services.values where st.family == fam {
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
                                }
                            }
                            all[st.marks[j]] = f
                        }
                    }
                }
                flowStatsCache = all
                flowStatsAt = now
            }
            guard let st = services[service], server < st.marks.count else { return FlowStats() }
            return flowStatsCache[st.marks[server]] ?? FlowStats()
        }
    }

    private var flowStatsCache: [UInt32: FlowStats] = [:]
    private var flowStatsAt: Int64 = 0

    public func isNat(_ service: String) -> Bool { lock.withLock { _ in services[service] != nil } }

    // MARK: - Thread

    /// Follows every state change (checks, runtime API, reload) as it happens.
    public func start() {
        wakeFd = ballast_eventfd(0)
        ServerStateClock.notifyFd.store(wakeFd, ordering: .relaxed)
        thread = NamedThread.start("ballast-nat") { self.loop() }
    }

    private func loop() {
        var pfd = pollfd(fd: wakeFd, events: Int16(POLLIN), revents: 0)
        var verified = monotonicMillis()
        while !stopping.load(ordering: .relaxed) {
            let r = poll(&pfd, 1, 1000)
            if r > 0 {
                var v: UInt64 = 0
                _ = read(wakeFd, &v, 8)
            }
            if stopping.load(ordering: .relaxed) { break }
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
                guard let exists = try? socket.tableExists(family: fam, name: NatController.tableName), !exists else { continue }
                logger.warning("nat: table \(fam == UInt16(NFPROTO_IPV6) ? "ip6" : "ip") \(NatController.tableName) is gone from the kernel (flushed by another tool?); programming it again")
                reprogramWhole(table)
                return
            }
        }
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        ServerStateClock.notifyFd.store(-1, ordering: .relaxed)
        if wakeFd >= 0 {
            var one: UInt64 = 1
            _ = write(wakeFd, &one, 8)
        }
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        if wakeFd >= 0 { close(wakeFd) }
        wakeFd = -1
    }

    // MARK: - nft syntax

    /// The ruleset Ballast owns, in `nft` syntax, as it is programmed now.
    public func render() -> String {
        let us = lastApplyMicros.load(ordering: .relaxed)
        let full = lastFullApplyMicros.load(ordering: .relaxed)
        return lock.withLock { _ in
            "# last full programming: \(full) us; last state change applied in \(us) us\n" + NatController.render(Array(services.values))
        }
    }

    static func render(_ list: [ServiceState]) -> String {
        var out = ""
        for fam in [UInt16(NFPROTO_IPV4), UInt16(NFPROTO_IPV6)] {
            let sv = list.filter { $0.family == fam }.sorted { $0.id < $1.id }
            if sv.isEmpty { continue }
            let v6 = fam == UInt16(NFPROTO_IPV6)
            let ip = v6 ? "ip6" : "ip"
            let addrType = v6 ? "ipv6_addr" : "ipv4_addr"
            func map(_ name: String, _ type: String, _ elements: [String], extra: String = "", typeof: String? = nil) -> String {
                var m = "\tmap \(name) {\n\t\t\(typeof.map { "typeof \($0)" } ?? "type \(type)")\n\(extra)"
                if !elements.isEmpty { m += "\t\telements = { \(elements.joined(separator: ", ")) }\n" }
                return m + "\t}\n"
            }
            out += "table \(ip) \(tableName) {\n"
            out += map("services", "\(addrType) . inet_service : verdict", sv.flatMap { st in
                st.config.binds.map { "\($0.address.hostText) . \($0.address.port) : goto \(st.chain)" }
            })
            out += map("source-nat", "mark : verdict", sv.filter { $0.config.snat != .none }.map { "0x\(hex8($0.id << 16)) : jump \($0.snatChain)" })
            out += map("traffic", "mark : verdict", sv.flatMap { st in st.config.servers.indices.map { "0x\(hex8(st.marks[$0])) : jump \(st.serverChain($0))" } })
            for st in sv {
                out += map(st.backends, "mark : \(addrType) . inet_service", st.config.servers.enumerated().map { j, s in
                    "0x\(hex8(st.marks[j])) : \(s.address.hostText) . \(s.address.port)"
                })
                // `typeof` (not `type mark : mark`): nft reads a map keyed by a hash or a
                // counter back only when told which expression fills the key.
                let total = st.weights.reduce(0, +)
                if st.config.balance == .source {
                    let used = st.slots.filter { $0 >= 0 }.count
                    let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
                    out += map(
                        st.sched, "", [],
                        extra: "\t\tsize \(st.config.hashTableSize)\n\t\t# \(used) Maglev slots\n",
                        typeof: "jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) : ct mark")
                } else {
                    var lo = 0
                    var ranges: [String] = []
                    for (j, w) in st.weights.enumerated() where w > 0 {
                        ranges.append(w == 1 ? "\(lo) : 0x\(hex8(st.marks[j]))" : "\(lo)-\(lo + w - 1) : 0x\(hex8(st.marks[j]))")
                        lo += w
                    }
                    let gen = st.config.balance == .random ? "random" : "inc"
                    out += map(st.sched, "", ranges, extra: "\t\tflags interval\n", typeof: "numgen \(gen) mod \(max(1, total)) : ct mark")
                }
            }
            for hook in ["prerouting", "output"] {
                out += "\tchain \(hook) {\n\t\ttype nat hook \(hook) priority \(hook == "output" ? "-100" : "dstnat"); policy accept;\n"
                out += "\t\tmeta l4proto tcp \(ip) daddr . tcp dport vmap @services\n\t}\n"
            }
            out += "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            out += "\t\tct mark 0x00000000/16 accept\n\t\tct mark & 0xffff0000 vmap @source-nat\n\t}\n"
            out += "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct mark vmap @traffic\n\t}\n"
            for st in sv {
                out += "\tchain \(st.chain) {\n"
                let total = st.weights.reduce(0, +)
                if st.config.balance == .source {
                    let key = st.config.hashKey == .sourcePort ? "\(ip) saddr . tcp sport" : "\(ip) saddr"
                    out += "\t\tct mark set jhash \(key) mod \(st.config.hashTableSize) seed 0x\(hex8(SourceHash.seed)) map @\(st.sched)\n"
                    out += "\t\tmeta l4proto tcp dnat \(ip) to ct mark map @\(st.backends)\n"
                } else if total > 0 {
                    out += "\t\tct mark set numgen \(st.config.balance == .random ? "random" : "inc") mod \(total) map @\(st.sched)\n"
                    out += "\t\tmeta l4proto tcp dnat \(ip) to ct mark map @\(st.backends)\n"
                }
                out += "\t}\n"
                switch st.config.snat {
                case .none: break
                case .masquerade: out += "\tchain \(st.snatChain) {\n\t\tmasquerade\n\t}\n"
                case .address(let a): out += "\tchain \(st.snatChain) {\n\t\tsnat \(ip) to \(a.hostText)\n\t}\n"
                }
                for j in st.config.servers.indices {
                    out += "\tchain \(st.serverChain(j)) {\n\t\tct state new counter\n\t\tct direction original counter\n\t\tct direction reply counter\n\t}\n"
                }
            }
            out += "}\n"
        }
        return out
    }

    static func hex8(_ v: UInt32) -> String {
        let h = String(v, radix: 16)
        return String(repeating: "0", count: max(0, 8 - h.count)) + h
    }

    /// The ruleset a config would program with every server up (for `ballast nft show -c`).
    public static func render(config: Config) -> String {
        let table = ServiceTable.build(config: config, generation: 0, previous: nil, now: 0)
        var list: [ServiceState] = []
        for (k, svc) in table.services.enumerated() where svc.config.mode == .nat {
            let id = UInt32(k + 1)
            var st = ServiceState(
                name: svc.name, id: id, family: family(svc.config), config: svc.config,
                marks: svc.servers.indices.map { (id << 16) | UInt32($0 + 1) })
            let w = svc.servers.indices.map { i in svc.backupFlags[i] ? 0 : svc.servers[i].weight }
            st.weights = w
            if st.config.balance == .source {
                st.slots = MaglevTable(names: svc.servers.map(\.name), weights: w, size: st.config.hashTableSize).entries
            }
            list.append(st)
        }
        return render(list)
    }
}
