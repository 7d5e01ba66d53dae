import BallastCore
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
///   map be-<svc> { type mark : ipv4_addr . inet_service }          server mark → address . port
///   map rr-<svc> { type mark : mark; flags interval }              roundrobin/random: weight ranges → mark
///   map mg-<svc> { type mark : mark }                              source: Maglev slot → mark
///   chain prerouting { type nat hook prerouting priority dstnat; ip daddr V tcp dport P goto svc-<svc> }
///   chain output     { type nat hook output priority dstnat;     (the same, for the host's own clients) }
///   chain postrouting { type nat hook postrouting priority srcnat; ct mark & 0xffff0000 == S masquerade }
///   chain svc-<svc>  { ct mark set numgen inc mod W map @rr-<svc> dnat to ct mark map @be-<svc> }
/// }
/// ```
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

    /// Start and reload: replaces each family's `ballast` table in one atomic batch, whatever
    /// was there (a crashed run's leftovers included). Established flows keep their server:
    /// NAT rules see only the first packet of a connection.
    public func apply(_ table: ServiceTable) throws(NatError) {
        var t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t1)
        defer {
            var t2 = timespec()
            clock_gettime(CLOCK_MONOTONIC, &t2)
            lastFullApplyMicros.store(Int(t2.tv_sec - t1.tv_sec) * 1_000_000 + Int(t2.tv_nsec - t1.tv_nsec) / 1000, ordering: .relaxed)
        }
        try lock.withLock { (_: inout Void) throws(NatError) in
            flowStatsAt = 0  // the next read asks the kernel again
            var next: [String: ServiceState] = [:]
            for (k, svc) in table.services.enumerated() where svc.config.mode == .nat {
                let id = UInt32(k + 1)
                var st = ServiceState(
                    name: svc.name, id: id, family: NatController.family(svc.config), config: svc.config,
                    marks: svc.servers.indices.map { (id << 16) | UInt32($0 + 1) })
                desired(&st, svc)
                next[svc.name] = st
            }
            let fams = Set(next.values.map(\.family))
            // Reload with the nat services unchanged: nothing to reprogram (the counters and the
            // maps stay as they are); only the table's server objects are followed from now on.
            if self.table != nil && fams == families && next.count == services.count
                && next.allSatisfy({ name, st in
                    guard let old = services[name] else { return false }
                    return old.id == st.id && old.family == st.family && old.config == st.config
                })
            {
                self.table = table
                return
            }
            for fam in fams.union(families) {
                let b = socket.newBatch(family: fam)
                // Replace: create (so delete cannot fail), delete, create again.
                b.table(NatController.tableName, NFT_MSG_NEWTABLE.rawValue)
                b.table(NatController.tableName, NFT_MSG_DELTABLE.rawValue)
                if fams.contains(fam) {
                    b.table(NatController.tableName, NFT_MSG_NEWTABLE.rawValue)
                    build(b, next.values.filter { $0.family == fam }.sorted { $0.id < $1.id })
                }
                b.finish()
                try socket.send(b)
            }
            services = next
            families = fams
            self.table = table
        }
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

    private func build(_ b: NftBatch, _ list: [ServiceState]) {
        let t = NatController.tableName
        b.chain(t, "prerouting", hook: UInt32(NF_INET_PRE_ROUTING.rawValue), priority: -100)
        b.chain(t, "output", hook: UInt32(NF_INET_LOCAL_OUT.rawValue), priority: -100)
        b.chain(t, "postrouting", hook: UInt32(NF_INET_POST_ROUTING.rawValue), priority: 100)
        // Per-server traffic counters on the forward path: `ct mark vmap @traffic` jumps to the
        // server's chain, which counts new connections and bytes each way (one map lookup and
        // three cheap rules per packet, whatever the number of servers).
        b.chain(t, "forward", hook: UInt32(NF_INET_FORWARD.rawValue), priority: 0, type: "filter")
        var jumps: [NftBatch.Element] = []
        for st in list {
            for j in st.config.servers.indices {
                let chain = "srv-\(st.name)-\(j + 1)"
                b.chain(t, chain)
                b.rule(t, chain, Expr.ctStateNew(Expr.reg1) + [Expr.counter()], "\(chain): new connections")
                b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: false) + [Expr.counter()], "\(chain): client to server")
                b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: true) + [Expr.counter()], "\(chain): server to client")
                jumps.append(NftBatch.Element(key: le(st.marks[j]), data: nil, jump: chain))
            }
        }
        b.map(t, "traffic", dataType: NFT_DATA_VERDICT.rawValue)
        if !jumps.isEmpty { b.elements(t, "traffic", jumps) }
        b.rule(t, "forward", [Expr.ctMarkLoad(Expr.reg1), Expr.vmap("traffic", setID: b.setID("traffic"), sreg: Expr.reg1)], "per-server counters")
        // Flows Ballast did not balance are none of postrouting's business. The rule also keeps
        // a conntrack expression in the table at all times: the kernel turns conntrack off in
        // a namespace when the last one goes, and established flows would lose their NAT the
        // moment a service's chain is emptied (no usable server).
        b.rule(t, "postrouting", [Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000), Expr.cmpEq(Expr.reg1, [0, 0, 0, 0]), Expr.accept()], "not balanced by Ballast")
        for st in list {
            let v6 = st.family == UInt16(NFPROTO_IPV6)
            b.chain(t, st.chain)
            b.map(t, st.backends, interval: false, dataType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), dataLen: v6 ? 20 : 8)
            b.elements(t, st.backends, st.config.servers.enumerated().map { j, s in
                NftBatch.Element(key: le(st.marks[j]), data: NatController.addressData(s.address))
            })
            if st.config.balance == .source {
                b.map(t, st.sched, interval: false, dataType: 19, dataLen: 4, size: UInt32(st.config.hashTableSize))
                b.elements(t, st.sched, slotElements(st, Array(st.slots.indices)))
            } else {
                b.map(t, st.sched, interval: true, dataType: 19, dataLen: 4)
                b.elements(t, st.sched, rangeElements(st))
            }
            schedRule(b, st)
            for bind in st.config.binds {
                for chain in ["prerouting", "output"] {
                    b.rule(t, chain, matchRule(bind.address) + [Expr.goto(st.chain)], "\(bind.address) → \(st.chain)")
                }
            }
            switch st.config.snat {
            case .none: break
            case .masquerade:
                b.rule(t, "postrouting", markMatch(st) + [Expr.masquerade()], "\(st.name): masquerade")
            case .address(let a):
                let nfproto = UInt32(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4)
                b.rule(t, "postrouting", markMatch(st) + [Expr.immediate(Expr.reg1, NatController.hostBytes(a)), Expr.snat(family: nfproto, addrReg: Expr.reg1)], "\(st.name): snat to \(a.hostText)")
            }
        }
    }

    // MARK: - Expressions

    /// `ip daddr V tcp dport P` (or `ip6 daddr`).
    private func matchRule(_ a: SocketAddress) -> [OpaquePointer] {
        let v6 = a.family == AF_INET6
        return [
            Expr.payload(network: true, offset: v6 ? 24 : 16, len: v6 ? 16 : 4, dreg: Expr.reg1),
            Expr.cmpEq(Expr.reg1, NatController.hostBytes(a)),
            Expr.metaL4proto(Expr.reg1),
            Expr.cmpEq(Expr.reg1, [UInt8(IPPROTO_TCP)]),
            Expr.payload(network: false, offset: 2, len: 2, dreg: Expr.reg1),
            Expr.cmpEq(Expr.reg1, [UInt8(a.port >> 8), UInt8(a.port & 0xff)]),
        ]
    }

    /// `ct mark & 0xffff0000 == service id << 16`.
    private func markMatch(_ st: ServiceState) -> [OpaquePointer] {
        [Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000), Expr.cmpEq(Expr.reg1, le(st.id << 16))]
    }

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

    /// Brings the maps in step with health and admin state: one atomic batch per changed
    /// service. Roundrobin/random replace their ranges and rule; source replaces only the
    /// Maglev slots that changed.
    public func sync() {
        var t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t1)
        var changed = false
        lock.withLock { _ in
            guard let table else { return }
            for svc in table.services where svc.config.mode == .nat {
                guard var st = services[svc.name] else { continue }
                let before = st
                desired(&st, svc)
                if st.weights == before.weights && st.slots == before.slots { continue }
                changed = true
                let b = socket.newBatch(family: st.family)
                let tn = NatController.tableName
                if st.config.balance == .source {
                    var changed: [Int] = []
                    for k in st.slots.indices where st.slots[k] != before.slots[k] { changed.append(k) }
                    let removed = changed.filter { before.slots[$0] >= 0 }
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
                b.finish()
                do {
                    try socket.send(b)
                    services[svc.name] = st
                } catch {
                    logger.error("nat: cannot update service \(svc.name): \(error); the kernel keeps the previous map")
                }
            }
        }
        guard changed else { return }
        var t2 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t2)
        let us = Int(t2.tv_sec - t1.tv_sec) * 1_000_000 + Int(t2.tv_nsec - t1.tv_nsec) / 1000
        lastApplyMicros.store(us, ordering: .relaxed)
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
                                case "new": f.newConnections = packets
                                case "original":
                                    f.packetsIn = packets
                                    f.bytesIn = bytes
                                case "reply":
                                    f.packetsOut = packets
                                    f.bytesOut = bytes
                                default: break
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
        let box = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        pthread_create(
            &tid, nil,
            { arg in
                let c = Unmanaged<NatController>.fromOpaque(arg!).takeRetainedValue()
                ballast_set_thread_name("ballast-nat")
                c.loop()
                return nil
            }, box)
        thread = tid
    }

    private func loop() {
        var pfd = pollfd(fd: wakeFd, events: Int16(POLLIN), revents: 0)
        while !stopping.load(ordering: .relaxed) {
            let r = poll(&pfd, 1, 1000)
            if r > 0 {
                var v: UInt64 = 0
                _ = read(wakeFd, &v, 8)
            }
            if stopping.load(ordering: .relaxed) { break }
            sync()
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
            out += "table \(ip) \(tableName) {\n"
            for st in sv {
                let elems = st.config.servers.enumerated().map { j, s in
                    "0x\(hex8(st.marks[j])) : \(s.address.hostText) . \(s.address.port)"
                }
                out += "\tmap \(st.backends) {\n\t\ttype mark : \(addrType) . inet_service\n\t\telements = { \(elems.joined(separator: ", ")) }\n\t}\n"
                if st.config.balance == .source {
                    let used = st.slots.filter { $0 >= 0 }.count
                    out += "\tmap \(st.sched) {\n\t\ttype mark : mark\n\t\tsize \(st.config.hashTableSize)\n\t\t# \(used) Maglev slots\n\t}\n"
                } else {
                    var lo = 0
                    var ranges: [String] = []
                    for (j, w) in st.weights.enumerated() where w > 0 {
                        ranges.append(w == 1 ? "\(lo) : 0x\(hex8(st.marks[j]))" : "\(lo)-\(lo + w - 1) : 0x\(hex8(st.marks[j]))")
                        lo += w
                    }
                    out += "\tmap \(st.sched) {\n\t\ttype mark : mark\n\t\tflags interval\n"
                    if !ranges.isEmpty { out += "\t\telements = { \(ranges.joined(separator: ", ")) }\n" }
                    out += "\t}\n"
                }
            }
            for (hook, prio) in [("prerouting", "dstnat"), ("output", "dstnat")] {
                out += "\tchain \(hook) {\n\t\ttype nat hook \(hook == "output" ? "output" : "prerouting") priority \(prio); policy accept;\n"
                for st in sv {
                    for b in st.config.binds { out += "\t\t\(ip) daddr \(b.address.hostText) tcp dport \(b.address.port) goto \(st.chain)\n" }
                }
                out += "\t}\n"
            }
            let jumps = sv.flatMap { st in st.config.servers.indices.map { "0x\(hex8(st.marks[$0])) : jump srv-\(st.name)-\($0 + 1)" } }
            out += "\tmap traffic {\n\t\ttype mark : verdict\n\t\telements = { \(jumps.joined(separator: ", ")) }\n\t}\n"
            out += "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct mark vmap @traffic\n\t}\n"
            for st in sv {
                for j in st.config.servers.indices {
                    out += "\tchain srv-\(st.name)-\(j + 1) {\n\t\tct state new counter\n\t\tct direction original counter\n\t\tct direction reply counter\n\t}\n"
                }
            }
            out += "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            out += "\t\tct mark 0x00000000/16 accept\n"
            for st in sv {
                switch st.config.snat {
                case .none: break
                case .masquerade: out += "\t\tct mark 0x\(hex8(st.id << 16))/16 masquerade\n"
                case .address(let a): out += "\t\tct mark 0x\(hex8(st.id << 16))/16 snat \(ip) to \(a.hostText)\n"
                }
            }
            out += "\t}\n"
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
