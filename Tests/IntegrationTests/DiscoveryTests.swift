import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Servers that move: DNS names re-resolved while Ballast runs, and servers added, deleted and
/// moved on the runtime API (HAProxy 2.6's commands and replies), kept over reloads and restarts.
@Suite struct DiscoveryTests {
    /// Ballast in a mount namespace of its own where `/etc/hosts` and `/etc/resolv.conf` are the
    /// test's files, so getaddrinfo answers what the test writes (the file is rewritten in place:
    /// the bind mount follows the inode). The network is the host's loopback.
    final class Names {
        let dir = TempDir()
        let hosts: String
        let resolv: String

        init(_ entries: String) {
            hosts = dir.write("hosts", entries)
            // Nothing listens on 127.0.0.1:53: a name not in the file fails at once. (Mounted
            // only where /etc/resolv.conf exists: it may be a dangling link in a container.)
            resolv = dir.write("resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        }

        func set(_ entries: String) throws {
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: hosts))
            try h.truncate(atOffset: 0)
            try h.write(contentsOf: Data(entries.utf8))
            try h.close()
        }

        /// Runs `ballast` with the test's name files mounted over the system's.
        var prefix: [String] {
            [
                "/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                "mount --bind \(hosts) /etc/hosts && { mount --bind \(resolv) /etc/resolv.conf 2>/dev/null || true; } && exec \"$@\"",
                "sh",
            ]
        }
    }

    static var canMount: Bool { geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") }

    static func line(_ port: UInt16, from fd: Int32? = nil) throws -> String {
        let c = try fd ?? Net.connect(port)
        defer { if fd == nil { close(c) } }
        Net.setTimeout(c, 5)
        var out = [UInt8]()
        var b = [UInt8](repeating: 0, count: 1)
        while recv(c, &b, 1, 0) == 1 {
            if b[0] == 10 { break }
            out.append(b[0])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func row(_ sock: String, _ server: String) -> [String: String] {
        (try? StatsClient.stat(sock)).map { StatsClient.row($0, server) } ?? [:]
    }

    static func waitFor(_ timeout: Double = 10, _ ok: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if ok() { return true }
            usleep(50_000)
        }
        return ok()
    }

    @Test(
        "DNS: a name resolved at start, moved by its DNS answer while a connection to the old address lives on; init_addr none held out of service until it resolves; another family or no answer keeps the address",
        .enabled(
            if: canMount, Comment(rawValue: "needs root and unshare (util-linux) to give Ballast its own /etc/hosts")))
    func namesMove() throws {
        // Two servers on one port, on two loopback addresses: the name decides which.
        let a = try TestServer(name: "at-2", host: "127.0.0.2") { c, s in
            try? Net.sendAll(c, s.name + "\n")
            var buf = [UInt8](repeating: 0, count: 512)
            while true {
                let n = recv(c, &buf, buf.count, 0)
                if n <= 0 || send(c, buf, n, Int32(MSG_NOSIGNAL)) != n { break }
            }
        }
        defer { a.stop() }
        let b = try TestServer.named("at-3", host: "127.0.0.3")
        defer { b.stop() }
        let names = Names("127.0.0.2 db-0.ballast.test\n")
        let sock = names.dir.file("admin.sock")
        let config = configYAML(
            global: "workers: 1\nstats: { sockets: [{ path: \"\(sock)\", level: admin }] }",
            services: [
                """
                  - name: db
                    bind: ["127.0.0.1:0"]
                    resolve_interval: 300ms
                    servers:
                      - { name: s1, address: "db-0.ballast.test:\(a.port)" }
                      - { name: s2, address: "db-1.ballast.test:\(b.port)", init_addr: none }

                """
            ])
        let p = try BallastProcess(config: config, prefix: names.prefix)
        defer { p.stop() }
        let port = p.port("db")
        #expect(Self.row(sock, "s1")["addr"] == "127.0.0.2:\(a.port)")
        #expect(Self.row(sock, "s2")["status"] == "MAINT (resolution)", "\(Self.row(sock, "s2"))")
        #expect(p.waitForLog("server s2: db-1.ballast.test does not resolve") != nil, "\(p.log)")
        // Only s1 takes connections.
        for _ in 0..<4 { #expect(try Self.line(port) == "at-2") }

        // A long-lived connection to s1 at 127.0.0.2.
        let held = try Net.connect(port)
        defer { close(held) }
        #expect(try Self.line(port, from: held) == "at-2")

        // db-0 moves to 127.0.0.3 (a server of its own on the same port) and db-1 appears there.
        let c = try TestServer.named("at-3-too", host: "127.0.0.3", port: a.port)
        defer { c.stop() }
        try names.set("127.0.0.3 db-0.ballast.test\n127.0.0.3 db-1.ballast.test\n")
        #expect(Self.waitFor { Self.row(sock, "s1")["addr"] == "127.0.0.3:\(a.port)" }, "\(p.log)")
        #expect(
            p.waitForLog("server s1 moved from 127.0.0.2:\(a.port) to 127.0.0.3:\(a.port) (db-0.ballast.test)") != nil,
            "\(p.log)")
        #expect(
            Self.waitFor { Self.row(sock, "s2")["status"] == "UP" || Self.row(sock, "s2")["status"] == "no check" },
            "\(Self.row(sock, "s2"))")
        // New connections go to the new addresses; the held one still talks to 127.0.0.2.
        var seen = Set<String>()
        for _ in 0..<6 { seen.insert(try Self.line(port)) }
        #expect(seen == ["at-3-too", "at-3"], "\(seen)")
        try Net.sendAll(held, "still here\n")
        #expect(try Self.line(port, from: held) == "still here")

        // An answer of the other family only: refused, the address stays.
        try names.set("::1 db-0.ballast.test\n127.0.0.3 db-1.ballast.test\n")
        #expect(
            p.waitForLog(
                "server s1: db-0.ballast.test now resolves to ::1 only, another address family than the server's; keeping 127.0.0.3:\(a.port)"
            ) != nil, "\(p.log)")
        // No answer at all: the address stays too, said once.
        try names.set("127.0.0.3 db-1.ballast.test\n")
        #expect(p.waitForLog("server s1: db-0.ballast.test does not resolve") != nil, "\(p.log)")
        usleep(1_000_000)
        #expect(p.logLines.filter { $0.contains("server s1: db-0.ballast.test does not resolve") }.count == 1)
        #expect(Self.row(sock, "s1")["addr"] == "127.0.0.3:\(a.port)")
        #expect(try Self.line(port) != "")
    }

    @Test(
        "a name that does not resolve is a config error naming file:line:column, unless init_addr: none",
        .enabled(if: canMount, Comment(rawValue: "needs root and unshare")))
    func unresolvableName() throws {
        let names = Names("127.0.0.2 known.ballast.test\n")
        let good = names.dir.write(
            "good.yaml",
            configYAML(services: [
                serviceYAML(name: "db", servers: [("s1", 6379)]).replacingOccurrences(
                    of: "127.0.0.1:6379", with: "known.ballast.test:6379")
            ]))
        let bad = names.dir.write(
            "bad.yaml",
            configYAML(services: [
                serviceYAML(name: "db", servers: [("s1", 6379)]).replacingOccurrences(
                    of: "127.0.0.1:6379", with: "unknown.ballast.test:6379")
            ]))
        let run = { (file: String) throws -> (Int32, String, String) in
            let pre = names.prefix
            return try runCommand(pre[0], Array(pre.dropFirst()) + [Repo.ballast, "check", "-c", file], timeout: 30)
        }
        let (okStatus, okOut, okErr) = try run(good)
        #expect(okStatus == 0, "\(okOut)\(okErr)")
        let (status, out, err) = try run(bad)
        #expect(status == 1)
        #expect(
            err.contains("bad.yaml:")
                && err.contains("service 'db' server 's1': 'unknown.ballast.test' does not resolve"), "\(out)\(err)")
        #expect(err.contains("init_addr: none starts the server out of service until it does"), "\(err)")
    }

    @Test(
        "add server, del server and set server addr answer as HAProxy 2.6 does, side by side",
        .enabled(if: RuntimeAPITests.haveHAProxy))
    func repliesAsHAProxy() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let other = try TestServer.echo()
        defer { other.stop() }
        let dir = TempDir()
        let hport = try Net.freePort()
        let cfg = dir.write(
            "h.cfg",
            """
            global
                stats socket \(dir.file("h.sock")) mode 600 level admin
            defaults
                mode tcp
                timeout connect 2s
                timeout client 30s
                timeout server 30s
            listen svc
                bind 127.0.0.1:\(hport)
                balance roundrobin
                server s1 127.0.0.1:\(echo.port)
                server s2 127.0.0.1:\(echo.port)

            """)
        let haproxy = try HAProxyProcess(configFile: cfg)
        defer { haproxy.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nstats: { sockets: [{ path: \(dir.file("b.sock")), level: admin }] }",
                services: [serviceYAML(name: "svc", servers: [("s1", echo.port), ("s2", echo.port)])]))
        defer { b.stop() }
        let h = dir.file("h.sock")
        let bs = dir.file("b.sock")
        #expect(Self.waitFor { FileManager.default.fileExists(atPath: h) })
        let commands = [
            "add server svc/s3 127.0.0.1:\(other.port)",
            "add server svc/s3 127.0.0.1:\(other.port)",
            "add server svc/s4 127.0.0.1:\(other.port) weight 5 backup",
            "add server svc/s5 127.0.0.1:\(other.port) bogus 1",
            "add server nope/s5 127.0.0.1:\(other.port)",
            "add server svc/s6",
            "del server svc/s1",
            "disable server svc/s1",
            "del server svc/s1",
            "del server svc/s1",
            "del server svc/nope",
            "set server svc/s2 addr 127.0.0.1",
            "set server svc/s2 addr 127.0.0.2",
            "set server svc/s2 addr 127.0.0.1 port \(other.port)",
            "set server svc/s2 addr 127.0.0.1 port \(other.port)",
            "set server svc/s2 addr foo",
            "set server svc/s2 addr 127.0.0.1 port x",
            "set server svc/s2 addr",
        ]
        for c in commands {
            let hr = try StatsClient.ask(h, c)
            let br = try StatsClient.ask(bs, c)
            #expect(br == hr, "\(c): Ballast \(br.debugDescription), HAProxy \(hr.debugDescription)")
        }
        // The same servers with the same addresses, admin states and weights in both (ids
        // differ: Ballast's are positions; HAProxy's operational state of a server in
        // maintenance is 0, Ballast's keeps its health).
        let fields = { (text: String) -> [String] in
            text.split(separator: "\n").dropFirst(2).filter { !$0.hasPrefix("#") }.map { line in
                let f = line.split(separator: " ")
                return [f[3], f[4], f[6], f[7], f[8]].joined(separator: " ")
            }
        }
        let hs = fields(try StatsClient.ask(h, "show servers state svc"))
        let bss = fields(try StatsClient.ask(bs, "show servers state svc"))
        #expect(bss == hs, "Ballast \(bss), HAProxy \(hs)")
    }

    @Test(
        "runtime servers: an added server takes traffic once enabled; del server waits for maintenance and no connection; set server addr moves new connections only; all kept over a reload and a restart, dropped when the config changes the service"
    )
    func addDeleteMoveKeep() throws {
        let one = try TestServer.namedEcho("one")
        defer { one.stop() }
        let two = try TestServer.named("two")
        defer { two.stop() }
        let three = try TestServer.named("three")
        defer { three.stop() }
        let dir = TempDir()
        let sock = dir.file("admin.sock")
        let state = dir.file("state")
        let config = configYAML(
            global: "workers: 2\nstate_file: \(state)\nstats: { sockets: [{ path: \"\(sock)\", level: admin }] }",
            services: [serviceYAML(name: "svc", servers: [("s1", one.port)])])
        var p: BallastProcess? = try BallastProcess(config: config)
        defer { p?.stop() }
        let port = p!.port("svc")
        let ask = { (c: String) throws -> String in try StatsClient.ask(sock, c) }

        // Added: in maintenance until enabled (as HAProxy), then in the rotation.
        #expect(try ask("add server svc/s2 127.0.0.1:\(two.port)") == "New server registered.\n\n")
        #expect(Self.row(sock, "s2")["status"] == "MAINT")
        for _ in 0..<3 { #expect(try Self.line(port) == "one") }
        #expect(try ask("enable server svc/s2") == "\n")
        var seen = Set<String>()
        for _ in 0..<4 { seen.insert(try Self.line(port)) }
        #expect(seen == ["one", "two"], "\(seen)")

        // del server: refused with a connection attached, even in maintenance. (s2 is out of
        // the rotation while the connection is made, so it goes to s1.)
        #expect(try ask("disable server svc/s2") == "\n")
        let holder = try Net.connect(port)
        defer { close(holder) }
        #expect(try Self.line(port, from: holder) == "one")
        #expect(try ask("enable server svc/s2") == "\n")
        #expect(try ask("disable server svc/s1") == "\n")
        #expect(try ask("del server svc/s1") == "Server still has connections attached to it, cannot remove it.\n")
        #expect(try ask("enable server svc/s1") == "\n")

        // set server addr: s1 moves to three's port; the held connection still talks to one.
        #expect(
            try ask("set server svc/s1 addr 127.0.0.1 port \(three.port)")
                == "no need to change the addr, port changed from '\(one.port)' to '\(three.port)' by 'stats socket command'\n\n"
        )
        seen = []
        for _ in 0..<4 { seen.insert(try Self.line(port)) }
        #expect(seen == ["three", "two"], "\(seen)")
        try Net.sendAll(holder, "ping\n")
        #expect(try Self.line(port, from: holder) == "ping")

        // Reload with the same file: both changes stay.
        #expect(p!.reload(config)?.contains("reloaded") == true)
        #expect(Self.row(sock, "s1")["addr"] == "127.0.0.1:\(three.port)")
        #expect(Self.row(sock, "s2")["status"] == "no check")

        // Restart: the state file brings them back.
        p!.stop()
        #expect(
            try String(contentsOfFile: state, encoding: .utf8).contains("#ballast-add svc s2 127.0.0.1:\(two.port)"))
        p = try BallastProcess(config: config)
        let port2 = p!.port("svc")
        #expect(
            p!.waitForLog(
                "state file: service svc keeps the server changes made at run time (1 added, 0 deleted, 1 moved)")
                != nil, "\(p!.log)")
        seen = []
        for _ in 0..<4 { seen.insert(try Self.line(port2)) }
        #expect(seen == ["three", "two"], "\(seen)")

        // del server, then a config that changes the service: the file is the truth again.
        #expect(try ask("disable server svc/s2") == "\n")
        #expect(try ask("del server svc/s2") == "Server deleted.\n")
        #expect(Self.row(sock, "s2").isEmpty)
        let changed = config.replacingOccurrences(of: "    servers:\n", with: "    retries: 2\n    servers:\n")
        #expect(p!.reload(changed)?.contains("reloaded") == true)
        #expect(
            p!.waitForLog(
                "service svc: the server changes made at run time are dropped: the config changed the service") != nil)
        #expect(Self.row(sock, "s1")["addr"] == "127.0.0.1:\(one.port)")
        for _ in 0..<3 { #expect(try Self.line(port2) == "one") }
        #expect(!(try String(contentsOfFile: state, encoding: .utf8).contains("#ballast-")))
    }
}
