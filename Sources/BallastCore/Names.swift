/// Servers given by DNS name: what a name may look like, what resolving it means, and which
/// address of an answer a server takes. The resolving itself (getaddrinfo) is BallastIO's; the
/// config loader and the runtime's resolver thread are handed a `NameResolver`.

/// Why a name gave no address: the resolver's own words (`Name or service not known`).
public struct NameLookupError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Resolves a host name to its addresses (port 0), in the resolver's order of preference.
public typealias NameResolver = @Sendable (String) -> Result<[SocketAddress], NameLookupError>

public enum HostName {
    /// A DNS name as RFC 1123 allows it: dot-separated labels of letters, digits and `-` (not
    /// first or last), 1...63 characters each, 253 in all, and not all digits (so a mistyped
    /// address is never looked up as a name).
    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty, bytes.count <= 253 else { return false }
        var trimmed = bytes[...]
        if trimmed.last == UInt8(ascii: ".") { trimmed = trimmed.dropLast() }  // a rooted name
        var sawLetter = false
        for label in trimmed.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard (1...63).contains(label.count), label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-")
            else {
                return false
            }
            for c in label {
                switch c {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"): sawLetter = true
                case UInt8(ascii: "0")...UInt8(ascii: "9"): break
                case UInt8(ascii: "-"), UInt8(ascii: "_"): sawLetter = true
                default: return false
                }
            }
        }
        return sawLetter
    }

    /// `name:port` → its parts, when `name` is a valid host name and `port` a number.
    public static func split(_ text: String) -> (host: String, port: UInt16)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        let host = String(text[..<colon])
        guard isValid(host), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        return (host, port)
    }
}

/// What a server does with a DNS answer.
public enum AddressChoice: Equatable, Sendable {
    /// The answer holds the address the server has: it stays (a name with several addresses
    /// does not make the server hop between them).
    case keep
    /// Move to this address.
    case move(SocketAddress)
    /// Only addresses of the other family came back (for example AAAA where the server, or a
    /// nat service, is IPv4): refused, the server keeps what it has.
    case otherFamily(SocketAddress)
    /// The answer was empty.
    case empty

    /// Chooses from `answers` (port 0) for a server on `port` that has `current` (nil: none
    /// yet) and must stay in `family` when one is given (nat services are one family).
    public static func choose(current: SocketAddress?, answers: [SocketAddress], port: UInt16, family: Int32?)
        -> AddressChoice
    {
        let withPort = answers.map { a -> SocketAddress in
            var a = a
            a.port = port
            return a
        }
        guard let first = withPort.first else { return .empty }
        if let current, withPort.contains(current) { return .keep }
        let want = family ?? current?.family
        guard let want else { return .move(first) }
        if let same = withPort.first(where: { $0.family == want }) { return .move(same) }
        return .otherFamily(first)
    }
}
