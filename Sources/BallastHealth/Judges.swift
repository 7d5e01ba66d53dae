import BallastCore

/// Reads an HTTP/1.x answer: status line, then (if asked) a body substring.
enum HTTPJudge {
    static func judge(_ bytes: [UInt8], config: CheckConfig, eof: Bool) -> (CheckStatus, Int?, String)? {
        guard let lineEnd = find(bytes, [13, 10]) else {
            if eof {
                return bytes.isEmpty
                    ? (.l7response, nil, "connection closed without an answer")
                    : (.l7response, nil, "not an HTTP answer: \(printable(bytes.prefix(40)))")
            }
            if bytes.count >= 8 && !bytes.starts(with: Array("HTTP/".utf8)) {
                return (.l7response, nil, "not an HTTP answer: \(printable(bytes.prefix(40)))")
            }
            return nil
        }
        let line = String(decoding: bytes[0..<lineEnd], as: UTF8.self)
        let parts = line.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let code = Int(parts[1]), (100...599).contains(code) else {
            return (.l7response, nil, "not an HTTP answer: \(printable(bytes.prefix(40)))")
        }
        let reason = parts.count > 2 ? String(parts[2]) : ""
        guard config.accepts(status: code) else { return (.l7status, code, reason.isEmpty ? "status \(code)" : reason) }
        guard let wanted = config.body else { return (.l7ok, code, reason) }
        let body: ArraySlice<UInt8> = find(bytes, [13, 10, 13, 10]).map { bytes[($0 + 4)...] } ?? []
        if find(Array(body), Array(wanted.utf8)) != nil { return (.l7ok, code, reason) }
        if eof { return (.l7response, code, "body does not contain '\(wanted)'") }
        return nil
    }
}

/// Reads the answers to the pipelined [AUTH] PING [INFO replication] QUIT.
enum RedisJudge {
    enum Reply {
        case simple(String)
        case error(String)
        case bulk(String)
    }

    /// Parses as many complete RESP replies as `bytes` holds.
    static func parse(_ bytes: [UInt8]) -> [Reply] {
        var out: [Reply] = []
        var i = 0
        while i < bytes.count {
            guard let end = find(Array(bytes[i...]), [13, 10]) else { break }
            let line = String(decoding: bytes[(i + 1)..<(i + end)], as: UTF8.self)
            switch bytes[i] {
            case UInt8(ascii: "+"):
                out.append(.simple(line))
                i += end + 2
            case UInt8(ascii: "-"):
                out.append(.error(line))
                i += end + 2
            case UInt8(ascii: "$"):
                guard let n = Int(line), n >= 0 else {
                    out.append(.bulk(""))
                    i += end + 2
                    continue
                }
                let start = i + end + 2
                guard bytes.count >= start + n + 2 else { return out }
                out.append(.bulk(String(decoding: bytes[start..<(start + n)], as: UTF8.self)))
                i = start + n + 2
            case UInt8(ascii: ":"):
                out.append(.simple(line))
                i += end + 2
            default:
                out.append(.error("unexpected answer: \(printable(bytes[i...].prefix(40)))"))
                return out
            }
        }
        return out
    }

    static func judge(_ bytes: [UInt8], config: CheckConfig, eof: Bool) -> (CheckStatus, Int?, String)? {
        let replies = parse(bytes)
        var k = 0
        func next() -> Reply? {
            defer { k += 1 }
            return k < replies.count ? replies[k] : nil
        }
        if config.password != nil {
            guard let r = next() else { return eof ? (.l7response, nil, closedEarly(bytes)) : nil }
            switch r {
            case .simple("OK"): break
            case .error(let e): return (.l7response, nil, "AUTH failed: \(e)")
            default: return (.l7response, nil, "AUTH: unexpected answer")
            }
        }
        guard let ping = next() else { return eof ? (.l7response, nil, closedEarly(bytes)) : nil }
        switch ping {
        case .simple("PONG"): break
        case .error(let e): return (.l7response, nil, "PING failed: \(e)")
        default: return (.l7response, nil, "PING: unexpected answer")
        }
        guard config.role != .any else { return (.l7ok, nil, "Redis server is ok") }
        guard let info = next() else { return eof ? (.l7response, nil, closedEarly(bytes)) : nil }
        guard case .bulk(let text) = info else {
            if case .error(let e) = info { return (.l7response, nil, "INFO replication failed: \(e)") }
            return (.l7response, nil, "INFO replication: unexpected answer")
        }
        let roleLine = text.split(whereSeparator: \.isNewline).first { $0.hasPrefix("role:") }
        let role = roleLine.map { String($0.dropFirst(5)) } ?? "unknown"
        let isMaster = role == "master"
        let wanted = config.role == .master
        if isMaster == wanted { return (.l7ok, nil, "role:\(role)") }
        return (.l7response, nil, "role is \(role), the check requires \(config.role.rawValue)")
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
