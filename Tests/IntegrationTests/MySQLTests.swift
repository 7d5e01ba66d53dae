import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The mysql check against a real MariaDB server (Debian's mariadb-server), set up in a
/// temporary directory with its own port and socket.
@Suite(.serialized) struct MySQLTests {
    static let haveMariaDB =
        FileManager.default.isExecutableFile(atPath: "/usr/sbin/mariadbd")
        && FileManager.default.isExecutableFile(atPath: "/usr/bin/mariadb-install-db")

    final class MariaDB: @unchecked Sendable {
        let dir = TempDir()
        let port: UInt16
        let process = Process()
        var socket: String { dir.file("mysql.sock") }

        /// `extra`: more server options (replication: `--server-id=…`, `--log-bin=…`).
        init(extra: [String] = []) throws {
            // Its own temporary directory: the bootstrap's temporary tables are files there, not
            // in the /tmp every other test and daemon shares (a CI run saw one vanish from /tmp).
            let tmp = dir.file("tmp")
            try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
            let (s, out, err) = try runCommand(
                "/usr/bin/mariadb-install-db",
                [
                    "--no-defaults", "--datadir=\(dir.file("data"))", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db", "--tmpdir=\(tmp)",
                ],
                timeout: 120)
            guard s == 0 else { throw Net.Failure("mariadb-install-db failed (status \(s)): \(err)\n\(out)") }
            // Held by this test run until mariadbd binds it (`Net.freePort`).
            port = try Net.freePort()
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/mariadbd")
            process.arguments =
                [
                    "--no-defaults", "--datadir=\(dir.file("data"))", "--socket=\(socket)", "--port=\(port)",
                    "--bind-address=127.0.0.1", "--user=root", "--pid-file=\(dir.file("mysqld.pid"))",
                    "--innodb-buffer-pool-size=16M", "--max-connect-errors=3", "--tmpdir=\(tmp)",
                    "--log-error=\(dir.file("mariadbd.log"))",
                ] + (extra.contains { $0.hasPrefix("--log-bin") } ? extra : ["--skip-log-bin"] + extra)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline && process.isRunning {
                if (try? sql("SELECT 1")) == "1\n" {
                    _ = try sql("CREATE USER 'check'@'%' IDENTIFIED BY 's3cret'; GRANT USAGE ON *.* TO 'check'@'%'")
                    return
                }
                usleep(100_000)
            }
            let log = (try? String(contentsOfFile: dir.file("mariadbd.log"), encoding: .utf8)) ?? ""
            throw Net.Failure(
                "mariadbd \(process.isRunning ? "did not answer within 30 s" : "exited") (port \(port)):\n\(log)")
        }

        /// Runs SQL as root over the Unix socket; returns the output (batch mode, no headers).
        @discardableResult
        func sql(_ q: String) throws -> String {
            let (s, out, err) = try runCommand(
                "/usr/bin/mariadb", ["--no-defaults", "-S", socket, "-u", "root", "-N", "-B", "-e", q])
            guard s == 0 else { throw Net.Failure("mariadb: \(err)") }
            return out
        }

        func status(_ name: String) throws -> Int {
            Int(
                try sql("SHOW GLOBAL STATUS LIKE '\(name)'").split(separator: "\t").last?.trimmingCharacters(
                    in: .whitespacesAndNewlines) ?? "") ?? -1
        }

        deinit {
            process.signal(SIGKILL)
            NatLab.waitGone(process, timeout: 60)
        }
    }

    static func ballast(_ db: MariaDB, check: String) throws -> BallastProcess {
        try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        name: "db", servers: [("m", db.port)],
                        extra: "check: { type: mysql, interval: 250ms, timeout: 250ms, fall: 1, rise: 1, \(check) }")
                ]))
    }

    @Test(
        "login with the right password passes, and many checks leave Aborted_connects unchanged",
        .enabled(if: haveMariaDB))
    func loginAndQuit() throws {
        let db = try MariaDB()
        let before = try db.status("Aborted_connects")
        let connections = try db.status("Connections")
        let p = try Self.ballast(db, check: "user: check, password: s3cret")
        usleep(2_500_000)  // about ten checks, well past max_connect_errors = 3
        p.stop()
        #expect(!p.log.contains("is DOWN"), "\(p.log)")
        #expect(try db.status("Connections") - connections >= 6, "the checks did not reach the server")
        #expect(try db.status("Aborted_connects") == before)
        #expect(try db.status("Aborted_clients") == 0)
        #expect(try db.sql("SELECT 1") == "1\n")
    }

    /// A relay in front of the server that holds each greeting back for `delay`, so a check is
    /// certainly in flight for that long. A client that hangs up meanwhile makes the relay hang up
    /// on the server too, as a direct connection would.
    static func slowGreetingRelay(to port: UInt16, delay: useconds_t) throws -> TestServer {
        try TestServer(name: "relay") { c, _ in
            guard let u = try? Net.connect(port) else { return }
            let back = TestThread {
                var buf = [UInt8](repeating: 0, count: 16384)
                var first = true
                while true {
                    let n = buf.withUnsafeMutableBytes { recv(u, $0.baseAddress!, $0.count, 0) }
                    if n <= 0 { break }
                    if first {
                        usleep(delay)
                        first = false
                    }
                    if buf.withUnsafeBytes({ send(c, $0.baseAddress!, n, Int32(MSG_NOSIGNAL)) }) != n { break }
                }
                shutdown(c, Int32(SHUT_WR))
            }
            var buf = [UInt8](repeating: 0, count: 16384)
            while true {
                let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress!, $0.count, 0) }
                if n <= 0 { break }
                if buf.withUnsafeBytes({ send(u, $0.baseAddress!, n, Int32(MSG_NOSIGNAL)) }) != n { break }
            }
            shutdown(u, Int32(SHUT_RDWR))
            back.join(timeout: 10)
            close(u)
        }
    }

    /// A mysql check through the relay (timeout 1 s).
    static func checkThrough(_ relay: TestServer, interval: String) -> String {
        configYAML(
            global: "workers: 1",
            services: [
                serviceYAML(
                    name: "db", servers: [("m", relay.port)],
                    extra:
                        "check: { type: mysql, interval: \(interval), timeout: 1s, fall: 1, rise: 1, user: check, password: s3cret }"
                )
            ])
    }

    /// Waits until the relay has seen `count` checks, then a little more: the last one now waits
    /// for its greeting.
    static func waitForCheck(_ relay: TestServer, count: Int) {
        // The first check comes at a random point of its first interval (2 s here), later on a
        // loaded machine.
        let deadline = Date().addingTimeInterval(6)
        while relay.connections < count && Date() < deadline { usleep(5_000) }
        #expect(relay.connections == count, "no check started")
        usleep(50_000)
    }

    @Test("stopping while a check waits for the greeting lets it finish: no aborted connect", .enabled(if: haveMariaDB))
    func stopMidCheck() throws {
        let db = try MariaDB()
        let relay = try Self.slowGreetingRelay(to: db.port, delay: 300_000)
        defer { relay.stop() }
        let before = try db.status("Aborted_connects")
        let connections = try db.status("Connections")
        for round in 1...3 {
            let p = try BallastProcess(config: Self.checkThrough(relay, interval: "1s"))
            Self.waitForCheck(relay, count: round)
            #expect(p.stop() == 0)
        }
        usleep(200_000)
        #expect(try db.status("Connections") - connections >= 3, "the checks did not reach the server")
        #expect(try db.status("Aborted_connects") == before)
        #expect(try db.status("Aborted_clients") == 0)
    }

    @Test(
        "a reload that changes the check while one waits for the greeting lets it finish: no aborted connect",
        .enabled(if: haveMariaDB))
    func reloadMidCheck() throws {
        let db = try MariaDB()
        let relay = try Self.slowGreetingRelay(to: db.port, delay: 300_000)
        defer { relay.stop() }
        let before = try db.status("Aborted_connects")
        let p = try BallastProcess(config: Self.checkThrough(relay, interval: "2s"))
        Self.waitForCheck(relay, count: 1)  // the reload replaces it
        #expect(p.reload(Self.checkThrough(relay, interval: "1500ms"))?.contains("reloaded") == true)
        usleep(600_000)  // the old conversation ends with COM_QUIT; the new check has not started yet, or runs
        #expect(p.stop() == 0)
        usleep(200_000)
        #expect(!p.log.contains("is DOWN"), "\(p.log)")
        #expect(try db.status("Aborted_connects") == before, "\(p.log)")
        #expect(try db.status("Aborted_clients") == 0)
    }

    @Test("a wrong password fails with the server's error in the detail", .enabled(if: haveMariaDB))
    func wrongPassword() throws {
        let db = try MariaDB()
        let p = try Self.ballast(db, check: "user: check, password: nope")
        defer { p.stop() }
        let line = try #require(p.waitForLog("Server db/m is DOWN", timeout: 5))
        #expect(
            line.contains(
                "reason: Layer7 invalid response, info: \"Access denied for user 'check'@'localhost' (using password: YES) (error 1045)\""
            ), "\(line)")
    }

    @Test("read_only=ON fails require: primary; require: replica passes", .enabled(if: haveMariaDB))
    func readOnly() throws {
        let db = try MariaDB()
        try db.sql("SET GLOBAL read_only = ON")
        let p = try Self.ballast(db, check: "user: check, password: s3cret, require: primary")
        let line = try #require(p.waitForLog("Server db/m is DOWN", timeout: 5))
        #expect(line.contains("info: \"read_only is ON, the check requires a primary\""), "\(line)")
        p.stop()
        let r = try Self.ballast(db, check: "user: check, password: s3cret, require: replica")
        usleep(800_000)
        r.stop()
        #expect(!r.log.contains("is DOWN"), "\(r.log)")
    }
}
