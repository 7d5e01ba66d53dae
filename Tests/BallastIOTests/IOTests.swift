import BallastCore
import Testing

@testable import BallastIO

#if canImport(Glibc)
    import Glibc
#endif

/// The typed syscall layer on real descriptors.
struct IOTests {
    @Test(
        "addresses parse and print back", arguments: ["127.0.0.1:80", "[::1]:6379", "[2001:db8::1]:0", "0.0.0.0:65535"])
    func addressRoundTrip(text: String) throws {
        #expect(try SocketAddress(parsing: text).description == text)
    }

    @Test func wildcardAndErrors() throws {
        #expect(try SocketAddress(parsing: "*:8080").description == "0.0.0.0:8080")
        #expect(throws: SocketAddress.ParseError.badPort("65536")) { try SocketAddress(parsing: "1.2.3.4:65536") }
        #expect(throws: SocketAddress.ParseError.missingPort) { try SocketAddress(parsing: "[::1]") }
    }

    @Test("a pipe takes the size asked for, and splice moves bytes socket → pipe → socket")
    func spliceThroughPipe() throws {
        let (r, w) = try Pipe.create()
        defer {
            Sys.close(r)
            Sys.close(w)
        }
        #expect(try Pipe.setSize(w, 1 << 20) >= 1 << 20)
        var a: [Int32] = [-1, -1]
        var b: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &a) == 0)
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &b) == 0)
        defer { (a + b).forEach { close($0) } }
        let message = Array("spliced, never copied".utf8)
        #expect(message.withUnsafeBytes { write(a[0], $0.baseAddress!, $0.count) } == message.count)
        #expect(try Sys.splice(from: a[1], to: w, 1 << 20) == .done(message.count))
        #expect(try Sys.splice(from: r, to: b[0], 1 << 20) == .done(message.count))
        var out = [UInt8](repeating: 0, count: 64)
        let n = out.withUnsafeMutableBytes { read(b[1], $0.baseAddress!, $0.count) }
        #expect(Array(out[0..<n]) == message)
        // Nothing left: a nonblocking splice says so instead of waiting.
        #expect(try Sys.splice(from: r, to: b[0], 1 << 20) == .wouldBlock)
    }

    @Test("a refused nonblocking connect reports ECONNREFUSED through SO_ERROR")
    func nonblockingConnect() throws {
        let l = try Socket.listen(try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false, backlog: 1)
        let port = Socket.localAddress(l)!.port
        Sys.close(l)
        var addr = try SocketAddress(parsing: "127.0.0.1:0")
        addr.port = port
        switch try Socket.connect(addr) {
        case .connected(let fd):
            Sys.close(fd)
            Issue.record("connected to a closed port")
        case .inProgress(let fd):
            defer { Sys.close(fd) }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            #expect(poll(&pfd, 1, 2000) == 1)
            #expect(Socket.pendingError(fd) == ECONNREFUSED)
        }
    }

    @Test(
        "bound without listening refuses connections (what ballast check does); freebind binds an address not on this host"
    )
    func bindWithoutListen() throws {
        let any = try SocketAddress(parsing: "127.0.0.1:0")
        let fd = try Socket.listen(any, reusePort: true, backlog: 16, listen: false)
        defer { Sys.close(fd) }
        let bound = try #require(Socket.localAddress(fd))
        let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(c) }
        let r = bound.withSockAddr { connect(c, $0, $1) }
        #expect(r == -1 && errno == ECONNREFUSED)
        // 192.0.2.0/24 (TEST-NET-1) is on no host: EADDRNOTAVAIL, unless freebind.
        let floating = try SocketAddress(parsing: "192.0.2.77:0")
        #expect(throws: SysError("bind", EADDRNOTAVAIL)) { try Socket.listen(floating, reusePort: true, backlog: 16) }
        let f = try Socket.listen(floating, reusePort: true, backlog: 16, freebind: true)
        Sys.close(f)
    }

    @Test("Completion: answers from other threads end the wait; a missing one ends it at the deadline")
    func completion() {
        let c = Completion()
        for _ in 0..<3 {
            _ = NamedThread.start("test-answer") { c.signal() }
        }
        #expect(c.wait(for: 3, timeoutMs: 5000))
        let start = monotonicMillis()
        #expect(!c.wait(for: 4, timeoutMs: 100))
        let waited = monotonicMillis() - start
        #expect(waited >= 100, "returned after \(waited) ms")
    }
}
