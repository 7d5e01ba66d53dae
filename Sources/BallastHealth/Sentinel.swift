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

/// Follows the Redis Sentinels of one service: every `interval` it asks each of them
/// `SENTINEL get-master-addr-by-name` (a majority of the answers that arrive must agree), and it
/// stays subscribed to each one's failover events, so a failover moves the writes as soon as
/// Sentinel has decided, not at the next check:
///
/// - `+selected-slave` (the leader chose the replica to promote; it sends `REPLICAOF NO ONE` on
///   its next tick, about 100 ms later): the chosen replica becomes the named master at once, so
///   the old master takes no write that the promoted replica would never see. Polls do not
///   override this while the failover runs (at most `failoverHold`).
/// - `+switch-master` (the failover is done): the new master is named.
/// - `-failover-abort-*`: the hold ends; the next poll names the master again. When no Sentinel answers, or they
/// disagree, the last agreed master stays (and that is logged once).
///
/// What `show sentinel` prints for one service.
public struct SentinelView: Sendable {
    public var service: String
    public var master: String
    /// The master a majority last agreed on (or the last switch); nil: never.
    public var agreed: SocketAddress?
    /// A failover Sentinel announced is under way.
    public var failover: Bool
    /// Per Sentinel: its address, its last answer (`127.0.0.1:7301`, or why it failed), and
    /// whether its event subscription is up.
    public var sentinels: [(address: SocketAddress, answer: String, subscribed: Bool)]
    /// The last problem of the polls (no answer, disagreement); nil when the last round agreed.
    public var problem: String?
}

/// One thread and one epoll instance per watched service; it reports to the checker through
/// `onNamed`, which must not block.
final class SentinelWatcher: @unchecked Sendable {
    let service: String
    let config: SentinelConfig
    private let logger: Logger
    private let onNamed: @Sendable (SocketAddress) -> Void
    private let stopping = Atomic<Bool>(false)
    /// Nil when the kernel gave no epoll or eventfd: the watcher cannot run (logged at start).
    private let loop: EventLoop?
    private var thread: pthread_t?
    private let published = Mutex<SentinelView?>(nil)
    private var lastAnswers: [String]
    private var subscribed: [Bool]

    /// The state as the runtime API shows it.
    var view: SentinelView? { published.withLock { $0 } }

    private func publish() {
        let v = SentinelView(
            service: service, master: config.master, agreed: agreed, failover: failoverUntil > now(),
            sentinels: config.addresses.indices.map { (config.addresses[$0], lastAnswers[$0], subscribed[$0]) },
            problem: lastRoundProblem)
        published.withLock { $0 = v }
    }

    /// One connection to a Sentinel: a query (ask, read, close) or the subscription (kept).
    final class Conn {
        let fd: Int32
        var connected = false
        var request: [UInt8]
        var sent = 0
        var received: [UInt8] = []
        var deadline: Int64
        var gen: UInt32
        /// Its event token; once the request is out it waits for input only.
        var token = EventToken(index: 0)
        var waitingForInput = false

        init(fd: Int32, request: [UInt8], deadline: Int64, gen: UInt32) {
            self.fd = fd
            self.request = request
            self.deadline = deadline
            self.gen = gen
        }
    }

    /// What one Sentinel answered in the current round.
    enum Answer: Equatable {
        case master(SocketAddress)
        case failed(String)
    }

    private var queries: [Conn?]
    private var subs: [Conn?]
    private var subRetryAt: [Int64]
    private var subFailureLogged: [Bool]
    private var answers: [Answer?]
    private var roundDeadline: Int64 = 0
    private var roundRunning = false
    private var nextRound: Int64 = 0
    private var gen: UInt32 = 0
    /// The master a majority last agreed on (or the last `+switch-master`).
    private(set) var agreed: SocketAddress?
    /// The last problem logged for rounds, so a lasting one is logged once.
    private var lastRoundProblem: String?
    /// While a failover Sentinel announced runs, polls (which still name the old master) are
    /// not followed; until this monotonic time at most.
    private var failoverUntil: Int64 = 0
    static let failoverHold: Int64 = 30_000
    static let channels = [
        "+switch-master", "+selected-slave", "-failover-abort-not-elected", "-failover-abort-no-good-slave",
        "-failover-abort-slave-timeout", "-failover-abort-master-timeout", "+failover-end-for-timeout",
    ]

    init(service: String, config: SentinelConfig, logger: Logger, onNamed: @escaping @Sendable (SocketAddress) -> Void)
    {
        self.service = service
        self.config = config
        self.logger = logger
        self.onNamed = onNamed
        let n = config.addresses.count
        queries = Array(repeating: nil, count: n)
        subs = Array(repeating: nil, count: n)
        subRetryAt = Array(repeating: 0, count: n)
        subFailureLogged = Array(repeating: false, count: n)
        answers = Array(repeating: nil, count: n)
        lastAnswers = Array(repeating: "not asked yet", count: n)
        subscribed = Array(repeating: false, count: n)
        // Both are checked: without them the watcher cannot run at all.
        loop = try? EventLoop(capacity: 64)
    }

    func start() {
        guard loop != nil else {
            logger.error("Service \(service): cannot follow the sentinels (no epoll or eventfd available).")
            return
        }
        thread = NamedThread.start("ballast-sentinel") { self.run() }
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        loop?.wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        for c in queries + subs { if let c { Sys.close(c.fd) } }
        queries = queries.map { _ in nil }
        subs = subs.map { _ in nil }
    }

    private func now() -> Int64 { monotonicMillis() }

    private func auth() -> [UInt8] {
        guard let p = config.password else { return [] }
        return RESP.command(config.username.map { ["AUTH", $0, p] } ?? ["AUTH", p])
    }

    /// Kinds of event token: a round's query to sentinel `index`, or its subscription.
    private enum Kind: UInt8 {
        case query = 0
        case subscription = 1
    }

    private func token(_ index: Int, sub: Bool, _ gen: UInt32) -> EventToken {
        EventToken(index: Int32(index), kind: (sub ? Kind.subscription : Kind.query).rawValue, generation: gen)
    }

    private func open(_ index: Int, sub: Bool, request: [UInt8], deadline: Int64) -> Conn? {
        let fd: Int32
        do {
            switch try Socket.connect(config.addresses[index]) {
            case .connected(let f), .inProgress(let f): fd = f
            }
        } catch {
            return nil
        }
        gen &+= 1
        let c = Conn(fd: fd, request: request, deadline: deadline, gen: gen)
        c.token = token(index, sub: sub, gen)
        do {
            guard let loop else { throw SysError("epoll_ctl", EBADF) }
            try loop.add(fd, Epoll.in | Epoll.out | Epoll.rdhup, c.token)
        } catch {
            Sys.close(fd)
            return nil
        }
        return c
    }

    private func close(_ c: Conn) {
        loop?.remove(c.fd)
        Sys.close(c.fd)
    }

    // MARK: - Loop

    private func run() {
        guard let loop else { return }
        while !stopping.load(ordering: .relaxed) {
            var t = now()
            if !roundRunning && t >= nextRound { startRound(t) }
            for k in subs.indices where subs[k] == nil && t >= subRetryAt[k] { subscribe(k, t) }
            var timeout = max(0, (roundRunning ? roundDeadline : nextRound) - t)
            for k in subs.indices where subs[k] == nil { timeout = min(timeout, max(0, subRetryAt[k] - t)) }
            for case let c? in subs where !c.connected { timeout = min(timeout, max(0, c.deadline - t)) }
            let n = (try? loop.wait(timeoutMs: Int32(min(timeout, 1000)))) ?? 0
            t = now()
            for e in 0..<n {
                let token = loop.event(at: e).token
                if token.isWake { continue }
                let index = Int(token.index)
                guard index >= 0 && index < subs.count else { continue }
                if token.kind == Kind.subscription.rawValue {
                    if let c = subs[index], token.matches(c.gen) { subscriptionEvent(index, c, t) }
                } else {
                    if let c = queries[index], token.matches(c.gen) { queryEvent(index, c, t) }
                }
            }
            // A subscription that never connected is retried.
            for k in subs.indices {
                if let c = subs[k], !c.connected, t >= c.deadline {
                    dropSubscription(k, "no connection within \(config.timeout)", t)
                }
            }
            if roundRunning && (t >= roundDeadline || !queries.contains(where: { $0 != nil })) { endRound(t) }
            publish()
        }
    }

    // MARK: - Queries

    private func startRound(_ t: Int64) {
        roundRunning = true
        roundDeadline = t + config.timeout.value
        nextRound = t + config.interval.value
        let request =
            auth() + RESP.command(["SENTINEL", "get-master-addr-by-name", config.master]) + RESP.command(["QUIT"])
        for k in config.addresses.indices {
            answers[k] = nil
            if let c = queries[k] { close(c) }
            queries[k] = open(k, sub: false, request: request, deadline: roundDeadline)
            if queries[k] == nil { answers[k] = .failed("cannot connect") }
        }
    }

    private func queryEvent(_ k: Int, _ c: Conn, _ t: Int64) {
        switch drive(c) {
        case .failed(let why):
            finishQuery(k, .failed(why))
        case .open, .eof:
            let (values, _) = RESP.parseAll(c.received)
            var replies = values[...]
            if config.password != nil {
                guard let a = replies.first else { return waitOrFail(k, c) }
                if case .error(let e) = a { return finishQuery(k, .failed("AUTH failed: \(e)")) }
                replies = replies.dropFirst()
            }
            guard let r = replies.first else { return waitOrFail(k, c) }
            switch r {
            case .array(let items) where items.count == 2:
                guard case .bulk(let ip) = items[0], case .bulk(let port) = items[1],
                    let addr = Self.address(ip, port)
                else { return finishQuery(k, .failed("unexpected answer")) }
                finishQuery(k, .master(addr))
            case .null:
                finishQuery(k, .failed("sentinel does not monitor a master named '\(config.master)'"))
            case .error(let e):
                finishQuery(k, .failed(e))
            default:
                finishQuery(k, .failed("unexpected answer"))
            }
        }
        func waitOrFail(_ k: Int, _ c: Conn) {
            if case .eof = drive(c) { finishQuery(k, .failed("connection closed without an answer")) }
        }
    }

    private func finishQuery(_ k: Int, _ a: Answer) {
        answers[k] = a
        if let c = queries[k] { close(c) }
        queries[k] = nil
    }

    static func address(_ ip: String, _ port: String) -> SocketAddress? {
        try? SocketAddress(parsing: ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)")
    }

    private func endRound(_ t: Int64) {
        roundRunning = false
        for k in queries.indices {
            if let c = queries[k] {
                close(c)
                queries[k] = nil
                answers[k] = .failed("no answer within \(config.timeout)")
            }
        }
        let results = answers.compactMap { a -> SocketAddress? in
            if case .master(let m)? = a { return m }
            return nil
        }
        if t < failoverUntil { return }  // Sentinel is promoting a replica: polls still name the old master
        for k in answers.indices {
            switch answers[k] {
            case .master(let m)?: lastAnswers[k] = "\(m)"
            case .failed(let w)?: lastAnswers[k] = w
            case nil: lastAnswers[k] = "no answer"
            }
        }
        let failures = zip(config.addresses, answers).compactMap { (addr, a) -> String? in
            if case .failed(let w)? = a { return "\(addr): \(w)" }
            return nil
        }
        switch Self.majority(results) {
        case .agreed(let m):
            lastRoundProblem = nil
            if m != agreed {
                let was = agreed.map { " (was \($0))" } ?? ""
                logger.notice(
                    "Service \(service): sentinels name \(m) the master of '\(config.master)'\(was), \(results.filter { $0 == m }.count) of \(config.addresses.count) agree."
                )
                agreed = m
                onNamed(m)
            }
        case .none:
            problem(
                "no sentinel answered (\(failures.joined(separator: "; "))); keeping \(agreed.map { "the last agreed master \($0)" } ?? "no master")"
            )
        case .disagree(let counts):
            let failed = failures.isEmpty ? "" : "; no answer from \(failures.joined(separator: "; "))"
            problem(
                "sentinels disagree (\(counts.map { "\($0.0): \($0.1)" }.joined(separator: ", "))\(failed)); keeping \(agreed.map { "the last agreed master \($0)" } ?? "no master")"
            )
        }
    }

    private func problem(_ text: String) {
        guard text != lastRoundProblem else { return }
        lastRoundProblem = text
        logger.warning("Service \(service): \(text).")
    }

    enum Majority: Equatable {
        case agreed(SocketAddress)
        case none
        case disagree([(SocketAddress, Int)])

        static func == (a: Majority, b: Majority) -> Bool {
            switch (a, b) {
            case (.agreed(let x), .agreed(let y)): return x == y
            case (.none, .none): return true
            case (.disagree(let x), .disagree(let y)): return x.map(\.0) == y.map(\.0) && x.map(\.1) == y.map(\.1)
            default: return false
            }
        }
    }

    /// More than half of the answers that arrived name the same address.
    static func majority(_ answers: [SocketAddress]) -> Majority {
        guard !answers.isEmpty else { return .none }
        var counts: [(SocketAddress, Int)] = []
        for a in answers {
            if let k = counts.firstIndex(where: { $0.0 == a }) { counts[k].1 += 1 } else { counts.append((a, 1)) }
        }
        counts.sort { $0.1 > $1.1 }
        if counts[0].1 * 2 > answers.count { return .agreed(counts[0].0) }
        return .disagree(counts)
    }

    // MARK: - Subscriptions

    private func subscribe(_ k: Int, _ t: Int64) {
        let request = auth() + RESP.command(["SUBSCRIBE"] + Self.channels)
        subs[k] = open(k, sub: true, request: request, deadline: t + config.timeout.value)
        if subs[k] == nil { subRetryAt[k] = t + 1000 }
    }

    private func dropSubscription(_ k: Int, _ why: String, _ t: Int64) {
        subscribed[k] = false
        if let c = subs[k] { close(c) }
        subs[k] = nil
        subRetryAt[k] = t + 1000
        if !subFailureLogged[k] {
            subFailureLogged[k] = true
            logger.warning(
                "Service \(service): sentinel \(config.addresses[k]): \(why); failovers are seen at the next poll (every \(config.interval)) until it is back."
            )
        }
    }

    private func subscriptionEvent(_ k: Int, _ c: Conn, _ t: Int64) {
        let state = drive(c)
        if case .failed(let why) = state { return dropSubscription(k, why, t) }
        let (values, used) = RESP.parseAll(c.received)
        c.received.removeFirst(used)
        for v in values {
            switch v {
            case .error(let e):
                return dropSubscription(k, e.hasPrefix("unexpected answer") ? e : "refused: \(e)", t)
            case .array(let items):
                guard items.count == 3, case .bulk(let kind) = items[0] else { continue }
                if kind == "subscribe" {
                    subscribed[k] = true
                    if subFailureLogged[k] {
                        subFailureLogged[k] = false
                        logger.notice(
                            "Service \(service): sentinel \(config.addresses[k]): subscribed to +switch-master again.")
                    }
                    continue
                }
                guard kind == "message", case .bulk(let channel) = items[1], case .bulk(let payload) = items[2] else {
                    continue
                }
                event(k, channel, payload, t)
            default:
                continue  // AUTH's +OK
            }
        }
        if case .eof = state { dropSubscription(k, "connection closed", t) }
    }

    /// One Sentinel event. Payloads: `+switch-master NAME OLDIP OLDPORT NEWIP NEWPORT`; the others
    /// describe an instance, `master NAME IP PORT` or `slave NAME IP PORT @ MASTER MIP MPORT`.
    private func event(_ k: Int, _ channel: String, _ payload: String, _ t: Int64) {
        let words = payload.split(separator: " ").map(String.init)
        let from = "sentinel \(config.addresses[k])"
        switch channel {
        case "+switch-master":
            guard words.count == 5, words[0] == config.master, let new = Self.address(words[3], words[4]) else {
                return
            }
            failoverUntil = 0
            nextRound = t  // confirm with every Sentinel at once
            // Every Sentinel publishes the same switch: log the first; each asks the new master again.
            if new != agreed {
                logger.notice(
                    "Service \(service): \(from) reports +switch-master \(words[1]):\(words[2]) -> \(new); writes move now."
                )
            }
            agreed = new
            lastRoundProblem = nil
            onNamed(new)
        case "+selected-slave":
            guard words.count >= 8, words[0] == "slave", words[4] == "@", words[5] == config.master,
                let chosen = Self.address(words[2], words[3]), let old = Self.address(words[6], words[7])
            else { return }
            // A Sentinel that has not heard of the last switch yet may start a failover of a master
            // that is no longer the master: its replica is not promoted in the end (the newer
            // configuration wins), so following it would send writes to a server about to be
            // turned back into a replica.
            if let agreed, old != agreed {
                logger.warning(
                    "Service \(service): \(from) starts a failover of \(old), which is not the master (\(agreed)); ignored until Sentinel switches."
                )
                return
            }
            failoverUntil = t + Self.failoverHold
            guard chosen != agreed else { return }
            logger.notice(
                "Service \(service): \(from) reports a failover of '\(config.master)': promoting \(chosen); the old master takes no more writes."
            )
            agreed = chosen
            lastRoundProblem = nil
            onNamed(chosen)
        default:
            // The failover ended without a switch: polls decide again.
            let name =
                words.first == "master" && words.count > 1
                ? words[1] : (words.firstIndex(of: "@").map { words.count > $0 + 1 ? words[$0 + 1] : "" } ?? "")
            guard name == config.master, failoverUntil > 0 else { return }
            logger.warning("Service \(service): \(from) reports \(channel); the master is asked again.")
            failoverUntil = 0
            nextRound = t
            agreed = nil  // so the next agreement is applied even if it names the old master
        }
    }

    // MARK: - Bytes

    enum DriveState {
        case open
        case eof
        case failed(String)
    }

    /// Finishes the connect, sends what is left of the request, reads what has arrived.
    private func drive(_ c: Conn) -> DriveState {
        if !c.connected {
            let err = Socket.pendingError(c.fd)
            if err != 0 { return .failed(String(cString: strerror(err))) }
            c.connected = true
        }
        while c.sent < c.request.count {
            let r = try? c.request.withUnsafeBytes { try Sys.send(c.fd, $0.baseAddress! + c.sent, $0.count - c.sent) }
            guard case .done(let n)? = r else {
                if r == nil { return .failed("connection closed while sending") }
                break
            }
            c.sent += n
        }
        if c.sent == c.request.count && !c.waitingForInput {
            c.waitingForInput = true
            try? loop?.modify(c.fd, Epoll.in | Epoll.rdhup, c.token)
        }
        var buf = [UInt8](repeating: 0, count: 4096)
        while c.received.count < 1 << 20 {
            let r = try? buf.withUnsafeMutableBytes { try Sys.recv(c.fd, $0.baseAddress!, $0.count) }
            guard let r else { return .eof }
            guard case .done(let n) = r else { return .open }
            if n == 0 { return .eof }
            c.received += buf[0..<n]
        }
        return .failed("answer too long")
    }
}
