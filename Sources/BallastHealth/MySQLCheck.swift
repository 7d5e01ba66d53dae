import BallastCore

/// The MySQL/MariaDB check as a conversation over the classic protocol: read the greeting,
/// log in with `mysql_native_password` (when a user is configured), optionally run one query and
/// read `@@read_only`, and always end with `COM_QUIT`, so the server never counts an aborted
/// connection (the cause of `max_connect_errors` host blocking).
///
/// Supported authentication: `mysql_native_password` (MariaDB's and MySQL 5.7's default), also
/// when the server asks to switch to it. Any other plugin the server asks for (MySQL 8's
/// `caching_sha2_password`, `ed25519`, …) fails the check with a detail naming the plugin; the
/// check still sends `COM_QUIT`.
struct MySQLConversation {
    enum Step { case greeting, auth, readOnlyResult, queryResult, done }

    let config: CheckConfig
    var step = Step.greeting
    var received: [UInt8] = []
    /// Packets to send next (each already framed).
    var outgoing: [UInt8] = []
    var verdict: (CheckStatus, Int?, String)?
    var serverVersion = ""
    var readOnly: String?
    var rowSeen = false

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

    private mutating func fail(_ status: CheckStatus, _ detail: String) -> [UInt8] {
        verdict = (status, nil, detail)
        return MySQLConversation.quit
    }

    private mutating func handle(_ p: [UInt8], seq: UInt8) -> [UInt8] {
        guard let first = p.first else { return fail(.l7response, "empty packet") }
        switch step {
        case .greeting:
            if first == 0xFF { verdict = (.l7response, nil, MySQLConversation.errorText(p)); return [] }
            guard first == 10, let nul = p[1...].firstIndex(of: 0) else {
                verdict = (.l7response, nil, "not a MySQL greeting (protocol \(first))")
                return []
            }
            serverVersion = String(decoding: p[1..<nul], as: UTF8.self)
            var i = nul + 1 + 4  // connection id
            guard p.count >= i + 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10 else {
                verdict = (.l7response, nil, "truncated MySQL greeting")
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
                verdict = (.l7ok, nil, "\(serverVersion)")
                return MySQLConversation.quit
            }
            step = .auth
            let auth = plugin == "mysql_native_password" ? nativePasswordScramble(password: config.password ?? "", scramble: scramble) : []
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
                    return fail(.l7response, "authentication plugin '\(plugin)' is not supported (use mysql_native_password)")
                }
                var scramble = Array(p[(nul + 1)...])
                if scramble.last == 0 { scramble.removeLast() }
                return MySQLConversation.frame(nativePasswordScramble(password: config.password ?? "", scramble: scramble), seq: seq &+ 1)
            default:
                return fail(.l7response, "unexpected answer to login (0x\(String(first, radix: 16)))")
            }
        case .readOnlyResult, .queryResult:
            if first == 0xFF { return fail(.l7response, MySQLConversation.errorText(p)) }
            if step == .queryResult {
                // Any result that is not an error will do; stop at the first packet.
                verdict = (.l7ok, nil, "\(serverVersion), query ok")
                return MySQLConversation.quit
            }
            // Column count, column definition, EOF, row, EOF: the row is a length-encoded string.
            if first == 0xFE && p.count < 9 {
                if rowSeen { return judgeReadOnly() }
                return []
            }
            if !rowSeen && readOnlyCandidate(p) { return [] }
            return []
        case .done:
            return []
        }
    }

    private var packetsInResult = 0

    /// Counts packets of the `SELECT @@read_only` result; the 3rd non-EOF packet is the row.
    private mutating func readOnlyCandidate(_ p: [UInt8]) -> Bool {
        packetsInResult += 1
        if packetsInResult == 3 {
            // Row: length-encoded string.
            let n = Int(p[0])
            if n < 251 && p.count >= 1 + n {
                readOnly = String(decoding: p[1..<(1 + n)], as: UTF8.self)
                rowSeen = true
            }
        }
        return true
    }

    private mutating func judgeReadOnly() -> [UInt8] {
        let ro = readOnly == "1" || readOnly?.uppercased() == "ON"
        switch config.mysqlRequire {
        case .primary where ro:
            return fail(.l7response, "read_only is ON, the check requires a primary")
        case .replica where !ro:
            return fail(.l7response, "read_only is OFF, the check requires a replica")
        default:
            verdict = (.l7ok, nil, "\(serverVersion), read_only \(ro ? "ON" : "OFF")")
            return MySQLConversation.quit
        }
    }

    private mutating func afterLogin() -> [UInt8] {
        if config.mysqlRequire != .any {
            step = .readOnlyResult
            packetsInResult = 0
            return MySQLConversation.frame([0x03] + Array("SELECT @@read_only".utf8), seq: 0)
        }
        if let q = config.query {
            step = .queryResult
            return MySQLConversation.frame([0x03] + Array(q.utf8), seq: 0)
        }
        verdict = (.l7ok, nil, "\(serverVersion), login ok")
        return MySQLConversation.quit
    }
}
