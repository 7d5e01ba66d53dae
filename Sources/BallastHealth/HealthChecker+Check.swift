import BallastCore
import BallastIO
import CLinux
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// One check's state machine: begin (connect), progress (send, read), judge, time out, finish
/// (rise/fall, transitions), and what an agent's reply changes.
extension HealthChecker {
    // MARK: - One check

    func begin(_ t: CheckTask, _ now: Int64) {
        t.running = true
        t.started = now
        t.deadline = now + t.config.timeout.value
        t.connected = false
        t.sent = 0
        t.response.removeAll(keepingCapacity: true)
        t.request = Self.request(for: t.config, target: t.target)
        t.mysql = t.config.type == .mysql ? MySQLConversation(config: t.config) : nil
        t.consumed = 0
        let fd: Int32
        do {
            switch try Socket.connect(t.target) {
            case .connected(let f), .inProgress(let f): fd = f
            }
        } catch {
            let status: CheckStatus = error.errno == ECONNREFUSED ? .l4con : .sockError
            return finish(t, Verdict(status, String(cString: strerror(error.errno))), now)
        }
        t.fd = fd
        t.generation &+= 1
        guard let index = tasks.firstIndex(where: { $0 === t }) else { return }
        do {
            try loop.add(fd, Epoll.in | Epoll.out | Epoll.rdhup, token(index, t))
        } catch {
            return finish(t, Verdict(.sockError, "\(error)"), now)
        }
        publish(t)  // `show stat` marks a check under way with `* `, as HAProxy does
    }

    static func request(for c: CheckConfig, target: SocketAddress) -> [UInt8] {
        switch c.type {
        case .tcp:
            return []
        case .http:
            var r = "\(c.method) \(c.path) HTTP/1.1\r\n"
            // HTTP/1.1 requires a Host header (nginx answers 400 without one): the configured
            // name, else the address checked.
            r += "Host: \(c.host ?? target.description)\r\n"
            r += "User-Agent: ballast-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            return Array(r.utf8)
        case .agent:
            return c.send.map { Array(($0.hasSuffix("\n") ? $0 : $0 + "\n").utf8) } ?? []
        case .mysql:
            return []  // the server speaks first
        case .redis:
            var cmds: [[String]] = []
            if let p = c.password { cmds.append(c.username.map { ["AUTH", $0, p] } ?? ["AUTH", p]) }
            cmds.append(["PING"])
            if c.role != .any { cmds.append(["INFO", "replication"]) }
            cmds.append(["QUIT"])
            return cmds.flatMap(RESP.command)
        }
    }

    func progress(_ t: CheckTask, _ ev: UInt32, _ now: Int64) {
        if !t.connected {
            let err = Socket.pendingError(t.fd)
            if err != 0 {
                let status: CheckStatus = err == ECONNREFUSED ? .l4con : err == ETIMEDOUT ? .l4timeout : .sockError
                return finish(t, Verdict(status, String(cString: strerror(err))), now)
            }
            guard ev & (Epoll.out | Epoll.in) != 0 else { return }
            t.connected = true
            if let v = t.config.sendProxy {
                // The header goes first: from the checker's own socket to the server.
                var local = Socket.localStorage(t.fd) ?? sockaddr_storage()
                var peer = sockaddr_storage()
                withUnsafeMutablePointer(to: &peer) { t.target.store(into: $0) }
                var header = [UInt8](repeating: 0, count: 128)
                let n = header.withUnsafeMutableBytes { buf in
                    withUnsafePointer(to: &local) { src in
                        withUnsafePointer(to: &peer) { dst in
                            ProxyProtocol.encode(v, src: src, dst: dst, into: buf.baseAddress!)
                        }
                    }
                }
                t.request = Array(header[0..<n]) + t.request
            }
            if t.config.type == .tcp && t.config.sendProxy == nil { return finish(t, Verdict(.l4ok, ""), now) }
        }
        // Send what is left of the request.
        while t.sent < t.request.count {
            let r = try? t.request.withUnsafeBytes { try Sys.send(t.fd, $0.baseAddress! + t.sent, $0.count - t.sent) }
            guard case .done(let n)? = r else {
                if r == nil { return finish(t, Verdict(.l7response, "connection closed while sending the check"), now) }
                return
            }
            t.sent += n
        }
        // Read what has arrived.
        var eof = false
        var buf = [UInt8](repeating: 0, count: 4096)
        while t.response.count < HealthChecker.maxResponse {
            let r = try? buf.withUnsafeMutableBytes { try Sys.recv(t.fd, $0.baseAddress!, $0.count) }
            guard let r else {
                eof = true
                break
            }
            guard case .done(let n) = r else { break }
            if n == 0 {
                eof = true
                break
            }
            t.response += buf[0..<n]
        }
        if t.mysql != nil {
            let fresh = Array(t.response[t.consumed...])
            t.consumed = t.response.count
            let out = t.mysql!.feed(fresh)
            if !out.isEmpty {
                t.request += out
                while t.sent < t.request.count {
                    let r = try? t.request.withUnsafeBytes {
                        try Sys.send(t.fd, $0.baseAddress! + t.sent, $0.count - t.sent)
                    }
                    guard case .done(let n)? = r else { break }
                    t.sent += n
                }
            }
            if let v = t.mysql!.verdict { return finish(t, v, now) }
            if eof { return finish(t, Verdict(.l7response, "connection closed by the server"), now) }
            if t.response.count >= HealthChecker.maxResponse {
                return finish(t, Verdict(.l7response, "answer too long"), now)
            }
            return
        }
        let full = t.response.count >= HealthChecker.maxResponse
        if var verdict = judge(t, eof: eof || full) {
            if full && !eof && verdict.detail.hasPrefix("incomplete answer") {
                verdict.detail = "answer exceeds \(HealthChecker.maxResponse >> 10) KiB without a complete reply"
            }
            finish(t, verdict, now)
        }
    }

    /// Decides from the bytes so far; nil: wait for more (until EOF or the timeout).
    func judge(_ t: CheckTask, eof: Bool) -> Verdict? {
        switch t.config.type {
        case .tcp:
            return Verdict(.l4ok, "")  // reached after the PROXY header is sent
        case .http:
            return HTTPJudge.judge(t.response, config: t.config, eof: eof)
        case .redis:
            return RedisJudge.judge(t.response, config: t.config, eof: eof)
        case .mysql:
            return nil  // judged by the conversation
        case .agent:
            guard let line = AgentReply.line(t.response, eof: eof) else { return nil }
            let reply = AgentReply(line)
            applyAgent(reply, to: t)
            if let down = reply.down { return Verdict(.l7status, down.isEmpty ? line : down) }
            return Verdict(.l7ok, line)
        }
    }

    func timedOut(_ t: CheckTask, _ now: Int64) {
        let status: CheckStatus = t.connected ? .l7timeout : .l4timeout
        var detail =
            t.connected ? "no complete answer within \(t.config.timeout)" : "no connection within \(t.config.timeout)"
        if t.connected && t.config.type == .redis,
            let partial = RedisJudge.judge(t.response, config: t.config, eof: true)
        {
            detail += " (\(partial.detail))"
        }
        finish(t, Verdict(status, detail), now)
    }

    /// Closes a check's socket. A MySQL check cut short after the greeting (timeout, reload,
    /// stop) still says `COM_QUIT` first, so the server counts no aborted client.
    func hangUp(_ t: CheckTask) {
        guard t.fd >= 0 else { return }
        if let m = t.mysql, m.needsQuit {
            _ = try? MySQLConversation.quit.withUnsafeBytes { try Sys.send(t.fd, $0.baseAddress!, $0.count) }
        }
        Sys.close(t.fd)
        t.fd = -1
    }

    func finish(_ t: CheckTask, _ verdict: Verdict, _ now: Int64) {
        hangUp(t)
        t.running = false
        if t.retired { return }  // its server now has a new check; this result means nothing
        var v = verdict
        var forceUp = false
        if t.config.type == .redis && t.config.role == .master, arbiters[t.service] != nil {
            forceUp = arbitrate(t, &v, now)
        }
        let r = CheckResult(status: v.status, code: v.code, detail: v.detail, durationMs: now - t.started)
        t.last = r
        defer { publish(t) }
        // As in HAProxy, an agent that cannot be reached changes nothing: it is not a failure.
        if t.config.type == .agent && !t.connected && !r.status.passed {
            t.nextDue = now + t.config.interval.value
            return
        }
        // The passive observer may have marked the server down meanwhile: follow it.
        let serverUp = t.server.up.load(ordering: .relaxed)
        if t.up && !serverUp {
            t.up = false
            t.successes = 0
        }
        // `init_state`: `down` comes up on the first pass, `up` goes down on the first failure.
        let first = !t.checkedOnce
        t.checkedOnce = true
        let initState = t.config.effectiveInitState
        if r.status.passed {
            t.failures = 0
            t.successes += 1
            let quick = forceUp || (first && initState == .down)
            if !t.up && (t.successes >= t.config.rise || quick) { transition(t, up: true, r) }
        } else {
            t.successes = 0
            t.failures += 1
            if t.up { t.server.failedChecks.wrappingAdd(1, ordering: .relaxed) }
            // A definite answer (wrong role, read_only, replication stopped) acts at once.
            let quick = v.definite || (first && initState == .up)
            if t.up && (t.failures >= t.config.fall || quick) {
                transition(t, up: false, r)
            } else if first && !t.up {
                // Started DOWN (`init_state`) and the first answer keeps it so: say why, once.
                logger.warning("\(transitionLine(t, up: false, r, reason: nil)) (first check since start)")
            }
        }
        let changing = (t.up && t.failures > 0) || (!t.up && t.successes > 0)
        var wait = (changing ? t.config.fast : (t.up ? t.config.interval : t.config.down)).value
        // The master Sentinel named but not confirmed yet (a failover under way): ask it often,
        // writes wait for its `role:master`.
        if !t.up, let a = arbiters[t.service], a.usesSentinel, a.named == t.server.address { wait = min(wait, 100) }
        t.nextDue = now + wait
    }

    /// Applies an agent's words: weight relative to the configured one, maxconn, admin state.
    func applyAgent(_ a: AgentReply, to t: CheckTask) {
        let now = monotonic()
        if let pct = a.weightPercent {
            let w = min(Defaults.maxWeight, t.initialWeight * pct / 100)
            if w != t.server.weight { t.server.setWeight(w, now: now) }
        }
        if let m = a.maxconn, m != t.server.maxconn { t.server.setMaxconn(m) }
        if let s = a.admin, s != t.server.adminState {
            t.server.setAdmin(s, now: now)
            logger.notice(
                "Server \(t.service)/\(t.server.name) is \(s == .ready ? "READY" : s == .drain ? "DRAIN" : "MAINT") (agent)."
            )
        }
    }
}
