import BallastCore
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Blocking socket helpers for the tests' own clients and servers (loopback only).
enum Net {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    static func listen(_ host: String = "127.0.0.1", port: UInt16 = 0, backlog: Int32 = 1024) throws -> (Int32, UInt16)
    {
        let fd = try bound(host, port: port)
        Glibc.listen(fd, backlog)
        return (fd, localPort(fd))
    }

    /// A TCP socket bound with SO_REUSEADDR, not listening.
    static func bound(_ host: String, port: UInt16) throws -> Int32 {
        let addr = try SocketAddress(parsing: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)")
        let fd = socket(addr.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket: \(errno)") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        let r = addr.withSockAddr { bind(fd, $0, $1) }
        guard r == 0 else {
            close(fd)
            throw Failure("bind \(addr): \(String(cString: strerror(errno)))")
        }
        return fd
    }

    static func localPort(_ fd: Int32) -> UInt16 {
        var st = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &st) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return SocketAddress(storage: st)?.port ?? 0
    }

    /// Connects with a receive timeout so a test can never hang on a read.
    static func connect(_ port: UInt16, host: String = "127.0.0.1", timeout: Double = 10) throws -> Int32 {
        let addr = try SocketAddress(parsing: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)")
        let fd = socket(addr.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket: \(String(cString: strerror(errno)))") }
        setTimeout(fd, timeout)
        let r = addr.withSockAddr { Glibc.connect(fd, $0, $1) }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw Failure("connect \(addr): \(String(cString: strerror(e)))")
        }
        return fd
    }

    static func setTimeout(_ fd: Int32, _ seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure("send: \(String(cString: strerror(errno)))")
            }
            off += n
        }
    }

    static func sendAll(_ fd: Int32, _ s: String) throws { try sendAll(fd, Array(s.utf8)) }

    enum ReadEnd: Equatable {
        case eof
        case reset
        case timeout
        case error(Int32)
    }

    /// Reads until EOF, error or timeout; returns the bytes and how the stream ended.
    static func readAll(_ fd: Int32, limit: Int = 256 << 20) -> ([UInt8], ReadEnd) {
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n > 0 {
                out.append(contentsOf: buf[0..<n])
                continue
            }
            if n == 0 { return (out, .eof) }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN { return (out, .timeout) }
            if e == ECONNRESET { return (out, .reset) }
            return (out, .error(e))
        }
        return (out, .eof)
    }

    /// Reads exactly `count` bytes (or fewer if the stream ends first).
    static func readExactly(_ fd: Int32, _ count: Int) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(count)
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            let want = min(buf.count, count - out.count)
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, want, 0) }
            if n > 0 {
                out.append(contentsOf: buf[0..<n])
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        return out
    }

    static func shutdownWrite(_ fd: Int32) { shutdown(fd, Int32(SHUT_WR)) }

    /// Closes with a RST.
    static func reset(_ fd: Int32) {
        lingerZero(fd)
        close(fd)
    }

    /// The next close of `fd` sends a reset (for a descriptor someone else closes).
    static func lingerZero(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
    }

    /// A free loopback port, held for the rest of the test run by a bound socket that does not
    /// listen: a connect to it is refused, a server that binds it with SO_REUSEADDR (every one the
    /// tests start does) can, and the kernel gives it to no one else, neither to a `bind` to port
    /// 0 (another test's server) nor as a connecting socket's local port. Released at once, it
    /// was taken by another test between the choice and the bind (seen in CI).
    static func freePort() throws -> UInt16 {
        let fd = try bound("127.0.0.1", port: 0)
        reserved.withLock { $0.append(fd) }
        return localPort(fd)
    }

    private static let reserved = Mutex<[Int32]>([])

    /// Raises this process's descriptor limit so tests can hold many connections.
    static func raiseFileLimit() {
        var rl = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        rl.rlim_cur = rl.rlim_max
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
    }
}

/// A deterministic byte stream: byte k of stream `seed` is a function of (seed, k), so a reader can
/// check every byte it receives, in order, without keeping a copy.
struct Pattern {
    let seed: UInt64

    func byte(_ k: Int) -> UInt8 {
        var x = (UInt64(k) / 8) &* 0x9E37_79B9_7F4A_7C15 ^ seed
        x ^= x >> 29
        x = x &* 0xBF58_476D_1CE4_E5B9
        x ^= x >> 32
        return UInt8(truncatingIfNeeded: x >> ((UInt64(k) % 8) * 8))
    }

    func fill(_ buf: UnsafeMutableRawBufferPointer, from offset: Int) {
        for j in 0..<buf.count { buf[j] = byte(offset + j) }
    }

    /// Index of the first byte of `data` (starting at `offset` in the stream) that differs, or nil.
    func firstMismatch(_ data: UnsafeRawBufferPointer, from offset: Int) -> Int? {
        for j in 0..<data.count where data[j] != byte(offset + j) { return offset + j }
        return nil
    }
}

/// Runs `body` on its own thread; `join()` waits for it.
final class TestThread: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var thread: Thread?

    init(_ body: @escaping @Sendable () -> Void) {
        let t = Thread { [done] in
            body()
            done.signal()
        }
        t.stackSize = 1 << 20
        thread = t
        t.start()
    }

    @discardableResult
    func join(timeout: Double = 60) -> Bool {
        done.wait(timeout: .now() + timeout) == .success
    }
}

/// A loopback TCP server run by the test, with one thread per connection and a behaviour per
/// connection. Counts connections so tests can see where the balancer sent them.
final class TestServer: @unchecked Sendable {
    let fd: Int32
    let port: UInt16
    let name: String
    private let accepted = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)
    private let lock = NSLock()
    private var clients: [Int32] = []
    private var acceptThread: TestThread?
    private let handler: @Sendable (Int32, TestServer) -> Void

    var connections: Int { accepted.load(ordering: .relaxed) }
    /// Connections whose handler has not finished (the peer has not closed, or the handler runs).
    var openConnections: Int { lock.withLock { clients.count } }

    init(
        name: String = "server", host: String = "127.0.0.1", port: UInt16 = 0,
        handler: @escaping @Sendable (Int32, TestServer) -> Void
    ) throws {
        ignoreSIGPIPE
        (fd, self.port) = try Net.listen(host, port: port)
        self.name = name
        self.handler = handler
        acceptThread = TestThread { [self] in self.acceptLoop() }
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .relaxed) {
            let c = accept(fd, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            if stopped.load(ordering: .relaxed) {
                close(c)
                return
            }
            accepted.wrappingAdd(1, ordering: .relaxed)
            lock.withLock { clients.append(c) }
            Net.setTimeout(c, 30)
            _ = TestThread { [self] in
                self.handler(c, self)
                self.closeClient(c)
            }
        }
    }

    func closeClient(_ c: Int32) {
        let mine = lock.withLock { () -> Bool in
            if let k = clients.firstIndex(of: c) {
                clients.remove(at: k)
                return true
            }
            return false
        }
        if mine { close(c) }
    }

    /// Stops listening and closes the open connections. Once: a second call must not shut down
    /// and close the listener's descriptor number again, which by then may belong to another
    /// test's socket (a listener there stops listening: its clients see "Connection refused").
    func stop() {
        if stopped.exchange(true, ordering: .relaxed) { return }
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
        acceptThread?.join(timeout: 5)
        let open = lock.withLock { () -> [Int32] in
            let c = clients
            clients.removeAll()
            return c
        }
        for c in open {
            shutdown(c, Int32(SHUT_RDWR))
            close(c)
        }
    }

    deinit { if !stopped.load(ordering: .relaxed) { stop() } }

    /// Echoes every byte; on EOF from the client, shuts down its own write side after the echo.
    static func echo(name: String = "echo", host: String = "127.0.0.1") throws -> TestServer {
        try TestServer(name: name, host: host) { c, _ in
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress!, $0.count, 0) }
                if n <= 0 {
                    if n < 0 && errno == EINTR { continue }
                    break
                }
                var off = 0
                while off < n {
                    let w = buf.withUnsafeBytes { send(c, $0.baseAddress! + off, n - off, Int32(MSG_NOSIGNAL)) }
                    if w <= 0 { return }
                    off += w
                }
            }
            shutdown(c, Int32(SHUT_WR))
            // Wait for the peer to close so the test can observe the half-close order.
            _ = Net.readAll(c, limit: 1)
        }
    }

    /// Sends its name and a newline, then echoes until the client closes: a long-lived
    /// connection whose server the test knows.
    static func namedEcho(_ name: String) throws -> TestServer {
        try TestServer(name: name) { c, s in
            try? Net.sendAll(c, s.name + "\n")
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress!, $0.count, 0) }
                if n <= 0 { break }
                if buf.withUnsafeBytes({ send(c, $0.baseAddress!, n, Int32(MSG_NOSIGNAL)) }) != n { break }
            }
        }
    }

    /// Answers each connection with its own name and a newline, then closes.
    static func named(_ name: String, host: String = "127.0.0.1", port: UInt16 = 0) throws -> TestServer {
        try TestServer(name: name, host: host, port: port) { c, s in
            try? Net.sendAll(c, s.name + "\n")
            shutdown(c, Int32(SHUT_WR))
            _ = Net.readAll(c, limit: 1 << 20)
        }
    }
}

extension Net {
    /// Connects from a chosen loopback source address (127.0.0.0/8 is all local).
    static func connect(_ port: UInt16, from source: String, timeout: Double = 10) throws -> Int32 {
        let addr = try SocketAddress(parsing: "127.0.0.1:\(port)")
        let local = try SocketAddress(parsing: "\(source):0")
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        Net.setTimeout(fd, timeout)
        guard local.withSockAddr({ bind(fd, $0, $1) }) == 0, addr.withSockAddr({ Glibc.connect(fd, $0, $1) }) == 0
        else {
            let e = errno
            close(fd)
            throw Net.Failure("connect from \(source): \(String(cString: strerror(e)))")
        }
        return fd
    }
}

/// A value behind a lock that closures on other threads can share.
final class Locked<T: Sendable>: Sendable {
    let value: Mutex<T>
    init(_ v: T) { value = Mutex(v) }
}

extension Process {
    /// Sends `sig` while the process still runs, never to a number that may be free: Foundation
    /// reaps an exited child at once, its PID may then belong to a thread of this very test
    /// process, and kill(2) with a thread's id signals the whole process. (A SIGKILL sent that
    /// way was the suite's silent death: `swift test` exits 1 without a word.)
    func signal(_ sig: Int32) {
        if isRunning { kill(processIdentifier, sig) }
    }
}
