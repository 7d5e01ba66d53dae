import BallastCore

/// Reads an HTTP/1.x answer: status line, then (if asked) a body substring.
enum HTTPJudge {
    static func judge(_ bytes: [UInt8], config: CheckConfig, eof: Bool) -> Verdict? {
        guard let lineEnd = find(bytes, [13, 10]) else {
            if eof {
                return bytes.isEmpty
                    ? Verdict(.l7response, "connection closed without an answer")
                    : Verdict(.l7response, "not an HTTP answer: \(printable(bytes.prefix(40)))")
            }
            if bytes.count >= 8 && !bytes.starts(with: Array("HTTP/".utf8)) {
                return Verdict(.l7response, code: nil, "not an HTTP answer: \(printable(bytes.prefix(40)))")
            }
            return nil
        }
        let line = String(decoding: bytes[0..<lineEnd], as: UTF8.self)
        let parts = line.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let code = Int(parts[1]), (100...599).contains(code)
        else {
            return Verdict(.l7response, code: nil, "not an HTTP answer: \(printable(bytes.prefix(40)))")
        }
        let reason = parts.count > 2 ? String(parts[2]) : ""
        guard config.accepts(status: code) else {
            return Verdict(.l7status, code: code, reason.isEmpty ? "status \(code)" : reason)
        }
        guard let wanted = config.body else { return Verdict(.l7ok, code: code, reason) }
        let body: ArraySlice<UInt8> = find(bytes, [13, 10, 13, 10]).map { bytes[($0 + 4)...] } ?? []
        if find(Array(body), Array(wanted.utf8)) != nil { return Verdict(.l7ok, code: code, reason) }
        if eof { return Verdict(.l7response, code: code, "body does not contain '\(wanted)'") }
        return nil
    }
}

/// RESP (Redis serialization protocol) values, as far as checks and Sentinel need them.
enum RESP: Equatable {
    case simple(String)
    case error(String)
    case bulk(String)
    case integer(Int64)
    case null
    indirect case array([RESP])

    /// One complete value starting at `i`, and where the next begins; nil: incomplete so far.
    /// A malformed value is returned as `.error("unexpected answer: …")` and ends the input.
    static func parseOne(_ bytes: [UInt8], at i: Int, depth: Int = 0) -> (RESP, Int)? {
        guard i < bytes.count else { return nil }
        var end = i
        while end + 1 < bytes.count && !(bytes[end] == 13 && bytes[end + 1] == 10) { end += 1 }
        guard end + 1 < bytes.count else { return nil }
        let line = String(decoding: bytes[(i + 1)..<end], as: UTF8.self)
        let next = end + 2
        let garbage = (RESP.error("unexpected answer: \(printable(bytes[i...].prefix(40)))"), bytes.count)
        switch bytes[i] {
        case UInt8(ascii: "+"): return (.simple(line), next)
        case UInt8(ascii: "-"): return (.error(line), next)
        case UInt8(ascii: ":"):
            guard let v = Int64(line) else { return garbage }
            return (.integer(v), next)
        case UInt8(ascii: "$"):
            guard let n = Int(line), n >= -1, n <= 512 << 20 else { return garbage }  // Redis's proto-max-bulk-len
            if n == -1 { return (.null, next) }
            guard bytes.count >= next + n + 2 else { return nil }
            return (.bulk(String(decoding: bytes[next..<(next + n)], as: UTF8.self)), next + n + 2)
        case UInt8(ascii: "*"):
            guard let n = Int(line), n >= -1, n < 1 << 16, depth < 8 else { return garbage }
            if n == -1 { return (.null, next) }
            var items: [RESP] = []
            var k = next
            for _ in 0..<n {
                guard let (v, after) = parseOne(bytes, at: k, depth: depth + 1) else { return nil }
                if case .error(let e) = v, e.hasPrefix("unexpected answer") { return (v, bytes.count) }
                items.append(v)
                k = after
            }
            return (.array(items), k)
        default:
            return garbage
        }
    }

    /// Every complete value in `bytes` (a malformed one is the last), and how many bytes they took.
    static func parseAll(_ bytes: [UInt8]) -> ([RESP], Int) {
        var out: [RESP] = []
        var i = 0
        while let (v, next) = parseOne(bytes, at: i) {
            out.append(v)
            i = next
            if i >= bytes.count { break }
        }
        return (out, i)
    }

    static func command(_ args: [String]) -> [UInt8] {
        var out = Array("*\(args.count)\r\n".utf8)
        for a in args { out += Array("$\(a.utf8.count)\r\n\(a)\r\n".utf8) }
        return out
    }
}

/// What `INFO replication` says about a Redis server.
public struct RedisReplication: Sendable, Equatable {
    public var role = "unknown"
    public var replid = ""
    public var replid2 = ""
    public var offset: Int64 = 0
    /// Replicas: `master_link_status:up`, `master_sync_in_progress:1`, `master_last_io_seconds_ago`.
    public var linkUp = false
    public var syncInProgress = false
    public var lastIOSeconds: Int?
    public var masterHost: String?

    public var isMaster: Bool { role == "master" }

    public init() {}

    public init(info text: String) {
        for line in text.split(whereSeparator: \.isNewline) {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let key = line[..<colon]
            let value = String(line[line.index(after: colon)...])
            switch key {
            case "role": role = value
            case "master_replid": replid = value
            case "master_replid2": replid2 = value
            case "master_repl_offset": offset = Int64(value) ?? 0
            case "master_link_status": linkUp = value == "up"
            case "master_sync_in_progress": syncInProgress = value == "1"
            case "master_last_io_seconds_ago": lastIOSeconds = Int(value)
            case "master_host": masterHost = value
            default: break
            }
        }
    }
}

/// Reads the answers to the pipelined [AUTH] PING [INFO replication] QUIT.
enum RedisJudge {
    static func judge(_ bytes: [UInt8], config: CheckConfig, eof: Bool) -> Verdict? {
        let replies = RESP.parseAll(bytes).0
        var k = 0
        func next() -> RESP? {
            defer { k += 1 }
            return k < replies.count ? replies[k] : nil
        }
        if config.password != nil {
            guard let r = next() else { return eof ? Verdict(.l7response, closedEarly(bytes)) : nil }
            switch r {
            case .simple("OK"): break
            case .error(let e): return Verdict(.l7response, "AUTH failed: \(e)")
            default: return Verdict(.l7response, "AUTH: unexpected answer")
            }
        }
        guard let ping = next() else { return eof ? Verdict(.l7response, closedEarly(bytes)) : nil }
        switch ping {
        case .simple("PONG"): break
        case .error(let e): return Verdict(.l7response, "PING failed: \(e)")
        default: return Verdict(.l7response, "PING: unexpected answer")
        }
        guard config.role != .any else { return Verdict(.l7ok, "Redis server is ok") }
        guard let info = next() else { return eof ? Verdict(.l7response, closedEarly(bytes)) : nil }
        guard case .bulk(let text) = info else {
            if case .error(let e) = info { return Verdict(.l7response, "INFO replication failed: \(e)") }
            return Verdict(.l7response, "INFO replication: unexpected answer")
        }
        let r = RedisReplication(info: text)
        // From here on the server said what it is: a wrong answer acts at once.
        switch config.role {
        case .master:
            guard r.isMaster else {
                return Verdict(
                    .l7response, "role is \(r.role), the check requires master", definite: true, replication: r)
            }
            return Verdict(.l7ok, "role:master", replication: r)
        case .replica:
            guard r.role == "slave" else {
                return Verdict(
                    .l7response, "role is \(r.role), the check requires replica", definite: true, replication: r)
            }
            guard r.linkUp else {
                return Verdict(
                    .l7response, "replication link to the master is down (master_link_status:down)", definite: true,
                    replication: r)
            }
            if r.syncInProgress {
                return Verdict(.l7response, "initial sync from the master in progress", definite: true, replication: r)
            }
            if let lag = config.maxLag, let seconds = r.lastIOSeconds, Int64(seconds) * 1000 > lag.value {
                return Verdict(
                    .l7response, "replication lag \(seconds) s > \(lag) (master_last_io_seconds_ago)", definite: true,
                    replication: r)
            }
            return Verdict(.l7ok, "role:slave, link up", replication: r)
        case .any:
            return Verdict(.l7ok, "Redis server is ok")
        }
    }

    static func closedEarly(_ bytes: [UInt8]) -> String {
        bytes.isEmpty ? "connection closed without an answer" : "incomplete answer: \(printable(bytes.prefix(40)))"
    }
}

func find(_ hay: [UInt8], _ needle: [UInt8]) -> Int? {
    guard !needle.isEmpty, hay.count >= needle.count else { return nil }
    for i in 0...(hay.count - needle.count) where hay[i] == needle[0] {
        if hay[i..<(i + needle.count)].elementsEqual(needle) { return i }
    }
    return nil
}

func printable<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
    String(bytes.map { $0 >= 32 && $0 < 127 ? Character(UnicodeScalar($0)) : "." })
}

/// One line of HAProxy's agent-check protocol: words separated by spaces, tabs or commas —
/// `up`, `down`/`fail`/`stopped` (optionally `#reason`), `ready`, `drain`, `maint`, `N%`,
/// `maxconn:N`.
struct AgentReply: Equatable {
    var weightPercent: Int?
    var maxconn: Int?
    var admin: AdminState?
    /// Set when the agent reports the server down; the text after `#`, if any.
    var down: String?
    var up = false

    init(weightPercent: Int?, maxconn: Int?, admin: AdminState?, down: String?, up: Bool) {
        self.weightPercent = weightPercent
        self.maxconn = maxconn
        self.admin = admin
        self.down = down
        self.up = up
    }

    /// The first line, once complete (or whatever came before EOF).
    static func line(_ bytes: [UInt8], eof: Bool) -> String? {
        if let nl = bytes.firstIndex(of: 10) {
            return String(decoding: bytes[..<nl], as: UTF8.self).trimmingCharacters()
        }
        return eof ? String(decoding: bytes, as: UTF8.self).trimmingCharacters() : nil
    }

    init(_ line: String) {
        var text = Substring(line)
        var reason = ""
        if let hash = text.firstIndex(of: "#") {
            reason = String(text[text.index(after: hash)...]).trimmingCharacters()
            text = text[..<hash]
        }
        for word in text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "," }) {
            let w = word.lowercased()
            switch w {
            case "up": up = true
            case "down", "fail", "stopped": down = reason
            case "ready": admin = .ready
            case "drain": admin = .drain
            case "maint": admin = .maint
            default:
                if w.hasSuffix("%"), let p = Int(w.dropLast()), p >= 0 {
                    weightPercent = p
                } else if w.hasPrefix("maxconn:"), let m = Int(w.dropFirst(8)), m >= 0 {
                    maxconn = m
                }
            }
        }
    }
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" || f == "\r" || f == "\n" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" || l == "\r" || l == "\n" { s = s.dropLast() }
        return String(s)
    }
}
