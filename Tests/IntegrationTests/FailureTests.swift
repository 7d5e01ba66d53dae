import BallastCore
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Dead servers, timeouts, queues and overload: each costs the client a clean close, never a hang.
@Suite(.serialized) struct FailureTests {
    /// A listener whose accept queue is full and never drained: further SYNs are dropped, so a
    /// connect to it neither succeeds nor fails until the connecting side gives up.
    final class BlackHole {
        let fd: Int32
        let port: UInt16
        var fillers: [Int32] = []

        init() throws {
            (fd, port) = try Net.listen(backlog: 0)
            // Fill the accept queue (backlog 0 holds one) with nonblocking connects.
            for _ in 0..<4 {
                let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
                let a = try SocketAddress(parsing: "127.0.0.1:\(port)")
                _ = a.withSockAddr { Glibc.connect(c, $0, $1) }
                fillers.append(c)
            }
            usleep(100_000)
        }

        deinit {
            for c in fillers { close(c) }
            close(fd)
        }
    }

    @Test("a refused server is retried on the other server")
    func refusedServerRedispatch() throws {
        let deadPort = try Net.freePort()
        let echo = try TestServer.named("alive")
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1", defaults: "retries: 2",
                services: [serviceYAML(servers: [("dead", deadPort), ("alive", echo.port)])]))
        defer { b.stop() }
        let port = b.port("svc")
        for _ in 0..<20 {
            let fd = try Net.connect(port)
            let (data, end) = Net.readAll(fd)
            close(fd)
            #expect(String(decoding: data, as: UTF8.self) == "alive\n")
            #expect(end == .eof)
        }
        #expect(echo.connections == 20)
    }

    @Test("a request sent with the handshake reaches the server tried after a refused one, whole and once")
    func earlyRequestSurvivesRetry() throws {
        // The proxy reads a client's first bytes as soon as it accepts and sends them before the
        // connect is reported; a refused connect must leave them for the next server.
        let deadPort = try Net.freePort()
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "retries: 2",
                services: [serviceYAML(servers: [("dead", deadPort), ("echo", echo.port)])]))
        defer { b.stop() }
        let port = b.port("svc")
        for k in 0..<20 {
            let fd = try Net.connect(port)
            let request = "request \(k) " + String(repeating: "x", count: k * 997)
            try Net.sendAll(fd, request)
            Net.shutdownWrite(fd)
            let (data, end) = Net.readAll(fd)
            close(fd)
            #expect(String(decoding: data, as: UTF8.self) == request, "connection \(k)")
            #expect(end == .eof, "connection \(k)\n\(b.log)")
        }
        #expect(echo.connections == 20)
        // Round robin sent half of the first attempts to the refusing server.
        #expect(
            b.logLines.filter { $0.contains("connect to dead failed (Connection refused), retrying on echo") }.count
                >= 5)
    }

    @Test("with every server refusing, the client gets a clean close after the retries")
    func allRefused() throws {
        let p1 = try Net.freePort()
        let p2 = try Net.freePort()
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "retries: 3",
                services: [serviceYAML(servers: [("a", p1), ("b", p2)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"), timeout: 5)
        defer { close(fd) }
        let (data, end) = Net.readAll(fd)
        #expect(data.isEmpty)
        #expect(end == .eof)
        let line = b.waitForLog("end=connect-failed")
        #expect(line != nil)
        // Three retries: four attempts, alternating servers rather than hammering one, and each
        // line names the server actually tried next.
        let retries = b.logLines.filter { $0.contains("retrying on") }
        #expect(retries.count == 3)
        for line in retries {
            let failed = line.contains("connect to a failed") ? "a" : "b"
            #expect(line.contains("retrying on \(failed == "a" ? "b" : "a")"), "\(line)")
        }
    }

    @Test("a retry goes to a server not tried yet (balance first: r1 and r2 refuse, r3 answers)")
    func retryGoesToAnUntriedServer() throws {
        let p1 = try Net.freePort()
        let p2 = try Net.freePort()
        let echo = try TestServer.named("r3")
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "retries: 2",
                services: [serviceYAML(servers: [("r1", p1), ("r2", p2), ("r3", echo.port)], extra: "balance: first")]))
        defer { b.stop() }
        for _ in 0..<3 {
            let fd = try Net.connect(b.port("svc"), timeout: 5)
            let (data, _) = Net.readAll(fd)
            close(fd)
            // Without the tried set, the second retry went back to r1 (first in order) and failed.
            #expect(String(decoding: data, as: UTF8.self) == "r3\n")
        }
        #expect(b.waitForLog("connect to r1 failed (Connection refused), retrying on r2") != nil)
        #expect(b.waitForLog("connect to r2 failed (Connection refused), retrying on r3") != nil)
    }

    @Test("connect timeout to a server that never answers")
    func connectTimeout() throws {
        let hole = try BlackHole()
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }",
                defaults: "timeout: { connect: 300ms }\nretries: 0",
                services: [serviceYAML(servers: [("hole", hole.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"), timeout: 10)
        defer { close(fd) }
        let start = Date()
        let (_, end) = Net.readAll(fd)
        let elapsed = Date().timeIntervalSince(start)
        #expect(end == .eof)
        #expect(elapsed >= 0.25 && elapsed < 3, "closed after \(elapsed)s")
        #expect(b.waitForLog("end=connect-timeout") != nil)
    }

    @Test("connect timeout moves on to the other server")
    func connectTimeoutRedispatch() throws {
        let hole = try BlackHole()
        let alive = try TestServer.named("alive")
        defer { alive.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1", defaults: "timeout: { connect: 200ms }\nretries: 1",
                services: [serviceYAML(servers: [("hole", hole.port), ("alive", alive.port)])]))
        defer { b.stop() }
        for _ in 0..<4 {
            let fd = try Net.connect(b.port("svc"), timeout: 10)
            let (data, _) = Net.readAll(fd)
            close(fd)
            #expect(String(decoding: data, as: UTF8.self) == "alive\n")
        }
    }

    @Test("client idle timeout closes an idle connection", arguments: ["client", "server"])
    func idleTimeout(which: String) throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let timeouts = which == "client" ? "{ client: 300ms, server: 30s }" : "{ client: 30s, server: 300ms }"
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "timeout: \(timeouts)",
                services: [serviceYAML(servers: [("e1", echo.port)])]))
        defer { b.stop() }
        let fd = try Net.connect(b.port("svc"), timeout: 10)
        defer { close(fd) }
        // Activity keeps it open: three exchanges 150 ms apart outlive one timeout.
        for k in 0..<3 {
            try Net.sendAll(fd, "ping\(k)")
            #expect(Net.readExactly(fd, 5) == Array("ping\(k)".utf8))
            usleep(150_000)
        }
        let start = Date()
        let (_, end) = Net.readAll(fd)
        let elapsed = Date().timeIntervalSince(start)
        #expect(end == .eof)
        #expect(elapsed >= 0.1 && elapsed < 2, "closed after \(elapsed)s")
        #expect(b.waitForLog("end=\(which)-timeout") != nil)
    }

    @Test("per-server maxconn queues the next client until a slot frees, in order")
    func maxconnQueue() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1", defaults: "timeout: { queue: 5s }",
                services: [serviceYAML(servers: [("e1", echo.port)], serverExtra: ["e1": "maxconn: 1"])]))
        defer { b.stop() }
        let port = b.port("svc")
        let first = try Net.connect(port)
        try Net.sendAll(first, "first")
        #expect(Net.readExactly(first, 5) == Array("first".utf8))
        let second = try Net.connect(port, timeout: 0.5)
        defer { close(second) }
        try Net.sendAll(second, "second")
        // Queued: nothing comes back while the first holds the only slot.
        let (early, end) = Net.readAll(second, limit: 6)
        #expect(early.isEmpty)
        #expect(end == .timeout)
        #expect(echo.connections == 1)
        close(first)
        Net.setTimeout(second, 5)
        #expect(Net.readExactly(second, 6) == Array("second".utf8))
        #expect(echo.connections == 2)
    }

    @Test("a queued client is closed when the queue timeout expires, and never reaches the server")
    func queueTimeout() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "timeout: { queue: 300ms }",
                services: [serviceYAML(servers: [("e1", echo.port)], serverExtra: ["e1": "maxconn: 1"])]))
        defer { b.stop() }
        let port = b.port("svc")
        let first = try Net.connect(port)
        defer { close(first) }
        try Net.sendAll(first, "x")
        #expect(Net.readExactly(first, 1) == Array("x".utf8))
        let second = try Net.connect(port, timeout: 5)
        defer { close(second) }
        let start = Date()
        let (data, end) = Net.readAll(second)
        let elapsed = Date().timeIntervalSince(start)
        #expect(data.isEmpty)
        #expect(end == .eof)
        #expect(elapsed >= 0.25 && elapsed < 2, "closed after \(elapsed)s")
        #expect(echo.connections == 1)
        #expect(b.waitForLog("end=queue-timeout") != nil)
    }

    @Test("maxqueue full: the next client is closed at once")
    func queueFull() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }",
                services: [
                    serviceYAML(servers: [("e1", echo.port)], extra: "maxqueue: 1", serverExtra: ["e1": "maxconn: 1"])
                ]))
        defer { b.stop() }
        let port = b.port("svc")
        let held = try Net.connect(port)
        defer { close(held) }
        try Net.sendAll(held, "x")
        _ = Net.readExactly(held, 1)
        let queued = try Net.connect(port)
        defer { close(queued) }
        usleep(100_000)
        let third = try Net.connect(port, timeout: 3)
        defer { close(third) }
        let (_, end) = Net.readAll(third)
        #expect(end == .eof)
        #expect(b.waitForLog("end=queue-full") != nil)
    }

    @Test("global maxconn pauses accepting; the waiting client is served once a slot frees")
    func globalMaxconn() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let b = try BallastProcess(
            config: configYAML(global: "workers: 2\nmaxconn: 2", services: [serviceYAML(servers: [("e1", echo.port)])]))
        defer { b.stop() }
        let port = b.port("svc")
        let a = try Net.connect(port)
        let c = try Net.connect(port)
        for fd in [a, c] {
            try Net.sendAll(fd, "hi")
            #expect(Net.readExactly(fd, 2) == Array("hi".utf8))
        }
        // The third handshake completes in the kernel backlog, but Ballast does not take it yet.
        let third = try Net.connect(port, timeout: 0.5)
        defer { close(third) }
        try Net.sendAll(third, "third")
        let (early, end) = Net.readAll(third, limit: 5)
        #expect(early.isEmpty)
        #expect(end == .timeout)
        #expect(echo.connections == 2)
        close(a)
        Net.setTimeout(third, 5)
        #expect(Net.readExactly(third, 5) == Array("third".utf8))
        close(c)
    }

    @Test("an explicit maxconn the descriptor limit cannot carry stops the start, naming the number")
    func maxconnAboveFileLimit() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let path = dir.write(
            "b.yaml",
            configYAML(global: "workers: 1\nmaxconn: 1000000", services: [serviceYAML(servers: [("e1", echo.port)])]))
        let (status, _, err) = try runCommand(
            "/usr/bin/prlimit", ["--nofile=2000:2000", Repo.ballast, "run", "-c", path], timeout: 20)
        #expect(status == 1)
        #expect(
            err.contains(
                "global.maxconn 1000000 needs 2001024 open files (2 per connection + 1024) but the limit is 2000 and cannot be raised (hard limit 2000)"
            ), "\(err)")
        #expect(err.contains("lower global.maxconn to 488"), "\(err)")
    }

    @Test("out of descriptors: the listener pauses without spinning and serves again afterwards")
    func emfile() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        // The default maxconn follows the descriptor limit at start (1,536 for 4,096); then the
        // limit drops to 64 under the running process: after Ballast's own descriptors (epoll,
        // eventfds, listeners, signalfd, stdio…), room for a few dozen relayed connections.
        let b = try BallastProcess(
            config: configYAML(global: "workers: 1", services: [serviceYAML(servers: [("e1", echo.port)])]),
            prefix: ["/usr/bin/prlimit", "--nofile=4096:4096"])
        defer { b.stop() }
        let port = b.port("svc")
        _ = try runCommand("/usr/bin/prlimit", ["--pid", "\(b.pid)", "--nofile=64:64"])
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        for _ in 0..<60 { held.append(try Net.connect(port, timeout: 1)) }
        #expect(b.waitForLog("pausing listeners", timeout: 5) != nil)
        // While paused with clients waiting in the backlog, the worker must sleep, not spin.
        let cpu0 = b.cpuSeconds
        usleep(1_000_000)
        let cpu = b.cpuSeconds - cpu0
        #expect(cpu < 0.3, "used \(cpu)s of CPU in 1s while out of descriptors")
        for fd in held { close(fd) }
        held.removeAll()
        usleep(300_000)
        let fd = try Net.connect(port, timeout: 5)
        defer { close(fd) }
        try Net.sendAll(fd, "after")
        #expect(Net.readExactly(fd, 5) == Array("after".utf8))
    }
}
