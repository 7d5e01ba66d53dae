#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A numeric IPv4 or IPv6 address with a port, as written in the config (`10.0.0.1:6379`,
/// `[::1]:6379`). Pure data: converting text uses `inet_pton`/`inet_ntop`, which touch no kernel state.
public enum SocketAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(sockaddr_in)
    case v6(sockaddr_in6)

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case missingPort
        case badPort(String)
        case badHost(String)
        case ipv6WithoutBrackets(String)

        public var description: String {
            switch self {
            case .missingPort: return "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"
            case .badPort(let p): return "port '\(p)' is not a number between 0 and 65535"
            case .badHost(let h): return "'\(h)' is not a numeric IPv4 or IPv6 address"
            case .ipv6WithoutBrackets(let h):
                return "'\(h)' is not a numeric IPv4 or IPv6 address (write IPv6 addresses as [ADDRESS]:PORT)"
            }
        }
    }

    /// Parses `A.B.C.D:PORT`, `[V6]:PORT`, `*:PORT` (all IPv4 addresses) and `:PORT`.
    public init(parsing text: String) throws(ParseError) {
        var host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw .badHost(text) }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw .missingPort }
            portText = rest.dropFirst()
            guard let addr = SocketAddress.parse6(String(host)) else { throw .badHost(String(host)) }
            let port = try SocketAddress.parsePort(portText)
            var sa = sockaddr_in6()
            sa.sin6_family = sa_family_t(AF_INET6)
            sa.sin6_port = port.bigEndian
            sa.sin6_addr = addr
            self = .v6(sa)
            return
        }
        guard let colon = text.lastIndex(of: ":") else { throw .missingPort }
        host = text[..<colon]
        portText = text[text.index(after: colon)...]
        if host.contains(":") { throw .ipv6WithoutBrackets(String(host)) }
        if host.isEmpty || host == "*" { host = "0.0.0.0" }
        guard let addr = SocketAddress.parse4(String(host)) else { throw .badHost(String(host)) }
        let port = try SocketAddress.parsePort(portText)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr = addr
        self = .v4(sa)
    }

    private static func parsePort(_ text: Substring) throws(ParseError) -> UInt16 {
        guard !text.isEmpty, text.allSatisfy({ $0.isASCII && $0.isNumber }), text.count <= 5, let v = Int(text),
            v <= 65535
        else { throw .badPort(String(text)) }
        return UInt16(v)
    }

    private static func parse4(_ s: String) -> in_addr? {
        var a = in_addr()
        return inet_pton(AF_INET, s, &a) == 1 ? a : nil
    }

    private static func parse6(_ s: String) -> in6_addr? {
        var a = in6_addr()
        return inet_pton(AF_INET6, s, &a) == 1 ? a : nil
    }

    /// 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        switch self {
        case .v4(let a): return UInt32(bigEndian: a.sin_addr.s_addr) >> 24 == 127
        case .v6(var a):
            return withUnsafeBytes(of: &a.sin6_addr) { b in b.prefix(15).allSatisfy { $0 == 0 } && b[15] == 1 }
        }
    }

    /// 0.0.0.0 or :: (a bind on every address; never a destination).
    public var isUnspecified: Bool {
        switch self {
        case .v4(let a): return a.sin_addr.s_addr == 0
        case .v6(var a): return withUnsafeBytes(of: &a.sin6_addr) { b in b.allSatisfy { $0 == 0 } }
        }
    }

    /// What a server address cannot be: unspecified, limited broadcast (255.255.255.255) or
    /// multicast (224.0.0.0/4, ff00::/8). TCP connects to none of them.
    public var notUnicast: String? {
        if isUnspecified { return "the unspecified address" }
        switch self {
        case .v4(let a):
            let v = UInt32(bigEndian: a.sin_addr.s_addr)
            if v == 0xFFFF_FFFF { return "the broadcast address" }
            if v >> 28 == 0xE { return "a multicast address" }
        case .v6(var a):
            if withUnsafeBytes(of: &a.sin6_addr, { $0[0] }) == 0xFF { return "a multicast address" }
        }
        return nil
    }

    /// Whether a socket bound to `self` would take connections meant for `other`: the same port
    /// and the same address, or `self` bound on every address of `other`'s family.
    public func covers(_ other: SocketAddress) -> Bool {
        guard port == other.port, family == other.family else { return false }
        return self == other || isUnspecified
    }

    /// The address without the port, as `show servers state` prints it.
    public var hostText: String {
        let d = description
        if case .v6 = self, let close = d.lastIndex(of: "]") { return String(d[d.index(after: d.startIndex)..<close]) }
        return String(d[..<d.lastIndex(of: ":")!])
    }

    public var family: Int32 {
        switch self {
        case .v4: return AF_INET
        case .v6: return AF_INET6
        }
    }

    public var port: UInt16 {
        get {
            switch self {
            case .v4(let sa): return UInt16(bigEndian: sa.sin_port)
            case .v6(let sa): return UInt16(bigEndian: sa.sin6_port)
            }
        }
        set {
            switch self {
            case .v4(var sa):
                sa.sin_port = newValue.bigEndian
                self = .v4(sa)
            case .v6(var sa):
                sa.sin6_port = newValue.bigEndian
                self = .v6(sa)
            }
        }
    }

    /// The address without the port, as text.
    public var host: String {
        var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch self {
        case .v4(var sa):
            _ = inet_ntop(AF_INET, &sa.sin_addr, &buf, socklen_t(buf.count))
        case .v6(var sa):
            _ = inet_ntop(AF_INET6, &sa.sin6_addr, &buf, socklen_t(buf.count))
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public var description: String {
        switch self {
        case .v4: return "\(host):\(port)"
        case .v6: return "[\(host)]:\(port)"
        }
    }

    /// Calls `body` with a pointer to the C `sockaddr` and its length.
    public func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        switch self {
        case .v4(var sa):
            return try withUnsafePointer(to: &sa) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .v6(var sa):
            return try withUnsafePointer(to: &sa) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        }
    }

    /// Builds an address from a `sockaddr_storage` filled by the kernel (accept, getsockname).
    public init?(storage: sockaddr_storage) {
        var st = storage
        switch Int32(st.ss_family) {
        case AF_INET:
            self = withUnsafePointer(to: &st) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { .v4($0.pointee) }
            }
        case AF_INET6:
            self = withUnsafePointer(to: &st) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { .v6($0.pointee) }
            }
        default:
            return nil
        }
    }

    public static func == (lhs: SocketAddress, rhs: SocketAddress) -> Bool {
        lhs.description == rhs.description
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(description) }
}

extension sockaddr_in: @retroactive @unchecked Sendable {}
extension sockaddr_in6: @retroactive @unchecked Sendable {}
