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
        "an accepted socket has Nagle off without a call of its own (TCP_NODELAY is set on the listener)",
        arguments: ["127.0.0.1:0", "[::1]:0"])
    func acceptedInheritsNoDelay(text: String) throws {
        let l = try Socket.listen(try SocketAddress(parsing: text), reusePort: false, backlog: 4)
        defer { Sys.close(l) }
        let client: Int32
        switch try Socket.connect(Socket.localAddress(l)!) {
        case .connected(let fd), .inProgress(let fd): client = fd
        }
        defer { Sys.close(client) }
        #expect(Socket.wait(l, timeoutMs: 2000))
        var peer = sockaddr_storage()
        guard case .done(let fd) = try Socket.accept(l, &peer) else {
            Issue.record("no connection to accept")
            return
        }
        defer { Sys.close(fd) }
        var value: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        #expect(getsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &value, &len) == 0)
        #expect(value == 1)
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

/// The one event loop every thread uses.
struct EventLoopTests {
    @Test("a token keeps index, kind and the low 24 bits of the generation")
    func tokenLayout() {
        let t = EventToken(index: -7, kind: 3, generation: 0x1ABC_DEF0)
        #expect(t.index == -7 && t.kind == 3 && t.generation == 0xBC_DEF0)
        #expect(t.matches(0x1ABC_DEF0) && t.matches(0xBC_DEF0) && !t.matches(0xBC_DEF1))
        #expect(!t.isWake && EventToken(index: 0, kind: EventToken.wakeKind).isWake)
    }

    @Test("wake() from another thread ends a wait at once and is reported once")
    func wakeFromAnotherThread() throws {
        let loop = try EventLoop(capacity: 8)
        let t0 = monotonicMillis()
        let thread = NamedThread.start("test-waker") {
            var ts = timespec(tv_sec: 0, tv_nsec: 50_000_000)
            nanosleep(&ts, nil)
            loop.wake()
        }
        // A signal (the test runner's other tests start and reap processes: SIGCHLD) ends a wait
        // with no event, as epoll_wait's EINTR; the loop's callers simply wait again.
        var n = 0
        while n == 0 && monotonicMillis() - t0 < 5000 { n = try loop.wait(timeoutMs: 5000) }
        pthread_join(thread, nil)
        #expect(n == 1 && loop.event(at: 0).token.isWake)
        #expect(monotonicMillis() - t0 < 2000)
        // Drained by the wait: the next one times out.
        #expect(try loop.wait(timeoutMs: 20) == 0)
    }

    @Test("a socket's event carries its token; removed, it reports nothing")
    func socketEvents() throws {
        let loop = try EventLoop(capacity: 8)
        var sv: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0)
        defer { sv.forEach { close($0) } }
        let token = EventToken(index: 42, kind: 1, generation: 9)
        try loop.add(sv[0], Epoll.in, token)
        #expect(try loop.wait(timeoutMs: 0) == 0)
        #expect(write(sv[1], "x", 1) == 1)
        #expect(try loop.wait(timeoutMs: 1000) == 1)
        let (got, events) = loop.event(at: 0)
        #expect(got == token && events & Epoll.in != 0)
        // A new generation for the same descriptor: the old token no longer matches.
        try loop.modify(sv[0], Epoll.in, EventToken(index: 42, kind: 1, generation: 10))
        #expect(try loop.wait(timeoutMs: 1000) == 1)
        #expect(!loop.event(at: 0).token.matches(9))
        loop.remove(sv[0])
        #expect(try loop.wait(timeoutMs: 20) == 0)
    }
}
