#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// An IPv4 or IPv6 network: `10.0.0.0/8`, `2001:db8::/32`; a bare address is a /32 or /128.
public struct IPPrefix: Hashable, Sendable, CustomStringConvertible {
    public let isV6: Bool
    /// The network's address bytes (4 or 16), host bits zero.
    public let bytes: [UInt8]
    public let length: Int

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case badAddress(String)
        case badLength(String)
        case hostBits(given: String, network: String)

        public var description: String {
            switch self {
            case .badAddress(let t):
                return "'\(t)' is not an IPv4 or IPv6 address or prefix (such as 10.0.0.0/8 or 2001:db8::/32)"
            case .badLength(let t): return "'\(t)': the prefix length is not a number within the address's bits"
            case .hostBits(let g, let n): return "\(g) has host bits set: the network is \(n)"
            }
        }
    }

    public init(parsing text: String) throws(ParseError) {
        var t = Substring(text)
        var lengthText: Substring?
        if let slash = t.firstIndex(of: "/") {
            lengthText = t[t.index(after: slash)...]
            t = t[..<slash]
        }
        if t.hasPrefix("[") && t.hasSuffix("]") { t = t.dropFirst().dropLast() }
        var v4 = in_addr()
        var v6 = in6_addr()
        let host = String(t)
        if inet_pton(AF_INET, host, &v4) == 1 {
            isV6 = false
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, host, &v6) == 1 {
            isV6 = true
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            throw .badAddress(text)
        }
        let bits = isV6 ? 128 : 32
        if let lt = lengthText {
            guard let n = Int(lt), n >= 0, n <= bits, lt.allSatisfy(\.isNumber) else { throw .badLength(text) }
            length = n
        } else {
            length = bits
        }
        let network = IPPrefix.masked(bytes, length)
        if network != bytes {
            throw .hostBits(given: text, network: IPPrefix(isV6: isV6, bytes: network, length: length).description)
        }
    }

    init(isV6: Bool, bytes: [UInt8], length: Int) {
        self.isV6 = isV6
        self.bytes = bytes
        self.length = length
    }

    static func masked(_ b: [UInt8], _ length: Int) -> [UInt8] {
        var out = b
        for i in 0..<out.count {
            let keep = max(0, min(8, length - i * 8))
            out[i] &= keep == 8 ? 0xFF : UInt8(truncatingIfNeeded: 0xFF << (8 - keep))
        }
        return out
    }

    /// Whether every address of `other` is in this network.
    public func covers(_ other: IPPrefix) -> Bool {
        isV6 == other.isV6 && length <= other.length && IPPrefix.masked(other.bytes, length) == bytes
    }

    public var description: String {
        var text = [CChar](repeating: 0, count: 64)
        var b = bytes
        _ = b.withUnsafeMutableBytes { inet_ntop(isV6 ? AF_INET6 : AF_INET, $0.baseAddress, &text, 64) }
        let end = text.firstIndex(of: 0) ?? text.count
        return "\(String(decoding: text[..<end].map { UInt8(bitPattern: $0) }, as: UTF8.self))/\(length)"
    }
}

/// A set of networks answering "is this address in any of them?" with a walk of at most 32 or
/// 128 steps down a binary tree, whatever the number of networks (10,000 cost what 10 do).
public struct PrefixSet: Sendable {
    /// Node k's children are `children[2k]` and `children[2k + 1]` (0: none; node 0 is the root
    /// and never a child); `ends[k]`: a network ends here.
    private var children: [Int32] = [0, 0]
    private var ends: [Bool] = [false]

    public init() {}

    public mutating func insert(_ bytes: [UInt8], length: Int) {
        var node = 0
        for bit in 0..<length {
            if ends[node] { return }  // a wider network already holds this one
            let b = Int(bytes[bit >> 3] >> (7 - UInt8(bit & 7)) & 1)
            if children[2 * node + b] == 0 {
                children[2 * node + b] = Int32(ends.count)
                ends.append(false)
                children += [0, 0]
            }
            node = Int(children[2 * node + b])
        }
        ends[node] = true
    }

    /// Whether `address` (network byte order, `count` bytes) falls in any network of the set.
    @inline(__always)
    public func contains(_ address: UnsafeRawPointer, bits: Int) -> Bool {
        var node = 0
        for bit in 0..<bits {
            if ends[node] { return true }
            let byte = address.load(fromByteOffset: bit >> 3, as: UInt8.self)
            let next = children[2 * node + Int(byte >> (7 - UInt8(bit & 7)) & 1)]
            if next == 0 { return false }
            node = Int(next)
        }
        return ends[node]
    }

    public var isEmpty: Bool { !ends[0] && children[0] == 0 && children[1] == 0 }
}

/// Who may connect to a service: `deny` is evaluated first, then, when `allow` is not empty,
/// only its networks are admitted. Built once per change and read by every worker.
public struct AccessList: Sendable, Equatable {
    public enum Verdict: Sendable, Equatable {
        case admitted
        case denied
        case notAllowed
    }

    public private(set) var allow: [IPPrefix]
    public private(set) var deny: [IPPrefix]
    private var allow4 = PrefixSet(), allow6 = PrefixSet()
    fileprivate var deny4 = PrefixSet(), deny6 = PrefixSet()

    public init(allow: [IPPrefix] = [], deny: [IPPrefix] = []) {
        self.allow = allow
        self.deny = deny
        for p in allow {
            if p.isV6 { allow6.insert(p.bytes, length: p.length) } else { allow4.insert(p.bytes, length: p.length) }
        }
        for p in deny {
            if p.isV6 { deny6.insert(p.bytes, length: p.length) } else { deny4.insert(p.bytes, length: p.length) }
        }
    }

    public static func == (a: AccessList, b: AccessList) -> Bool { a.allow == b.allow && a.deny == b.deny }

    public var isEmpty: Bool { allow.isEmpty && deny.isEmpty }

    /// The verdict for a client address (an IPv4-mapped IPv6 address is judged as IPv4).
    public func check(_ address: sockaddr_storage) -> Verdict {
        var a = address
        let family = Int32(address.ss_family)
        return withUnsafeBytes(of: &a) { raw -> Verdict in
            switch family {
            case AF_INET:
                let p = raw.baseAddress! + MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_addr)!
                return verdict(v4: p)
            case AF_INET6:
                let p = raw.baseAddress! + MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_addr)!
                let mapped =
                    (0..<10).allSatisfy { p.load(fromByteOffset: $0, as: UInt8.self) == 0 }
                    && p.load(fromByteOffset: 10, as: UInt8.self) == 0xFF
                    && p.load(fromByteOffset: 11, as: UInt8.self) == 0xFF
                if mapped { return verdict(v4: p + 12) }
                if deny6.contains(p, bits: 128) { return .denied }
                if !allow.isEmpty && !allow6.contains(p, bits: 128) { return .notAllowed }
                return .admitted
            default:
                return .admitted
            }
        }
    }

    private func verdict(v4 p: UnsafeRawPointer) -> Verdict {
        if deny4.contains(p, bits: 32) { return .denied }
        if !allow.isEmpty && !allow4.contains(p, bits: 32) { return .notAllowed }
        return .admitted
    }

    /// Adds a network to `allow` (`deny: false`) or `deny`; nil when it is listed already.
    public func adding(_ p: IPPrefix, deny isDeny: Bool) -> AccessList? {
        if isDeny { return deny.contains(p) ? nil : AccessList(allow: allow, deny: deny + [p]) }
        return allow.contains(p) ? nil : AccessList(allow: allow + [p], deny: deny)
    }

    /// Removes a network; nil when it is not listed.
    public func removing(_ p: IPPrefix, deny isDeny: Bool) -> AccessList? {
        if isDeny { return deny.contains(p) ? AccessList(allow: allow, deny: deny.filter { $0 != p }) : nil }
        return allow.contains(p) ? AccessList(allow: allow.filter { $0 != p }, deny: deny) : nil
    }

    /// A network listed in both, or an allowed network entirely inside a denied one (it would
    /// admit nothing): a mistake worth refusing.
    public static func conflict(allow: [IPPrefix], deny: [IPPrefix]) -> String? {
        guard !allow.isEmpty && !deny.isEmpty else { return nil }
        // A deny network covers an allow network when the deny tree ends somewhere on the allow
        // network's path (at most its length deep): one walk per allow entry.
        let list = AccessList(deny: deny)
        for a in allow
        where a.bytes.withUnsafeBytes({ (a.isV6 ? list.deny6 : list.deny4).contains($0.baseAddress!, bits: a.length) })
        {
            let d = deny.first { $0.covers(a) }!
            return a == d
                ? "\(a) is in both allow and deny" : "allow \(a) is entirely inside deny \(d): it admits nothing"
        }
        return nil
    }
}

/// Per-client limits of a service (proxy mode counts them itself; nat mode has the kernel do it).
public struct SourceLimits: Sendable, Equatable {
    /// Connections open at once from one client address (nil: no limit).
    public var connections: Int?
    /// New connections from one client address per `ratePeriodMs` (nil: no limit).
    public var rate: Int?
    public var ratePeriodMs: Int64 = 1000

    public init() {}

    public var isEmpty: Bool { connections == nil && rate == nil }

    /// `50/s`, `3000/m`, `100000/h`.
    public static func parseRate(_ text: String) -> (Int, Int64)? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let n = Int(String(parts[0]).trimmingSpaces), n > 0 else { return nil }
        switch String(parts[1]).trimmingSpaces {
        case "s", "sec", "second": return (n, 1000)
        case "m", "min", "minute": return (n, 60_000)
        case "h", "hour": return (n, 3_600_000)
        default: return nil
        }
    }
}
