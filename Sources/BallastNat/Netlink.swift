import CNftables

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What conntrack knows of one server's flows (bytes and packets need conntrack accounting).
public struct FlowStats: Sendable, Equatable {
    public var flows = 0
    /// Connections balanced to the server since its table was programmed (nft counter).
    public var newConnections: UInt64 = 0
    public var packetsIn: UInt64 = 0
    public var packetsOut: UInt64 = 0
    public var bytesIn: UInt64 = 0
    public var bytesOut: UInt64 = 0

    public init(flows: Int = 0) { self.flows = flows }

    public mutating func add(_ o: FlowStats) {
        flows += o.flows
        newConnections &+= o.newConnections
        packetsIn &+= o.packetsIn
        packetsOut &+= o.packetsOut
        bytesIn &+= o.bytesIn
        bytesOut &+= o.bytesOut
    }
}

/// A failure talking to the kernel, naming the object that failed.
public struct NatError: Error, CustomStringConvertible, Sendable {
    public var message: String
    /// The kernel's error code, when the kernel refused a request.
    public var errno: Int32?
    public init(_ m: String, errno: Int32? = nil) {
        message = m
        self.errno = errno
    }
    public var description: String { message }
}

/// One nftables transaction: libnftnl objects serialized into an nfnetlink batch
/// (`BATCH_BEGIN … BATCH_END`), which the kernel applies all or nothing.
final class NftBatch {
    private let batch: OpaquePointer
    private(set) var seq: UInt32
    let family: UInt16
    /// What each message does, by sequence number, for error messages.
    private(set) var what: [UInt32: String] = [:]
    private(set) var messages = 0
    private var nextSetID: UInt32 = 1
    private var setIDs: [String: UInt32] = [:]

    let beginSeq: UInt32

    init(family: UInt16, seq: UInt32) {
        self.family = family
        self.seq = seq
        beginSeq = seq
        // A page must hold the largest message (an element chunk under 64 KiB) or libnftnl drops it.
        batch = nftnl_batch_alloc(UInt32(1 << 18), UInt32(1 << 17))
        nftnl_batch_begin(buffer, next())
        _ = nftnl_batch_update(batch)
    }

    deinit { nftnl_batch_free(batch) }

    private var buffer: UnsafeMutablePointer<CChar> { nftnl_batch_buffer(batch).assumingMemoryBound(to: CChar.self) }

    private func next() -> UInt32 {
        defer { seq &+= 1 }
        return seq
    }

    private func header(_ type: UInt32, _ flags: Int32, _ description: String) -> UnsafeMutablePointer<nlmsghdr> {
        let s = next()
        what[s] = description
        // A refused transaction (no CAP_NET_ADMIN) fails at its first message: name that.
        if messages == 0 { what[beginSeq] = description }
        messages += 1
        return nftnl_nlmsg_build_hdr(buffer, UInt16(type), family, UInt16(flags | NLM_F_ACK), s)
    }

    func finish() {
        nftnl_batch_end(buffer, next())
        _ = nftnl_batch_update(batch)
    }

    // MARK: Tables and chains

    func table(_ name: String, _ type: UInt32, flags: Int32 = NLM_F_CREATE) {
        let t = nftnl_table_alloc()!
        defer { nftnl_table_free(t) }
        nftnl_table_set_u32(t, UInt16(NFTNL_TABLE_FAMILY.rawValue), UInt32(family))
        nftnl_table_set_str(t, UInt16(NFTNL_TABLE_NAME.rawValue), name)
        let verb = type == NFT_MSG_DELTABLE.rawValue ? "delete" : "create"
        nftnl_table_nlmsg_build_payload(header(type, flags, "\(verb) table \(familyName) \(name)"), t)
        _ = nftnl_batch_update(batch)
    }

    var familyName: String {
        family == UInt16(NFPROTO_IPV6) ? "ip6" : family == UInt16(NFPROTO_NETDEV) ? "netdev" : "ip"
    }

    /// A base chain (with a hook) when `hook` is given, else a regular chain. `device`: the
    /// interface of a netdev family's ingress hook.
    func chain(
        _ table: String, _ name: String, hook: UInt32? = nil, priority: Int32 = 0, type: String = "nat",
        device: String? = nil
    ) {
        let c = chainObject(table, name)
        defer { nftnl_chain_free(c) }
        if let hook {
            if let device { nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_DEV.rawValue), device) }
            nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_TYPE.rawValue), type)
            nftnl_chain_set_u32(c, UInt16(NFTNL_CHAIN_HOOKNUM.rawValue), hook)
            nftnl_chain_set_s32(c, UInt16(NFTNL_CHAIN_PRIO.rawValue), priority)
            nftnl_chain_set_u32(c, UInt16(NFTNL_CHAIN_POLICY.rawValue), UInt32(NF_ACCEPT))
        }
        nftnl_chain_nlmsg_build_payload(
            header(NFT_MSG_NEWCHAIN.rawValue, NLM_F_CREATE, "create chain \(table) \(name)"), c)
        _ = nftnl_batch_update(batch)
    }

    /// Deletes every rule of a chain (DELRULE naming only the chain).
    func flushChain(_ table: String, _ name: String) {
        let r = ruleObject(table, name)
        defer { nftnl_rule_free(r) }
        nftnl_rule_nlmsg_build_payload(header(NFT_MSG_DELRULE.rawValue, 0, "flush chain \(table) \(name)"), r)
        _ = nftnl_batch_update(batch)
    }

    /// Deletes a regular chain (flush it first in the same batch: a chain with rules is busy).
    func deleteChain(_ table: String, _ name: String) {
        let c = chainObject(table, name)
        defer { nftnl_chain_free(c) }
        nftnl_chain_nlmsg_build_payload(header(NFT_MSG_DELCHAIN.rawValue, 0, "delete chain \(table) \(name)"), c)
        _ = nftnl_batch_update(batch)
    }

    // MARK: Sets and maps

    /// Deletes a map (no rule may refer to it once the batch is applied).
    func deleteMap(_ table: String, _ name: String) {
        let s = setObject(table, name)
        defer { nftnl_set_free(s) }
        nftnl_set_nlmsg_build_payload(header(NFT_MSG_DELSET.rawValue, 0, "delete map \(table) \(name)"), s)
        _ = nftnl_batch_update(batch)
        setIDs[name] = nil
    }

    /// A map `type mark : <data>` (`interval` for weighted ranges; `dataType`
    /// `NFT_DATA_VERDICT` makes a verdict map, whose data needs no length).
    func map(
        _ table: String, _ name: String, interval: Bool = false, keyType: UInt32 = 19, keyLen: UInt32 = 4,
        dataType: UInt32, dataLen: UInt32? = nil,
        size: UInt32 = 0
    ) {
        let id = nextSetID
        nextSetID += 1
        setIDs[name] = id
        let s = setObject(table, name)  // names the new set by its id too
        defer { nftnl_set_free(s) }
        nftnl_set_set_u32(
            s, UInt16(NFTNL_SET_FLAGS.rawValue),
            UInt32(NFT_SET_MAP.rawValue) | (interval ? UInt32(NFT_SET_INTERVAL.rawValue) : 0))
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_TYPE.rawValue), keyType)  // 19: mark
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue), keyLen)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_DATA_TYPE.rawValue), dataType)
        if let dataLen { nftnl_set_set_u32(s, UInt16(NFTNL_SET_DATA_LEN.rawValue), dataLen) }
        if size > 0 { nftnl_set_set_u32(s, UInt16(NFTNL_SET_DESC_SIZE.rawValue), size) }
        // Byte-order hints for `nft list` (they change nothing in the kernel): interval keys
        // come from numgen through hton (big-endian); marks are host-endian; a concatenation of
        // header fields (address . port) is network order, which nft assumes when told nothing.
        var udata: [UInt8] =
            keyType == 19 ? [0, 4] + withUnsafeBytes(of: UInt32(interval ? 2 : 1).littleEndian) { Array($0) } : []
        if dataType == 19 { udata += [1, 4] + withUnsafeBytes(of: UInt32(1).littleEndian) { Array($0) } }
        if !udata.isEmpty {
            _ = udata.withUnsafeBytes {
                nftnl_set_set_data(s, UInt16(NFTNL_SET_USERDATA.rawValue), $0.baseAddress, UInt32($0.count))
            }
        }
        nftnl_set_nlmsg_build_payload(header(NFT_MSG_NEWSET.rawValue, NLM_F_CREATE, "create map \(table) \(name)"), s)
        _ = nftnl_batch_update(batch)
    }

    /// A plain set of addresses (`type ipv4_addr` or `ipv6_addr`, `flags interval`): the
    /// allow and deny lists of a service, matched by `ip saddr @set`.
    /// A plain set of keys (`type ipv4_addr . inet_service` and the like), looked up by rules.
    func keySet(_ table: String, _ name: String, keyType: UInt32, keyLen: UInt32) {
        let id = nextSetID
        nextSetID += 1
        setIDs[name] = id
        let s = setObject(table, name)
        defer { nftnl_set_free(s) }
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_FLAGS.rawValue), 0)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_TYPE.rawValue), keyType)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue), keyLen)
        nftnl_set_nlmsg_build_payload(header(NFT_MSG_NEWSET.rawValue, NLM_F_CREATE, "create set \(table) \(name)"), s)
        _ = nftnl_batch_update(batch)
    }

    func addressSet(_ table: String, _ name: String, v6: Bool) {
        let id = nextSetID
        nextSetID += 1
        setIDs[name] = id
        let s = setObject(table, name)
        defer { nftnl_set_free(s) }
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_FLAGS.rawValue), UInt32(NFT_SET_INTERVAL.rawValue))
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_TYPE.rawValue), v6 ? 8 : 7)  // ipv6_addr, ipv4_addr
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue), v6 ? 16 : 4)
        nftnl_set_nlmsg_build_payload(header(NFT_MSG_NEWSET.rawValue, NLM_F_CREATE, "create set \(table) \(name)"), s)
        _ = nftnl_batch_update(batch)
    }

    /// A set filled by the rules themselves (`add @set { ip saddr ct count over N }`): per-client
    /// state for `limits`, entries forgotten after `timeoutMs` when given.
    func dynamicSet(_ table: String, _ name: String, v6: Bool, timeoutMs: UInt64?) {
        let id = nextSetID
        nextSetID += 1
        setIDs[name] = id
        let s = setObject(table, name)
        defer { nftnl_set_free(s) }
        nftnl_set_set_u32(
            s, UInt16(NFTNL_SET_FLAGS.rawValue),
            UInt32(NFT_SET_EVAL.rawValue) | (timeoutMs != nil ? UInt32(NFT_SET_TIMEOUT.rawValue) : 0))
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_TYPE.rawValue), v6 ? 8 : 7)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_KEY_LEN.rawValue), v6 ? 16 : 4)
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_DESC_SIZE.rawValue), 65535)
        if let t = timeoutMs { nftnl_set_set_u64(s, UInt16(NFTNL_SET_TIMEOUT.rawValue), t) }
        nftnl_set_nlmsg_build_payload(header(NFT_MSG_NEWSET.rawValue, NLM_F_CREATE, "create set \(table) \(name)"), s)
        _ = nftnl_batch_update(batch)
    }

    struct Element {
        var key: [UInt8]
        var data: [UInt8]?
        var intervalEnd = false
        /// A verdict map's value: jump to this chain (or go to it, with `goto`).
        var jump: String?
        var goto = false
    }

    /// Adds (or, with `delete`, removes) elements, at most 1024 per message (attribute lengths
    /// are 16 bits). `delete` with no elements flushes the map.
    func elements(_ table: String, _ name: String, _ elems: [Element], delete: Bool = false) {
        var start = 0
        repeat {
            let chunk = elems[start..<min(elems.count, start + 1024)]
            let s = setObject(table, name)
            for e in chunk {
                let el = nftnl_set_elem_alloc()!
                e.key.withUnsafeBytes {
                    _ = nftnl_set_elem_set(el, UInt16(NFTNL_SET_ELEM_KEY), $0.baseAddress, UInt32($0.count))
                }
                if let d = e.data {
                    d.withUnsafeBytes {
                        _ = nftnl_set_elem_set(el, UInt16(NFTNL_SET_ELEM_DATA), $0.baseAddress, UInt32($0.count))
                    }
                }
                if e.intervalEnd {
                    nftnl_set_elem_set_u32(el, UInt16(NFTNL_SET_ELEM_FLAGS), UInt32(NFT_SET_ELEM_INTERVAL_END.rawValue))
                }
                if let chain = e.jump {
                    nftnl_set_elem_set_u32(
                        el, UInt16(NFTNL_SET_ELEM_VERDICT),
                        UInt32(bitPattern: e.goto ? NFT_GOTO.rawValue : NFT_JUMP.rawValue))
                    nftnl_set_elem_set_str(el, UInt16(NFTNL_SET_ELEM_CHAIN), chain)
                }
                nftnl_set_elem_add(s, el)
            }
            let type = delete ? NFT_MSG_DELSETELEM.rawValue : NFT_MSG_NEWSETELEM.rawValue
            let verb = delete ? (elems.isEmpty ? "flush" : "delete elements of") : "add elements to"
            nftnl_set_elems_nlmsg_build_payload(
                header(type, delete ? 0 : NLM_F_CREATE, "\(verb) map \(table) \(name)"), s)
            _ = nftnl_batch_update(batch)
            nftnl_set_free(s)
            start += 1024
        } while start < elems.count
    }

    // MARK: Rules

    func rule(_ table: String, _ chain: String, _ exprs: [OpaquePointer], _ description: String) {
        let r = ruleObject(table, chain)
        defer { nftnl_rule_free(r) }
        for e in exprs { nftnl_rule_add_expr(r, e) }  // the rule owns them now
        nftnl_rule_nlmsg_build_payload(
            header(
                NFT_MSG_NEWRULE.rawValue, NLM_F_CREATE | NLM_F_APPEND, "add rule \(table) \(chain) (\(description))"), r
        )
        _ = nftnl_batch_update(batch)
    }

    func setID(_ name: String) -> UInt32? { setIDs[name] }

    // MARK: Objects (the caller frees them)

    /// A chain naming `table`/`name` in this batch's family.
    private func chainObject(_ table: String, _ name: String) -> OpaquePointer {
        let c = nftnl_chain_alloc()!
        nftnl_chain_set_u32(c, UInt16(NFTNL_CHAIN_FAMILY.rawValue), UInt32(family))
        nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_TABLE.rawValue), table)
        nftnl_chain_set_str(c, UInt16(NFTNL_CHAIN_NAME.rawValue), name)
        return c
    }

    /// A set naming `table`/`name` in this batch's family, and its id when this batch created it
    /// (the kernel finds a set made in the same transaction by id).
    private func setObject(_ table: String, _ name: String) -> OpaquePointer {
        let s = nftnl_set_alloc()!
        nftnl_set_set_u32(s, UInt16(NFTNL_SET_FAMILY.rawValue), UInt32(family))
        nftnl_set_set_str(s, UInt16(NFTNL_SET_TABLE.rawValue), table)
        nftnl_set_set_str(s, UInt16(NFTNL_SET_NAME.rawValue), name)
        if let id = setIDs[name] { nftnl_set_set_u32(s, UInt16(NFTNL_SET_ID.rawValue), id) }
        return s
    }

    /// A rule in `table`/`chain` in this batch's family.
    private func ruleObject(_ table: String, _ chain: String) -> OpaquePointer {
        let r = nftnl_rule_alloc()!
        nftnl_rule_set_u32(r, UInt16(NFTNL_RULE_FAMILY.rawValue), UInt32(family))
        nftnl_rule_set_str(r, UInt16(NFTNL_RULE_TABLE.rawValue), table)
        nftnl_rule_set_str(r, UInt16(NFTNL_RULE_CHAIN.rawValue), chain)
        return r
    }

    /// The batch as iovecs, for sendmsg.
    func withIovecs<R>(_ body: (UnsafeMutablePointer<iovec>, Int) -> R) -> R {
        let n = Int(nftnl_batch_iovec_len(batch))
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: max(1, n))
        defer { iov.deallocate() }
        nftnl_batch_iovec(batch, iov, UInt32(n))
        return body(iov, n)
    }
}

/// Expression builders (the bytecode `nft --debug=netlink` shows).
enum Expr {
    static let reg1 = UInt32(NFT_REG_1.rawValue)
    static let reg2 = UInt32(NFT_REG_2.rawValue)

    static func reg32(_ n: UInt32) -> UInt32 { UInt32(NFT_REG32_00.rawValue) + n }

    private static func make(_ name: String) -> OpaquePointer { nftnl_expr_alloc(name)! }

    static func payload(network: Bool, offset: UInt32, len: UInt32, dreg: UInt32) -> OpaquePointer {
        let e = make("payload")
        nftnl_expr_set_u32(
            e, UInt16(NFTNL_EXPR_PAYLOAD_BASE),
            network ? UInt32(NFT_PAYLOAD_NETWORK_HEADER.rawValue) : UInt32(NFT_PAYLOAD_TRANSPORT_HEADER.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_OFFSET), offset)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_LEN), len)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_DREG), dreg)
        return e
    }

    static func cmpEq(_ sreg: UInt32, _ data: [UInt8]) -> OpaquePointer {
        let e = make("cmp")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CMP_SREG), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CMP_OP), UInt32(NFT_CMP_EQ.rawValue))
        data.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_CMP_DATA), $0.baseAddress, UInt32($0.count)) }
        return e
    }

    /// `meta mark set <reg>` (the packet's mark, not conntrack's: dsr mode has no connection).
    static func metaMarkSet(_ sreg: UInt32) -> OpaquePointer {
        keyed("meta", NFTNL_EXPR_META_KEY, NFT_META_MARK.rawValue, NFTNL_EXPR_META_SREG, sreg)
    }

    static func metaMarkLoad(_ dreg: UInt32) -> OpaquePointer {
        keyed("meta", NFTNL_EXPR_META_KEY, NFT_META_MARK.rawValue, NFTNL_EXPR_META_DREG, dreg)
    }

    /// `meta protocol` (the frame's ethertype, network order) into `dreg`.
    static func metaProtocol(_ dreg: UInt32) -> OpaquePointer {
        keyed("meta", NFTNL_EXPR_META_KEY, NFT_META_PROTOCOL.rawValue, NFTNL_EXPR_META_DREG, dreg)
    }

    /// A `meta` or `ct` expression: which key, and the register it reads or fills.
    private static func keyed(_ name: String, _ keyAttr: Int, _ key: UInt32, _ regAttr: Int, _ reg: UInt32)
        -> OpaquePointer
    {
        let e = make(name)
        nftnl_expr_set_u32(e, UInt16(keyAttr), key)
        nftnl_expr_set_u32(e, UInt16(regAttr), reg)
        return e
    }

    /// Writes `len` bytes of `sreg` into the link-layer header at `offset` (`ether daddr set`:
    /// offset 0, `ether saddr set`: offset 6); no checksum covers them.
    static func payloadWriteLL(offset: UInt32, len: UInt32, sreg: UInt32) -> OpaquePointer {
        let e = make("payload")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_BASE), UInt32(NFT_PAYLOAD_LL_HEADER.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_OFFSET), offset)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_LEN), len)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_SREG), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_CSUM_TYPE), UInt32(NFT_PAYLOAD_CSUM_NONE.rawValue))
        return e
    }

    /// `fwd to <device>`: the frame leaves by the interface whose index `sreg` holds.
    static func fwd(_ sreg: UInt32) -> OpaquePointer {
        let e = make("fwd")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_FWD_SREG_DEV), sreg)
        return e
    }

    /// `tcp flags & (syn | ack) == syn`: a connection's first packet.
    static func tcpSyn(_ reg: UInt32) -> [OpaquePointer] {
        [payload(network: false, offset: 13, len: 1, dreg: reg), and(reg, mask: [0x12]), cmpEq(reg, [0x02])]
    }

    static func metaL4proto(_ dreg: UInt32) -> OpaquePointer {
        keyed("meta", NFTNL_EXPR_META_KEY, NFT_META_L4PROTO.rawValue, NFTNL_EXPR_META_DREG, dreg)
    }

    static func numgen(random: Bool, modulus: UInt32, dreg: UInt32) -> OpaquePointer {
        let e = make("numgen")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NG_DREG), dreg)
        nftnl_expr_set_u32(
            e, UInt16(NFTNL_EXPR_NG_TYPE), random ? UInt32(NFT_NG_RANDOM.rawValue) : UInt32(NFT_NG_INCREMENTAL.rawValue)
        )
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NG_MODULUS), modulus)
        return e
    }

    static func jhash(sreg: UInt32, len: UInt32, modulus: UInt32, seed: UInt32, dreg: UInt32) -> OpaquePointer {
        let e = make("hash")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_TYPE), UInt32(NFT_HASH_JENKINS.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_SREG), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_DREG), dreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_LEN), len)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_MODULUS), modulus)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_HASH_SEED), seed)
        return e
    }

    static func hton(_ reg: UInt32) -> OpaquePointer {
        let e = make("byteorder")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BYTEORDER_SREG), reg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BYTEORDER_DREG), reg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BYTEORDER_OP), UInt32(NFT_BYTEORDER_HTON.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BYTEORDER_LEN), 4)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BYTEORDER_SIZE), 4)
        return e
    }

    static func lookup(_ set: String, setID: UInt32?, sreg: UInt32, dreg: UInt32) -> OpaquePointer {
        let e = make("lookup")
        nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_LOOKUP_SET), set)
        if let setID { nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SET_ID), setID) }
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SREG), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_DREG), dreg)
        return e
    }

    /// `… @set` (or `… != @set` with `invert`): the rule goes on only when the register's value
    /// is (is not) in the set.
    static func match(_ set: String, setID: UInt32?, sreg: UInt32, invert: Bool) -> OpaquePointer {
        let e = make("lookup")
        nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_LOOKUP_SET), set)
        if let setID { nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SET_ID), setID) }
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SREG), sreg)
        if invert { nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_FLAGS), UInt32(NFT_LOOKUP_F_INV.rawValue)) }
        return e
    }

    /// `add @set { <key> <expr> }`: the key's entry (made when new) runs `expr`, a stateful
    /// expression kept per entry; the rule goes on when it matches.
    static func dynsetAdd(_ set: String, setID: UInt32?, sreg: UInt32, _ expr: OpaquePointer) -> OpaquePointer {
        let e = make("dynset")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_DYNSET_SREG_KEY), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_DYNSET_OP), UInt32(NFT_DYNSET_OP_ADD.rawValue))
        nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_DYNSET_SET_NAME), set)
        if let setID { nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_DYNSET_SET_ID), setID) }
        // libnftnl takes the expression itself (not a copy) and frees it with the rule.
        _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_DYNSET_EXPR), UnsafeRawPointer(expr), 0)
        return e
    }

    /// `ct count over N`: more than N tracked connections for the entry's key.
    static func connlimitOver(_ n: Int) -> OpaquePointer {
        let e = make("connlimit")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CONNLIMIT_COUNT), UInt32(n))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CONNLIMIT_FLAGS), UInt32(NFT_CONNLIMIT_F_INV.rawValue))
        return e
    }

    /// `limit rate over N/unit burst B packets`.
    static func limitOver(_ n: Int, perSeconds unit: UInt64, burst: UInt32) -> OpaquePointer {
        let e = make("limit")
        nftnl_expr_set_u64(e, UInt16(NFTNL_EXPR_LIMIT_RATE), UInt64(n))
        nftnl_expr_set_u64(e, UInt16(NFTNL_EXPR_LIMIT_UNIT), unit)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_BURST), burst)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_TYPE), UInt32(NFT_LIMIT_PKTS.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LIMIT_FLAGS), UInt32(NFT_LIMIT_F_INV.rawValue))
        return e
    }

    static func drop() -> OpaquePointer {
        let e = make("immediate")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_DREG), UInt32(NFT_REG_VERDICT.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_VERDICT), UInt32(NF_DROP))
        return e
    }

    /// `ct mark vmap @set`: the map's verdict goes straight to the verdict register.
    static func vmap(_ set: String, setID: UInt32?, sreg: UInt32) -> OpaquePointer {
        let e = make("lookup")
        nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_LOOKUP_SET), set)
        if let setID { nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SET_ID), setID) }
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_SREG), sreg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_LOOKUP_DREG), UInt32(NFT_REG_VERDICT.rawValue))
        return e
    }

    /// `ct state new` (state bits & NEW != 0) or `ct direction original|reply`.
    static func ctStateNew(_ reg: UInt32) -> [OpaquePointer] {
        let e = make("ct")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CT_KEY), UInt32(NFT_CT_STATE.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CT_DREG), reg)
        let b = and(reg, mask: 8)  // NF_CT_STATE_BIT(IP_CT_NEW)
        var x: UInt32 = 0
        let c = make("cmp")
        nftnl_expr_set_u32(c, UInt16(NFTNL_EXPR_CMP_SREG), reg)
        nftnl_expr_set_u32(c, UInt16(NFTNL_EXPR_CMP_OP), UInt32(NFT_CMP_NEQ.rawValue))
        withUnsafeBytes(of: &x) { _ = nftnl_expr_set(c, UInt16(NFTNL_EXPR_CMP_DATA), $0.baseAddress, 4) }
        return [e, b, c]
    }

    static func ctDirection(_ reg: UInt32, reply: Bool) -> [OpaquePointer] {
        let e = make("ct")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CT_KEY), UInt32(NFT_CT_DIRECTION.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_CT_DREG), reg)
        return [e, cmpEq(reg, [reply ? 1 : 0])]
    }

    static func counter() -> OpaquePointer { make("counter") }

    static func ctMarkSet(_ sreg: UInt32) -> OpaquePointer {
        keyed("ct", NFTNL_EXPR_CT_KEY, NFT_CT_MARK.rawValue, NFTNL_EXPR_CT_SREG, sreg)
    }

    static func ctMarkLoad(_ dreg: UInt32) -> OpaquePointer {
        keyed("ct", NFTNL_EXPR_CT_KEY, NFT_CT_MARK.rawValue, NFTNL_EXPR_CT_DREG, dreg)
    }

    /// `reg & mask` (host order, 4 bytes) into `reg`.
    static func and(_ reg: UInt32, mask: UInt32) -> OpaquePointer {
        and(reg, mask: withUnsafeBytes(of: mask) { Array($0) })
    }

    /// `reg & mask` over `mask.count` bytes into `reg`.
    static func and(_ reg: UInt32, mask: [UInt8]) -> OpaquePointer {
        let e = make("bitwise")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BITWISE_SREG), reg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BITWISE_DREG), reg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_BITWISE_LEN), UInt32(mask.count))
        let xor = [UInt8](repeating: 0, count: mask.count)
        mask.withUnsafeBytes {
            _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_BITWISE_MASK), $0.baseAddress, UInt32($0.count))
        }
        xor.withUnsafeBytes {
            _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_BITWISE_XOR), $0.baseAddress, UInt32($0.count))
        }
        return e
    }

    static func dnat(family: UInt32, addrReg: UInt32, protoReg: UInt32) -> OpaquePointer {
        let e = make("nat")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_TYPE), UInt32(NFT_NAT_DNAT.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_FAMILY), family)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_REG_ADDR_MIN), addrReg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_REG_ADDR_MAX), addrReg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_REG_PROTO_MIN), protoReg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_REG_PROTO_MAX), protoReg)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_FLAGS), 0x3)  // NF_NAT_RANGE_MAP_IPS | PROTO_SPECIFIED
        return e
    }

    static func snat(family: UInt32, addrReg: UInt32) -> OpaquePointer {
        let e = make("nat")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_TYPE), UInt32(NFT_NAT_SNAT.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_FAMILY), family)
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_NAT_REG_ADDR_MIN), addrReg)
        return e
    }

    static func masquerade() -> OpaquePointer { make("masq") }

    static func immediate(_ dreg: UInt32, _ data: [UInt8]) -> OpaquePointer {
        let e = make("immediate")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_DREG), dreg)
        data.withUnsafeBytes { _ = nftnl_expr_set(e, UInt16(NFTNL_EXPR_IMM_DATA), $0.baseAddress, UInt32($0.count)) }
        return e
    }

    static func goto(_ chain: String) -> OpaquePointer {
        let e = make("immediate")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_DREG), UInt32(NFT_REG_VERDICT.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_VERDICT), UInt32(bitPattern: NFT_GOTO.rawValue))
        nftnl_expr_set_str(e, UInt16(NFTNL_EXPR_IMM_CHAIN), chain)
        return e
    }

    static func accept() -> OpaquePointer {
        let e = make("immediate")
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_DREG), UInt32(NFT_REG_VERDICT.rawValue))
        nftnl_expr_set_u32(e, UInt16(NFTNL_EXPR_IMM_VERDICT), UInt32(NF_ACCEPT))
        return e
    }
}

/// A NETLINK_NETFILTER socket: sends nftables batches and ctnetlink requests, reads every ACK.
final class NetlinkSocket {
    private let nl: OpaquePointer
    private let portID: UInt32
    private(set) var seq: UInt32

    init() throws(NatError) {
        guard let nl = mnl_socket_open(NETLINK_NETFILTER) else {
            throw NatError("cannot open a netfilter netlink socket: \(String(cString: strerror(errno)))")
        }
        guard mnl_socket_bind(nl, 0, pid_t(MNL_SOCKET_AUTOPID)) == 0 else {
            let e = String(cString: strerror(errno))
            mnl_socket_close(nl)
            throw NatError("cannot bind a netfilter netlink socket: \(e)")
        }
        self.nl = nl
        portID = mnl_socket_get_portid(nl)
        seq = UInt32(truncatingIfNeeded: time(nil))
        // Big batches (a 65537-slot Maglev map) and one ACK per message.
        var size: Int32 = 16 << 20
        let fd = mnl_socket_get_fd(nl)
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, 4) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, 4)
        }
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, 4) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4)
        }
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(SOL_NETLINK), Int32(NETLINK_EXT_ACK), &one, 4)
    }

    deinit { mnl_socket_close(nl) }

    func newBatch(family: UInt16) -> NftBatch {
        let b = NftBatch(family: family, seq: seq)
        return b
    }

    /// Sends a finished batch and reads the answer to every message. The batch is applied all or
    /// nothing; any error names the first message that failed.
    func send(_ batch: NftBatch) throws(NatError) {
        seq = batch.seq &+ 1
        let fd = mnl_socket_get_fd(nl)
        let sent = batch.withIovecs { iov, n -> Int in
            var addr = sockaddr_nl()
            addr.nl_family = sa_family_t(AF_NETLINK)
            return withUnsafeMutablePointer(to: &addr) { a -> Int in
                var msg = msghdr()
                msg.msg_name = UnsafeMutableRawPointer(a)
                msg.msg_namelen = socklen_t(MemoryLayout<sockaddr_nl>.size)
                msg.msg_iov = iov
                msg.msg_iovlen = n
                return sendmsg(fd, &msg, 0)
            }
        }
        guard sent >= 0 else { throw NatError("cannot send to the kernel: \(String(cString: strerror(errno)))") }
        try readAcks(expected: batch.messages, from: batch.beginSeq, count: batch.seq &- batch.beginSeq) { seq in
            batch.what[seq] ?? "message \(seq)"
        }
    }

    /// True when the kernel has table `name` in `family` (one GETTABLE request).
    func tableExists(family: UInt16, name: String) throws(NatError) -> Bool {
        var req = [UInt8](repeating: 0, count: 256)
        let s = seq
        seq &+= 1
        let sent = req.withUnsafeMutableBytes { raw -> Int in
            let nlh = nftnl_nlmsg_build_hdr(
                raw.baseAddress!.assumingMemoryBound(to: CChar.self), UInt16(NFT_MSG_GETTABLE.rawValue), family,
                UInt16(NLM_F_ACK), s)!
            let t = nftnl_table_alloc()!
            nftnl_table_set_str(t, UInt16(NFTNL_TABLE_NAME.rawValue), name)
            nftnl_table_nlmsg_build_payload(nlh, t)
            nftnl_table_free(t)
            return mnl_socket_sendto(nl, nlh, Int(nlh.pointee.nlmsg_len))
        }
        guard sent > 0 else { throw NatError("cannot ask for table \(name): \(String(cString: strerror(errno)))") }
        var found = false
        var failure: Int32 = 0
        try receive(answering: { $0 == s }, "no answer about table \(name)") { type, err, _ in
            if type == UInt16(NLMSG_ERROR) {
                failure = err
                return true
            }
            if type == UInt16(NFNL_SUBSYS_NFTABLES) << 8 | UInt16(NFT_MSG_NEWTABLE.rawValue) { found = true }
            return false
        }
        if failure == 0 { return found }
        if -failure == ENOENT { return false }
        throw NatError("table \(name): \(String(cString: strerror(-failure)))")
    }

    /// Reads until `body` says it has all it wants, handing it each message that answers a
    /// request of ours (`answering` its sequence number; a failed batch leaves answers to its
    /// later messages behind, which are skipped here): its type, the error code of an
    /// NLMSG_ERROR (0: an acknowledgement), and its bytes from the netlink header on.
    private func receive(
        answering isOurs: (UInt32) -> Bool, _ what: @autoclosure () -> String,
        _ body: (_ type: UInt16, _ error: Int32, _ message: UnsafeRawBufferPointer) -> Bool
    ) throws(NatError) {
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        let header = MemoryLayout<nlmsghdr>.size
        while true {
            let n = buf.withUnsafeMutableBytes { mnl_socket_recvfrom(nl, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw NatError("\(what()): \(String(cString: strerror(errno)))")
            }
            let done = buf.withUnsafeBytes { raw -> Bool in
                var off = 0
                while off + header <= n {
                    let h = raw.loadUnaligned(fromByteOffset: off, as: nlmsghdr.self)
                    let len = Int(h.nlmsg_len)
                    if len < header || off + len > n { return false }  // malformed: read on
                    defer { off += (len + 3) & ~3 }
                    guard isOurs(h.nlmsg_seq) else { continue }
                    let err =
                        h.nlmsg_type == UInt16(NLMSG_ERROR) && len >= header + 4
                        ? raw.loadUnaligned(fromByteOffset: off + header, as: Int32.self) : 0
                    if body(h.nlmsg_type, err, UnsafeRawBufferPointer(rebasing: raw[off..<off + len])) { return true }
                }
                return false
            }
            if done { return }
        }
    }

    /// Only answers to sequence numbers `from ..< from + count` count: a batch that failed leaves
    /// the answers to its later messages behind, which are not this batch's.
    private func readAcks(expected: Int, from: UInt32, count: UInt32, describe: (UInt32) -> String) throws(NatError) {
        guard expected > 0 else { return }
        var acked = 0
        var failure: NatError?
        let fd = mnl_socket_get_fd(nl)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try receive(
            answering: { $0 &- from < count },
            "no answer from the kernel after \(acked) of \(expected) acknowledgements"
        ) { type, err, message in
            guard type == UInt16(NLMSG_ERROR) else { return false }
            acked += 1
            if err != 0 {
                let seq = message.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
                failure = NatError("\(describe(seq)): \(String(cString: strerror(-err)))", errno: -err)
                return true
            }
            return acked >= expected
        }
        if let failure { throw failure }
    }

    /// Per conntrack mark: flows, and packets/bytes each way when conntrack accounting is on
    /// (`net.netfilter.nf_conntrack_acct=1`). One ctnetlink dump.
    func conntrackByMark(family: UInt8) throws(NatError) -> [UInt32: FlowStats] {
        var req = [UInt8](repeating: 0, count: 64)
        let s = seq
        seq &+= 1
        let sent = req.withUnsafeMutableBytes { raw -> Int in
            let nlh = mnl_nlmsg_put_header(raw.baseAddress)!
            nlh.pointee.nlmsg_type = UInt16((NFNL_SUBSYS_CTNETLINK << 8) | Int32(IPCTNL_MSG_CT_GET.rawValue))
            nlh.pointee.nlmsg_flags = UInt16(NLM_F_REQUEST | NLM_F_DUMP)
            nlh.pointee.nlmsg_seq = s
            let nfg = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<nfgenmsg>.size)!.assumingMemoryBound(
                to: nfgenmsg.self)
            nfg.pointee.nfgen_family = family
            nfg.pointee.version = UInt8(NFNETLINK_V0)
            return mnl_socket_sendto(nl, nlh, Int(nlh.pointee.nlmsg_len))
        }
        guard sent > 0 else { throw NatError("cannot ask conntrack: \(String(cString: strerror(errno)))") }
        var out: [UInt32: FlowStats] = [:]
        try receive(answering: { $0 == s }, "conntrack dump") { type, _, m in
            if type == UInt16(NLMSG_DONE) || type == UInt16(NLMSG_ERROR) { return true }
            // nlmsghdr (16) + nfgenmsg (4), then attributes.
            var a = 20
            var mark: UInt32 = 0
            var stats = FlowStats(flows: 1)
            func u64be(_ o: Int) -> UInt64 { UInt64(bigEndian: m.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
            while a + 4 <= m.count {
                let alen = Int(m.loadUnaligned(fromByteOffset: a, as: UInt16.self))
                let atype = m.loadUnaligned(fromByteOffset: a + 2, as: UInt16.self) & 0x3fff
                if alen < 4 { break }
                if atype == UInt16(CTA_MARK.rawValue) && alen >= 8 {
                    mark = UInt32(bigEndian: m.loadUnaligned(fromByteOffset: a + 4, as: UInt32.self))
                } else if atype == UInt16(CTA_COUNTERS_ORIG.rawValue) || atype == UInt16(CTA_COUNTERS_REPLY.rawValue) {
                    var c = a + 4
                    while c + 4 <= a + alen {
                        let clen = Int(m.loadUnaligned(fromByteOffset: c, as: UInt16.self))
                        let ctype = m.loadUnaligned(fromByteOffset: c + 2, as: UInt16.self) & 0x3fff
                        if clen < 4 { break }
                        if clen >= 12 {
                            let v = u64be(c + 4)
                            let orig = atype == UInt16(CTA_COUNTERS_ORIG.rawValue)
                            if ctype == UInt16(CTA_COUNTERS_PACKETS.rawValue) {
                                if orig { stats.packetsIn = v } else { stats.packetsOut = v }
                            } else if ctype == UInt16(CTA_COUNTERS_BYTES.rawValue) {
                                if orig { stats.bytesIn = v } else { stats.bytesOut = v }
                            }
                        }
                        c += (clen + 3) & ~3
                    }
                }
                a += (alen + 3) & ~3
            }
            if mark & 0xffff_0000 != 0 { out[mark, default: FlowStats()].add(stats) }
            return false
        }
        return out
    }

    /// Every rule's counters in a table, by chain: `[chain: [(has a ct expression, packets, bytes)]]`.
    /// What a per-server counter rule counts (`ct state new counter`, `ct direction original
    /// counter`, `ct direction reply counter`).
    enum CounterKind: Sendable {
        case newConnections, original, reply
        /// A service chain's access-list rule (`ip saddr @deny-… counter drop`).
        case refused
    }

    func ruleCounters(family: UInt16, table: String) throws(NatError) -> [String: [(CounterKind, UInt64, UInt64)]] {
        var req = [UInt8](repeating: 0, count: 512)
        let s = seq
        seq &+= 1
        let sent = req.withUnsafeMutableBytes { raw -> Int in
            let nlh = nftnl_nlmsg_build_hdr(
                raw.baseAddress!.assumingMemoryBound(to: CChar.self), UInt16(NFT_MSG_GETRULE.rawValue), family,
                UInt16(NLM_F_DUMP), s)!
            let r = nftnl_rule_alloc()!
            nftnl_rule_set_str(r, UInt16(NFTNL_RULE_TABLE.rawValue), table)
            nftnl_rule_nlmsg_build_payload(nlh, r)
            nftnl_rule_free(r)
            return mnl_socket_sendto(nl, nlh, Int(nlh.pointee.nlmsg_len))
        }
        guard sent > 0 else { throw NatError("cannot list rules: \(String(cString: strerror(errno)))") }
        var out: [String: [(CounterKind, UInt64, UInt64)]] = [:]
        try receive(answering: { $0 == s }, "rule dump") { type, _, m in
            if type == UInt16(NLMSG_DONE) || type == UInt16(NLMSG_ERROR) { return true }
            let r = nftnl_rule_alloc()!
            defer { nftnl_rule_free(r) }
            guard nftnl_rule_nlmsg_parse(m.baseAddress!.assumingMemoryBound(to: nlmsghdr.self), r) >= 0,
                let chainC = nftnl_rule_get_str(r, UInt16(NFTNL_RULE_CHAIN.rawValue))
            else { return false }
            // `ct state` or `ct direction` (then the compared value says which direction).
            var kind: CounterKind?
            var direction = false
            var packets: UInt64 = 0
            var bytes: UInt64 = 0
            var counted = false
            var exprs = 0
            let it = nftnl_expr_iter_create(r)!
            while let e = nftnl_expr_iter_next(it) {
                exprs += 1
                let name = String(cString: nftnl_expr_get_str(e, UInt16(NFTNL_EXPR_NAME)))
                if name == "payload" && nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_OFFSET)) == 13
                    && nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_PAYLOAD_BASE))
                        == UInt32(NFT_PAYLOAD_TRANSPORT_HEADER.rawValue)
                {
                    kind = .newConnections  // dsr: `tcp flags & (syn | ack) == syn counter`
                } else if name == "ct" {
                    let key = nftnl_expr_get_u32(e, UInt16(NFTNL_EXPR_CT_KEY))
                    direction = key != UInt32(NFT_CT_STATE.rawValue)
                    kind = direction ? nil : .newConnections
                } else if name == "cmp" && direction {
                    var len: UInt32 = 0
                    if let d = nftnl_expr_get(e, UInt16(NFTNL_EXPR_CMP_DATA), &len), len >= 1 {
                        kind = d.load(as: UInt8.self) == 1 ? .reply : .original
                    }
                } else if (name == "lookup" && !nftnl_expr_is_set(e, UInt16(NFTNL_EXPR_LOOKUP_DREG)))
                    || name == "dynset"
                {
                    kind = .refused
                } else if name == "counter" {
                    packets = nftnl_expr_get_u64(e, UInt16(NFTNL_EXPR_CTR_PACKETS))
                    bytes = nftnl_expr_get_u64(e, UInt16(NFTNL_EXPR_CTR_BYTES))
                    counted = true
                }
            }
            nftnl_expr_iter_destroy(it)
            if counted && exprs == 1 { kind = .original }  // dsr: a bare `counter` (client to server)
            if counted, let kind { out[String(cString: chainC), default: []].append((kind, packets, bytes)) }
            return false
        }
        return out
    }

    /// Deletes every conntrack entry with this mark (ctnetlink `IPCTNL_MSG_CT_DELETE` with only
    /// CTA_MARK/CTA_MARK_MASK: the kernel flushes matches itself). Their next packets are
    /// balanced anew; on another server they get a reset, so clients fail fast.
    func flushConntrack(mark: UInt32, family: UInt8) throws(NatError) {
        var buf = [UInt8](repeating: 0, count: 256)
        let s = seq
        seq &+= 1
        buf.withUnsafeMutableBytes { raw in
            let nlh = mnl_nlmsg_put_header(raw.baseAddress)!
            nlh.pointee.nlmsg_type = UInt16((NFNL_SUBSYS_CTNETLINK << 8) | Int32(IPCTNL_MSG_CT_DELETE.rawValue))
            nlh.pointee.nlmsg_flags = UInt16(NLM_F_REQUEST | NLM_F_ACK)
            nlh.pointee.nlmsg_seq = s
            let nfg = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<nfgenmsg>.size)!.assumingMemoryBound(
                to: nfgenmsg.self)
            nfg.pointee.nfgen_family = family
            nfg.pointee.version = UInt8(NFNETLINK_V0)
            nfg.pointee.res_id = 0
            mnl_attr_put_u32(nlh, UInt16(CTA_MARK.rawValue), mark.bigEndian)
            mnl_attr_put_u32(nlh, UInt16(CTA_MARK_MASK.rawValue), UInt32(0xffff_ffff).bigEndian)
            _ = mnl_socket_sendto(nl, nlh, Int(nlh.pointee.nlmsg_len))
        }
        do {
            try readAcks(expected: 1, from: s, count: 1) { _ in "flush conntrack mark 0x\(String(mark, radix: 16))" }
        } catch {
            // ENOENT: no entry had this mark.
            if error.errno != ENOENT { throw error }
        }
    }
}
