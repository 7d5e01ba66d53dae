import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// PROXY protocol v1/v2: sent to servers, accepted from a front balancer, malformed headers refused.
@Suite(.serialized) struct ProxyProtocolTests {
    /// A server that records everything it receives until the client closes.
    static func recorder() throws -> (TestServer, Locked<[[UInt8]]>) {
        let got = Locked<[[UInt8]]>([])
        let s = try TestServer(name: "rec") { c, _ in
            let (data, _) = Net.readAll(c)
            got.value.withLock { $0.append(data) }
        }
        return (s, got)
    }

    static func waitFor(_ got: Locked<[[UInt8]]>, _ n: Int) -> [[UInt8]] {
        let deadline = Date().addingTimeInterval(5)
        while got.value.withLock({ $0.count }) < n && Date() < deadline { usleep(10_000) }
        return got.value.withLock { $0 }
    }

    @Test(
        "send_proxy writes the header with the real client before the first relayed byte",
        arguments: [("v1", "127.0.0.1"), ("v2", "127.0.0.1"), ("v1", "::1"), ("v2", "::1")])
    func send(version: String, host: String) throws {
        let (rec, got) = try Self.recorder()
        defer { rec.stop() }
        let bind = host == "::1" ? "[::1]:0" : "127.0.0.1:0"
        let p = try BallastProcess(
            config: configYAML(services: [
                serviceYAML(bind: bind, servers: [("rec", rec.port)], serverExtra: ["rec": "send_proxy: \(version)"])
            ]))
        defer { p.stop() }
        let fd = try Net.connect(p.port("svc"), host: host)
        var st = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &st) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        let clientPort =
            host == "::1"
            ? withUnsafePointer(to: &st) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            : withUnsafePointer(to: &st) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            }
        try Net.sendAll(fd, "payload")
        close(fd)
        let data = try #require(Self.waitFor(got, 1).first)
        let front = p.port("svc")
        if version == "v1" {
            let fam = host == "::1" ? "TCP6" : "TCP4"
            #expect(
                String(decoding: data, as: UTF8.self)
                    == "PROXY \(fam) \(host) \(host) \(clientPort) \(front)\r\npayload")
        } else {
            let sig: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21]
            #expect(Array(data.prefix(13)) == sig)
            let addrLen = host == "::1" ? 16 : 4
            #expect(data[13] == (host == "::1" ? 0x21 : 0x11))
            #expect(Int(data[14]) << 8 | Int(data[15]) == 2 * addrLen + 4)
            let ports = Array(data[(16 + 2 * addrLen)..<(20 + 2 * addrLen)])
            #expect(
                ports == [UInt8(clientPort >> 8), UInt8(clientPort & 0xFF), UInt8(front >> 8), UInt8(front & 0xFF)])
            #expect(Array(data[(20 + 2 * addrLen)...]) == Array("payload".utf8))
        }
    }

    /// `clientTimeout` nil: the default, so a lost FIN shows as a hang, not a timeout's close.
    static func acceptConfig(_ server: UInt16, clientTimeout: String? = "500ms") -> String {
        configYAML(
            global: "workers: 1\nlog: { connections: true }",
            defaults: clientTimeout.map { "timeout: { client: \($0) }" } ?? "",
            services: [
                "  - name: svc\n    bind: [{ address: \"127.0.0.1:0\", accept_proxy: true }]\n    servers:\n      - { name: rec, address: \"127.0.0.1:\(server)\" }\n"
            ])
    }

    @Test(
        "accept_proxy: v1 and v2 headers give the connection its real client; the rest is relayed",
        arguments: [
            (Array("PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n".utf8), "198.51.100.7:40000"),
            (
                [
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0x00, 0x0C,
                    203, 0, 113, 9, 127, 0, 0, 1, 0x9C, 0x41, 0x00, 0x50,
                ] as [UInt8], "203.0.113.9:40001"
            ),
            (Array("PROXY TCP6 2001:db8::5 ::1 40002 80\r\n".utf8), "[2001:db8::5]:40002"),
        ])
    func accept(header: [UInt8], client: String) throws {
        let (rec, got) = try Self.recorder()
        defer { rec.stop() }
        let p = try BallastProcess(config: Self.acceptConfig(rec.port))
        defer { p.stop() }
        let fd = try Net.connect(p.port("svc"))
        try Net.sendAll(fd, header + Array("after the header".utf8))
        Net.shutdownWrite(fd)
        _ = Net.readAll(fd)
        close(fd)
        #expect(Self.waitFor(got, 1).first.map { String(decoding: $0, as: UTF8.self) } == "after the header")
        #expect(p.waitForLog("client=\(client)") != nil, "\(p.log)")
    }

    @Test(
        "accept_proxy: a header, a request and the FIN sent together: the request is answered and the FIN passes on both ways",
        arguments: [1, 5000, 40000])
    func acceptThenHalfClose(size: Int) throws {
        // The header is read on the client's first event, which also says the client hung up;
        // the request after it is read before the connect is reported, and the FIN must still be
        // read then (no new event will say so).
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try BallastProcess(config: Self.acceptConfig(echo.port, clientTimeout: nil))
        defer { p.stop() }
        for k in 0..<5 {
            let fd = try Net.connect(p.port("svc"), timeout: 5)
            let request = Array(String(repeating: "r", count: size).utf8)
            try Net.sendAll(fd, Array("PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n".utf8) + request)
            Net.shutdownWrite(fd)
            let (data, end) = Net.readAll(fd)
            close(fd)
            #expect(data == request, "connection \(k): \(data.count) bytes")
            #expect(end == .eof, "connection \(k)\n\(p.log)")
        }
    }

    @Test(
        "malformed PROXY headers: closed with the reason logged, nothing reaches the server",
        arguments: [
            ("GET / HTTP/1.1\r\n\r\n", "rejected: bad signature"),
            ("PROXY TCP4 1.2.3.4\r\n", "rejected: malformed v1 header 'TCP4 1.2.3.4'"),
            ("PROXY TCP4 ::1 ::1 1 2\r\n", "rejected: bad address in v1 header"),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + String(repeating: " ", count: 100) + "\r\n",
                "rejected: v1 header longer than 107 bytes"
            ),
            ("V2LEN", "rejected: wrong length 4 for TCP over IPv4"),
            ("V2FAM", "rejected: unsupported address family/protocol 0x31"),
            ("V2HUGE", "rejected: header of 1040 bytes is over the 232-byte limit"),
            ("PROXY TCP4 1.2", "rejected: no complete header within the client timeout"),
        ])
    func malformed(input: String, reason: String) throws {
        let (rec, got) = try Self.recorder()
        defer { rec.stop() }
        let p = try BallastProcess(config: Self.acceptConfig(rec.port))
        defer { p.stop() }
        let sig: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21]
        var bytes = Array(input.utf8)
        switch input {
        case "V2LEN": bytes = sig + [0x11, 0x00, 0x04, 1, 2, 3, 4]
        case "V2FAM": bytes = sig + [0x31, 0x00, 0x00]
        case "V2HUGE": bytes = sig + [0x11, 0x04, 0x00] + [UInt8](repeating: 0, count: 300)
        default: break
        }
        let fd = try Net.connect(p.port("svc"), timeout: 5)
        defer { close(fd) }
        try Net.sendAll(fd, bytes)
        let (_, end) = Net.readAll(fd)
        #expect(end == .eof || end == .reset)
        let line = try #require(p.waitForLog("PROXY header from"))
        #expect(line.contains(reason), "\(line)")
        #expect(p.waitForLog("end=bad-proxy-header") != nil)
        usleep(100_000)
        #expect(rec.connections == 0)
        #expect(got.value.withLock { $0.isEmpty })
    }

    @Test("check send_proxy: the health check sends the header first", arguments: ["v1", "v2"])
    func checkSendProxy(version: String) throws {
        let (rec, got) = try Self.recorder()
        defer { rec.stop() }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: [("rec", rec.port)],
                        extra: "check: { type: tcp, send_proxy: \(version), interval: 200ms, timeout: 100ms }")
                ]))
        defer { p.stop() }
        let first = try #require(Self.waitFor(got, 1).first)
        if version == "v1" {
            let text = String(decoding: first, as: UTF8.self)
            #expect(text.hasPrefix("PROXY TCP4 127.0.0.1 127.0.0.1 "))
            #expect(text.hasSuffix(" \(rec.port)\r\n"))
        } else {
            #expect(
                Array(first.prefix(14)) == [
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11,
                ])
            #expect(first.count == 28)
        }
        #expect(!p.log.contains("is DOWN"))
    }
}
