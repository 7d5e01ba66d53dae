import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Active health checks against real servers; what a user sees: the transition log lines and
/// where new connections go.
@Suite(.serialized) struct HealthTests {
    /// A tiny HTTP server whose answer the test sets; it records the first request it got.
    final class HTTPServer: @unchecked Sendable {
        let server: TestServer
        let answer = Locked<String>("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        let firstRequest = Locked<String?>(nil)

        init() throws {
            let answer = self.answer
            let firstRequest = self.firstRequest
            server = try TestServer(name: "http") { c, _ in
                var req = [UInt8]()
                while !req.suffix(4).elementsEqual([13, 10, 13, 10]) {
                    let b = Net.readExactly(c, 1)
                    if b.isEmpty { return }
                    req += b
                }
                firstRequest.value.withLock { if $0 == nil { $0 = String(decoding: req, as: UTF8.self) } }
                let a = answer.value.withLock { $0 }
                if a == "SILENT" {
                    _ = Net.readAll(c)
                    return
                }
                try? Net.sendAll(c, a)
            }
        }
    }

    static func config(
        _ servers: [(String, UInt16)], check: String, extra: String = "", serverExtra: [String: String] = [:]
    ) -> String {
        configYAML(
            global: "workers: 1",
            services: [serviceYAML(servers: servers, extra: "check: \(check)\n" + extra, serverExtra: serverExtra)])
    }

    @Test("tcp: a refused server goes DOWN after fall checks, traffic avoids it, and it comes back UP")
    func tcpRefusedAndBack() throws {
        let alive = try TestServer.named("alive")
        defer { alive.stop() }
        let deadPort = try Net.freePort()
        let p = try BallastProcess(
            config: Self.config(
                [("alive", alive.port), ("dead", deadPort)],
                check: "{ type: tcp, interval: 200ms, timeout: 200ms, rise: 2, fall: 2 }"))
        defer { p.stop() }
        let down = try #require(p.waitForLog("Server svc/dead is DOWN", timeout: 5))
        #expect(down.contains("reason: Layer4 connection problem, info: \"Connection refused\", check duration: "))
        #expect(p.waitForLog("Server svc/alive is DOWN", timeout: 0.5) == nil)
        for _ in 0..<10 { #expect(try LifecycleTests.whoAnswers(p.port("svc")) == "alive") }
        let revived = try TestServer(name: "dead", port: deadPort) { c, s in try? Net.sendAll(c, s.name + "\n") }
        defer { revived.stop() }
        let up = try #require(p.waitForLog("Server svc/dead is UP", timeout: 5))
        #expect(up.contains("reason: Layer4 check passed"))
        var seen = Set<String>()
        for _ in 0..<6 { seen.insert(try LifecycleTests.whoAnswers(p.port("svc"))) }
        #expect(seen == ["alive", "dead"])
    }

    @Test("tcp: a server that never completes the handshake fails with a Layer4 timeout")
    func tcpTimeout() throws {
        let hole = try FailureTests.BlackHole()
        let alive = try TestServer.named("alive")
        defer { alive.stop() }
        let p = try BallastProcess(
            config: Self.config(
                [("alive", alive.port), ("hole", hole.port)],
                check: "{ type: tcp, interval: 300ms, timeout: 200ms, fall: 1 }"))
        defer { p.stop() }
        let down = try #require(p.waitForLog("Server svc/hole is DOWN", timeout: 5))
        #expect(down.contains("reason: Layer4 timeout"))
    }

    @Test(
        "http: the request sent, and 200 / 503 / wrong body / silence / garbage judged as HAProxy does",
        arguments: [
            ("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy", nil as String?),
            (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                "reason: Layer7 wrong status, code: 503, info: \"Service Unavailable\""
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nsick",
                "reason: Layer7 invalid response, code: 200, info: \"body does not contain 'healthy'\""
            ),
            ("SILENT", "reason: Layer7 timeout"),
            (
                "+PONG\r\nthis is not http at all\r\n",
                "reason: Layer7 invalid response, info: \"not an HTTP answer: +PONG..this is not http at all..\""
            ),
        ])
    func http(answer: String, expected: String?) throws {
        let http = try HTTPServer()
        http.answer.value.withLock { $0 = answer }
        let alive = try TestServer.named("alive")
        defer {
            http.server.stop()
            alive.stop()
        }
        let p = try BallastProcess(
            config: Self.config(
                [("alive", alive.port), ("web", http.server.port)],
                check:
                    "{ type: http, method: HEAD, path: /healthz, host: app.example, expect: [200-299], body: healthy, interval: 300ms, timeout: 250ms, fall: 1 }",
                serverExtra: ["alive": "check: false"]))
        defer { p.stop() }
        if let expected {
            let line = try #require(p.waitForLog("Server svc/web is DOWN", timeout: 5))
            #expect(line.contains(expected), "\(line)")
        } else {
            usleep(1_000_000)
            #expect(!p.log.contains("is DOWN"))
        }
        let req = try #require(http.firstRequest.value.withLock { $0 })
        #expect(req.hasPrefix("HEAD /healthz HTTP/1.1\r\nHost: app.example\r\n"))
        #expect(req.contains("Connection: close\r\n"))
    }

    @Test(
        "redis role: master takes the traffic; a failover moves it and cuts the old master's clients",
        .enabled(if: RedisTests.haveRedis))
    func redisFailover() throws {
        let a = try RedisTests.RedisServer()
        let b = try RedisTests.RedisServer()
        try #require("\(a.port)".count == "\(b.port)".count)
        _ = try b.cli("REPLICAOF", "127.0.0.1", "\(a.port)")
        // The role change is seen in a valid reply, not by a timeout: the timeout only has to be
        // long enough that a loaded machine (CI runs suites side by side) does not fail the master.
        let interval = 400
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }",
                services: [
                    serviceYAML(
                        name: "redis", servers: [("a", a.port), ("b", b.port)],
                        extra:
                            "check: { type: redis, role: master, interval: \(interval)ms, timeout: 350ms, rise: 1, fall: 2 }\non_marked_down: shutdown-sessions"
                    )
                ]))
        defer { p.stop() }
        let down = try #require(p.waitForLog("Server redis/b is DOWN", timeout: 5))
        #expect(down.contains("reason: Layer7 invalid response, info: \"role is slave, the check requires master\""))
        // Role checks start DOWN (`init_state: down`): no traffic before a's first answer, which
        // on a loaded machine can come after b's.
        try #require(p.waitForLog("Server redis/a is UP", timeout: 5) != nil, "\(p.log)")
        let port = p.port("redis")
        func servedBy() throws -> String {
            let fd = try Net.connect(port, timeout: 5)
            defer { close(fd) }
            try Net.sendAll(fd, "*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nport\r\n")
            // *2 $4 port $N <port>: 20 bytes of framing and the port's digits.
            let reply = String(decoding: Net.readExactly(fd, 20 + "\(a.port)".count), as: UTF8.self)
            return reply.contains("\r\n\(a.port)\r\n") ? "a" : reply.contains("\r\n\(b.port)\r\n") ? "b" : reply
        }
        func states() -> String { p.log.split(separator: "\n").filter { $0.contains(" is ") }.joined(separator: "\n") }
        for _ in 0..<6 {
            let who = try servedBy()
            #expect(who == "a", "reply \(who.debugDescription)\n\(p.log)")
        }
        // A client of the master, through Ballast, held across the failover.
        let held = try Net.connect(port, timeout: 10)
        defer { close(held) }
        try Net.sendAll(held, "*1\r\n$4\r\nPING\r\n")
        #expect(Net.readExactly(held, 7) == Array("+PONG\r\n".utf8))
        let start = Date()
        _ = try b.cli("REPLICAOF", "NO", "ONE")
        _ = try a.cli("REPLICAOF", "127.0.0.1", "\(b.port)")
        #expect(p.waitForLog("Server redis/a is DOWN", timeout: 5) != nil)
        #expect(p.waitForLog("Server redis/b is UP", timeout: 5) != nil)
        let moved = Date().timeIntervalSince(start)
        // fall × interval + one interval, with room for a slow machine.
        #expect(moved < Double(2 * interval + interval) / 1000 + 1.0, "took \(moved)s")
        for _ in 0..<6 { #expect(try servedBy() == "b", "\(states())") }
        // shutdown-sessions: the old master's client was closed.
        let (_, end) = Net.readAll(held)
        #expect(end == .eof || end == .reset)
        #expect(p.waitForLog("closed 1 connections (server-down)") != nil)
    }

    @Test(
        "redis AUTH: the right password passes, a wrong one fails with the server's error",
        .enabled(if: RedisTests.haveRedis),
        arguments: [("s3cret", nil as String?), ("wrong", "AUTH failed: WRONGPASS")])
    func redisAuth(password: String, expected: String?) throws {
        let r = try RedisTests.RedisServer(extra: ["--requirepass", "s3cret"])
        let dir = TempDir()
        let pwFile = dir.write("redis.pw", password + "\n")
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        name: "redis", servers: [("r", r.port)],
                        extra:
                            "check: { type: redis, password_file: \(pwFile), interval: 250ms, timeout: 250ms, fall: 2 }"
                    )
                ]))
        defer { p.stop() }
        if let expected {
            let line = try #require(p.waitForLog("Server redis/r is DOWN", timeout: 5))
            #expect(line.contains(expected), "\(line)")
        } else {
            usleep(800_000)
            #expect(!p.log.contains("is DOWN"))
        }
    }

    @Test("passive observation: consecutive failed connects mark a server DOWN at once; the check brings it back")
    func passive() throws {
        let alive = try TestServer.named("alive")
        let checkTarget = try TestServer.named("check-target")
        defer {
            alive.stop()
            checkTarget.stop()
        }
        let refusing = try Net.freePort()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1", defaults: "retries: 1",
                services: [
                    serviceYAML(
                        servers: [("flaky", refusing), ("alive", alive.port)],
                        extra:
                            "check: { type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 3 }\nobserve: { fails: 3 }",
                        serverExtra: ["flaky": "check: { port: \(checkTarget.port) }"])
                ]))
        defer { p.stop() }
        // The check passes (it probes another port) while every relayed connect is refused.
        for _ in 0..<8 { #expect(try LifecycleTests.whoAnswers(p.port("svc")) == "alive") }
        let down = try #require(p.waitForLog("Server svc/flaky is DOWN", timeout: 3))
        #expect(
            down.contains(
                "reason: passive observation, info: \"3 consecutive failed connects, last: Connection refused\""))
        #expect(p.waitForLog("Server svc/flaky is UP", timeout: 5)?.contains("reason: Layer4 check passed") == true)
    }

    @Test("rise/fall counting with fastinterval and downinterval")
    func intervals() throws {
        let deadPort = try Net.freePort()
        let alive = try TestServer.named("alive")
        defer { alive.stop() }
        let p = try BallastProcess(
            config: Self.config(
                [("alive", alive.port), ("dead", deadPort)],
                check:
                    "{ type: tcp, interval: 1s, fastinterval: 100ms, downinterval: 2s, timeout: 100ms, rise: 2, fall: 3 }",
                serverExtra: ["alive": "check: false"]))
        defer { p.stop() }
        // First failure within one interval (spread start), then two more at fastinterval.
        let start = Date()
        #expect(p.waitForLog("Server svc/dead is DOWN", timeout: 3) != nil)
        #expect(Date().timeIntervalSince(start) < 1.0 + 0.2 + 0.6)
        // DOWN: checks every 2 s; back after two successes, the second at fastinterval.
        let revived = try TestServer(name: "dead", port: deadPort) { c, s in try? Net.sendAll(c, s.name + "\n") }
        defer { revived.stop() }
        let t0 = Date()
        #expect(p.waitForLog("Server svc/dead is UP", timeout: 4) != nil)
        let took = Date().timeIntervalSince(t0)
        #expect(took < 2.0 + 0.1 + 0.6, "came back after \(took)s")
    }

    @Test("agent: each word of the protocol sets state, weight or maxconn")
    func agent() throws {
        let a = try TestServer.namedEcho("a")
        let b = try TestServer.namedEcho("b")
        let word = Locked<String>("up")
        let agent = try TestServer(name: "agent") { c, _ in
            try? Net.sendAll(c, word.value.withLock { $0 } + "\n")
        }
        defer {
            a.stop()
            b.stop()
            agent.stop()
        }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: [("a", a.port), ("b", b.port)],
                        extra:
                            "check: { type: agent, port: \(agent.port), interval: 150ms, timeout: 150ms, rise: 1, fall: 1 }",
                        serverExtra: ["a": "weight: 100", "b": "weight: 100, check: false"])
                ]))
        defer { p.stop() }
        let port = p.port("svc")
        func share(_ n: Int) throws -> [String: Int] {
            var held: [SchedulingTests.Held] = []
            for _ in 0..<n { held.append(try SchedulingTests.open(port)) }
            defer { SchedulingTests.release(held) }
            return SchedulingTests.tally(held)
        }
        func say(_ w: String) {
            word.value.withLock { $0 = w }
            usleep(400_000)
        }
        #expect(try share(4) == ["a": 2, "b": 2])
        say("drain")
        #expect(p.waitForLog("Server svc/a is DRAIN (agent)") != nil)
        #expect(try share(4) == ["b": 4])
        say("ready")
        #expect(p.waitForLog("Server svc/a is READY (agent)") != nil)
        #expect(try share(4) == ["a": 2, "b": 2])
        say("maint")
        #expect(p.waitForLog("Server svc/a is MAINT (agent)") != nil)
        #expect(try share(4) == ["b": 4])
        say("ready 50%")
        // weight 50 against 100: one in three.
        #expect(try share(6) == ["a": 2, "b": 4])
        say("100% maxconn:1")
        #expect(try share(4) == ["a": 1, "b": 3])
        say("maxconn:0 down #disk full")
        let down = try #require(p.waitForLog("Server svc/a is DOWN"))
        #expect(down.contains("reason: Layer7 wrong status, info: \"disk full\""))
        #expect(try share(4) == ["b": 4])
        say("up")
        #expect(p.waitForLog("Server svc/a is UP") != nil)
        #expect(try share(4) == ["a": 2, "b": 2])
    }

    @Test(
        "bad servers are failed checks with a clear detail, never a stuck check",
        arguments: [
            ("closes", "reason: Layer7 invalid response, info: \"connection closed without an answer\""),
            ("floods", "reason: Layer7 invalid response, info: \"answer exceeds 16 KiB without a complete reply\""),
            ("slow", "reason: Layer7 timeout"),
            ("garbage", "reason: Layer7 invalid response, info: \"PING failed: unexpected answer: hello?"),
        ])
    func badServers(kind: String, expected: String) throws {
        let bad = try TestServer(name: kind) { c, _ in
            switch kind {
            case "closes": return
            case "floods":
                // A bulk string that never ends, far past the check's 16 KiB read limit.
                try? Net.sendAll(c, "$99999999\r\n")
                let chunk = [UInt8](repeating: 0x41, count: 65536)
                for _ in 0..<64 { if (try? Net.sendAll(c, chunk)) == nil { return } }
            case "slow":
                usleep(2_000_000)
                try? Net.sendAll(c, "+PONG\r\n")
            default:
                try? Net.sendAll(c, "hello?\r\n")
            }
        }
        let alive = try TestServer.named("alive")
        defer {
            bad.stop()
            alive.stop()
        }
        let p = try BallastProcess(
            config: Self.config(
                [("alive", alive.port), ("bad", bad.port)],
                check: "{ type: redis, interval: 300ms, timeout: 250ms, fall: 1 }",
                serverExtra: ["alive": "check: false"]))
        defer { p.stop() }
        let line = try #require(p.waitForLog("Server svc/bad is DOWN", timeout: 5))
        #expect(line.contains(expected), "\(line)")
        #expect(try LifecycleTests.whoAnswers(p.port("svc")) == "alive")
    }

    @Test("a reload that changes a check under way closes that check's connection at once")
    func reloadClosesReplacedCheck() throws {
        // A server that takes the check's connection and never answers; it notes when the
        // checker hangs up.
        let closedAt = Locked<Date?>(nil)
        let silent = try TestServer(name: "silent") { c, _ in
            _ = Net.readAll(c, limit: 1 << 20)
            closedAt.value.withLock { $0 = Date() }
        }
        defer { silent.stop() }
        func yaml(_ path: String) -> String {
            Self.config([("silent", silent.port)], check: "{ type: http, path: \(path), interval: 5s, timeout: 5s }")
        }
        let p = try BallastProcess(config: yaml("/a"))
        defer { p.stop() }
        let deadline = Date().addingTimeInterval(7)
        while silent.connections < 1 && Date() < deadline { usleep(10_000) }
        #expect(silent.connections >= 1, "no check started")
        usleep(100_000)
        let reloaded = Date()
        #expect(p.reload(yaml("/b"))?.contains("reloaded") == true)
        let closeDeadline = Date().addingTimeInterval(2)
        while closedAt.value.withLock({ $0 }) == nil && Date() < closeDeadline { usleep(10_000) }
        let closed = try #require(closedAt.value.withLock { $0 }, "the replaced check's connection stayed open")
        #expect(closed.timeIntervalSince(reloaded) < 1.5)
    }

    @Test("on_marked_up: shutdown-backup-sessions moves clients off the backup when an active server returns")
    func shutdownBackupSessions() throws {
        let spare = try TestServer.namedEcho("spare")
        defer { spare.stop() }
        let activePort = try Net.freePort()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: [("main", activePort), ("spare", spare.port)],
                        extra:
                            "check: { type: tcp, interval: 200ms, timeout: 200ms, rise: 1, fall: 1 }\non_marked_up: shutdown-backup-sessions",
                        serverExtra: ["spare": "backup: true, check: false"])
                ]))
        defer { p.stop() }
        #expect(p.waitForLog("Server svc/main is DOWN", timeout: 5) != nil)
        let onSpare = try SchedulingTests.open(p.port("svc"))
        defer { close(onSpare.fd) }
        #expect(onSpare.server == "spare")
        let main = try TestServer(name: "main", port: activePort) { c, s in
            try? Net.sendAll(c, s.name + "\n")
            _ = Net.readAll(c)
        }
        defer { main.stop() }
        #expect(p.waitForLog("Server svc/main is UP", timeout: 5) != nil)
        let (_, end) = Net.readAll(onSpare.fd)
        #expect(end == .eof || end == .reset)
        #expect(p.waitForLog("closed 1 connections (active-server-up)") != nil)
        let again = try SchedulingTests.open(p.port("svc"))
        defer { close(again.fd) }
        #expect(again.server == "main")
    }
}
