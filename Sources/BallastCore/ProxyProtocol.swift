#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The PROXY protocol (versions 1 and 2, the specification published with HAProxy): a header
/// before the first byte of a connection that tells the next hop who the client really is.
/// Encoding and parsing work on caller-provided memory and allocate nothing.
public enum ProxyProtocol {
    public enum Version: UInt8, Sendable, CaseIterable {
        case v1 = 1
        case v2 = 2

        public init?(text: String) {
            switch text {
            case "v1": self = .v1
            case "v2": self = .v2
            default: return nil
            }
        }
    }

    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    /// Longest header accepted: v1 is at most 107 bytes; v2 with TCP/IPv6 addresses is 52, and
    /// TLVs may follow — up to this limit.
    public static let maxHeader = 232

    /// Writes a header for a connection from `src` to `dst`; returns its length (at most 108).
    public static func encode(
        _ version: Version, src: UnsafePointer<sockaddr_storage>, dst: UnsafePointer<sockaddr_storage>,
        into out: UnsafeMutableRawPointer
    ) -> Int {
        let fam = Int32(src.pointee.ss_family)
        let sameFamily = fam == Int32(dst.pointee.ss_family) && (fam == AF_INET || fam == AF_INET6)
        var n = 0
        func put(_ b: UInt8) {
            out.storeBytes(of: b, toByteOffset: n, as: UInt8.self)
            n += 1
        }
        func putAll(_ bytes: UnsafeRawBufferPointer) { for b in bytes { put(b) } }
        switch version {
        case .v1:
            for b in "PROXY ".utf8 { put(b) }
            guard sameFamily else {
                for b in "UNKNOWN\r\n".utf8 { put(b) }
                return n
            }
            for b in (fam == AF_INET ? "TCP4 " : "TCP6 ").utf8 { put(b) }
            func putAddr(_ s: UnsafePointer<sockaddr_storage>) {
                var text = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))  // 48 bytes
                withUnsafeMutableBytes(of: &text) { buf in
                    let p = buf.baseAddress!.assumingMemoryBound(to: CChar.self)
                    if fam == AF_INET {
                        s.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                            var a = sin.pointee.sin_addr
                            _ = inet_ntop(AF_INET, &a, p, 48)
                        }
                    } else {
                        s.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin in
                            var a = sin.pointee.sin6_addr
                            _ = inet_ntop(AF_INET6, &a, p, 48)
                        }
                    }
                    var k = 0
                    while k < 48 && buf[k] != 0 {
                        put(buf[k])
                        k += 1
                    }
                }
            }
            func putPort(_ s: UnsafePointer<sockaddr_storage>) {
                var v = Int(port(s))
                var digits = (UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0))
                var count = 0
                withUnsafeMutableBytes(of: &digits) { d in
                    repeat {
                        d[count] = UInt8(48 + v % 10)
                        v /= 10
                        count += 1
                    } while v > 0
                    for k in stride(from: count - 1, through: 0, by: -1) { put(d[k]) }
                }
            }
            putAddr(src)
            put(32)
            putAddr(dst)
            put(32)
            putPort(src)
            put(32)
            putPort(dst)
            put(13)
            put(10)
            return n
        case .v2:
            for b in v2Signature { put(b) }
            put(0x21)  // version 2, PROXY command
            guard sameFamily else {
                put(0x00)  // UNSPEC
                put(0)
                put(0)
                return n
            }
            if fam == AF_INET {
                put(0x11)  // TCP over IPv4
                put(0)
                put(12)
                src.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { s in
                    dst.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { d in
                        withUnsafeBytes(of: s.pointee.sin_addr) { putAll($0) }
                        withUnsafeBytes(of: d.pointee.sin_addr) { putAll($0) }
                        withUnsafeBytes(of: s.pointee.sin_port) { putAll($0) }
                        withUnsafeBytes(of: d.pointee.sin_port) { putAll($0) }
                    }
                }
            } else {
                put(0x21)  // TCP over IPv6
                put(0)
                put(36)
                src.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { s in
                    dst.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { d in
                        withUnsafeBytes(of: s.pointee.sin6_addr) { putAll($0) }
                        withUnsafeBytes(of: d.pointee.sin6_addr) { putAll($0) }
                        withUnsafeBytes(of: s.pointee.sin6_port) { putAll($0) }
                        withUnsafeBytes(of: d.pointee.sin6_port) { putAll($0) }
                    }
                }
            }
            return n
        }
    }

    static func port(_ s: UnsafePointer<sockaddr_storage>) -> UInt16 {
        if Int32(s.pointee.ss_family) == AF_INET {
            return s.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        return s.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
    }

    public enum Parsed: Equatable {
        /// More bytes are needed.
        case incomplete
        /// Not a valid header; the reason is for the log.
        case invalid(String)
        /// A header of `length` bytes; `source` is the client it names (nil for LOCAL/UNKNOWN).
        case header(length: Int, source: SocketAddress?)
    }

    /// Parses a header at the start of `data` (peeked from the socket).
    public static func parse(_ data: UnsafeRawBufferPointer) -> Parsed {
        if data.isEmpty { return .incomplete }
        if data[0] == 0x0D {
            let k = min(data.count, 12)
            for j in 0..<k where data[j] != v2Signature[j] { return .invalid("bad signature") }
            if data.count < 16 { return .incomplete }
            guard data[12] >> 4 == 2 else { return .invalid("unsupported version \(data[12] >> 4)") }
            let command = data[12] & 0x0F
            guard command <= 1 else { return .invalid("unknown command \(command)") }
            let length = Int(data[14]) << 8 | Int(data[15])
            guard 16 + length <= maxHeader else {
                return .invalid("header of \(16 + length) bytes is over the \(maxHeader)-byte limit")
            }
            if data.count < 16 + length { return .incomplete }
            if command == 0 { return .header(length: 16 + length, source: nil) }  // LOCAL
            switch data[13] {
            case 0x11:
                guard length >= 12 else { return .invalid("wrong length \(length) for TCP over IPv4") }
                var sa = sockaddr_in()
                sa.sin_family = sa_family_t(AF_INET)
                withUnsafeMutableBytes(of: &sa.sin_addr) { for j in 0..<4 { $0[j] = data[16 + j] } }
                withUnsafeMutableBytes(of: &sa.sin_port) {
                    $0[0] = data[24]
                    $0[1] = data[25]
                }
                return .header(length: 16 + length, source: .v4(sa))
            case 0x21:
                guard length >= 36 else { return .invalid("wrong length \(length) for TCP over IPv6") }
                var sa = sockaddr_in6()
                sa.sin6_family = sa_family_t(AF_INET6)
                withUnsafeMutableBytes(of: &sa.sin6_addr) { for j in 0..<16 { $0[j] = data[16 + j] } }
                withUnsafeMutableBytes(of: &sa.sin6_port) {
                    $0[0] = data[48]
                    $0[1] = data[49]
                }
                return .header(length: 16 + length, source: .v6(sa))
            case 0x00:
                return .header(length: 16 + length, source: nil)
            default:
                return .invalid("unsupported address family/protocol 0x\(String(data[13], radix: 16))")
            }
        }
        let prefix = Array("PROXY ".utf8)
        for j in 0..<min(data.count, 6) where data[j] != prefix[j] { return .invalid("bad signature") }
        var end = -1
        for j in 0..<min(data.count, 108) where data[j] == 10 {
            end = j
            break
        }
        if end < 0 { return data.count >= 108 ? .invalid("v1 header longer than 107 bytes") : .incomplete }
        guard end >= 1, data[end - 1] == 13 else { return .invalid("v1 header not ended by CRLF") }
        let line = String(decoding: UnsafeRawBufferPointer(rebasing: data[6..<(end - 1)]), as: UTF8.self)
        let f = line.split(separator: " ", omittingEmptySubsequences: false)
        if f.first == "UNKNOWN" { return .header(length: end + 1, source: nil) }
        guard f.count == 5, f[0] == "TCP4" || f[0] == "TCP6" else { return .invalid("malformed v1 header '\(line)'") }
        let v6 = f[0] == "TCP6"
        guard let port = UInt16(f[3]), let dport = UInt16(f[4]),
            let src = try? SocketAddress(parsing: v6 ? "[\(f[1])]:\(port)" : "\(f[1]):\(port)"),
            (src.family == AF_INET6) == v6,
            (try? SocketAddress(parsing: v6 ? "[\(f[2])]:\(dport)" : "\(f[2]):\(dport)")) != nil
        else { return .invalid("bad address in v1 header '\(line)'") }
        return .header(length: end + 1, source: src)
    }
}

extension SocketAddress {
    /// Writes the address into a `sockaddr_storage`.
    public func store(into s: UnsafeMutablePointer<sockaddr_storage>) {
        s.pointee = sockaddr_storage()
        switch self {
        case .v4(let a): s.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee = a }
        case .v6(let a): s.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee = a }
        }
    }
}
