import BallastCore
import BallastIO
import CNftables

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The kernel's neighbour table (ARP for IPv4, NDP for IPv6) over rtnetlink, for dsr mode: a
/// server's frames go to the MAC address the kernel resolved for it on the service's interface.
/// One socket asks (a dump of the table), another listens to every change (`RTNLGRP_NEIGH`), so
/// the nat thread wakes the moment an entry appears, fails or changes its address.
final class Neighbours {
    struct Entry: Equatable {
        var ifindex: UInt32
        var address: [UInt8]
        var mac: [UInt8]?
        var state: UInt16
    }

    // rtnetlink's numbers (linux/rtnetlink.h, linux/neighbour.h).
    static let newNeigh: UInt16 = 28
    static let getNeigh: UInt16 = 30
    static let groupNeigh: UInt32 = 1 << 2  // RTMGRP_NEIGH
    static let attrDst: UInt16 = 1
    static let attrLLAddr: UInt16 = 2
    /// States with a MAC address the kernel sends to: REACHABLE, STALE, DELAY, PROBE, PERMANENT.
    static let usableStates: UInt16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x80

    private let ask: OpaquePointer
    private let listen: OpaquePointer
    private var seq: UInt32 = 1

    init() throws(NatError) {
        guard let a = mnl_socket_open(NETLINK_ROUTE) else {
            throw NatError("cannot open a route netlink socket: \(String(cString: strerror(errno)))")
        }
        guard mnl_socket_bind(a, 0, pid_t(MNL_SOCKET_AUTOPID)) == 0, let l = mnl_socket_open(NETLINK_ROUTE) else {
            let e = String(cString: strerror(errno))
            mnl_socket_close(a)
            throw NatError("cannot open a route netlink socket: \(e)")
        }
        guard mnl_socket_bind(l, Neighbours.groupNeigh, pid_t(MNL_SOCKET_AUTOPID)) == 0 else {
            let e = String(cString: strerror(errno))
            mnl_socket_close(a)
            mnl_socket_close(l)
            throw NatError("cannot follow neighbour changes: \(e)")
        }
        ask = a
        listen = l
        let fd = mnl_socket_get_fd(l)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    deinit {
        mnl_socket_close(ask)
        mnl_socket_close(listen)
    }

    /// Readable when a neighbour entry changed (for the nat thread's event loop).
    var changes: Int32 { mnl_socket_get_fd(listen) }

    /// Reads and forgets what the change socket holds (a dump follows, which says it all).
    func drainChanges() {
        var buf = [UInt8](repeating: 0, count: 16384)
        while buf.withUnsafeMutableBytes({ mnl_socket_recvfrom(listen, $0.baseAddress, $0.count) }) > 0 {}
    }

    /// Every neighbour entry of both families.
    func dump() throws(NatError) -> [Entry] {
        seq &+= 1
        let s = seq
        // nlmsghdr (16 bytes) + ndmsg (12 bytes), family AF_UNSPEC: both tables.
        var req = [UInt8](repeating: 0, count: 28)
        func put16(_ v: UInt16, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { req.replaceSubrange(at..<at + 2, with: $0) }
        }
        func put32(_ v: UInt32, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { req.replaceSubrange(at..<at + 4, with: $0) }
        }
        put32(28, 0)
        put16(Neighbours.getNeigh, 4)
        put16(UInt16(NLM_F_REQUEST | NLM_F_DUMP), 6)
        put32(s, 8)
        let sent = req.withUnsafeBytes { mnl_socket_sendto(ask, $0.baseAddress, $0.count) }
        guard sent > 0 else {
            throw NatError("cannot ask for the neighbour table: \(String(cString: strerror(errno)))")
        }
        var out: [Entry] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { mnl_socket_recvfrom(ask, $0.baseAddress, $0.count) }
            guard n > 0 else { throw NatError("cannot read the neighbour table: \(String(cString: strerror(errno)))") }
            var off = 0
            while off + 16 <= n {
                let len = Int(buf.u32(off))
                let type = buf.u16(off + 4)
                guard len >= 16, off + len <= n else { break }
                if buf.u32(off + 8) == s {
                    if type == UInt16(NLMSG_DONE) { return out }
                    if type == UInt16(NLMSG_ERROR) {
                        let err = Int32(bitPattern: buf.u32(off + 16))
                        throw NatError("the neighbour table: \(String(cString: strerror(-err)))")
                    }
                    if type == Neighbours.newNeigh, let e = Neighbours.parse(buf, off + 16, off + len) { out.append(e) }
                }
                off += (len + 3) & ~3
            }
        }
    }

    /// One `ndmsg` and its attributes.
    static func parse(_ b: [UInt8], _ start: Int, _ end: Int) -> Entry? {
        guard start + 12 <= end else { return nil }
        var e = Entry(
            ifindex: UInt32(bitPattern: Int32(bitPattern: b.u32(start + 4))), address: [], mac: nil,
            state: b.u16(start + 8))
        var off = start + 12
        while off + 4 <= end {
            let len = Int(b.u16(off))
            let type = b.u16(off + 2) & 0x3FFF
            guard len >= 4, off + len <= end else { break }
            let value = Array(b[(off + 4)..<(off + len)])
            if type == attrDst { e.address = value }
            if type == attrLLAddr && value.count == 6 { e.mac = value }
            off += (len + 3) & ~3
        }
        return e.address.isEmpty ? nil : e
    }
}

extension [UInt8] {
    fileprivate func u16(_ at: Int) -> UInt16 { UInt16(self[at]) | UInt16(self[at + 1]) << 8 }
    fileprivate func u32(_ at: Int) -> UInt32 {
        UInt32(self[at]) | UInt32(self[at + 1]) << 8 | UInt32(self[at + 2]) << 16 | UInt32(self[at + 3]) << 24
    }
}
