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

/// HAProxy's check status vocabulary.
public enum CheckStatus: String, Sendable {
    case initializing = "INI"
    case sockError = "SOCKERR"
    case l4ok = "L4OK"
    case l4timeout = "L4TOUT"
    case l4con = "L4CON"
    case l7ok = "L7OK"
    case l7timeout = "L7TOUT"
    case l7response = "L7RSP"
    case l7status = "L7STS"

    /// HAProxy's description, used in transition log lines.
    public var text: String {
        switch self {
        case .initializing: return "Initializing"
        case .sockError: return "Socket error"
        case .l4ok: return "Layer4 check passed"
        case .l4timeout: return "Layer4 timeout"
        case .l4con: return "Layer4 connection problem"
        case .l7ok: return "Layer7 check passed"
        case .l7timeout: return "Layer7 timeout"
        case .l7response: return "Layer7 invalid response"
        case .l7status: return "Layer7 wrong status"
        }
    }

    public var passed: Bool { self == .l4ok || self == .l7ok }
}

/// The last result of a server's check, for logs, the runtime API and `/metrics`.
public struct CheckResult: Sendable, Equatable {
    public var status: CheckStatus
    public var code: Int?
    public var detail: String
    public var durationMs: Int64
}

/// What the runtime API shows of a server's check.
public struct CheckView: Sendable {
    public var type: CheckType
    public var last: CheckResult?
    /// A check is under way (HAProxy prefixes the status with `* `).
    public var running = false
    /// HAProxy's health counter: 0..rise+fall-1, UP from `rise` on.
    public var health: Int
    public var rise: Int
    public var fall: Int
    /// `disable health` stopped the check.
    public var enabled = true
    /// Consecutive passes while DOWN / failures while UP (the `DOWN 1/2`, `UP 1/2` statuses).
    public var successes = 0
    public var failures = 0
    public var up = true
    public var port: UInt16
    public var address: SocketAddress
}

/// Runs every active check on one thread with one epoll instance: thousands of servers need no
/// thread each. Each check is a small nonblocking state machine (connect, send, read, judge).
public final class HealthChecker: @unchecked Sendable {
    /// Called on the checker thread when a server goes down or comes back.
    public typealias Transition = @Sendable (_ service: String, _ server: Server, _ up: Bool) -> Void

    /// One server's check: its settings, where it stands (connecting, sending, reading), and its
    /// rise/fall counters. (Not Swift's `Task`.)
    final class CheckTask {
        let service: String
        let server: Server
        let config: CheckConfig
        let target: SocketAddress
        let initialWeight: Int
        var nextDue: Int64
        var fd: Int32 = -1
        var started: Int64 = 0
        var deadline: Int64 = 0
        var connected = false
        var request: [UInt8] = []
        var sent = 0
        var response: [UInt8] = []
        var mysql: MySQLConversation?
        var consumed = 0
        var up = true
        var successes = 0
        var failures = 0
        var generation: UInt32 = 0
        /// Stable while the task lives (the master arbiter's key for this server).
        let key: Int
        /// No check has ended yet since start (`init_state` applies to the first result).
        var checkedOnce = false
        var enabled = true
        var running = false
        var last: CheckResult?
        /// Left behind by a reload that changed its check mid-conversation (MySQL only): it is
        /// driven to its end so the server sees a clean `COM_QUIT`, and its result is dropped.
        var retired = false

        init(service: String, server: Server, config: CheckConfig, initialWeight: Int, now: Int64, key: Int) {
            self.key = key
            self.service = service
            self.server = server
            self.config = config
            self.initialWeight = initialWeight
            var t = config.address ?? server.address
            if config.address != nil { t.port = server.address.port }
            if let p = config.port { t.port = p }
            target = t
            // A server restored DOWN from the state file starts DOWN and needs `rise` passes.
            up = server.up.load(ordering: .relaxed)
            // Spread the first checks over one interval so they do not fire in lockstep; a server
            // that takes no traffic before its first answer is asked at once.
            let initDown = config.effectiveInitState == .down || config.effectiveInitState == .fullyDown
            nextDue = initDown && !up ? now : now + Int64.random(in: 0...max(0, config.interval.value - 1))
        }
    }

    static let maxResponse = 16 << 10

    private let epfd: Int32
    private let wakeFd: Int32
    private let logger: Logger
    private let onTransition: Transition
    private let pending = Mutex<([(String, Server, CheckConfig, Int)], [String: SentinelConfig])?>(nil)
    private let stopping = Atomic<Bool>(false)
    private var tasks: [CheckTask?] = []
    /// Checks a reload replaced while they were talking to a MySQL server, by their own id
    /// (epoll token `retiredBase + id`), until they end.
    private var retiring: [UInt32: CheckTask] = [:]
    private var nextRetiredId: UInt32 = 0
    private static let retiredBase: UInt32 = 1 << 30
    private var thread: pthread_t?
    private var nextKey = 0
    /// `role: master` services: which claim takes the writes.
    private var arbiters: [String: MasterArbiter] = [:]
    /// Services with `sentinel:`, by name.
    private var sentinels: [String: SentinelWatcher] = [:]
    private let views = Mutex<[ObjectIdentifier: CheckView]>([:])
    private let requests = Mutex<[@Sendable (HealthChecker) -> Void]>([])

    public init(logger: Logger, onTransition: @escaping Transition) throws(SysError) {
        self.logger = logger
        self.onTransition = onTransition
        epfd = try Epoll.create()
        wakeFd = try EventFd.create()
        try Epoll.add(epfd, wakeFd, events: Epoll.in, data: UInt64.max)
    }

    /// Replaces the set of checked servers (start and reload). A server whose check is unchanged
    /// keeps its state and counters; a server that lost its check is marked up.
    public func update(_ table: ServiceTable) {
        var list: [(String, Server, CheckConfig, Int)] = []
        var sentinelConfigs: [String: SentinelConfig] = [:]
        for svc in table.services {
            if let s = svc.config.sentinel { sentinelConfigs[svc.name] = s }
            for (k, s) in svc.servers.enumerated() {
                if let c = svc.config.servers[k].check {
                    list.append((svc.name, s, c, svc.config.servers[k].weight))
                } else {
                    s.setUp(true)
                }
            }
        }
        pending.withLock { $0 = (list, sentinelConfigs) }
        EventFd.signal(wakeFd)
    }

    /// The Sentinel state of every service with `sentinel:` (`show sentinel`).
    public func sentinelViews() -> [SentinelView] {
        let list = Mutex<[SentinelView]>([])
        _ = perform { c in
            let v = c.sentinels.values.compactMap(\.view).sorted { $0.service < $1.service }
            list.withLock { $0 = v }
        }
        return list.withLock { $0 }
    }

    /// The last check result of `server`, if it is checked.
    public func result(_ server: Server) -> CheckResult? {
        views.withLock { $0[ObjectIdentifier(server)]?.last }
    }

    /// The check of `server` as the runtime API shows it; nil when the server has no check.
    public func view(_ server: Server) -> CheckView? {
        views.withLock { $0[ObjectIdentifier(server)] }
    }

    private func publish(_ t: CheckTask) {
        let health = t.up ? t.config.rise + t.config.fall - 1 - t.failures : t.successes
        let v = CheckView(
            type: t.config.type, last: t.last, running: t.running, health: health, rise: t.config.rise, fall: t.config.fall,
            enabled: t.enabled, successes: t.successes, failures: t.failures, up: t.up, port: t.target.port, address: t.target)
        views.withLock { $0[ObjectIdentifier(t.server)] = v }
    }

    /// Runs `body` on the checker thread and waits for it (at most 2 s): runtime API commands
    /// change a check's state where the check runs, so they never race it.
    private func perform(_ body: @escaping @Sendable (HealthChecker) -> Void) -> Bool {
        let done = Completion()
        requests.withLock {
            $0.append { checker in
                body(checker)
                done.signal()
            }
        }
        EventFd.signal(wakeFd)
        return done.wait(timeoutMs: 2000)
    }

    /// `enable health` / `disable health`. A disabled check runs no more and the server keeps
    /// its current state, as in HAProxy. False when the server has no check.
    public func setEnabled(_ server: Server, _ enabled: Bool) -> Bool {
        let found = Atomic<Bool>(false)
        _ = perform { c in
            guard let t = c.task(server) else { return }
            found.store(true, ordering: .relaxed)
            guard t.enabled != enabled else { return }
            t.enabled = enabled
            if !enabled {
                c.hangUp(t)
                t.running = false
            } else {
                t.nextDue = c.monotonic()
            }
            c.publish(t)
        }
        return found.load(ordering: .relaxed)
    }

    /// `set server … health up|down`: forces the health as if `rise` checks had passed or `fall`
    /// had failed; the following checks go on from there. A server without a check is set directly.
    public func force(_ server: Server, up: Bool, service: String) {
        let handled = Atomic<Bool>(false)
        _ = perform { c in
            guard let t = c.task(server) else { return }
            handled.store(true, ordering: .relaxed)
            let r = CheckResult(status: t.last?.status ?? (up ? .l4ok : .l4con), code: nil, detail: "changed from CLI", durationMs: 0)
            if t.up != up || server.up.load(ordering: .relaxed) != up {
                c.transition(t, up: up, r, reason: "changed from CLI")
            }
            t.successes = 0
            t.failures = 0
            c.publish(t)
        }
        if !handled.load(ordering: .relaxed) {
            if server.setUp(up) {
                logger.notice("Server \(service)/\(server.name) is \(up ? "UP" : "DOWN") (changed from CLI).")
                onTransition(service, server, up)
            }
        }
    }

    private func task(_ server: Server) -> CheckTask? {
        for case let t? in tasks where t.server === server { return t }
        return nil
    }

    public func start() {
        thread = NamedThread.start("ballast-checks") { self.loop() }
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        EventFd.signal(wakeFd)
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    // MARK: - Loop

    private func loop() {
        let events = UnsafeMutablePointer<ballast_epoll_event>.allocate(capacity: 256)
        defer { events.deallocate() }
        // At stop, MySQL checks under way are let finish (up to their own timeout, at most a
        // second): closing one mid-handshake counts as an aborted connect on the server, and
        // enough of those block the host (`max_connect_errors`). Other checks just close.
        var drainUntil: Int64?
        while true {
            var now = monotonic()
            if stopping.load(ordering: .relaxed) {
                if drainUntil == nil {
                    drainUntil = now + 1000
                    for case let t? in tasks where t.fd >= 0 {
                        // Results that arrive now change nothing: no transition while stopping.
                        if t.mysql == nil { hangUp(t) } else { t.retired = true }
                    }
                }
                if now >= drainUntil! || (!tasks.contains(where: { $0.map { $0.fd >= 0 } ?? false }) && retiring.isEmpty) { break }
            }
            var timeout: Int64 = 1000
            for t in retiring.values { timeout = min(timeout, max(0, t.deadline - now)) }
            for t in tasks {
                guard let t else { continue }
                if drainUntil != nil {
                    if t.fd >= 0 { timeout = min(timeout, max(0, min(t.deadline, drainUntil!) - now)) }
                    continue
                }
                guard t.enabled || t.fd >= 0 else { continue }
                timeout = min(timeout, max(0, (t.fd >= 0 ? t.deadline : t.nextDue) - now))
            }
            let n = (try? Epoll.wait(epfd, events, max: 256, timeoutMs: Int32(timeout))) ?? 0
            now = monotonic()
            for k in 0..<n {
                let data = events[k].data
                if data == UInt64.max {
                    EventFd.drain(wakeFd)
                    applyPending(now)
                    let work = requests.withLock { r -> [@Sendable (HealthChecker) -> Void] in
                        let w = r
                        r.removeAll()
                        return w
                    }
                    for w in work { w(self) }
                    continue
                }
                let index = Int(data & 0xFFFF_FFFF)
                let gen = UInt32(data >> 32)
                if index >= Int(HealthChecker.retiredBase) {
                    if let t = retiring[UInt32(index) - HealthChecker.retiredBase], t.generation == gen, t.fd >= 0 { progress(t, events[k].events, now) }
                    continue
                }
                guard index < tasks.count, let t = tasks[index], t.generation == gen, t.fd >= 0 else { continue }
                progress(t, events[k].events, now)
            }
            for t in tasks {
                guard let t else { continue }
                if t.fd >= 0 {
                    if now >= t.deadline { timedOut(t, now) }
                } else if t.enabled && drainUntil == nil && now >= t.nextDue {
                    begin(t, now)
                }
            }
            if !retiring.isEmpty {
                for t in retiring.values where t.fd >= 0 && now >= t.deadline { hangUp(t) }
                retiring = retiring.filter { $0.value.fd >= 0 }
            }
        }
        for case let t? in tasks where t.fd >= 0 { hangUp(t) }
        for t in retiring.values { hangUp(t) }
        for w in sentinels.values { w.stop() }
        sentinels.removeAll()
        Sys.close(wakeFd)
        Sys.close(epfd)
    }

    fileprivate func monotonic() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    private func applyPending(_ now: Int64) {
        guard let (list, sentinelConfigs) = pending.withLock({ p -> ([(String, Server, CheckConfig, Int)], [String: SentinelConfig])? in
            let l = p
            p = nil
            return l
        }) else { return }
        var old: [ObjectIdentifier: CheckTask] = [:]
        for t in tasks {
            guard let t else { continue }
            old[ObjectIdentifier(t.server)] = t
        }
        var next: [CheckTask?] = []
        // Checks that end here: servers that left the config, and checks whose settings changed.
        var ended: [CheckTask] = []
        for (service, server, config, weight) in list {
            let previous = old.removeValue(forKey: ObjectIdentifier(server))
            if let t = previous, t.config == config, t.initialWeight == weight {
                next.append(t)
            } else {
                if let t = previous { ended.append(t) }
                nextKey += 1
                next.append(CheckTask(service: service, server: server, config: config, initialWeight: weight, now: now, key: nextKey))
            }
        }
        updateArbiters(next, sentinelConfigs: sentinelConfigs)
        ended += old.values
        for t in ended where t.fd >= 0 {
            // A MySQL conversation under way is finished, not cut: cutting it counts as an
            // aborted connection on the server.
            guard t.mysql != nil else {
                hangUp(t)
                continue
            }
            t.retired = true
            let id = nextRetiredId
            nextRetiredId = (nextRetiredId + 1) % HealthChecker.retiredBase
            retiring[id] = t
            t.generation &+= 1
            try? Epoll.modify(epfd, t.fd, events: Epoll.in | Epoll.out | Epoll.rdhup, data: UInt64(HealthChecker.retiredBase + id) | (UInt64(t.generation) << 32))
        }
        tasks = next
        views.withLock { $0.removeAll() }
        for case let t? in tasks { publish(t) }
        // Re-register running checks under their new index.
        for (k, t) in tasks.enumerated() where t!.fd >= 0 {
            t!.generation &+= 1
            try? Epoll.modify(epfd, t!.fd, events: Epoll.in | Epoll.out | Epoll.rdhup, data: token(k, t!))
        }
    }

    private func token(_ index: Int, _ t: CheckTask) -> UInt64 { UInt64(index) | (UInt64(t.generation) << 32) }

    // MARK: - One check

    private func begin(_ t: CheckTask, _ now: Int64) {
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
            try Epoll.add(epfd, fd, events: Epoll.in | Epoll.out | Epoll.rdhup, data: token(index, t))
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

    private func progress(_ t: CheckTask, _ ev: UInt32, _ now: Int64) {
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
                        withUnsafePointer(to: &peer) { dst in ProxyProtocol.encode(v, src: src, dst: dst, into: buf.baseAddress!) }
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
                    let r = try? t.request.withUnsafeBytes { try Sys.send(t.fd, $0.baseAddress! + t.sent, $0.count - t.sent) }
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

    private func timedOut(_ t: CheckTask, _ now: Int64) {
        let status: CheckStatus = t.connected ? .l7timeout : .l4timeout
        var detail = t.connected ? "no complete answer within \(t.config.timeout)" : "no connection within \(t.config.timeout)"
        if t.connected && t.config.type == .redis, let partial = RedisJudge.judge(t.response, config: t.config, eof: true) {
            detail += " (\(partial.detail))"
        }
        finish(t, Verdict(status, detail), now)
    }

    /// Closes a check's socket. A MySQL check cut short after the greeting (timeout, reload,
    /// stop) still says `COM_QUIT` first, so the server counts no aborted client.
    fileprivate func hangUp(_ t: CheckTask) {
        guard t.fd >= 0 else { return }
        if let m = t.mysql, m.needsQuit {
            _ = try? MySQLConversation.quit.withUnsafeBytes { try Sys.send(t.fd, $0.baseAddress!, $0.count) }
        }
        Sys.close(t.fd)
        t.fd = -1
    }

    private func finish(_ t: CheckTask, _ verdict: Verdict, _ now: Int64) {
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

    /// A `role: master` check's answer goes through the service's arbiter: a master answer
    /// that another master outranks becomes a refusal; one that takes over takes the others
    /// down at once. True when the server should come UP on this answer.
    private func arbitrate(_ t: CheckTask, _ v: inout Verdict, _ now: Int64) -> Bool {
        guard var arbiter = arbiters[t.service] else { return false }
        defer { arbiters[t.service] = arbiter }
        guard v.status.passed, let rep = v.replication, rep.isMaster else {
            // Anything but a master answer; a timeout keeps the claim (one slow answer is noise).
            if v.replication != nil || v.status == .l4con || v.status == .sockError || v.status == .l7response {
                arbiter.noClaim(t.key)
            }
            return false
        }
        let claim = MasterArbiter.Claim(name: t.server.name, address: t.server.address, replid: rep.replid, replid2: rep.replid2)
        switch arbiter.masterAnswer(t.key, claim) {
        case .refuse(let reason):
            v = Verdict(.l7response, reason, definite: true, replication: rep)
            return false
        case .accept(let takeover, let demote):
            arbiters[t.service] = arbiter
            demoteTasks(t.service, demote, now)
            if takeover {
                logger.notice("Service \(t.service): \(t.server.name) takes the writes (\(arbiter.usesSentinel ? "named by sentinel" : "replication history")).")
            }
            return takeover || (arbiter.usesSentinel && arbiter.named != nil)
        }
    }

    /// Takes servers down at once on the arbiter's word (another server is the master).
    private func demoteTasks(_ service: String, _ demote: [Int: String], _ now: Int64) {
        for (key, reason) in demote {
            guard let d = tasks.first(where: { $0?.key == key }) ?? nil, d.service == service else { continue }
            let r = CheckResult(status: .l7response, code: nil, detail: reason, durationMs: 0)
            d.last = r
            if d.up { transition(d, up: false, r) }
            // Ask again soon: the demoted server's next answer confirms or ends the conflict.
            if d.fd < 0 { d.nextDue = min(d.nextDue, now + d.config.fast.value) }
            publish(d)
        }
    }

    /// Keeps one arbiter per `role: master` service and one Sentinel watcher per `sentinel:`.
    private func updateArbiters(_ next: [CheckTask?], sentinelConfigs: [String: SentinelConfig]) {
        var keys: [String: Set<Int>] = [:]
        for case let t? in next where t.config.type == .redis && t.config.role == .master {
            keys[t.service, default: []].insert(t.key)
        }
        var fresh: [String: MasterArbiter] = [:]
        for (service, live) in keys {
            let usesSentinel = sentinelConfigs[service] != nil
            var a = arbiters[service].flatMap { $0.usesSentinel == usesSentinel ? $0 : nil } ?? MasterArbiter(usesSentinel: usesSentinel)
            for k in a.claims.keys where !live.contains(k) { a.noClaim(k) }
            fresh[service] = a
        }
        arbiters = fresh
        for (service, w) in sentinels where sentinelConfigs[service] != w.config || fresh[service] == nil {
            w.stop()
            sentinels[service] = nil
        }
        for (service, c) in sentinelConfigs where sentinels[service] == nil && fresh[service] != nil {
            let w = SentinelWatcher(service: service, config: c, logger: logger) { [weak self] address in
                self?.post { $0.sentinelNamed(service, address) }
            }
            w.start()
            sentinels[service] = w
        }
    }

    /// Sentinel named the master of `service` (a majority agreed, or `+switch-master`).
    private func sentinelNamed(_ service: String, _ address: SocketAddress) {
        guard var a = arbiters[service] else { return }
        let changed = a.named != address
        let demote = a.sentinelNamed(address)
        arbiters[service] = a
        let now = monotonic()
        demoteTasks(service, demote, now)
        // Ask the named server now (unless it is already UP): its answer brings it UP at once.
        for case let t? in tasks where t.service == service && t.server.address == address && t.fd < 0 && t.enabled && !t.up {
            t.nextDue = now
        }
        guard changed else { return }
        if !tasks.contains(where: { $0?.service == service && $0?.server.address == address }) {
            logger.warning("Service \(service): sentinel names \(address) the master, which is not a server of this service; no server takes writes.")
        }
    }

    /// Runs `body` on the checker thread soon, without waiting for it.
    private func post(_ body: @escaping @Sendable (HealthChecker) -> Void) {
        requests.withLock { $0.append(body) }
        EventFd.signal(wakeFd)
    }

    /// Applies an agent's words: weight relative to the configured one, maxconn, admin state.
    private func applyAgent(_ a: AgentReply, to t: CheckTask) {
        let now = monotonic()
        if let pct = a.weightPercent {
            let w = min(Defaults.maxWeight, t.initialWeight * pct / 100)
            if w != t.server.weight { t.server.setWeight(w, now: now) }
        }
        if let m = a.maxconn { t.server.maxconnValue.store(m, ordering: .relaxed) }
        if let s = a.admin, s != t.server.adminState {
            t.server.setAdmin(s, now: now)
            logger.notice("Server \(t.service)/\(t.server.name) is \(s == .ready ? "READY" : s == .drain ? "DRAIN" : "MAINT") (agent).")
        }
    }

    fileprivate func transition(_ t: CheckTask, up: Bool, _ r: CheckResult, reason: String? = nil) {
        t.up = up
        t.successes = 0
        t.failures = 0
        if up {
            t.server.upSince.store(max(monotonic(), 1), ordering: .relaxed)
            t.server.connectFailures.store(0, ordering: .relaxed)
        }
        t.server.setUp(up)
        ServerStateClock.bump()
        let line = transitionLine(t, up: up, r, reason: reason)
        if up { logger.notice("\(line)") } else { logger.warning("\(line)") }
        onTransition(t.service, t.server, up)
    }
}

extension HealthChecker {
    /// HAProxy's transition line: `Server svc/s is DOWN, reason: …, info: "…", check duration: 1ms.`
    fileprivate func transitionLine(_ t: CheckTask, up: Bool, _ r: CheckResult, reason: String?) -> String {
        var line = "Server \(t.service)/\(t.server.name) is \(up ? "UP" : "DOWN")"
        if let reason { return line + " (\(reason))." }
        line += ", reason: \(r.status.text)"
        if let code = r.code { line += ", code: \(code)" }
        if !r.detail.isEmpty { line += ", info: \"\(r.detail)\"" }
        return line + ", check duration: \(r.durationMs)ms."
    }
}


