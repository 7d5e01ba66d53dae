import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A MariaDB primary and a GTID replica from Debian's mariadb-server behind `mysql-rw` and
/// `mysql-ro`: a stopped or lagging replica leaves the read pool and comes back; a promotion moves
/// the writes and cuts the old primary's sessions.
@Suite(.serialized) struct MariaDBReplicationTests {
    /// Primary (server id 1, binary log) and replica (server id 2, read_only), replicating.
    static func pair() throws -> (MySQLTests.MariaDB, MySQLTests.MariaDB) {
        let primary = try MySQLTests.MariaDB(extra: ["--server-id=1", "--log-bin=mysql-bin", "--binlog-format=ROW"])
        let replica = try MySQLTests.MariaDB(extra: [
            "--server-id=2", "--read-only=ON", "--log-bin=mysql-bin", "--log-slave-updates=ON",
        ])
        try primary.sql("CREATE USER 'repl'@'%' IDENTIFIED BY 'r3pl'; GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'")
        // The check user reads the replica status (SLAVE MONITOR since MariaDB 10.5).
        for db in [primary, replica] { try db.sql("SET sql_log_bin = 0; GRANT SLAVE MONITOR ON *.* TO 'check'@'%'") }
        try primary.sql("CREATE DATABASE app; CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        // The replica starts from the primary's current position except for what it must copy:
        // its users were made locally, the app schema comes by replication.
        let pos = try primary.sql("SELECT @@gtid_binlog_pos").trimmingCharacters(in: .whitespacesAndNewlines)
        try replica.sql("CREATE DATABASE app; CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        try replica.sql(
            "SET GLOBAL gtid_slave_pos = '\(pos)'; CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=\(primary.port), MASTER_USER='repl', MASTER_PASSWORD='r3pl', MASTER_USE_GTID=slave_pos; START SLAVE"
        )
        try primary.sql("INSERT INTO app.t (v) VALUES (1)")
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if (try? replica.sql("SELECT COUNT(*) FROM app.t")) == "1\n" { return (primary, replica) }
            usleep(100_000)
        }
        throw Net.Failure("replication did not start: \(try replica.sql("SHOW SLAVE STATUS\\G"))")
    }

    static func check(_ extra: String) -> String {
        "check: { type: mysql, user: check, password: s3cret, interval: 250ms, rise: 1, fall: 3, \(extra) }\non_marked_down: shutdown-sessions"
    }

    /// Ballast (one worker) with one service in front of MariaDB servers.
    static func ballast(_ name: String, _ servers: [(String, UInt16)], _ extra: String) throws -> BallastProcess {
        try BallastProcess(
            config: configYAML(
                global: "workers: 1", services: [serviceYAML(name: name, servers: servers, extra: extra)]))
    }

    /// `SELECT @@server_id` through Ballast with the real client, or the client's error.
    static func serverId(_ port: UInt16) -> String {
        let r = try? runCommand(
            "/usr/bin/mariadb",
            [
                "--no-defaults", "-h", "127.0.0.1", "-P", "\(port)", "-u", "check", "-ps3cret", "--connect-timeout=2",
                "-N", "-B", "-e", "SELECT @@server_id",
            ],
            timeout: 10)
        guard let (s, out, err) = r else { return "no answer" }
        return s == 0
            ? out.trimmingCharacters(in: .whitespacesAndNewlines) : err.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test(
        "mysql-ro: a stopped SQL thread and an injected lag take the replica out, and it comes back",
        .enabled(if: MySQLTests.haveMariaDB))
    func lagTakesReplicaOut() throws {
        let (primary, replica) = try Self.pair()
        let p = try Self.ballast("mysql-ro", [("r", replica.port)], Self.check("require: replica, max_lag: 2s"))
        defer { p.stop() }
        let up = try #require(p.waitForLog("Server mysql-ro/r is UP", timeout: 5))
        #expect(up.contains("read_only ON, replication lag 0 s"), "\(up)")
        #expect(Self.serverId(p.port("mysql-ro")) == "2")

        // 1. The SQL thread stops: DOWN on the next answer (definite), with the reason.
        try replica.sql("STOP SLAVE SQL_THREAD")
        let stopped = try #require(p.waitForLog("Server mysql-ro/r is DOWN", timeout: 3))
        #expect(stopped.contains("info: \"replication stopped (SQL thread not running)\""), "\(stopped)")
        #expect(Self.serverId(p.port("mysql-ro")) != "2")
        try replica.sql("START SLAVE SQL_THREAD")
        #expect(p.waitForLog("Server mysql-ro/r is UP", count: 2, timeout: 3) != nil)

        // 2. Lag: the replica applies events 5 s late while the primary keeps writing.
        try replica.sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 5; START SLAVE")
        let writer = TestThread {
            for k in 0..<40 {
                _ = try? primary.sql("INSERT INTO app.t (v) VALUES (\(k))")
                usleep(200_000)
            }
        }
        let lagging = try #require(p.waitForLog("Server mysql-ro/r is DOWN", count: 2, timeout: 10))
        #expect(lagging.contains("info: \"replication lag ") && lagging.contains(" s > 2s\""), "\(lagging)")
        try replica.sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 0; START SLAVE")
        #expect(p.waitForLog("Server mysql-ro/r is UP", count: 3, timeout: 10) != nil, "\(p.log)")
        writer.join(timeout: 20)
    }

    @Test("a check user without SLAVE MONITOR gets a clear detail", .enabled(if: MySQLTests.haveMariaDB))
    func missingPrivilege() throws {
        let (_, replica) = try Self.pair()
        try replica.sql("CREATE USER 'weak'@'%' IDENTIFIED BY 'w'")
        let p = try Self.ballast(
            "mysql-ro", [("r", replica.port)],
            "check: { type: mysql, user: weak, password: w, require: replica, max_lag: 2s, interval: 250ms }")
        defer { p.stop() }
        let line = try #require(p.waitForLog("Server mysql-ro/r is DOWN", timeout: 5))
        #expect(
            line.contains(
                "SHOW SLAVE STATUS failed: Access denied; you need (at least one of) the SUPER, SLAVE MONITOR privilege(s)"
            ), "\(line)")
    }

    @Test(
        "mysql-rw: a promotion moves the writes at once and cuts the old primary's sessions",
        .enabled(if: MySQLTests.haveMariaDB))
    func promotion() throws {
        let (primary, replica) = try Self.pair()
        let p = try Self.ballast(
            "mysql-rw", [("p", primary.port), ("r", replica.port)], "balance: first\n" + Self.check("require: primary"))
        defer { p.stop() }
        #expect(p.waitForLog("Server mysql-rw/p is UP", timeout: 5) != nil)
        let port = p.port("mysql-rw")
        #expect(Self.serverId(port) == "1")
        // A session on the old primary, through Ballast, held across the promotion.
        let held = try Net.connect(port, timeout: 5)
        defer { close(held) }
        Net.setTimeout(held, 5)
        var greeting = [UInt8](repeating: 0, count: 1024)
        #expect(greeting.withUnsafeMutableBytes { recv(held, $0.baseAddress!, $0.count, 0) } > 0)
        let start = Date()
        try primary.sql("SET GLOBAL read_only = ON")
        try replica.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF")
        let down = try #require(p.waitForLog("Server mysql-rw/p is DOWN", timeout: 3))
        #expect(down.contains("read_only is ON, the check requires a primary"), "\(down)")
        #expect(p.waitForLog("Server mysql-rw/r is UP", timeout: 3) != nil)
        // A definite answer: one interval (250 ms), not fall × interval; with room for a slow machine.
        #expect(Date().timeIntervalSince(start) < 1.5)
        let (_, end) = Net.readAll(held)
        #expect(end == .eof || end == .reset, "the old primary's session stayed open")
        #expect(Self.serverId(port) == "2")
    }

    @Test(
        "query with require: both must pass; expect compares the value; an error while executing fails",
        .enabled(if: MySQLTests.haveMariaDB))
    func queryWithRequire() throws {
        let db = try MySQLTests.MariaDB()
        func firstLine(_ check: String, _ verb: String) throws -> String {
            let p = try Self.ballast(
                "db", [("m", db.port)],
                "check: { type: mysql, user: check, password: s3cret, interval: 250ms, \(check) }")
            defer { p.stop() }
            return p.waitForLog("Server db/m is \(verb)", timeout: 5) ?? p.log
        }
        #expect(
            try firstLine("require: primary, query: \"SELECT 1\", expect: \"1\"", "UP").contains(
                "read_only OFF, query ok"))
        #expect(
            try firstLine("require: primary, query: \"SELECT 1\", expect: \"2\"", "DOWN").contains(
                "query returned '1', expected '2'"))
        // The query is not skipped because of require (it used to be).
        let missing = try firstLine("require: primary, query: \"SELECT * FROM no_such_db.t\"", "DOWN")
        #expect(
            missing.contains(
                "info: \"query failed: SELECT command denied to user 'check'@'localhost' for table `no_such_db`.`t` (error 1142)\""
            ), "\(missing)")
        #expect(
            try firstLine("query: \"SELECT (SELECT 1 UNION SELECT 2)\"", "DOWN").contains(
                "query failed: Subquery returns more than 1 row (error 1242)"))
    }
}
