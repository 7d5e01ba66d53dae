import BallastCore
import CLinux

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Socket calls used by the data plane and the tests.
public enum Socket {
    /// Creates a nonblocking listening socket. With `reusePort`, several workers can each bind
    /// their own socket to the same address (`SO_REUSEPORT`) and the kernel spreads connections.
    /// IPv6 sockets are IPv6-only so `0.0.0.0:P` and `[::]:P` can be bound side by side.
    /// The corresponding C functions are `socket`, `setsockopt`, `bind` and `listen`.
    /// `freebind`: bind an address this host does not hold (yet): a floating address that
    /// keepalived moves here (`IP_FREEBIND` / `IPV6_FREEBIND`). `listen: false` only binds (what
    /// `ballast check` needs: a bound socket that never listens takes no client from the live
    /// listener group).
    public static func listen(
        _ address: SocketAddress, reusePort: Bool, backlog: Int32, freebind: Bool = false, listen: Bool = true
    ) throws(SysError) -> Int32 {
        let fd = Int32(
            try Sys.checkBlocking("socket") {
                Int(ballast_socket_nonblock(address.family, Int32(SOCK_STREAM.rawValue), 0))
            })
        do throws(SysError) {
            try setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if address.family == AF_INET6 { try setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, 1) }
            // Linux copies TCP_NODELAY from the listener to every socket it accepts: set once
            // here, not once per connection.
            try setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
            if freebind {
                if address.family == AF_INET6 {
                    try setOption(fd, Int32(IPPROTO_IPV6), 78, 1)  // IPV6_FREEBIND
                } else {
                    try setOption(fd, Int32(IPPROTO_IP), 15, 1)  // IP_FREEBIND
                }
            }
            _ = try Sys.checkBlocking("bind") { address.withSockAddr { Int(Glibc.bind(fd, $0, $1)) } }
            if listen { _ = try Sys.checkBlocking("listen") { Int(Glibc.listen(fd, backlog)) } }
        } catch {
            Sys.close(fd)
            throw error
        }
        return fd
    }

    /// `sockaddr_un` for a filesystem path; nil when the path is too long for one.
    static func unixAddress(_ path: String) -> sockaddr_un? {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (k, b) in bytes.enumerated() { dst[k] = b }
            dst[bytes.count] = 0
        }
        return addr
    }

    /// Waits until `fd` is readable (`forWrite`: writable) or `timeoutMs` passes; false on timeout.
    /// The corresponding C function is `poll`.
    public static func wait(_ fd: Int32, forWrite: Bool = false, timeoutMs: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(forWrite ? POLLOUT : POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, timeoutMs)
            if r < 0 && errno == EINTR { continue }
            return r > 0
        }
    }

    /// Connects a close-on-exec Unix stream socket to `path`. `nonblocking`: the socket and the
    /// connect never wait (a listener with a full backlog is EAGAIN). The corresponding C
    /// functions are `socket` and `connect`.
    public static func connectUnix(_ path: String, nonblocking: Bool = false) throws(SysError) -> Int32 {
        guard var addr = unixAddress(path) else { throw SysError("connect", ENAMETOOLONG) }
        let type =
            Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
            | (nonblocking ? Int32(SOCK_NONBLOCK.rawValue) : 0)
        let fd = Int32(try Sys.checkBlocking("socket") { Int(Glibc.socket(AF_UNIX, type, 0)) })
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if r != 0 {
            let e = errno
            Sys.close(fd)
            throw SysError("connect", e)
        }
        return fd
    }

    /// Creates a nonblocking listening Unix stream socket at `path`. A stale socket file left by
    /// a process that is gone is replaced; one that still answers is in use (EADDRINUSE).
    public static func listenUnix(_ path: String, backlog: Int32) throws(SysError) -> Int32 {
        guard var addr = unixAddress(path) else { throw SysError("bind", ENAMETOOLONG) }
        let len = socklen_t(MemoryLayout<sockaddr_un>.size)
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw SysError("bind", EEXIST) }
            if let live = try? connectUnix(path) {
                Sys.close(live)
                throw SysError("bind", EADDRINUSE)
            }
            unlink(path)
        }
        let fd = Int32(
            try Sys.checkBlocking("socket") { Int(ballast_socket_nonblock(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)) })
        do throws(SysError) {
            _ = try Sys.checkBlocking("bind") {
                Int(
                    withUnsafePointer(to: &addr) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, len) }
                    })
            }
            _ = try Sys.checkBlocking("listen") { Int(Glibc.listen(fd, backlog)) }
        } catch {
            Sys.close(fd)
            throw error
        }
        return fd
    }

    /// Accepts one connection, nonblocking and close-on-exec. The corresponding C function is `accept4`.
    @inline(never)
    public static func accept(_ fd: Int32, _ peer: UnsafeMutablePointer<sockaddr_storage>) throws(SysError) -> IOResult<
        Int32
    > {
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = try Sys.check("accept4") {
            peer.withMemoryRebound(to: sockaddr.self, capacity: 1) { Int(ballast_accept4(fd, $0, &len)) }
        }
        switch r {
        case .done(let v): return .done(Int32(v))
        case .wouldBlock: return .wouldBlock
        }
    }

    public enum ConnectResult: Equatable {
        case connected(Int32)
        case inProgress(Int32)
    }

    /// Starts a nonblocking connect. `inProgress` means: wait for EPOLLOUT, then read `SO_ERROR`.
    /// The corresponding C functions are `socket` and `connect`.
    @inline(never)
    public static func connect(_ address: SocketAddress) throws(SysError) -> ConnectResult {
        let fd = Int32(
            try Sys.checkBlocking("socket") {
                Int(ballast_socket_nonblock(address.family, Int32(SOCK_STREAM.rawValue), 0))
            })
        let r = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if r == 0 { return .connected(fd) }
        let e = errno
        if e == EINPROGRESS || e == EINTR { return .inProgress(fd) }
        Sys.close(fd)
        throw SysError("connect", e)
    }

    /// A blocking connect for command-line clients (`ballast ctl`, `ballast health`), with a
    /// receive timeout on the connected socket. The corresponding C functions are `socket`,
    /// `connect` and `setsockopt(SO_RCVTIMEO)`.
    public static func connectBlocking(_ address: SocketAddress, receiveTimeoutSeconds: Int = 10) throws(SysError)
        -> Int32
    {
        let fd = Int32(
            try Sys.checkBlocking("socket") {
                Int(Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0))
            })
        let r = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if r != 0 {
            let e = errno
            Sys.close(fd)
            throw SysError("connect", e)
        }
        setReceiveTimeout(fd, seconds: receiveTimeoutSeconds)
        return fd
    }

    /// Sends one datagram to a Unix datagram socket (`@name` is the abstract namespace), as
    /// sd_notify does; false when it could not be sent whole. The corresponding C functions are
    /// `socket(AF_UNIX, SOCK_DGRAM)` and `sendto`.
    public static func sendDatagram(toUnix path: String, _ payload: [UInt8]) -> Bool {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Sys.close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (k, b) in bytes.enumerated() { p[k] = b } }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (bytes.first == 0 ? 0 : 1))
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                payload.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, len) }
            }
        }
        return r == payload.count
    }

    /// The corresponding C function is `setsockopt(SO_RCVTIMEO)`.
    public static func setReceiveTimeout(_ fd: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The pending error of a socket (0 when none). The corresponding C function is `getsockopt(SO_ERROR)`.
    @inline(never)
    public static func pendingError(_ fd: Int32) -> Int32 {
        var v: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &v, &len) != 0 { return errno }
        return v
    }

    public static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) throws(SysError) {
        var v = value
        _ = try Sys.checkBlocking("setsockopt") {
            Int(setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)))
        }
    }

    /// Disables Nagle: a relay forwards what it has at once.
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Makes the next close send a RST instead of a FIN: used to pass an abort on to the other peer.
    public static func setLingerZero(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
    }

    /// The local address a socket is bound to, as the kernel's `sockaddr_storage`.
    /// The corresponding C function is `getsockname`.
    public static func localStorage(_ fd: Int32) -> sockaddr_storage? {
        var st = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &st) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return r == 0 ? st : nil
    }

    /// The local address a socket is bound to.
    public static func localAddress(_ fd: Int32) -> SocketAddress? {
        localStorage(fd).flatMap { SocketAddress(storage: $0) }
    }
}
