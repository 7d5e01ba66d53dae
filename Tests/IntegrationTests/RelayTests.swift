import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Byte-exact relay, concurrency, half-close and resets, through a real `ballast run`.
@Suite(.serialized) struct RelayTests {
    /// Sends `size` bytes of a pattern while reading the echo back on another thread; checks every
    /// byte in order, then half-closes and expects the echo server's FIN after exactly `size` bytes.
    static func echoExchange(port: UInt16, size: Int, seed: UInt64) throws -> (
        received: Int, mismatch: Int?, end: Net.ReadEnd
    ) {
        let fd = try Net.connect(port, timeout: 30)
        defer { close(fd) }
        let pattern = Pattern(seed: seed)
        let writer = TestThread {
            var buf = [UInt8](repeating: 0, count: 256 << 10)
            var off = 0
            while off < size {
                let n = min(buf.count, size - off)
                buf.withUnsafeMutableBytes {
                    pattern.fill(UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), from: off)
                }
                var sent = 0
                while sent < n {
                    let w = buf.withUnsafeBytes { send(fd, $0.baseAddress! + sent, n - sent, Int32(MSG_NOSIGNAL)) }
                    if w <= 0 { return }
                    sent += w
                }
                off += n
            }
            Net.shutdownWrite(fd)
        }
        var received = 0
        var mismatch: Int?
        var end = Net.ReadEnd.eof
        var buf = [UInt8](repeating: 0, count: 256 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n > 0 {
                if mismatch == nil {
                    mismatch = buf.withUnsafeBytes {
                        pattern.firstMismatch(UnsafeRawBufferPointer(rebasing: $0[0..<n]), from: received)
                    }
                }
                received += n
                continue
            }
            if n == 0 { break }
            if errno == EINTR { continue }
            end = errno == EAGAIN ? .timeout : errno == ECONNRESET ? .reset : .error(errno)
            break
        }
        writer.join()
        return (received, mismatch, end)
    }

    @Test(
        "bytes are relayed exactly, both ways at once",
        arguments: [0, 1, 100, 16384, 16385, 1 << 20, (4 << 20) + 7, 64 << 20])
    func exactRelay(size: Int) throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("e1", echo.port)])]))
        defer { b.stop() }
        let r = try Self.echoExchange(port: b.port("svc"), size: size, seed: UInt64(size) &+ 11)
        #expect(r.received == size)
        #expect(r.mismatch == nil, "first differing byte at offset \(r.mismatch ?? -1)")
        #expect(r.end == .eof)
    }

    @Test("1000 concurrent connections each get their own bytes back")
    func thousandConnections() throws {
        Net.raiseFileLimit()
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("e1", echo.port)])]))
        defer { b.stop() }
        let port = b.port("svc")
        var fds: [Int32] = []
        defer { for fd in fds { close(fd) } }
        for _ in 0..<1000 { fds.append(try Net.connect(port)) }
        for (k, fd) in fds.enumerated() { try Net.sendAll(fd, "connection \(k) says hello\n") }
        var wrong = 0
        for (k, fd) in fds.enumerated() {
            let expected = Array("connection \(k) says hello\n".utf8)
            if Net.readExactly(fd, expected.count) != expected { wrong += 1 }
        }
        #expect(wrong == 0)
        #expect(echo.connections == 1000)
    }

    @Test("client half-close: the server sees EOF and can still answer")
    func clientHalfClose() throws {
        let got = Mutex<[UInt8]>([])
        let server = try TestServer { c, _ in
            let (data, end) = Net.readAll(c)
            got.withLock { $0 = data }
            // Answer after the client's FIN: the reply must still reach the client.
            if end == .eof { try? Net.sendAll(c, "got \(data.count) bytes") }
            shutdown(c, Int32(SHUT_WR))
        }
        defer { server.stop() }
        let b = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("s1", server.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"))
        defer { close(fd) }
        try Net.sendAll(fd, "request body")
        Net.shutdownWrite(fd)
        let (reply, end) = Net.readAll(fd)
        #expect(String(decoding: reply, as: UTF8.self) == "got 12 bytes")
        #expect(end == .eof)
        #expect(got.withLock { $0 } == Array("request body".utf8))
    }

    @Test("server half-close: the client sees EOF and can still send")
    func serverHalfClose() throws {
        let got = Mutex<[UInt8]>([])
        let server = try TestServer { c, _ in
            try? Net.sendAll(c, "banner\n")
            shutdown(c, Int32(SHUT_WR))
            let (data, _) = Net.readAll(c)
            got.withLock { $0 = data }
        }
        defer { server.stop() }
        let b = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("s1", server.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"))
        defer { close(fd) }
        let (banner, end) = Net.readAll(fd)
        #expect(String(decoding: banner, as: UTF8.self) == "banner\n")
        #expect(end == .eof)
        try Net.sendAll(fd, "still talking after your FIN")
        Net.shutdownWrite(fd)
        let deadline = Date().addingTimeInterval(5)
        while got.withLock({ $0.isEmpty }) && Date() < deadline { usleep(10_000) }
        #expect(String(decoding: got.withLock { $0 }, as: UTF8.self) == "still talking after your FIN")
    }

    @Test("a server reset mid-stream reaches the client as a reset, and the connection is logged")
    func serverResetMidStream() throws {
        let server = try TestServer { c, _ in
            try? Net.sendAll(c, [UInt8](repeating: 0x41, count: 1000))
            usleep(100_000)
            // The server closes `c` when this returns: only ask for a reset (a second close could
            // hit a descriptor another test's thread has just opened).
            Net.lingerZero(c)
        }
        defer { server.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }",
                services: [serviceYAML(servers: [("s1", server.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"), timeout: 5)
        defer { close(fd) }
        let start = Date()
        let (data, end) = Net.readAll(fd)
        #expect(end == .reset)
        #expect(data.count <= 1000)
        #expect(Date().timeIntervalSince(start) < 3)
        #expect(b.waitForLog("end=server-reset") != nil)
    }

    @Test("a client reset closes the server side too")
    func clientReset() throws {
        let serverEnd = Mutex<Net.ReadEnd?>(nil)
        let server = try TestServer { c, _ in
            let (_, end) = Net.readAll(c)
            serverEnd.withLock { $0 = end }
        }
        defer { server.stop() }
        let b = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("s1", server.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"))
        try Net.sendAll(fd, "partial")
        usleep(100_000)
        Net.reset(fd)
        let deadline = Date().addingTimeInterval(5)
        while serverEnd.withLock({ $0 }) == nil && Date() < deadline { usleep(10_000) }
        #expect(serverEnd.withLock { $0 } == .reset)
    }

    @Test("IPv6 bind and IPv6 server")
    func ipv6() throws {
        let echo = try TestServer.echo(host: "::1")
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(services: [serviceYAML(bind: "[::1]:0", servers: [("e1", echo.port)], host: "::1")]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"), host: "::1")
        defer { close(fd) }
        try Net.sendAll(fd, "over v6")
        Net.shutdownWrite(fd)
        #expect(String(decoding: Net.readAll(fd).0, as: UTF8.self) == "over v6")
    }
}
