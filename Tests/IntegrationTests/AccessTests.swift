import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Who may connect (proxy mode): allow and deny lists, per-client limits, the runtime API's
/// `show/add/del/clear acl`, counters and the once-a-second log line. Clients connect from
/// several loopback addresses (all of 127.0.0.0/8 is local) and from ::1.
@Suite struct AccessTests {
    /// What a client sees: its bytes echoed (admitted), or the connection closed or reset
    /// without a byte (refused).
    enum Seen: Equatable {
        case admitted
        case refused
    }

    static func attempt(_ port: UInt16, from source: String? = nil, host: String = "127.0.0.1") -> Seen {
        guard
            let fd = try?
                (source.map { try Net.connect(port, from: $0, timeout: 3) } ?? Net.connect(port, host: host, timeout: 3))
        else {
            return .refused
        }
        defer { close(fd) }
        guard (try? Net.sendAll(fd, "ping")) != nil else { return .refused }
        return Net.readExactly(fd, 4) == Array("ping".utf8) ? .admitted : .refused
    }

    /// A service's refused connections (`dcon` of its FRONTEND row); -1 when there is none.
    static func dcon(_ sock: String, _ service: String) throws -> Int {
        Int(StatsClient.row(try StatsClient.stat(sock), "FRONTEND", proxy: service)["dcon"] ?? "") ?? -1
    }

    @Test(
        "allow and deny, IPv4 and IPv6: refused clients are reset before any server is picked, counted in dcon and logged once a second"
    )
    func lists() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nstats: { sockets: [{ path: \(dir.file("admin.sock")), level: admin }] }",
                services: [
                    serviceYAML(
                        name: "v4", servers: [("e", echo.port)],
                        extra: "allow: [127.0.0.0/16]\ndeny: [127.0.9.0/24, 127.0.8.7]"),
                    serviceYAML(
                        name: "v6ok", bind: "[::1]:0", servers: [("e", echo.port)], extra: "allow: [\"::1/128\"]"),
                    serviceYAML(
                        name: "v6no", bind: "[::1]:0", servers: [("e", echo.port)], extra: "allow: [\"2001:db8::/32\"]"),
                ]))
        defer { b.stop() }
        let port = b.port("v4")
        #expect(Self.attempt(port, from: "127.0.0.5") == .admitted)
        #expect(Self.attempt(port, from: "127.0.200.1") == .admitted)
        #expect(Self.attempt(port, from: "127.0.9.5") == .refused)  // deny
        #expect(Self.attempt(port, from: "127.0.8.7") == .refused)  // deny, one address
        #expect(Self.attempt(port, from: "127.0.8.8") == .admitted)
        #expect(Self.attempt(port, from: "127.1.0.5") == .refused)  // not in allow
        #expect(Self.attempt(b.port("v6ok"), host: "::1") == .admitted)
        #expect(Self.attempt(b.port("v6no"), host: "::1") == .refused)
        let sock = dir.file("admin.sock")
        #expect(try Self.dcon(sock, "v4") == 3)
        #expect(try Self.dcon(sock, "v6no") == 1)
        #expect(try Self.dcon(sock, "v6ok") == 0)
        // The server saw only the admitted clients: nothing was connected for a refused one.
        #expect(echo.connections == 4, "the echo server accepted \(echo.connections) connections")
        // Once a second at most: the three refusals are in one line, or in two when a report fell
        // between them; together they say 3, with their reasons.
        let deadline = Date().addingTimeInterval(3)
        var said = Self.refusalsSaid(b.log, service: "v4")
        while said.total < 3 && Date() < deadline {
            usleep(100_000)
            said = Self.refusalsSaid(b.log, service: "v4")
        }
        #expect(said.total == 3 && said.reasons == ["deny list": 2, "not in the allow list": 1], "\(said.lines)")
    }

    /// What the once-a-second lines for `service` say together: the refused total and the count
    /// for each reason ("… refused 3 connections in the last second (deny list 2, …); the last from …").
    static func refusalsSaid(_ log: String, service: String) -> (total: Int, reasons: [String: Int], lines: [String]) {
        let lines = log.split(separator: "\n").map(String.init).filter { $0.contains("service \(service): refused ") }
        var total = 0
        var reasons: [String: Int] = [:]
        for line in lines {
            guard let rest = line.components(separatedBy: "refused ").last,
                let n = rest.split(separator: " ").first.flatMap({ Int($0) }),
                let open = rest.firstIndex(of: "("), let close = rest.firstIndex(of: ")")
            else { continue }
            total += n
            for part in rest[rest.index(after: open)..<close].components(separatedBy: ", ") {
                guard let space = part.lastIndex(of: " "), let k = Int(part[part.index(after: space)...]) else {
                    continue
                }
                reasons[String(part[..<space]), default: 0] += k
            }
        }
        return (total, reasons, lines)
    }

    @Test("a flood of refused connections: a log line per second, not per connection")
    func refusedFlood() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(services: [serviceYAML(servers: [("e", echo.port)], extra: "deny: [127.0.66.0/24]")]))
        defer { b.stop() }
        let port = b.port("svc")
        let t0 = Date()
        for k in 0..<2000 { _ = Self.attempt(port, from: "127.0.66.\(k % 250 + 1)") }
        let seconds = Date().timeIntervalSince(t0)
        usleep(1_200_000)
        let lines = b.log.split(separator: "\n").filter { $0.contains("service svc: refused") }
        #expect(lines.count >= 1 && Double(lines.count) <= seconds + 3, "\(lines.count) lines for \(seconds) s")
        let total = lines.compactMap { l in
            l.components(separatedBy: "refused ").last?.split(separator: " ").first.flatMap { Int($0) }
        }.reduce(0, +)
        #expect(total == 2000, "\(lines)")
    }

    @Test("per-client limits: connections at once and new connections per second, each client on its own")
    func limits() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nstats: { sockets: [{ path: \(dir.file("admin.sock")), level: admin }] }",
                services: [
                    serviceYAML(name: "conns", servers: [("e", echo.port)], extra: "limits: { conn_per_source: 3 }"),
                    serviceYAML(
                        name: "rate", servers: [("e", echo.port)], extra: "limits: { new_conn_rate_per_source: 5/s }"),
                ]))
        defer { b.stop() }
        let conns = b.port("conns")
        var open: [Int32] = []
        defer { for fd in open { close(fd) } }
        for _ in 0..<3 {
            let fd = try Net.connect(conns, from: "127.0.0.7")
            try Net.sendAll(fd, "x")
            #expect(Net.readExactly(fd, 1) == Array("x".utf8))
            open.append(fd)
        }
        #expect(Self.attempt(conns, from: "127.0.0.7") == .refused)  // a fourth at once
        #expect(Self.attempt(conns, from: "127.0.0.8") == .admitted)  // another client
        close(open.removeLast())
        usleep(100_000)
        #expect(Self.attempt(conns, from: "127.0.0.7") == .admitted)  // back under the limit

        let rate = b.port("rate")
        var seen: [Seen] = []
        for _ in 0..<10 { seen.append(Self.attempt(rate, from: "127.0.0.9")) }
        #expect(seen.prefix(5).allSatisfy { $0 == .admitted }, "\(seen)")
        #expect(seen.dropFirst(5).allSatisfy { $0 == .refused }, "\(seen)")
        #expect(Self.attempt(rate, from: "127.0.0.10") == .admitted)  // another client
        usleep(2_100_000)
        #expect(Self.attempt(rate, from: "127.0.0.9") == .admitted)  // a new window
        let sock = dir.file("admin.sock")
        #expect(try Self.dcon(sock, "conns") == 1)
        #expect(try Self.dcon(sock, "rate") == 5)
        #expect(
            b.waitForLog(
                "service rate: refused 5 connections in the last second (over new_conn_rate_per_source 5)", timeout: 3)
                != nil)
    }

    @Test("runtime API: show, add, del and clear acl; the change holds over a reload until the config's list changes")
    func runtime() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let global =
            "workers: 1\nstats: { sockets: [{ path: \(dir.file("admin.sock")), level: admin }, { path: \(dir.file("user.sock")), level: user }] }"
        let b = try BallastProcess(
            config: configYAML(
                global: global, services: [serviceYAML(servers: [("e", echo.port)], extra: "deny: [127.0.9.0/24]")]))
        defer { b.stop() }
        let port = b.port("svc")
        let sock = dir.file("admin.sock")
        #expect(
            try StatsClient.ask(sock, "show acl")
                == "# id (name) description\n0 (svc/allow) 0 networks; empty: every client is allowed\n1 (svc/deny) 1 networks; refused first\n\n"
        )
        #expect(try StatsClient.ask(sock, "show acl svc/deny") == "0x1 127.0.9.0/24\n\n")
        #expect(Self.attempt(port, from: "127.0.0.5") == .admitted)
        #expect(try StatsClient.ask(sock, "add acl svc/deny 127.0.0.5") == "\n")
        #expect(Self.attempt(port, from: "127.0.0.5") == .refused)
        #expect(try StatsClient.ask(sock, "show acl #1") == "0x1 127.0.9.0/24\n0x2 127.0.0.5/32\n\n")
        // Bad input: an error reply naming the reason, nothing changed.
        #expect(
            try StatsClient.ask(sock, "add acl svc/deny 10.0.0.1/8")
                == "10.0.0.1/8 has host bits set: the network is 10.0.0.0/8.\n\n")
        #expect(
            try StatsClient.ask(sock, "add acl svc/deny nonsense")
                == "'nonsense' is not an IPv4 or IPv6 address or prefix (such as 10.0.0.0/8 or 2001:db8::/32).\n\n")
        #expect(
            try StatsClient.ask(sock, "add acl svc/allow 127.0.9.0/25")
                == "allow 127.0.9.0/25 is entirely inside deny 127.0.9.0/24: it admits nothing.\n\n")
        #expect(
            try StatsClient.ask(sock, "add acl nosuch/deny 10.0.0.0/8")
                == "Unknown ACL identifier. Please use #<id> or <service>/allow, <service>/deny.\n\n")
        #expect(try StatsClient.ask(sock, "del acl svc/deny 10.0.0.0/8") == "Key not found.\n\n")
        #expect(try StatsClient.ask(dir.file("user.sock"), "add acl svc/deny 10.0.0.0/8") == "Permission denied\n\n")
        // A reload with the same lists keeps the runtime change.
        let same = configYAML(
            global: global,
            services: [serviceYAML(servers: [("e", echo.port)], extra: "deny: [127.0.9.0/24]\nretries: 1")])
        #expect(b.reload(same)?.contains("reloaded") == true)
        #expect(Self.attempt(port, from: "127.0.0.5") == .refused)
        #expect(try StatsClient.ask(sock, "del acl svc/deny 127.0.0.5") == "\n")
        #expect(Self.attempt(port, from: "127.0.0.5") == .admitted)
        // An allow list from the API: only its networks get in.
        #expect(try StatsClient.ask(sock, "add acl svc/allow 127.0.0.6") == "\n")
        #expect(Self.attempt(port, from: "127.0.0.5") == .refused)
        #expect(Self.attempt(port, from: "127.0.0.6") == .admitted)
        #expect(try StatsClient.ask(sock, "clear acl svc/allow") == "\n")
        #expect(Self.attempt(port, from: "127.0.0.5") == .admitted)
        // A reload that changes the config's list takes the config's, at once for new clients,
        // while an open connection carries on.
        let open = try Net.connect(port, from: "127.0.0.5")
        defer { close(open) }
        try Net.sendAll(open, "a")
        #expect(Net.readExactly(open, 1) == Array("a".utf8))
        let changed = configYAML(
            global: global, services: [serviceYAML(servers: [("e", echo.port)], extra: "deny: [127.0.0.0/24]")])
        #expect(b.reload(changed)?.contains("reloaded") == true)
        #expect(Self.attempt(port, from: "127.0.0.5") == .refused)
        #expect(Self.attempt(port, from: "127.0.1.5") == .admitted)
        try Net.sendAll(open, "b")
        #expect(Net.readExactly(open, 1) == Array("b".utf8))
        #expect(try StatsClient.ask(sock, "show acl svc/deny") == "0x1 127.0.0.0/24\n\n")
    }
}
