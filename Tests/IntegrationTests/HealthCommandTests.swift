import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `ballast health`, as keepalived's `track_script` runs it: exit status and the one line it
/// prints, against a running Ballast, a missing socket, a socket it may not open, a Ballast that
/// is stopping, something that is not Ballast, and a process that does not answer at all.
@Suite(.serialized) struct HealthCommandTests {
    static func health(_ args: [String], prefix: [String] = []) throws -> (Int32, String, Double) {
        let start = Date()
        let (status, out, err) =
            prefix.isEmpty
            ? try runCommand(Repo.ballast, ["health"] + args, timeout: 10)
            : try runCommand(prefix[0], Array(prefix.dropFirst()) + [Repo.ballast, "health"] + args, timeout: 10)
        return (status, (out + err).trimmingCharacters(in: .whitespacesAndNewlines), Date().timeIntervalSince(start))
    }

    static func ballast(_ dir: TempDir, servers: [(String, UInt16)], grace: String = "10s") throws -> BallastProcess {
        try BallastProcess(
            config: configYAML(
                global:
                    "workers: 2\ngrace: \(grace)\nstats: { sockets: [{ path: \"\(dir.file("admin.sock"))\", level: admin }] }",
                services: [
                    serviceYAML(
                        name: "redis", servers: servers, extra: "check: { type: tcp, interval: 200ms, fall: 1 }")
                ]))
    }

    @Test("a running Ballast: exit 0 with ok; --service fails when the service has no usable server")
    func runningAndService() throws {
        let dir = TempDir()
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try Self.ballast(dir, servers: [("r1", echo.port)])
        defer { p.stop() }
        let sock = dir.file("admin.sock")
        let (s, line, took) = try Self.health(["--socket", sock, "--service", "redis"])
        #expect(s == 0 && line == "ok: 2 workers answered within 1 s; redis usable", "\(line)")
        print("ballast health answered in \(Int(took * 1000)) ms (process start included)")
        // From the config file, as the unit or keepalived would call it.
        #expect(try Self.health(["-c", p.configPath]).0 == 0)
        echo.stop()
        #expect(p.waitForLog("Server redis/r1 is DOWN", timeout: 3) != nil)
        let (s2, line2, _) = try Self.health(["--socket", sock, "--service", "redis"])
        #expect(s2 == 1 && line2 == "fail: service redis has no usable server", "\(line2)")
        let (s3, line3, _) = try Self.health(["--socket", sock, "--service", "nosuch"])
        #expect(s3 == 1 && line3 == "fail: no service named 'nosuch'", "\(line3)")
        // The process is fine without --service: the servers are not its health.
        #expect(try Self.health(["--socket", sock]).0 == 0)
    }

    @Test("bad situations: a clear line and exit 1, never a hang")
    func badSituations() throws {
        let dir = TempDir()
        // No socket at all.
        let (s1, l1, _) = try Self.health(["--socket", dir.file("missing.sock")])
        #expect(
            s1 == 1 && l1 == "fail: no answer on \(dir.file("missing.sock")): no such socket (is Ballast running?)",
            "\(l1)")
        // Something that is not Ballast answers.
        let sock = dir.file("fake.sock")
        let fake = try UnixServer(path: sock) { c in
            var buf = [UInt8](repeating: 0, count: 256)
            _ = recv(c, &buf, buf.count, 0)
            _ = "hello from something else\n".withCString { send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        }
        let (s2, l2, _) = try Self.health(["--socket", sock])
        #expect(s2 == 1 && l2 == "fail: unexpected answer from \(sock): hello from something else", "\(l2)")
        fake.stop()
        // A process that accepts and never answers (a Ballast frozen by SIGSTOP): the deadline.
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try Self.ballast(dir, servers: [("r1", echo.port)])
        defer { p.stop() }
        kill(p.pid, SIGSTOP)
        let (s3, l3, took) = try Self.health(["--socket", dir.file("admin.sock"), "--timeout", "300"])
        kill(p.pid, SIGCONT)
        #expect(s3 == 1 && l3 == "fail: no answer on \(dir.file("admin.sock")) within 300 ms", "\(l3)")
        #expect(took < 5, "ballast health took \(took) s")
        // Not allowed to open the socket (mode 600, owned by root): as nobody.
        if geteuid() == 0 {
            let (s4, l4, _) = try Self.health(
                ["--socket", dir.file("admin.sock")],
                prefix: ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            #expect(s4 == 1 && l4 == "fail: no answer on \(dir.file("admin.sock")): permission denied", "\(l4)")
        }
    }

    @Test("a Ballast that is stopping is not healthy (the VIP should move before it is gone)")
    func stopping() throws {
        let dir = TempDir()
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try Self.ballast(dir, servers: [("r1", echo.port)], grace: "5s")
        defer { p.stop() }
        // A connection keeps the graceful stop waiting.
        let fd = try Net.connect(p.port("redis"), timeout: 5)
        defer { close(fd) }
        try Net.sendAll(fd, "x")
        _ = Net.readExactly(fd, 1)
        p.signal(SIGTERM)
        #expect(p.waitForLog("waiting up to 5s") != nil)
        let (s, line, _) = try Self.health(["--socket", dir.file("admin.sock")])
        #expect(s == 1 && line == "fail: Ballast is stopping", "\(line)")
    }
}

/// A Unix stream socket server run by the test: `handler` gets each connection, which is closed after.
final class UnixServer: @unchecked Sendable {
    let fd: Int32
    private var thread: TestThread?
    private let stopped = Locked(false)

    init(path: String, handler: @escaping @Sendable (Int32) -> Void) throws {
        let sfd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        fd = sfd
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (k, b) in path.utf8.enumerated() { dst[k] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(sfd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard r == 0, listen(sfd, 16) == 0 else { throw Net.Failure("cannot listen on \(path)") }
        let fd = self.fd
        let stopped = self.stopped
        thread = TestThread {
            while !stopped.value.withLock({ $0 }) {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                handler(c)
                close(c)
            }
        }
    }

    func stop() {
        stopped.value.withLock { $0 = true }
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
        thread?.join(timeout: 5)
    }
}
