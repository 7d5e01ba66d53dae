import BallastCore
import BallastIO
import CLinux
import CNftables
import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// dsr mode (direct routing, as LVS-DR and nftlb's dsr): the balancer sees only the client's
/// packets, on the ingress hook of the interface it shares with the servers, before routing or
/// conntrack. It picks a server by the flow's Maglev slot (the same jhash and table as nat and
/// proxy mode), writes the server's MAC address as the frame's destination and its own as the
/// source, counts, and sends the frame out of the same interface (`fwd`). The server holds the
/// service address on its loopback and answers the client directly.
///
/// ```
/// table netdev ballast {
///   map services4 { type ipv4_addr . inet_service : verdict }   VIP . port → goto svc-<svc>
///   map services6 { type ipv6_addr . inet_service : verdict }
///   map traffic   { type mark : verdict }                        server mark → goto srv-<svc>-<n>
///   map be-<svc>  { type mark : ether_addr }                     server mark → its MAC (neighbour table)
///   map mg-<svc>  { type mark : mark }                           Maglev slot → server mark
///   chain ingress-<dev> { type filter hook ingress device <dev> priority 0;
///                         meta protocol ip meta l4proto tcp ip daddr . tcp dport vmap @services4; (ip6 …) }
///   chain svc-<svc> { meta mark set jhash ip saddr [. tcp sport] mod N seed S map @mg-<svc>
///                     ether daddr set meta mark map @be-<svc> ether saddr set <dev MAC> meta mark vmap @traffic }
///   chain srv-<svc>-<n> { tcp flags & (syn | ack) == syn counter; counter; fwd to <dev> }
/// }
/// ```
/// No slot (no usable server) or no MAC: the rule stops, the packet goes up this host's stack,
/// where nothing listens on the service address: the client gets a reset, never silence.
extension NatController {
    static let netdev = UInt16(NFPROTO_NETDEV)

    /// The shared part of the netdev table (maps, an ingress chain per interface), then every
    /// dsr service's objects.
    func buildNetdev(_ b: NftBatch, _ list: [ServiceState]) {
        let t = NatController.tableName
        for v6 in [false, true] {
            b.map(
                t, v6 ? "services6" : "services4", keyType: v6 ? (8 << 6 | 13) : (7 << 6 | 13), keyLen: v6 ? 20 : 8,
                dataType: NFT_DATA_VERDICT.rawValue)
        }
        b.map(t, "traffic", dataType: NFT_DATA_VERDICT.rawValue)
        for dev in Set(list.compactMap(\.config.interface)).sorted() {
            let chain = "ingress-\(dev)"
            b.chain(t, chain, hook: UInt32(NF_NETDEV_INGRESS.rawValue), priority: 0, type: "filter", device: dev)
            for v6 in [false, true] {
                b.rule(
                    t, chain,
                    [
                        Expr.metaProtocol(Expr.reg1), Expr.cmpEq(Expr.reg1, v6 ? [0x86, 0xdd] : [0x08, 0x00]),
                        Expr.metaL4proto(Expr.reg1), Expr.cmpEq(Expr.reg1, [UInt8(IPPROTO_TCP)]),
                        Expr.payload(network: true, offset: v6 ? 24 : 16, len: v6 ? 16 : 4, dreg: Expr.reg1),
                        Expr.payload(network: false, offset: 2, len: 2, dreg: Expr.reg32(v6 ? 4 : 1)),
                        Expr.vmap(
                            v6 ? "services6" : "services4", setID: b.setID(v6 ? "services6" : "services4"),
                            sreg: Expr.reg1),
                    ], "\(dev): daddr . dport → service")
            }
        }
        for st in list { addDSRService(b, st, keeping: []) }
    }

    func addDSRService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        let dev = st.config.interface ?? ""
        b.chain(t, st.chain)
        b.map(t, st.backends, dataType: 9, dataLen: 6)  // 9: ether_addr
        let macs = backendElements(st, st.macs.indices)
        if !macs.isEmpty { b.elements(t, st.backends, macs) }
        b.map(t, st.sched, interval: false, dataType: 19, dataLen: 4, size: UInt32(st.config.hashTableSize))
        let slots = slotElements(st, Array(st.slots.indices))
        if !slots.isEmpty { b.elements(t, st.sched, slots) }
        var pick = hashExprs(st)
        pick.append(Expr.lookup(st.sched, setID: b.setID(st.sched), sreg: Expr.reg1, dreg: Expr.reg1))
        pick.append(Expr.metaMarkSet(Expr.reg1))
        b.rule(t, st.chain, pick, "\(st.name): Maglev slot → server")
        b.rule(
            t, st.chain,
            [
                Expr.metaMarkLoad(Expr.reg1),
                Expr.lookup(st.backends, setID: b.setID(st.backends), sreg: Expr.reg1, dreg: Expr.reg2),
                Expr.payloadWriteLL(offset: 0, len: 6, sreg: Expr.reg2),
                Expr.immediate(Expr.reg2, st.devMac),
                Expr.payloadWriteLL(offset: 6, len: 6, sreg: Expr.reg2),
                Expr.vmap("traffic", setID: b.setID("traffic"), sreg: Expr.reg1),
            ], "\(st.name): the server's MAC address, then its counters and \(dev)")
        let fresh = st.config.servers.indices.filter { !keeping.contains($0) }
        for j in fresh {
            let chain = st.serverChain(j)
            b.chain(t, chain)
            b.rule(t, chain, Expr.tcpSyn(Expr.reg1) + [Expr.counter()], "\(chain): new connections")
            b.rule(t, chain, [Expr.counter()], "\(chain): client to server")
            b.rule(
                t, chain, [Expr.immediate(Expr.reg1, le(st.ifindex)), Expr.fwd(Expr.reg1)], "\(chain): out of \(dev)")
        }
        if !fresh.isEmpty {
            b.elements(
                t, "traffic",
                fresh.map { NftBatch.Element(key: le(st.marks[$0]), data: nil, jump: st.serverChain($0), goto: true) })
        }
        for (v6, binds) in Dictionary(grouping: st.config.binds, by: { $0.address.family == AF_INET6 }) {
            b.elements(
                t, v6 ? "services6" : "services4",
                binds.map {
                    NftBatch.Element(key: NatController.addressData($0.address), data: nil, jump: st.chain, goto: true)
                })
        }
    }

    func removeDSRService(_ b: NftBatch, _ st: ServiceState, keeping: Set<Int>) {
        let t = NatController.tableName
        for (v6, binds) in Dictionary(grouping: st.config.binds, by: { $0.address.family == AF_INET6 }) {
            b.elements(
                t, v6 ? "services6" : "services4",
                binds.map { NftBatch.Element(key: NatController.addressData($0.address), data: nil) }, delete: true)
        }
        removeServiceObjects(b, st, keeping: keeping)
    }

    /// The source address (and port, in consecutive 32-bit registers from reg 2) hashed into a
    /// Maglev slot in reg1, for nat and dsr rules alike and as proxy mode's `SourceHash` does:
    /// the same client lands on the same server in all three.
    func hashExprs(_ st: ServiceState) -> [OpaquePointer] {
        let v6 = st.config.binds.first?.address.family == AF_INET6
        let withPort = st.config.hashKey == .sourcePort
        var e: [OpaquePointer] = []
        e.append(Expr.payload(network: true, offset: v6 ? 8 : 12, len: v6 ? 16 : 4, dreg: Expr.reg2))
        if withPort { e.append(Expr.payload(network: false, offset: 0, len: 2, dreg: Expr.reg32(v6 ? 8 : 5))) }
        let len: UInt32 = (v6 ? 16 : 4) + (withPort ? 4 : 0)
        e.append(
            Expr.jhash(
                sreg: Expr.reg2, len: len, modulus: UInt32(st.config.hashTableSize), seed: SourceHash.seed,
                dreg: Expr.reg1))
        return e
    }

    // MARK: - Neighbours

    /// Brings every dsr server's MAC address in step with the kernel's neighbour table: an entry
    /// with an address makes the server reachable; none, or a failed one, makes it DOWN for
    /// `no L2 neighbour on <dev>`, and the kernel is asked to resolve it (a datagram out of the
    /// interface). A server behind a gateway never gets an entry of its own on the segment.
    /// Changes are announced on the servers (the nat thread then moves the maps).
    func refreshNeighbours(_ table: ServiceTable) {
        let dsr = table.services.filter { $0.config.mode == .dsr }
        guard !dsr.isEmpty else { return }
        if neighbours == nil {
            do { neighbours = try Neighbours() } catch {
                logger.error("dsr: \(error)")
                return
            }
        }
        guard let entries = try? neighbours?.dump() else { return }
        let now = monotonicMillis()
        let current = Set(dsr.flatMap { $0.servers.map(ObjectIdentifier.init) })
        lastProbe = lastProbe.filter { current.contains($0.key) }  // servers a reload removed
        for svc in dsr {
            let dev = svc.config.interface ?? ""
            let index = Interface.index(dev)
            for s in svc.servers {
                let host = NatController.hostBytes(s.address)
                let e = entries.first { $0.ifindex == index && $0.address == host }
                let mac = (e?.state ?? 0) & Neighbours.usableStates != 0 ? e?.mac : nil
                let reason = index == nil ? "interface \(dev) is gone" : "no L2 neighbour on \(dev)"
                let was = s.link
                if s.setLink(mac, reason: reason, now: now) {
                    if let mac {
                        logger.notice(
                            "Server \(svc.name)/\(s.name) has L2 neighbour \(Interface.macText(mac)) on \(dev)\(was.mac == nil ? "" : " (was \(Interface.macText(was.mac!)))")."
                        )
                    } else {
                        logger.warning("Server \(svc.name)/\(s.name) is DOWN, reason: \(reason).")
                    }
                }
                if mac == nil, index != nil, now - (lastProbe[ObjectIdentifier(s)] ?? 0) >= 1000 {
                    lastProbe[ObjectIdentifier(s)] = now
                    Interface.probeNeighbour(s.address, device: dev)
                }
            }
        }
    }
}
