import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A client for the runtime API socket, as scripts use it: write a line, read until EOF.
enum StatsClient {
    static func connect(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (k, b) in path.utf8.enumerated() { dst[k] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard r == 0 else {
            close(fd)
            throw Net.Failure("connect \(path): \(String(cString: strerror(errno)))")
        }
        Net.setTimeout(fd, 10)
        return fd
    }

    /// Sends `request` as is and returns everything until the server closes.
    static func raw(_ path: String, _ request: [UInt8], shutdownAfter: Bool = false) throws -> String {
        let fd = try connect(path)
        defer { close(fd) }
        try Net.sendAll(fd, request)
        if shutdownAfter { Net.shutdownWrite(fd) }
        let (bytes, _) = Net.readAll(fd)
        return String(decoding: bytes, as: UTF8.self)
    }

    static func ask(_ path: String, _ line: String) throws -> String { try raw(path, Array((line + "\n").utf8)) }

    /// In prompt mode: reads until the reply ends with the `> ` prompt.
    static func untilPrompt(_ fd: Int32) -> String? {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n <= 0 { return nil }
            out += buf[0..<n]
            if out.count >= 2 && out[out.count - 2] == UInt8(ascii: ">") && out[out.count - 1] == UInt8(ascii: " ") {
                return String(decoding: out, as: UTF8.self)
            }
        }
    }

    /// `show stat` as rows of fields (the header row first, without its `# `).
    static func stat(_ path: String) throws -> [[String]] {
        let text = try ask(path, "show stat")
        return text.split(separator: "\n").map { line in
            var l = String(line)
            if l.hasPrefix("# ") { l.removeFirst(2) }
            return l.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        }
    }

    /// The first `show stat` row whose svname is `sv` (and pxname `proxy`, when given), by column.
    static func row(_ rows: [[String]], _ sv: String, proxy: String? = nil) -> [String: String] {
        let header = rows[0]
        guard let r = rows.first(where: { $0.count > 1 && $0[1] == sv && (proxy == nil || $0[0] == proxy) }) else {
            return [:]
        }
        var d: [String: String] = [:]
        for (k, name) in header.enumerated() where k < r.count { d[name] = r[k] }
        return d
    }
}

/// The runtime API: HAProxy's protocol and replies, levels, robustness, counters, saved state
/// and /metrics.
@Suite(.serialized) struct RuntimeAPITests {
    static let haveHAProxy = HAProxyProcess.available

    /// A Ballast with admin, operator and user sockets, a state file and metrics, in front of
    /// `servers`.
    static func start(
        _ servers: [(String, UInt16)], extra: String = "", serverExtra: [String: String] = [:], dir: TempDir,
        workers: Int = 2, metricsPort: UInt16 = 0
    ) throws -> BallastProcess {
        let global = """
            workers: \(workers)
            stats:
              sockets:
                - { path: \(dir.file("admin.sock")), level: admin }
                - { path: \(dir.file("operator.sock")) }
                - { path: \(dir.file("user.sock")), level: user, mode: 660 }
            state_file: \(dir.file("state"))
            \(metricsPort > 0 ? "metrics: { address: \"127.0.0.1:\(metricsPort)\" }" : "")
            """
        return try BallastProcess(
            config: configYAML(
                global: global,
                services: [
                    serviceYAML(name: "svc", servers: servers, extra: extra, serverExtra: serverExtra)
                ]))
    }

    // MARK: - HAProxy compatibility

    @Test("same header, row layout, servers-state header and error replies as HAProxy 2.6", .enabled(if: haveHAProxy))
    func compatibleWithHAProxy() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dead = try Net.freePort()
        let dir = TempDir()
        let hport = try Net.freePort()
        let cfg = dir.write(
            "h.cfg",
            """
            global
                stats socket \(dir.file("h.sock")) mode 600 level admin
                stats socket \(dir.file("hu.sock")) mode 600 level user
                nbthread 1
            defaults
                mode tcp
                timeout connect 2s
                timeout client 30s
                timeout server 30s
            listen svc
                bind 127.0.0.1:\(hport)
                balance roundrobin
                server s1 127.0.0.1:\(echo.port) weight 100 check inter 200ms rise 2 fall 2
                server s2 127.0.0.1:\(dead) weight 50 check inter 200ms rise 2 fall 2
                server s3 127.0.0.1:\(echo.port) weight 10 backup

            """)
        let haproxy = try HAProxyProcess(configFile: cfg)
        defer { haproxy.stop() }
        let b = try BallastProcess(
            config: configYAML(
                global: """
                    workers: 1
                    stats:
                      sockets:
                        - { path: \(dir.file("b.sock")), level: admin }
                        - { path: \(dir.file("bu.sock")), level: user }
                    """,
                services: [
                    serviceYAML(
                        name: "svc", servers: [("s1", echo.port), ("s2", dead), ("s3", echo.port)],
                        extra: "check: { type: tcp, interval: 200ms, timeout: 200ms, rise: 2, fall: 2 }",
                        serverExtra: [
                            "s1": "weight: 100", "s2": "weight: 50", "s3": "weight: 10, backup: true, check: false",
                        ])
                ]))
        defer { b.stop() }
        let h = dir.file("h.sock")
        let bs = dir.file("b.sock")
        // Both see s2 down.
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let hs = (try? StatsClient.stat(h)).map { StatsClient.row($0, "s2")["status"] } ?? nil
            let bst = (try? StatsClient.stat(bs)).map { StatsClient.row($0, "s2")["status"] } ?? nil
            if hs == "DOWN" && bst == "DOWN" { break }
            usleep(100_000)
        }
        // Three connections through each.
        for port in [hport, b.port("svc")] {
            for _ in 0..<3 {
                let c = try Net.connect(port)
                try Net.sendAll(c, "hello\n")
                #expect(Net.readExactly(c, 6) == Array("hello\n".utf8))
                close(c)
            }
        }
        usleep(300_000)
        let hText = try StatsClient.ask(h, "show stat")
        let bText = try StatsClient.ask(bs, "show stat")
        let hLines = hText.split(separator: "\n", omittingEmptySubsequences: false)
        let bLines = bText.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(hLines[0] == bLines[0], "header differs")
        #expect(hText.hasSuffix("\n\n") && bText.hasSuffix("\n\n"))
        let hRows = try StatsClient.stat(h)
        let bRows = try StatsClient.stat(bs)
        for sv in ["FRONTEND", "s1", "s2", "s3", "BACKEND"] {
            let hr = hRows.first { $0.count > 1 && $0[1] == sv }!
            let br = bRows.first { $0.count > 1 && $0[1] == sv }!
            #expect(hr.count == br.count, "\(sv): \(hr.count) fields vs \(br.count)")
            // A check under way ("* " before its status): HAProxy empties last_chk meanwhile, so
            // that field is compared only when neither side is checking at that moment.
            let statusK = hRows[0].firstIndex(of: "check_status")!
            let lastK = hRows[0].firstIndex(of: "last_chk")!
            let checking = hr[statusK].hasPrefix("* ") || br[statusK].hasPrefix("* ")
            let hEmpty = hr.indices.filter { hr[$0].isEmpty && !(checking && $0 == lastK) }
            let bEmpty = br.indices.filter { br[$0].isEmpty && !(checking && $0 == lastK) }
            #expect(hEmpty == bEmpty, "\(sv): empty fields differ: HAProxy \(hEmpty) Ballast \(bEmpty)")
            let names = hRows[0]
            for field in [
                "type", "status", "act", "bck", "weight", "stot", "bin", "bout", "lbtot", "mode", "check_status",
                "check_desc", "last_chk", "algo", "check_rise", "check_fall", "check_health", "addr",
            ] {
                let k = names.firstIndex(of: field)!
                var hv = hr[k]
                var bv = br[k]
                if field == "addr" {
                    hv = String(hv.split(separator: ":").first ?? "")
                    bv = String(bv.split(separator: ":").first ?? "")
                }
                if field == "last_chk" && checking { continue }
                if field == "check_status" {
                    // "* " marks a check under way: timing, not format (tested on its own).
                    if hv.hasPrefix("* ") { hv.removeFirst(2) }
                    if bv.hasPrefix("* ") { bv.removeFirst(2) }
                }
                #expect(hv == bv, "\(sv).\(field): HAProxy '\(hr[k])' Ballast '\(br[k])'")
            }
        }
        // show servers state: same version line and header.
        let hs = try StatsClient.ask(h, "show servers state").split(separator: "\n")
        let bsState = try StatsClient.ask(bs, "show servers state").split(separator: "\n")
        #expect(hs[0] == bsState[0] && hs[1] == bsState[1])
        #expect(hs.count == bsState.count)
        // Field by field where the meaning is the same: names, op state, admin state, weights, check result.
        for (hl, bl) in zip(hs.dropFirst(2), bsState.dropFirst(2)) {
            let hf = hl.split(separator: " ")
            let bf = bl.split(separator: " ")
            #expect(hf.count == bf.count)
            for k in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 18] {
                #expect(hf[k] == bf[k], "servers state field \(k): '\(hl)' vs '\(bl)'")
            }
            // Check state and result: a check under way on either side (bit 0x1, result 0 while
            // it runs) is timing, not format; compare the rest.
            let hState = Int(hf[13]) ?? -1
            let bState = Int(bf[13]) ?? -1
            #expect(hState & ~1 == bState & ~1, "servers state field 13: '\(hl)' vs '\(bl)'")
            if (hState | bState) & 1 == 0 { #expect(hf[11] == bf[11], "servers state field 11: '\(hl)' vs '\(bl)'") }
            if hState & 1 != 0 { #expect(hf[11] == "0") }
            if bState & 1 != 0 { #expect(bf[11] == "0", "Ballast shows a result while its check runs: '\(bl)'") }
        }
        // The same bad commands get the same replies.
        let bad = [
            "get weight nope/s1", "get weight svc", "get weight svc/zz", "get weight svc/#9", "set weight svc/s1 300",
            "set weight svc/s1 abc", "set weight svc/s1", "set weight svc/s1 -5%", "set server svc/s1 state foo",
            "set server svc/s1 health foo", "set server svc/zz state ready", "set server nope/s1 state ready",
            "shutdown session 0x1234", "shutdown session", "show servers state nope", "show stat nope 1 -1",
            "set maxconn server svc/s1", "set maxconn server svc/s1 abc", "show sess 0xdead", "disable server svc",
            "enable health nope/s1", "shutdown sessions server svc/zz", "get weight #99/s1", "show backend",
            "show cli level",
        ]
        for cmd in bad {
            let hr = try StatsClient.ask(h, cmd)
            let br = try StatsClient.ask(bs, cmd)
            #expect(hr == br, "'\(cmd)': HAProxy \(hr.debugDescription) Ballast \(br.debugDescription)")
        }
        for cmd in ["set weight svc/s1 10", "show sess", "disable server svc/s1", "clear counters all"] {
            #expect(try StatsClient.ask(dir.file("hu.sock"), cmd) == "Permission denied\n\n")
            #expect(try StatsClient.ask(dir.file("bu.sock"), cmd) == "Permission denied\n\n")
        }
        // The unknown-command reply starts the same way and ends with help, prompt and quit.
        let hu = try StatsClient.ask(h, "foo")
        let bu = try StatsClient.ask(bs, "foo")
        #expect(hu.hasPrefix("Unknown command, but maybe one of the following ones is a better match:\n"))
        #expect(bu.hasPrefix("Unknown command, but maybe one of the following ones is a better match:\n"))
        let tail =
            "  help [<command>]                        : list matching or all commands\n  prompt                                  : toggle interactive mode with prompt\n  quit                                    : disconnect\n\n"
        #expect(hu.hasSuffix(tail) && bu.hasSuffix(tail))
    }

    // MARK: - Levels and protocol

    @Test("every command at every level; operator and user only lower the level")
    func levels() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port), ("s2", echo.port)], dir: dir)
        defer { b.stop() }
        let table: [(String, String)] = [
            ("show info", "user"), ("show stat", "user"), ("show servers state", "user"), ("show backend", "user"),
            ("get weight svc/s1", "user"), ("show version", "user"), ("show cli level", "user"), ("help", "user"),
            ("show sess", "operator"), ("clear counters", "operator"), ("clear counters all", "admin"),
            ("set weight svc/s1 1", "admin"), ("set server svc/s1 weight 1", "admin"),
            ("set server svc/s2 state ready", "admin"),
            ("enable server svc/s2", "admin"), ("disable health svc/s2", "admin"), ("enable health svc/s2", "admin"),
            ("set maxconn server svc/s2 0", "admin"), ("shutdown sessions server svc/s2", "admin"),
            ("shutdown session 0x1", "admin"), ("set server svc/s2 health up", "admin"),
        ]
        let rank = ["user": 0, "operator": 1, "admin": 2]
        for (level, sock) in [("user", "user.sock"), ("operator", "operator.sock"), ("admin", "admin.sock")] {
            #expect(try StatsClient.ask(dir.file(sock), "show cli level") == "\(level)\n\n")
            for (cmd, need) in table {
                let reply = try StatsClient.ask(dir.file(sock), cmd)
                if rank[level]! < rank[need]! {
                    #expect(reply == "Permission denied\n\n", "\(cmd) at \(level): \(reply.debugDescription)")
                } else {
                    #expect(
                        reply != "Permission denied\n\n" && reply.hasSuffix("\n"),
                        "\(cmd) at \(level): \(reply.debugDescription)")
                }
            }
            // help lists exactly what this level may run.
            let help = try StatsClient.ask(dir.file(sock), "help")
            #expect(help.contains("show stat") && help.contains("quit"))
            #expect(help.contains("set server") == (level == "admin"), "\(level) help: \(help)")
            #expect(help.contains("show sess") == (level != "user"), "\(level) help")
        }
        // Lowering works, raising does not.
        #expect(
            try StatsClient.ask(dir.file("admin.sock"), "operator;show cli level;set weight svc/s1 2")
                == "\noperator\n\nPermission denied\n\n")
        #expect(
            try StatsClient.ask(dir.file("user.sock"), "operator;show cli level") == "Permission denied\n\nuser\n\n")
        // The user socket has the configured mode.
        var st = stat()
        #expect(lstat(dir.file("user.sock"), &st) == 0 && st.st_mode & 0o777 == 0o660)
        #expect(lstat(dir.file("admin.sock"), &st) == 0 && st.st_mode & 0o777 == 0o600)
    }

    @Test("prompt mode, chained commands, quit, and a line without its newline")
    func promptAndChains() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port)], serverExtra: ["s1": "weight: 7"], dir: dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        // Chained: one reply per command, each ending with an empty line; `\;` escapes.
        #expect(
            try StatsClient.ask(sock, "show cli level;get weight svc/s1;get weight x/y")
                == "admin\n\n7 (initial 7)\n\nNo such backend.\n\n")
        #expect(try StatsClient.ask(sock, "get weight svc/s1\\;x") == "No such server.\n\n")
        // Without a newline nothing runs (HAProxy does the same); the connection just closes.
        #expect(try StatsClient.raw(sock, Array("show info".utf8), shutdownAfter: true) == "")
        // Non-interactive: only the first line is answered, then the server closes.
        #expect(try StatsClient.raw(sock, Array("show cli level\nshow version\n".utf8)) == "admin\n\n")
        // Interactive.
        let fd = try StatsClient.connect(sock)
        defer { close(fd) }
        try Net.sendAll(fd, "prompt\n")
        #expect(StatsClient.untilPrompt(fd) == "\n> ")
        try Net.sendAll(fd, "get weight svc/s1\n")
        #expect(StatsClient.untilPrompt(fd) == "7 (initial 7)\n\n> ")
        try Net.sendAll(fd, "set weight svc/s1 9;get weight svc/s1\n")
        var got = ""
        while !got.hasSuffix("9 (initial 7)\n\n> ") {
            guard let more = StatsClient.untilPrompt(fd) else { break }
            got += more
        }
        #expect(got == "\n> 9 (initial 7)\n\n> ")
        try Net.sendAll(fd, "quit\n")
        let (rest, end) = Net.readAll(fd)
        #expect(rest.isEmpty && end == .eof)
    }

    @Test(
        "extra words after a command's arguments are an error and change nothing; maxconn above the process's is refused"
    )
    func extraWords() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port), ("s2", echo.port)], dir: dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        #expect(
            try StatsClient.ask(sock, "set weight svc/s1 5 extra")
                == "Unexpected argument 'extra'. Usage: set weight <bk>/<srv>  (DEPRECATED)\n\n")
        #expect(
            try StatsClient.ask(sock, "set server svc/s1 weight 5 extra")
                == "Unexpected argument 'extra'. Usage: set server <bk>/<srv> weight <value>\n\n")
        #expect(
            try StatsClient.ask(sock, "set server svc/s1 state drain now")
                == "Unexpected argument 'now'. Usage: set server <bk>/<srv> state <value>\n\n")
        #expect(
            try StatsClient.ask(sock, "get weight svc/s1 svc/s2")
                == "Unexpected argument 'svc/s2'. Usage: get weight <bk>/<srv>\n\n")
        #expect(
            try StatsClient.ask(sock, "show version please") == "Unexpected argument 'please'. Usage: show version\n\n")
        #expect(try StatsClient.ask(sock, "get weight svc/s1") == "1 (initial 1)\n\n")
        let row = try StatsClient.stat(sock).first { $0.count > 1 && $0[1] == "s1" }
        #expect(row?[17] == "no check", "the refused drain changed nothing (DRAIN otherwise): \(row ?? [])")
        let maxconn =
            try StatsClient.ask(sock, "show info").split(separator: "\n").first { $0.hasPrefix("Maxconn: ") }?
            .dropFirst(9) ?? ""
        #expect(
            try StatsClient.ask(sock, "set maxconn server svc/s1 99999999999")
                == "maxconn 99999999999 is above the process's maxconn (\(maxconn)); this server could never reach it.\n\n"
        )
        #expect(try StatsClient.ask(sock, "set maxconn server svc/s1 \(maxconn)") == "\n")
    }

    @Test("a 1 MiB line, 10,000 random lines, 64 idle clients: every request gets a reply")
    func robustness() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port), ("s2", echo.port)], dir: dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        // 1 MiB on one line: an error reply, and the socket goes on answering.
        let huge = [UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20) + [10]
        let reply = try StatsClient.raw(sock, huge)
        #expect(reply == "Command line too long (over 65536 bytes).\n\n")
        #expect(try StatsClient.ask(sock, "show cli level") == "admin\n\n")
        // 10,000 random lines in prompt mode, each answered before the next is sent.
        var rng = SystemRandomNumberGenerator()
        let words = [
            "show", "stat", "info", "sess", "servers", "state", "set", "server", "weight", "get", "svc/s1", "svc/s2",
            "svc", "#1/#1", "health", "up", "down", "drain", "ready", "maint", "clear", "counters", "help", "enable",
            "disable", "100", "-1", "50%", "0x1", "typed", "json", "backend", "version", "cli", "level", "shutdown",
            "agent",
        ]
        let fd = try StatsClient.connect(sock)
        defer { close(fd) }
        try Net.sendAll(fd, "prompt\n")
        _ = StatsClient.untilPrompt(fd)
        var answered = 0
        for k in 0..<10_000 {
            var line = ""
            if k % 3 == 0 {
                // Raw printable garbage (no newline, no command separators).
                let n = Int.random(in: 0...80, using: &rng)
                line = String(
                    (0..<n).map { _ in Character(Unicode.Scalar(UInt8.random(in: 32...126, using: &rng))) }.filter {
                        $0 != ";" && $0 != "\\"
                    })
            } else {
                line = (0..<Int.random(in: 1...5, using: &rng)).map { _ in words.randomElement(using: &rng)! }.joined(
                    separator: " ")
            }
            try Net.sendAll(fd, line + "\n")
            guard let r = StatsClient.untilPrompt(fd) else {
                Issue.record("no reply to line \(k): \(line.debugDescription)")
                break
            }
            #expect(!r.isEmpty)
            answered += 1
        }
        #expect(answered == 10_000)
        // 64 idle clients do not lock the socket out (default cap 10: the idlest make room).
        var idle: [Int32] = []
        for _ in 0..<64 { idle.append(try StatsClient.connect(sock)) }
        defer { for c in idle { close(c) } }
        usleep(200_000)
        let t0 = Date()
        #expect(try StatsClient.ask(sock, "show cli level") == "admin\n\n")
        #expect(Date().timeIntervalSince(t0) < 2)
        #expect(b.process.isRunning)
    }

    @Test("3,000 mutants of valid command lines in prompt mode: each gets a reply, the process lives on")
    func commandMutants() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port), ("s2", echo.port)], dir: dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        let seeds = [
            "show stat", "show stat -1 4 -1 typed", "show stat svc 2 -1 json", "show info typed",
            "show servers state svc",
            "set server svc/s1 state drain", "set server svc/s1 state ready", "set server svc/#2 weight 50%",
            "set weight svc/s2 3",
            "get weight svc/s1", "set maxconn server svc/s1 10", "set server svc/s1 health up", "enable health svc/s1",
            "show sess", "shutdown session 0x1", "show cli level; show version; show backend", "help set",
            "clear counters",
            "show health svc", "show stat up\\ no-maint", "operator; show cli level",
        ]
        let pieces = [
            ";", "\\", " ", "\t", "\r", "/", "#", "%", "0x", "-1", "99999999999999999999", "é", "\u{1}", "svc", "s1",
            "#0",
            "stat", "server", "weight", "state", "maint", "up", "json", "typed", "\u{7f}",
        ]
        var rng = SystemRandomNumberGenerator()
        var fd = try StatsClient.connect(sock)
        defer { close(fd) }
        func enterPrompt() throws {
            try Net.sendAll(fd, "prompt\n")
            _ = StatsClient.untilPrompt(fd)
        }
        try enterPrompt()
        var answered = 0
        var reconnects = 0
        let end = Date().addingTimeInterval(30)
        for _ in 0..<3000 where Date() < end {
            var line = Array(seeds.randomElement(using: &rng)!)
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                let at = Int.random(in: 0...line.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: line.insert(contentsOf: pieces.randomElement(using: &rng)!, at: at)
                case 1:
                    if at < line.count {
                        line.removeSubrange(at..<min(line.count, at + Int.random(in: 1...5, using: &rng)))
                    }
                default: line.insert(Character(Unicode.Scalar(UInt8.random(in: 32...126, using: &rng))), at: at)
                }
            }
            let text = String(line)
            try Net.sendAll(fd, text + "\n")
            if let r = StatsClient.untilPrompt(fd) {
                #expect(r.count > 2, "\(text.debugDescription)")
                answered += 1
            } else {
                // `quit` or `prompt` among the mutants ends the session: that is an answer too.
                #expect(text.contains("quit") || text.contains("prompt"), "no reply to \(text.debugDescription)")
                close(fd)
                fd = try StatsClient.connect(sock)
                try enterPrompt()
                reconnects += 1
            }
        }
        print("command fuzz: \(answered) answered, \(reconnects) sessions ended by the line")
        #expect(answered >= 500)
        #expect(b.process.isRunning)
        #expect(try StatsClient.ask(sock, "show cli level") == "admin\n\n")
    }

    // MARK: - Counters

    @Test("stot, bin, bout and lbtot equal what the clients sent and received")
    func countersMatchTraffic() throws {
        let a = try TestServer.echo(name: "a")
        let c = try TestServer.echo(name: "c")
        defer {
            a.stop()
            c.stop()
        }
        let dir = TempDir()
        let b = try Self.start([("s1", a.port), ("s2", c.port)], dir: dir)
        defer { b.stop() }
        let port = b.port("svc")
        let n = 20
        let size = 100_003
        for k in 0..<n {
            let fd = try Net.connect(port)
            let payload = [UInt8](repeating: UInt8(k), count: size)
            try Net.sendAll(fd, payload)
            Net.shutdownWrite(fd)
            let (back, _) = Net.readAll(fd)
            #expect(back.count == size)
            close(fd)
            // One at a time from the proxy's side too (its close can trail the client's), so the
            // maximum of concurrent connections is exactly 1.
            let settle = Date().addingTimeInterval(2)
            while Date() < settle,
                StatsClient.row(try StatsClient.stat(dir.file("user.sock")), "FRONTEND")["scur"] != "0"
            { usleep(2_000) }
        }
        // Counters are added when bytes move and when connections end; the last close is async.
        var fe: [String: String] = [:]
        var be: [String: String] = [:]
        var s1: [String: String] = [:]
        var s2: [String: String] = [:]
        let deadline = Date().addingTimeInterval(5)
        repeat {
            let rows = try StatsClient.stat(dir.file("user.sock"))
            fe = StatsClient.row(rows, "FRONTEND")
            be = StatsClient.row(rows, "BACKEND")
            s1 = StatsClient.row(rows, "s1")
            s2 = StatsClient.row(rows, "s2")
            if fe["scur"] == "0" && be["bout"] == "\(n * size)" { break }
            usleep(50_000)
        } while Date() < deadline
        #expect(fe["stot"] == "\(n)" && fe["conn_tot"] == "\(n)")
        #expect(fe["bin"] == "\(n * size)" && fe["bout"] == "\(n * size)")
        #expect(
            be["stot"] == "\(n)" && be["lbtot"] == "\(n)" && be["bin"] == "\(n * size)" && be["bout"] == "\(n * size)")
        // Two workers, each with its own round robin: the split is near 1:1, the sums are exact.
        let st1 = Int(s1["stot"] ?? "") ?? -1
        let st2 = Int(s2["stot"] ?? "") ?? -1
        #expect(st1 + st2 == n && abs(st1 - st2) <= 2, "\(st1) + \(st2)")
        #expect(s1["lbtot"] == "\(st1)" && s2["lbtot"] == "\(st2)")
        #expect(s1["bin"] == "\(st1 * size)" && s2["bin"] == "\(st2 * size)")
        #expect(s1["bout"] == "\(st1 * size)" && s2["bout"] == "\(st2 * size)")
        #expect(fe["scur"] == "0" && s1["scur"] == "0" && s1["smax"] == "1")
        #expect(s1["econ"] == "0" && s1["lastsess"] != "-1")
        // show info agrees, and `clear counters all` starts over.
        let info = try StatsClient.ask(dir.file("user.sock"), "show info")
        #expect(
            info.contains("CumConns: \(n)\n") && info.contains("Name: Ballast\n")
                && info.contains("TotalBytesOut: \(n * size)\n"))
        #expect(try StatsClient.ask(dir.file("admin.sock"), "clear counters all") == "\n")
        let after = StatsClient.row(try StatsClient.stat(dir.file("user.sock")), "s1")
        #expect(after["stot"] == "0" && after["bin"] == "0" && after["smax"] == "0")
    }

    @Test("show sess lists a live connection; shutdown session closes exactly it")
    func sessions() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port)], dir: dir)
        defer { b.stop() }
        let keep = try Net.connect(b.port("svc"))
        let victim = try Net.connect(b.port("svc"))
        defer {
            close(keep)
            close(victim)
        }
        try Net.sendAll(victim, "x")
        #expect(Net.readExactly(victim, 1) == [UInt8(ascii: "x")])
        try Net.sendAll(keep, "y")
        #expect(Net.readExactly(keep, 1) == [UInt8(ascii: "y")])
        var local = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(victim, $0, &len) }
        }
        let victimPort = UInt16(bigEndian: local.sin_port)
        let sess = try StatsClient.ask(dir.file("operator.sock"), "show sess")
        let lines = sess.split(separator: "\n")
        #expect(lines.count == 2, "\(sess)")
        let line = try #require(lines.first { $0.contains("src=127.0.0.1:\(victimPort) ") })
        #expect(line.contains("fe=svc be=svc srv=s1") && line.contains("state=established"))
        let id = String(line.split(separator: ":")[0])
        #expect(try StatsClient.ask(dir.file("admin.sock"), "shutdown session \(id)") == "\n")
        Net.setTimeout(victim, 3)
        let (_, end) = Net.readAll(victim)
        #expect(end == .eof || end == .reset)
        #expect(
            try StatsClient.ask(dir.file("admin.sock"), "shutdown session \(id)")
                == "No such session (use 'show sess').\n\n")
        try Net.sendAll(keep, "z")
        #expect(Net.readExactly(keep, 1) == [UInt8(ascii: "z")])
    }

    // MARK: - State changes and their persistence

    @Test("drain, maint, weight and forced health drive traffic and show in show stat")
    func adminChangesDriveTraffic() throws {
        let a = try TestServer.namedEcho("A")
        let c = try TestServer.namedEcho("C")
        defer {
            a.stop()
            c.stop()
        }
        let dir = TempDir()
        let b = try Self.start(
            [("s1", a.port), ("s2", c.port)],
            extra: "check: { type: tcp, interval: 300ms, timeout: 300ms, rise: 2, fall: 2 }", dir: dir)
        defer { b.stop() }
        let admin = dir.file("admin.sock")
        let port = b.port("svc")
        func who() throws -> String {
            let fd = try Net.connect(port)
            defer { close(fd) }
            try Net.sendAll(fd, "?")
            return String(decoding: Net.readExactly(fd, 1), as: UTF8.self)
        }
        #expect(try StatsClient.ask(admin, "set server svc/s1 state drain") == "\n")
        #expect(StatsClient.row(try StatsClient.stat(admin), "s1")["status"] == "DRAIN")
        #expect(try (0..<6).map { _ in try who() } == Array(repeating: "C", count: 6))
        #expect(try StatsClient.ask(admin, "set server svc/s1 state maint") == "\n")
        #expect(StatsClient.row(try StatsClient.stat(admin), "s1")["status"] == "MAINT")
        #expect(try StatsClient.ask(admin, "set server svc/s1 state ready") == "\n")
        #expect(try StatsClient.ask(admin, "set server svc/s2 health down") == "\n")
        #expect(StatsClient.row(try StatsClient.stat(admin), "s2")["status"]?.hasPrefix("DOWN") == true)
        #expect(try (0..<4).map { _ in try who() } == Array(repeating: "A", count: 4))
        // The check brings it back: DOWN 1/2, then UP.
        let deadline = Date().addingTimeInterval(5)
        var seen: Set<String> = []
        while Date() < deadline {
            let st = StatsClient.row(try StatsClient.stat(admin), "s2")["status"] ?? ""
            seen.insert(st)
            if st == "UP" { break }
            usleep(50_000)
        }
        #expect(seen.contains("UP"), "\(seen)")
        // Weights: 0 drains; a percentage is of the initial weight.
        #expect(try StatsClient.ask(admin, "set weight svc/s1 0") == "\n")
        #expect(try StatsClient.ask(admin, "get weight svc/s1") == "0 (initial 1)\n\n")
        #expect(try (0..<4).map { _ in try who() } == Array(repeating: "C", count: 4))
        #expect(try StatsClient.ask(admin, "set weight svc/s1 200%") == "\n")
        #expect(try StatsClient.ask(admin, "get weight svc/s1") == "2 (initial 1)\n\n")
        // disable health: no check columns, the state stays.
        #expect(try StatsClient.ask(admin, "disable health svc/s2") == "\n")
        let s2 = StatsClient.row(try StatsClient.stat(admin), "s2")
        #expect(s2["status"] == "no check" && s2["check_status"] == "")
        #expect(try StatsClient.ask(admin, "enable health svc/s2") == "\n")
        #expect(b.log.contains("Server svc/s1 enters drain state."))
        #expect(b.log.contains("Server svc/s2 is DOWN (changed from CLI)."))
    }

    @Test("state kept: drained and reweighted servers stay so across reload and restart; config changes win")
    func stateKept() throws {
        let a = try TestServer.namedEcho("A")
        let c = try TestServer.namedEcho("C")
        let d = try TestServer.namedEcho("D")
        defer {
            a.stop()
            c.stop()
            d.stop()
        }
        let dir = TempDir()
        var b = try Self.start([("s1", a.port), ("s2", c.port), ("s3", c.port)], dir: dir)
        let admin = dir.file("admin.sock")
        #expect(
            try StatsClient.ask(
                admin, "set server svc/s1 state drain;set weight svc/s2 33;set server svc/s3 state maint") == "\n\n\n")
        // Reload with the same config: nothing changes.
        let same = try String(contentsOfFile: b.configPath, encoding: .utf8)
        #expect(b.reload(same)?.contains("reloaded") == true)
        var rows = try StatsClient.stat(admin)
        #expect(StatsClient.row(rows, "s1")["status"] == "DRAIN" && StatsClient.row(rows, "s2")["weight"] == "33")
        #expect(StatsClient.row(rows, "s3")["status"] == "MAINT")
        // Restart: the state file brings it back.
        b.stop()
        let saved = try String(contentsOfFile: dir.file("state"), encoding: .utf8)
        #expect(saved.hasPrefix("1\n# be_id be_name"))
        b = try Self.start([("s1", a.port), ("s2", c.port), ("s3", c.port)], dir: dir)
        rows = try StatsClient.stat(admin)
        #expect(StatsClient.row(rows, "s1")["status"] == "DRAIN")
        #expect(StatsClient.row(rows, "s2")["weight"] == "33")
        #expect(StatsClient.row(rows, "s3")["status"] == "MAINT")
        #expect(b.log.contains("state file: restored the runtime state of 3 servers"))
        b.stop()
        // Restart with s3 moved to another port and s2 removed: s3 takes the config, s2's state is gone.
        b = try Self.start([("s1", a.port), ("s3", d.port)], dir: dir)
        defer { b.stop() }
        rows = try StatsClient.stat(admin)
        #expect(StatsClient.row(rows, "s1")["status"] == "DRAIN")
        #expect(StatsClient.row(rows, "s3")["status"] == "UP" || StatsClient.row(rows, "s3")["status"] == "no check")
        #expect(b.log.contains("state file: svc/s3 now has address 127.0.0.1:\(d.port) in the config"))
        let file = try String(contentsOfFile: dir.file("state"), encoding: .utf8)
        #expect(!file.contains(" s2 ") && file.contains(" s3 127.0.0.1 2 0 "))
    }

    // MARK: - Prometheus

    @Test("/metrics parses with the Prometheus client's parser and carries the expected series")
    func metrics() throws {
        let a = try TestServer.echo(name: "a")
        let c = try TestServer.echo(name: "c")
        defer {
            a.stop()
            c.stop()
        }
        let dir = TempDir()
        let mport = try Net.freePort()
        // One worker: its round robin alone decides, so the split is exactly 5 + 5.
        let b = try Self.start([("s1", a.port), ("s2", c.port)], dir: dir, workers: 1, metricsPort: mport)
        defer { b.stop() }
        for _ in 0..<10 {
            let fd = try Net.connect(b.port("svc"))
            try Net.sendAll(fd, "0123456789")
            _ = Net.readExactly(fd, 10)
            close(fd)
        }
        #expect(try StatsClient.ask(dir.file("admin.sock"), "set server svc/s2 state drain") == "\n")
        usleep(200_000)
        let script = dir.write(
            "parse.py",
            """
            import json, sys, urllib.request
            from prometheus_client.parser import text_string_to_metric_families
            text = urllib.request.urlopen("http://127.0.0.1:\(mport)/metrics", timeout=5).read().decode()
            out = {}
            types = {}
            for fam in text_string_to_metric_families(text):
                types[fam.name] = fam.type
                for s in fam.samples:
                    key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                    out[key] = s.value
            print(json.dumps({"samples": out, "types": types}))
            """)
        let (status, out, err) = try runCommand("/usr/bin/env", ["python3", script], timeout: 30)
        #expect(status == 0, "\(err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])
        let samples = try #require(json["samples"] as? [String: Double])
        let types = try #require(json["types"] as? [String: String])
        #expect(samples["ballast_frontend_connections_total{proxy=svc}"] == 10)
        #expect(samples["ballast_backend_sessions_total{proxy=svc}"] == 10)
        #expect(samples["ballast_server_sessions_total{proxy=svc,server=s1}"] == 5)
        #expect(samples["ballast_server_bytes_in_total{proxy=svc,server=s1}"] == 50)
        #expect(samples["ballast_server_bytes_out_total{proxy=svc,server=s2}"] == 50)
        #expect(samples["ballast_server_loadbalanced_total{proxy=svc,server=s2}"] == 5)
        #expect(
            samples["ballast_server_status{proxy=svc,server=s1,state=UP}"] == 1
                || samples["ballast_server_status{proxy=svc,server=s1,state=NOCHECK}"] == 1)
        #expect(samples["ballast_server_status{proxy=svc,server=s2,state=DRAIN}"] == 1)
        #expect(samples["ballast_server_weight{proxy=svc,server=s1}"] == 1)
        #expect(samples["ballast_frontend_current_sessions{proxy=svc}"] == 0)
        #expect(samples["ballast_backend_current_queue{proxy=svc}"] == 0)
        #expect(samples["ballast_process_worker_threads{}"] == 1)
        #expect(types["ballast_server_sessions"] == "counter" && types["ballast_server_current_sessions"] == "gauge")
        // Anything but /metrics is a 404.
        let fd = try Net.connect(mport)
        try Net.sendAll(fd, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        let (resp, _) = Net.readAll(fd)
        close(fd)
        #expect(String(decoding: resp, as: UTF8.self).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
    }

    @Test("a check under way shows as `* ` before its status, as in HAProxy")
    func checkInProgress() throws {
        // Listening but never answering: the HTTP check stays under way until its timeout.
        let (silent, port) = try Net.listen()
        defer { close(silent) }
        let dir = TempDir()
        let b = try Self.start(
            [("s1", port)], extra: "check: { type: http, interval: 3s, timeout: 2500ms, rise: 1, fall: 1 }", dir: dir)
        defer { b.stop() }
        var seen = ""
        let deadline = Date().addingTimeInterval(4)
        while Date() < deadline {
            seen = StatsClient.row(try StatsClient.stat(dir.file("user.sock")), "s1")["check_status"] ?? ""
            if seen.hasPrefix("* ") { break }
            usleep(50_000)
        }
        #expect(seen == "* INI", "check_status \(seen)")
    }

    @Test("show stat typed and json are well formed; filters select rows")
    func typedJSONAndFilters() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let b = try Self.start([("s1", echo.port), ("s2", echo.port)], dir: dir)
        defer { b.stop() }
        let sock = dir.file("user.sock")
        let typed = try StatsClient.ask(sock, "show stat typed")
        #expect(typed.hasPrefix("F.1.0.0.pxname.1:KNS:str:svc\n") && typed.hasSuffix("\n\n"))
        #expect(typed.contains("S.1.2.1.svname.1:KNS:str:s2\n") && typed.contains("B.1.0.17.status.1:SGP:str:UP\n"))
        let json = try StatsClient.ask(sock, "show stat json")
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[[String: Any]]])
        #expect(parsed.count == 4)
        let servers = try StatsClient.ask(sock, "show stat svc 4 -1").split(separator: "\n")
        #expect(servers.count == 3 && servers[1].hasPrefix("svc,s1,") && servers[2].hasPrefix("svc,s2,"))
        let one = try StatsClient.ask(sock, "show stat -1 4 2").split(separator: "\n")
        #expect(one.count == 2 && one[1].hasPrefix("svc,s2,"))
        #expect(try StatsClient.ask(sock, "show stat nope 1 -1") == "No such proxy.\n\n")
        #expect(try StatsClient.ask(sock, "show backend") == "# name\nsvc\n\n")
        let info = try StatsClient.ask(sock, "show info typed")
        #expect(info.hasPrefix("0.Name.1:POS:str:Ballast\n"))
    }
}
