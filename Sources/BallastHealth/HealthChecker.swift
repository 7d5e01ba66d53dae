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

    static let maxResponse = 16 << 10

    let loop: EventLoop
    let logger: Logger
    let onTransition: Transition
    let pending = Mutex<([(String, Server, CheckConfig, Int)], [String: SentinelConfig])?>(nil)
    let stopping = Atomic<Bool>(false)
    var tasks: [CheckTask?] = []
    /// Checks a reload replaced while they were talking to a MySQL server, by their own id
    /// (event token of kind `retired`, index `id`), until they end.
    var retiring: [UInt32: CheckTask] = [:]
    var nextRetiredId: UInt32 = 0
    /// What an event token's index refers to: a slot in `tasks`, or an id in `retiring`.
    enum Kind: UInt8 {
        case task = 0
        case retired = 1
    }
    var thread: pthread_t?
    var nextKey = 0
    /// `role: master` services: which claim takes the writes.
    var arbiters: [String: MasterArbiter] = [:]
    /// Services with `sentinel:`, by name.
    var sentinels: [String: SentinelWatcher] = [:]
    let views = Mutex<[ObjectIdentifier: CheckView]>([:])
    let requests = Mutex<[@Sendable (HealthChecker) -> Void]>([])

    public init(logger: Logger, onTransition: @escaping Transition) throws(SysError) {
        self.logger = logger
        self.onTransition = onTransition
        loop = try EventLoop(capacity: 256)
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
        loop.wake()
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

    func publish(_ t: CheckTask) {
        let health = t.up ? t.config.rise + t.config.fall - 1 - t.failures : t.successes
        let v = CheckView(
            type: t.config.type, last: t.last, running: t.running, health: health, rise: t.config.rise,
            fall: t.config.fall,
            enabled: t.enabled, successes: t.successes, failures: t.failures, up: t.up, port: t.target.port,
            address: t.target)
        views.withLock { $0[ObjectIdentifier(t.server)] = v }
    }

    /// Runs `body` on the checker thread and waits for it (at most 2 s): runtime API commands
    /// change a check's state where the check runs, so they never race it.
    func perform(_ body: @escaping @Sendable (HealthChecker) -> Void) -> Bool {
        let done = Completion()
        requests.withLock {
            $0.append { checker in
                body(checker)
                done.signal()
            }
        }
        loop.wake()
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
            let r = CheckResult(
                status: t.last?.status ?? (up ? .l4ok : .l4con), code: nil, detail: "changed from CLI", durationMs: 0)
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

    func task(_ server: Server) -> CheckTask? {
        for case let t? in tasks where t.server === server { return t }
        return nil
    }

    public func start() {
        thread = NamedThread.start("ballast-checks") { self.run() }
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        loop.wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    // MARK: - Loop

    func run() {
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
                if now >= drainUntil!
                    || (!tasks.contains(where: { $0.map { $0.fd >= 0 } ?? false }) && retiring.isEmpty)
                {
                    break
                }
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
            let n = (try? loop.wait(timeoutMs: Int32(timeout))) ?? 0
            now = monotonic()
            for k in 0..<n {
                let (token, ev) = loop.event(at: k)
                if token.isWake {
                    applyPending(now)
                    let work = requests.withLock { r -> [@Sendable (HealthChecker) -> Void] in
                        let w = r
                        r.removeAll()
                        return w
                    }
                    for w in work { w(self) }
                    continue
                }
                let index = Int(UInt32(bitPattern: token.index))
                if token.kind == Kind.retired.rawValue {
                    if let t = retiring[UInt32(index)], token.matches(t.generation), t.fd >= 0 {
                        progress(t, ev, now)
                    }
                    continue
                }
                guard index < tasks.count, let t = tasks[index], token.matches(t.generation), t.fd >= 0 else {
                    continue
                }
                progress(t, ev, now)
            }
            for t in tasks {
                guard let t else { continue }
                if t.fd >= 0 {
                    if now >= t.deadline { timedOut(t, now) }
                } else if t.enabled && drainUntil == nil && now >= t.nextDue {
                    // A server whose name has not resolved has nowhere to be checked yet.
                    if t.server.hasAddress.load(ordering: .relaxed) {
                        begin(t, now)
                    } else {
                        t.nextDue = now + t.config.interval.value
                    }
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
    }

    func monotonic() -> Int64 { monotonicMillis() }

    func applyPending(_ now: Int64) {
        guard
            let (list, sentinelConfigs) = pending.withLock({
                p -> ([(String, Server, CheckConfig, Int)], [String: SentinelConfig])? in
                let l = p
                p = nil
                return l
            })
        else { return }
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
                next.append(
                    CheckTask(
                        service: service, server: server, config: config, initialWeight: weight, now: now, key: nextKey)
                )
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
            nextRetiredId &+= 1
            retiring[id] = t
            t.generation &+= 1
            try? loop.modify(
                t.fd, Epoll.in | Epoll.out | Epoll.rdhup,
                EventToken(index: Int32(bitPattern: id), kind: Kind.retired.rawValue, generation: t.generation))
        }
        tasks = next
        views.withLock { $0.removeAll() }
        for case let t? in tasks { publish(t) }
        // Re-register running checks under their new index.
        for (k, t) in tasks.enumerated() where t!.fd >= 0 {
            t!.generation &+= 1
            try? loop.modify(t!.fd, Epoll.in | Epoll.out | Epoll.rdhup, token(k, t!))
        }
    }

    func token(_ index: Int, _ t: CheckTask) -> EventToken {
        EventToken(index: Int32(index), kind: Kind.task.rawValue, generation: t.generation)
    }

    /// Runs `body` on the checker thread soon, without waiting for it.
    func post(_ body: @escaping @Sendable (HealthChecker) -> Void) {
        requests.withLock { $0.append(body) }
        loop.wake()
    }

    func transition(_ t: CheckTask, up: Bool, _ r: CheckResult, reason: String? = nil) {
        t.up = up
        t.successes = 0
        t.failures = 0
        t.server.checkTransition(up: up, now: monotonic())
        let line = transitionLine(t, up: up, r, reason: reason)
        if up { logger.notice("\(line)") } else { logger.warning("\(line)") }
        onTransition(t.service, t.server, up)
    }
}

extension HealthChecker {
    /// HAProxy's transition line: `Server svc/s is DOWN, reason: …, info: "…", check duration: 1ms.`
    func transitionLine(_ t: CheckTask, up: Bool, _ r: CheckResult, reason: String?) -> String {
        var line = "Server \(t.service)/\(t.server.name) is \(up ? "UP" : "DOWN")"
        if let reason { return line + " (\(reason))." }
        line += ", reason: \(r.status.text)"
        if let code = r.code { line += ", code: \(code)" }
        if !r.detail.isEmpty { line += ", info: \"\(r.detail)\"" }
        return line + ", check duration: \(r.durationMs)ms."
    }
}
