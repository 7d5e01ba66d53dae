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

/// The plan as netlink objects: the tables, base chains and shared maps, a service's chains, maps
/// and elements, and the expressions of its scheduling rule (one batch per family).
extension NatController {
    func build(_ b: NftBatch, _ list: [ServiceState]) {
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
        b.map(
            t, "services", keyType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), keyLen: v6 ? 20 : 8,
            dataType: NFT_DATA_VERDICT.rawValue)
        b.map(t, "source-nat", dataType: NFT_DATA_VERDICT.rawValue)
        b.map(t, "traffic", dataType: NFT_DATA_VERDICT.rawValue)
        // A server's packet that opens no flow this node knows (`ct state new` from a server's
        // address and port: the node took a flow over before conntrackd committed its entry,
        // or lost it) would go out to the client with the server's address, and the client's
        // reset would kill the connection. Dropped instead: the server sends it again, and by
        // then the entry is there (committed, or picked up from the client's next packet).
        b.keySet(t, "replies", keyType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), keyLen: v6 ? 20 : 8)
        b.rule(
            t, "forward",
            Expr.ctStateNew(Expr.reg1) + [
                Expr.metaL4proto(Expr.reg1), Expr.cmpEq(Expr.reg1, [UInt8(IPPROTO_TCP)]),
                Expr.payload(network: true, offset: v6 ? 8 : 12, len: v6 ? 16 : 4, dreg: Expr.reg1),
                Expr.payload(network: false, offset: 0, len: 2, dreg: Expr.reg32(v6 ? 4 : 1)),
                Expr.match("replies", setID: b.setID("replies"), sreg: Expr.reg1, invert: false), Expr.counter(),
                Expr.drop(),
            ], "a server's packet of a flow this node does not track")
        let ends = NatController.replyEnds(list)
        if !ends.isEmpty {
            b.elements(
                t, "replies",
                ends.sorted { $0.description < $1.description }.map {
                    NftBatch.Element(key: NatController.addressData($0), data: nil)
                })
        }
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
        b.rule(
            t, "forward",
            [Expr.ctMarkLoad(Expr.reg1), Expr.vmap("traffic", setID: b.setID("traffic"), sreg: Expr.reg1)],
            "per-server counters")
        // Flows Ballast did not balance are none of postrouting's business. The rule also keeps
        // a conntrack expression in the table at all times: the kernel turns conntrack off in
        // a namespace when the last one goes, and established flows would lose their NAT the
        // moment a service's chain is emptied (no usable server).
        b.rule(
            t, "postrouting",
            [
                Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000),
                Expr.cmpEq(Expr.reg1, [0, 0, 0, 0]), Expr.accept(),
            ], "not balanced by Ballast")
        b.rule(
            t, "postrouting",
            [
                Expr.ctMarkLoad(Expr.reg1), Expr.and(Expr.reg1, mask: 0xffff_0000),
                Expr.vmap("source-nat", setID: b.setID("source-nat"), sreg: Expr.reg1),
            ], "service → its source NAT")
        for st in list { addService(b, st, keeping: []) }
    }

    /// A service's own objects: its chain and maps, its servers' counter chains, its source-NAT
    /// chain, and its elements in the shared maps. `keeping`: servers whose chain exists already.
    func addService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        b.chain(t, st.chain)
        b.map(t, st.backends, interval: false, dataType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), dataLen: v6 ? 20 : 8)
        let backends = backendElements(st, st.addrs.indices)
        if !backends.isEmpty { b.elements(t, st.backends, backends) }
        if st.config.balance == .source {
            b.map(t, st.sched, interval: false, dataType: 19, dataLen: 4, size: UInt32(st.config.hashTableSize))
            let slots = slotElements(st, Array(st.slots.indices))
            if !slots.isEmpty { b.elements(t, st.sched, slots) }
        } else {
            b.map(t, st.sched, interval: true, dataType: 19, dataLen: 4)
            let ranges = rangeElements(st)
            if !ranges.isEmpty { b.elements(t, st.sched, ranges) }
        }
        accessRules(b, st)
        schedRule(b, st)
        let fresh = st.config.servers.indices.filter { !keeping.contains($0) }
        for j in fresh {
            let chain = st.serverChain(j)
            b.chain(t, chain)
            b.rule(t, chain, Expr.ctStateNew(Expr.reg1) + [Expr.counter()], "\(chain): new connections")
            b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: false) + [Expr.counter()], "\(chain): client to server")
            b.rule(t, chain, Expr.ctDirection(Expr.reg1, reply: true) + [Expr.counter()], "\(chain): server to client")
        }
        if !fresh.isEmpty {
            b.elements(
                t, "traffic", fresh.map { NftBatch.Element(key: le(st.marks[$0]), data: nil, jump: st.serverChain($0)) }
            )
        }
        switch st.config.snat {
        case .none: break
        case .masquerade:
            b.chain(t, st.snatChain)
            b.rule(t, st.snatChain, [Expr.masquerade()], "\(st.name): masquerade")
        case .address(let a):
            b.chain(t, st.snatChain)
            let nfproto = UInt32(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4)
            b.rule(
                t, st.snatChain,
                [
                    Expr.immediate(Expr.reg1, NatController.hostBytes(a)),
                    Expr.snat(family: nfproto, addrReg: Expr.reg1),
                ], "\(st.name): snat to \(a.hostText)")
        }
        if st.config.snat != .none {
            b.elements(t, "source-nat", [NftBatch.Element(key: le(st.id << 16), data: nil, jump: st.snatChain)])
        }
        b.elements(
            t, "services",
            st.config.binds.map {
                NftBatch.Element(key: NatController.addressData($0.address), data: nil, jump: st.chain, goto: true)
            })
    }

    /// Takes a service's objects out (the reverse order of `addService`: references first).
    func removeService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        b.elements(
            t, "services",
            st.config.binds.map { NftBatch.Element(key: NatController.addressData($0.address), data: nil) },
            delete: true)
        if st.config.snat != .none {
            b.elements(t, "source-nat", [NftBatch.Element(key: le(st.id << 16), data: nil)], delete: true)
            b.flushChain(t, st.snatChain)
            b.deleteChain(t, st.snatChain)
        }
        removeServiceObjects(b, st, keeping: keeping)
        if !st.access.deny.isEmpty { b.deleteMap(t, st.denySet) }
        if !st.access.allow.isEmpty { b.deleteMap(t, st.allowSet) }
        if st.config.limits.connections != nil { b.deleteMap(t, st.connSet) }
        if st.config.limits.rate != nil { b.deleteMap(t, st.rateSet) }
    }

    /// What nat and dsr services both have: their servers' `traffic` elements and counter
    /// chains (but those in `keeping`), the service chain and its two maps.
    func removeServiceObjects(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        let gone = st.config.servers.indices.filter { !keeping.contains($0) }
        if !gone.isEmpty {
            b.elements(t, "traffic", gone.map { NftBatch.Element(key: le(st.marks[$0]), data: nil) }, delete: true)
        }
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

    /// Before any server is picked: `ip saddr @deny-<svc> counter drop`, then (with an allow
    /// list) `ip saddr != @allow-<svc> counter drop`. Only a flow's first packet meets them (nat
    /// chains see nothing else), so a refused client's SYN is dropped and nothing is tracked
    /// as balanced.
    func accessRules(_ b: NftBatch, _ st: ServiceState) {
        accessSets(b, st)
        accessRulesOnly(b, st)
    }

    /// The sets behind a service's access rules: the allow and deny lists' interval sets and the
    /// limits' dynamic sets (filled by the kernel).
    func accessSets(_ b: NftBatch, _ st: ServiceState) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        for (set, list) in [(st.denySet, st.access.deny), (st.allowSet, st.access.allow)] where !list.isEmpty {
            b.addressSet(t, set, v6: v6)
            let elements = NatController.intervalElements(list.filter { $0.isV6 == v6 })
            if !elements.isEmpty { b.elements(t, set, elements) }
        }
        if st.config.limits.connections != nil { b.dynamicSet(t, st.connSet, v6: v6, timeoutMs: nil) }
        if st.config.limits.rate != nil {
            b.dynamicSet(t, st.rateSet, v6: v6, timeoutMs: UInt64(2 * st.config.limits.ratePeriodMs))
        }
    }

    /// The rules at the head of a service's chain that refuse a client before a server is
    /// picked. A chain flushed to replace its scheduling rule gets them back first.
    func accessRulesOnly(_ b: NftBatch, _ st: ServiceState) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        let saddr = { Expr.payload(network: true, offset: v6 ? 8 : 12, len: v6 ? 16 : 4, dreg: Expr.reg1) }
        for (set, list, invert) in [(st.denySet, st.access.deny, false), (st.allowSet, st.access.allow, true)]
        where !list.isEmpty {
            b.rule(
                t, st.chain,
                [
                    saddr(), Expr.match(set, setID: b.setID(set), sreg: Expr.reg1, invert: invert), Expr.counter(),
                    Expr.drop(),
                ],
                "\(st.name): \(invert ? "not in allow" : "deny")")
        }
        // Per-client limits, kept by the kernel per source address: `ct count` (connections
        // tracked now) and a token bucket (new connections per period).
        if let n = st.config.limits.connections {
            b.rule(
                t, st.chain,
                [
                    saddr(),
                    Expr.dynsetAdd(st.connSet, setID: b.setID(st.connSet), sreg: Expr.reg1, Expr.connlimitOver(n)),
                    Expr.counter(), Expr.drop(),
                ], "\(st.name): conn_per_source")
        }
        if let n = st.config.limits.rate {
            let unit = UInt64(st.config.limits.ratePeriodMs / 1000)
            b.rule(
                t, st.chain,
                [
                    saddr(),
                    Expr.dynsetAdd(
                        st.rateSet, setID: b.setID(st.rateSet), sreg: Expr.reg1,
                        Expr.limitOver(n, perSeconds: unit, burst: NatController.rateBurst)), Expr.counter(),
                    Expr.drop(),
                ], "\(st.name): new_conn_rate_per_source")
        }
    }

    /// The token bucket's burst for `new_conn_rate_per_source` (nft's own default).
    static let rateBurst: UInt32 = 5

    /// Networks as the kernel's interval set wants them: merged ranges, each a start element and
    /// an end element at the first address after it (none when the range runs to the top), and
    /// an end marker at zero when the first range does not start there (as nft writes them).
    static func intervalElements(_ prefixes: [IPPrefix]) -> [NftBatch.Element] {
        var ranges: [([UInt8], [UInt8])] = prefixes.map { p in
            (
                p.bytes,
                p.bytes.enumerated().map { i, byte in
                    let keep = max(0, min(8, p.length - i * 8))
                    return byte | (keep == 8 ? 0 : UInt8(truncatingIfNeeded: 0xFF >> keep))
                }
            )
        }
        ranges.sort { $0.0.lexicographicallyPrecedes($1.0) }
        var merged: [([UInt8], [UInt8])] = []
        for r in ranges {
            if let last = merged.last {
                let after = successor(last.1)
                if after == nil || !after!.lexicographicallyPrecedes(r.0) {
                    if last.1.lexicographicallyPrecedes(r.1) { merged[merged.count - 1].1 = r.1 }
                    continue
                }
            }
            merged.append(r)
        }
        var out: [NftBatch.Element] = []
        if let first = merged.first, first.0.contains(where: { $0 != 0 }) {
            out.append(NftBatch.Element(key: [UInt8](repeating: 0, count: first.0.count), data: nil, intervalEnd: true))
        }
        for (start, end) in merged {
            out.append(NftBatch.Element(key: start, data: nil))
            if let after = successor(end) { out.append(NftBatch.Element(key: after, data: nil, intervalEnd: true)) }
        }
        return out
    }

    /// The address after `a` (big-endian bytes), nil past the last one.
    static func successor(_ a: [UInt8]) -> [UInt8]? {
        var b = a
        for i in b.indices.reversed() {
            if b[i] == 0xFF {
                b[i] = 0
            } else {
                b[i] += 1
                return b
            }
        }
        return nil
    }

    /// The service chain's one rule: pick a server mark, tag the flow, DNAT to that server.
    func schedRule(_ b: NftBatch, _ st: ServiceState) {
        let t = NatController.tableName
        let v6 = st.family == UInt16(NFPROTO_IPV6)
        var e: [OpaquePointer] = []
        switch st.config.balance {
        case .source:
            // Hashed like SourceHash in proxy mode: the same Maglev slot for the same client.
            e += hashExprs(st)
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
                Expr.dnat(
                    family: UInt32(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4), addrReg: Expr.reg1,
                    protoReg: Expr.reg32(v6 ? 4 : 1)),
            ], "\(st.name): dnat")
    }

    /// A service's `be-` elements for servers `js` (those with data: see `backendData`).
    func backendElements(_ st: ServiceState, _ js: some Sequence<Int>) -> [NftBatch.Element] {
        let data = st.backendData
        return js.compactMap { j in data[j].map { NftBatch.Element(key: le(st.marks[j]), data: $0) } }
    }

    func le(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    func be(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    static func hostBytes(_ a: SocketAddress) -> [UInt8] {
        switch a {
        case .v4(let s): return withUnsafeBytes(of: s.sin_addr) { Array($0) }
        case .v6(let s): return withUnsafeBytes(of: s.sin6_addr) { Array($0) }
        }
    }

    /// `address . port` as nftables stores a concatenation: each field in 32-bit words.
    /// Every server address and port of these services (the `replies` set), once.
    static func replyEnds(_ list: [ServiceState]) -> Set<SocketAddress> {
        Set(list.flatMap { $0.addrs.compactMap { $0 } })
    }

    /// Brings the `replies` set of a family from `loaded` to `wanted`; false when equal.
    func updateReplies(_ b: NftBatch, from loaded: Set<SocketAddress>, to wanted: Set<SocketAddress>) -> Bool {
        guard loaded != wanted else { return false }
        let t = NatController.tableName
        let gone = loaded.subtracting(wanted).sorted { $0.description < $1.description }
        let new = wanted.subtracting(loaded).sorted { $0.description < $1.description }
        if !gone.isEmpty {
            b.elements(
                t, "replies", gone.map { NftBatch.Element(key: NatController.addressData($0), data: nil) }, delete: true
            )
        }
        if !new.isEmpty {
            b.elements(t, "replies", new.map { NftBatch.Element(key: NatController.addressData($0), data: nil) })
        }
        return true
    }

    static func addressData(_ a: SocketAddress) -> [UInt8] {
        hostBytes(a) + [UInt8(a.port >> 8), UInt8(a.port & 0xff), 0, 0]
    }

    /// Weighted ranges `lo-hi : mark` over the usable servers (big-endian keys, interval ends).
    func rangeElements(_ st: ServiceState) -> [NftBatch.Element] {
        var out: [NftBatch.Element] = []
        var lo: UInt32 = 0
        for (j, w) in st.weights.enumerated() where w > 0 {
            out.append(NftBatch.Element(key: be(lo), data: le(st.marks[j])))
            lo += UInt32(w)
            out.append(NftBatch.Element(key: be(lo), data: nil, intervalEnd: true))
        }
        return out
    }

    func slotElements(_ st: ServiceState, _ slots: [Int]) -> [NftBatch.Element] {
        slots.compactMap { k in
            let s = st.slots[k]
            return s < 0 ? nil : NftBatch.Element(key: le(UInt32(k)), data: le(st.marks[Int(s)]))
        }
    }
}
