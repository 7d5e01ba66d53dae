import BallastCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The system resolver: getaddrinfo(3), which reads `/etc/hosts`, `/etc/resolv.conf` and
/// `nsswitch.conf` as every other program on the host does. It blocks (up to the resolver's
/// timeouts), so Ballast calls it only at load time and on the `ballast-dns` thread.
public enum Resolver {
    public static let system: NameResolver = { lookup($0) }

    /// The host's TCP addresses for `name`, in getaddrinfo's order (RFC 3484 preference),
    /// each once, with port 0.
    public static func lookup(_ name: String) -> Result<[SocketAddress], NameLookupError> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(name, nil, &hints, &list)
        guard rc == 0 else {
            let why = rc == EAI_SYSTEM ? String(cString: strerror(errno)) : String(cString: gai_strerror(rc))
            return .failure(NameLookupError(why))
        }
        defer { freeaddrinfo(list) }
        var out: [SocketAddress] = []
        var p = list
        while let ai = p {
            if let sa = ai.pointee.ai_addr, ai.pointee.ai_addrlen <= socklen_t(MemoryLayout<sockaddr_storage>.size) {
                var storage = sockaddr_storage()
                withUnsafeMutableBytes(of: &storage) { dst in
                    dst.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: Int(ai.pointee.ai_addrlen)))
                }
                if var a = SocketAddress(storage: storage) {
                    a.port = 0
                    if !out.contains(a) { out.append(a) }
                }
            }
            p = ai.pointee.ai_next
        }
        return out.isEmpty ? .failure(NameLookupError("no address")) : .success(out)
    }
}
