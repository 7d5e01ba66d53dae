import BallastCore

/// The MySQL/MariaDB check as a conversation over the classic protocol: read the greeting,
/// log in with `mysql_native_password` (when a user is configured), then run in turn
/// `SELECT @@read_only` (`require:`), `SHOW SLAVE STATUS` (`require: replica` with `max_lag`) and
/// the configured `query` (reading each whole result: an ERR at any point fails), and always end with `COM_QUIT`, so the server never counts an aborted
/// connection (the cause of `max_connect_errors` host blocking).
///
/// Supported authentication: `mysql_native_password` (MariaDB's and MySQL 5.7's default), also
/// when the server asks to switch to it. Any other plugin the server asks for (MySQL 8's
/// `caching_sha2_password`, `ed25519`, …) fails the check with a detail naming the plugin; the
/// check still sends `COM_QUIT`.
struct MySQLConversation {
    enum Step { case greeting, auth, result, done }

    let config: CheckConfig
    var step = Step.greeting
    var received: [UInt8] = []
    /// Packets to send next (each already framed).
    var outgoing: [UInt8] = []
    var verdict: Verdict?
    var serverVersion = ""
    /// Statements still to run after login, the first one under way.
    var queries: [Query] = []
    var reader = ResultReader()
    /// What passed so far, for the detail of a passing check.
    var notes: [String] = []

    init(config: CheckConfig) { self.config = config }

    static let quit: [UInt8] = [1, 0, 0, 0, 0x01]

    /// True when the login is under way or done and no `COM_QUIT` has been produced yet: closing
    /// now without one would count as an aborted client.
    var needsQuit: Bool { step != .greeting && verdict == nil }

    static func frame(_ payload: [UInt8], seq: UInt8) -> [UInt8] {
        let n = payload.count
        return [UInt8(n & 0xFF), UInt8((n >> 8) & 0xFF), UInt8((n >> 16) & 0xFF), seq] + payload
    }

    /// Next complete packet (payload, sequence id), consuming it.
    mutating func nextPacket() -> ([UInt8], UInt8)? {
        guard received.count >= 4 else { return nil }
        let n = Int(received[0]) | Int(received[1]) << 8 | Int(received[2]) << 16
        guard received.count >= 4 + n else { return nil }
        let payload = Array(received[4..<(4 + n)])
        let seq = received[3]
        received.removeFirst(4 + n)
        return (payload, seq)
    }

    static func errorText(_ p: [UInt8]) -> String {
        // 0xFF, code (2), then '#' + SQLSTATE (5) in protocol 4.1, then the message.
        guard p.count >= 3 else { return "error packet" }
        let code = Int(p[1]) | Int(p[2]) << 8
        var msg = Array(p[3...])
        if msg.first == UInt8(ascii: "#") && msg.count >= 6 { msg = Array(msg[6...]) }
        return "\(String(decoding: msg, as: UTF8.self)) (error \(code))"
    }

    /// Feeds bytes from the server; returns bytes to send (possibly empty).
    mutating func feed(_ bytes: [UInt8]) -> [UInt8] {
        received += bytes
        var out: [UInt8] = []
        while verdict == nil, let (p, seq) = nextPacket() {
            out += handle(p, seq: seq)
        }
        return out
    }

    private mutating func fail(_ status: CheckStatus, _ detail: String, definite: Bool = false) -> [UInt8] {
        verdict = Verdict(status, detail, definite: definite)
        return MySQLConversation.quit
    }

    private mutating func handle(_ p: [UInt8], seq: UInt8) -> [UInt8] {
        guard let first = p.first else { return fail(.l7response, "empty packet") }
        switch step {
        case .greeting:
            if first == 0xFF {
                verdict = Verdict(.l7response, MySQLConversation.errorText(p))
                return []
            }
            guard first == 10, let nul = p[1...].firstIndex(of: 0) else {
                verdict = Verdict(.l7response, "not a MySQL greeting (protocol \(first))")
                return []
            }
            serverVersion = String(decoding: p[1..<nul], as: UTF8.self)
            var i = nul + 1 + 4  // connection id
            guard p.count >= i + 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10 else {
                verdict = Verdict(.l7response, "truncated MySQL greeting")
                return []
            }
            var scramble = Array(p[i..<(i + 8)])
            i += 8 + 1  // part 1 + filler
            i += 2 + 1 + 2 + 2  // capability (low), charset, status, capability (high)
            let authLen = Int(p[i])
            i += 1 + 10
            let part2 = max(13, authLen - 8)
            if p.count >= i + part2 {
                scramble += p[i..<(i + part2 - 1)]  // without its trailing NUL
                i += part2
            }
            var plugin = "mysql_native_password"
            if i < p.count, let end = p[i...].firstIndex(of: 0) { plugin = String(decoding: p[i..<end], as: UTF8.self) }
            guard let user = config.username else {
                // No user: the greeting is all we can judge. Quit politely.
                verdict = Verdict(.l7ok, "\(serverVersion)")
                return MySQLConversation.quit
            }
            step = .auth
            let auth =
                plugin == "mysql_native_password"
                ? nativePasswordScramble(password: config.password ?? "", scramble: scramble) : []
            // CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
            let caps: UInt32 = 0x1 | 0x200 | 0x2000 | 0x8000 | 0x8_0000
            var payload: [UInt8] = (0..<4).map { UInt8(truncatingIfNeeded: caps >> ($0 * 8)) }
            payload += [0, 0, 0, 1]  // max packet 16 MiB
            payload += [33]  // utf8_general_ci
            payload += [UInt8](repeating: 0, count: 23)
            payload += Array(user.utf8) + [0]
            payload += [UInt8(auth.count)] + auth
            payload += Array("mysql_native_password".utf8) + [0]
            return MySQLConversation.frame(payload, seq: seq &+ 1)
        case .auth:
            switch first {
            case 0x00:
                return afterLogin()
            case 0xFF:
                return fail(.l7response, MySQLConversation.errorText(p))
            case 0xFE:
                // Auth switch request: plugin name, NUL, new scramble.
                guard let nul = p[1...].firstIndex(of: 0) else { return fail(.l7response, "bad auth switch request") }
                let plugin = String(decoding: p[1..<nul], as: UTF8.self)
                guard plugin == "mysql_native_password" else {
                    return fail(
                        .l7response, "authentication plugin '\(plugin)' is not supported (use mysql_native_password)")
                }
                var scramble = Array(p[(nul + 1)...])
                if scramble.last == 0 { scramble.removeLast() }
                return MySQLConversation.frame(
                    nativePasswordScramble(password: config.password ?? "", scramble: scramble), seq: seq &+ 1)
            default:
                return fail(.l7response, "unexpected answer to login (0x\(String(first, radix: 16)))")
            }
        case .result:
            guard !queries.isEmpty else { return fail(.l7response, "unexpected packet after the last query") }
            switch reader.feed(p) {
            case .more:
                return []
            case .error(let text):
                return fail(.l7response, "\(queries[0].what) failed: \(text)", definite: false)
            case .done(let result):
                let q = queries.removeFirst()
                reader = ResultReader()
                if let v = judge(q, result) { return v }
                return nextQuery()
            }
        case .done:
            return []
        }
    }

    /// One statement of the check, and what its result means.
    enum Query {
        case readOnly, replicaStatus
        case user(String)

        var sql: String {
            switch self {
            case .readOnly: return "SELECT @@read_only"
            case .replicaStatus: return "SHOW SLAVE STATUS"
            case .user(let q): return q
            }
        }

        var what: String {
            switch self {
            case .readOnly: return "SELECT @@read_only"
            case .replicaStatus: return "SHOW SLAVE STATUS"
            case .user: return "query"
            }
        }
    }

    private mutating func afterLogin() -> [UInt8] {
        if config.mysqlRequire != .any { queries.append(.readOnly) }
        if config.mysqlRequire == .replica && config.maxLag != nil { queries.append(.replicaStatus) }
        if let q = config.query { queries.append(.user(q)) }
        if queries.isEmpty {
            verdict = Verdict(.l7ok, "\(serverVersion), login ok")
            return MySQLConversation.quit
        }
        return nextQuery()
    }

    private mutating func nextQuery() -> [UInt8] {
        guard let q = queries.first else {
            verdict = Verdict(.l7ok, ([serverVersion] + notes).joined(separator: ", "))
            return MySQLConversation.quit
        }
        step = .result
        return MySQLConversation.frame([0x03] + Array(q.sql.utf8), seq: 0)
    }

    /// Judges one complete result; nil: go on with the next statement.
    private mutating func judge(_ q: Query, _ r: ResultSet) -> [UInt8]? {
        switch q {
        case .readOnly:
            let value = r.rows.first?.first ?? nil
            let ro = value == "1" || value?.uppercased() == "ON"
            switch config.mysqlRequire {
            case .primary where ro:
                return fail(.l7response, "read_only is ON, the check requires a primary", definite: true)
            case .replica where !ro:
                return fail(.l7response, "read_only is OFF, the check requires a replica", definite: true)
            default:
                notes.append("read_only \(ro ? "ON" : "OFF")")
                return nil
            }
        case .replicaStatus:
            guard let row = r.rows.first else {
                return fail(.l7response, "not a replica (SHOW SLAVE STATUS is empty)", definite: true)
            }
            func column(_ name: String) -> String? {
                guard let k = r.columns.firstIndex(where: { $0.lowercased() == name.lowercased() }) else { return nil }
                return k < row.count ? row[k] : nil
            }
            let io = column("Slave_IO_Running") ?? "No"
            let sql = column("Slave_SQL_Running") ?? "No"
            if sql != "Yes" {
                let err = column("Last_SQL_Error").flatMap { $0.isEmpty ? nil : ": \($0)" } ?? ""
                return fail(.l7response, "replication stopped (SQL thread not running\(err))", definite: true)
            }
            if io != "Yes" {
                let err = column("Last_IO_Error").flatMap { $0.isEmpty ? nil : ": \($0)" } ?? ""
                return fail(
                    .l7response,
                    "replication stopped (IO thread \(io == "Connecting" ? "connecting" : "not running")\(err))",
                    definite: true)
            }
            guard let lagText = column("Seconds_Behind_Master"), let lag = Int64(lagText) else {
                return fail(.l7response, "replication lag unknown (Seconds_Behind_Master is NULL)", definite: true)
            }
            if let limit = config.maxLag, lag * 1000 > limit.value {
                return fail(.l7response, "replication lag \(lag) s > \(limit)", definite: true)
            }
            notes.append("replication lag \(lag) s")
            return nil
        case .user:
            if let wanted = config.queryExpect {
                guard let first = r.rows.first?.first else {
                    return fail(.l7response, "query returned no value, expected '\(wanted)'")
                }
                guard first == wanted else {
                    return fail(.l7response, "query returned '\(first ?? "NULL")', expected '\(wanted)'")
                }
            }
            notes.append("query ok")
            return nil
        }
    }
}

/// A query's result as the text protocol sends it.
struct ResultSet: Equatable {
    var columns: [String] = []
    var rows: [[String?]] = []
}

/// Reads one COM_QUERY response packet by packet: an OK packet, an ERR packet, or a result set
/// (column count, column definitions, EOF, rows, EOF), where an ERR may come at any point.
struct ResultReader {
    enum Progress: Equatable {
        case more
        case done(ResultSet)
        case error(String)
    }

    private enum State {
        case start
        case columns(Int)
        case columnsEnd, rows
    }
    private var state = State.start
    private var result = ResultSet()

    static func isEOF(_ p: [UInt8]) -> Bool { p.first == 0xFE && p.count < 9 }

    /// A length-encoded integer at `i`, and the index after it.
    static func lenenc(_ p: [UInt8], _ i: Int) -> (Int, Int)? {
        guard i < p.count else { return nil }
        let b = p[i]
        func le(_ n: Int) -> (Int, Int)? {
            guard i + n < p.count else { return nil }
            var v = 0
            for k in 0..<n { v |= Int(p[i + 1 + k]) << (8 * k) }
            return (v, i + 1 + n)
        }
        switch b {
        case 0..<0xFB: return (Int(b), i + 1)
        case 0xFC: return le(2)
        case 0xFD: return le(3)
        case 0xFE: return le(8)
        default: return nil
        }
    }

    /// A length-encoded string at `i` (nil value for NULL, 0xFB), and the index after it.
    static func lenencString(_ p: [UInt8], _ i: Int) -> (String?, Int)? {
        guard i < p.count else { return nil }
        if p[i] == 0xFB { return (nil, i + 1) }
        guard let (n, start) = lenenc(p, i), n >= 0, start + n <= p.count else { return nil }
        return (String(decoding: p[start..<(start + n)], as: UTF8.self), start + n)
    }

    mutating func feed(_ p: [UInt8]) -> Progress {
        if p.first == 0xFF { return .error(MySQLConversation.errorText(p)) }
        switch state {
        case .start:
            if p.first == 0x00 { return .done(result) }  // OK: a statement without a result set
            guard let (n, _) = Self.lenenc(p, 0), n > 0 else { return .error("malformed result (column count)") }
            state = .columns(n)
            return .more
        case .columns(let left):
            // catalog, schema, table, org_table, name, …
            var i = 0
            var name: String?
            for _ in 0..<5 {
                guard let (v, next) = Self.lenencString(p, i) else { return .error("malformed column definition") }
                name = v
                i = next
            }
            result.columns.append(name ?? "")
            state = left > 1 ? .columns(left - 1) : .columnsEnd
            return .more
        case .columnsEnd:
            guard Self.isEOF(p) else { return .error("malformed result (no EOF after the columns)") }
            state = .rows
            return .more
        case .rows:
            if Self.isEOF(p) { return .done(result) }
            var row: [String?] = []
            var i = 0
            for _ in 0..<result.columns.count {
                guard let (v, next) = Self.lenencString(p, i) else { return .error("malformed row") }
                row.append(v)
                i = next
            }
            result.rows.append(row)
            return .more
        }
    }
}
