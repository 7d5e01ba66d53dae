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

/// The runtime API sockets and the metrics endpoint, served by one thread ("ballast-admin") with
/// its own epoll instance: nothing here runs on a data-plane thread. Clients are bounded in
/// number (the longest idle one makes room for a new one) and in idle time, so stuck scripts
/// cannot lock the socket (HAProxy issue #2429).
///
/// Each client is served like one of HAProxy's applets: its commands run a few at a time, in
/// turn with every other client's, and only while its unsent output is under `outputHigh`; the
/// client that does not read is the one that waits. Input is read only while less than a line's
/// worth is waiting, so a flood costs a bounded buffer per client, and no loop turn runs long
/// (another client's `show info`, and `stop()`, wait a few milliseconds at most).
final class AdminServer: @unchecked Sendable {
    struct Listener {
        var fd: Int32
        var level: CLILevel
        var metrics: Bool
        var path: String?
        var name: String
    }

    final class Client {
        /// Never reused (56 bits, carried in its event token's index and generation), so an
        /// event for a closed client's descriptor number cannot reach the client that got the
        /// same number.
        let id: UInt64
        var token: EventToken {
            EventToken(
                index: Int32(bitPattern: UInt32(truncatingIfNeeded: id)), kind: AdminServer.Kind.client.rawValue,
                generation: UInt32(truncatingIfNeeded: id >> 32))
        }
        let fd: Int32
        let metrics: Bool
        var session: CLISession
        /// Bytes read; `input[consumed...]` is what has not been run yet.
        var input: [UInt8] = []
        var consumed = 0
        /// Where the search for the next newline resumes (nothing before it is one).
        var scanned = 0
        /// The commands of the current line not yet run (a line's `;`-separated commands run one
        /// by one, in turns like separate lines).
        var queue: [[String]] = []
        var queued = 0
        var output: [UInt8] = []
        var sent = 0
        var last: Int64
        /// Close once the output is written.
        var closing = false
        /// Reply sent for an over-long line: read and discard until EOF, then close.
        var discarding = false
        var eof = false
        var interest: UInt32 = 0

        init(id: UInt64, fd: Int32, level: CLILevel, metrics: Bool, now: Int64) {
            self.id = id
            self.fd = fd
            self.metrics = metrics
            session = CLISession(level: level)
            last = now
        }

        var pending: Int { output.count - sent }
        var idle: Bool { pending == 0 }
        var unconsumed: Int { input.count - consumed }

        /// The next complete line (without its newline or a trailing CR), consumed.
        func nextLine() -> ArraySlice<UInt8>? {
            let from = max(scanned, consumed)
            guard let nl = input[from...].firstIndex(of: 10) else {
                scanned = input.count
                return nil
            }
            var line = input[consumed..<nl]
            if line.last == 13 { line = line.dropLast() }
            consumed = nl + 1
            scanned = consumed
            return line
        }

        /// Commands or complete lines waiting (the metrics endpoint's request is handled whole).
        var hasWork: Bool { !metrics && (queued < queue.count || input[max(scanned, consumed)...].contains(10)) }
    }

    /// A request line longer than this gets an error reply instead of being buffered further.
    static let maxLine = 64 << 10
    /// A client's commands wait while this much of its output is unsent.
    static let outputHigh = 256 << 10
    /// Per client per loop turn: at most this many commands, or this much time.
    static let turnCommands = 32
    static let turnNanos: Int64 = 2_000_000

    /// Set by the runtime once the workers and the checker exist, before `start()`.
    var ctx: AdminContext!
    private let logger: Logger
    private var listeners: [Listener] = []
    private var clients: [UInt64: Client] = [:]
    private var nextId: UInt64 = 1
    /// Clients with commands left to run, served one turn each per loop iteration.
    private var ready: [UInt64] = []
    private var readySet = Set<UInt64>()
    private let loop: EventLoop
    /// What an event token refers to: a listener (index in `listeners`) or a client (its id).
    enum Kind: UInt8 {
        case listener = 0
        case client = 1
    }
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?
    private let limits: Mutex<(timeout: Int64, maxconn: Int)>
    private var metrics: MetricsExporter!
    private var lastSample: Int64 = 0

    init(config: GlobalConfig, logger: Logger) throws(SysError) {
        self.logger = logger
        limits = Mutex((config.stats.timeout.value, config.stats.maxconn))
        loop = try EventLoop(capacity: 64)
    }

    var hasListeners: Bool { !listeners.isEmpty }

    /// Binds every configured socket (as root, before privileges are dropped) and gives Unix
    /// sockets their mode and owner. Throws a config error naming the entry that failed.
    func open(_ config: GlobalConfig) throws(ConfigError) {
        for s in config.stats.sockets {
            do {
                if let path = s.path {
                    let fd = try Socket.listenUnix(path, backlog: 64)
                    if chmod(path, mode_t(s.mode)) != 0
                        || ((s.uid != nil || s.gid != nil)
                            && chown(path, s.uid ?? UInt32.max, s.gid ?? UInt32.max) != 0)
                    {
                        let e = String(cString: strerror(errno))
                        Sys.close(fd)
                        unlink(path)
                        throw ConfigError(s.location, "stats socket \(path): cannot set mode/owner: \(e)")
                    }
                    listeners.append(Listener(fd: fd, level: s.level, metrics: false, path: path, name: path))
                } else if let a = s.address {
                    let fd = try Socket.listen(a, reusePort: false, backlog: 64)
                    let actual = Socket.localAddress(fd)?.description ?? a.description
                    listeners.append(Listener(fd: fd, level: s.level, metrics: false, path: nil, name: actual))
                }
            } catch let e as SysError {
                close()
                throw ConfigError(
                    s.location, "stats socket \(s.name): cannot listen: \(String(cString: strerror(e.errno)))")
            } catch let e as ConfigError {
                close()
                throw e
            } catch {
                close()
                throw ConfigError(s.location, "stats socket \(s.name): \(error)")
            }
        }
        if let m = config.metrics {
            do {
                let fd = try Socket.listen(m, reusePort: false, backlog: 64)
                let actual = Socket.localAddress(fd)?.description ?? m.description
                listeners.append(Listener(fd: fd, level: .user, metrics: true, path: nil, name: actual))
            } catch {
                close()
                throw ConfigError(
                    config.metricsLocation ?? SourceLocation(file: "", line: 0, column: 0),
                    "metrics \(m): cannot listen: \(String(cString: strerror(error.errno)))")
            }
        }
    }

    /// Where each listener ended up (port 0 picks one), for the start-up log.
    var names: [String] { listeners.map { ($0.metrics ? "metrics http://" : "stats ") + $0.name } }

    func update(_ config: GlobalConfig) {
        limits.withLock { $0 = (config.stats.timeout.value, config.stats.maxconn) }
    }

    func start() {
        metrics = MetricsExporter(ctx: ctx)
        for (k, l) in listeners.enumerated() {
            try? loop.add(l.fd, Epoll.in, EventToken(index: Int32(k), kind: Kind.listener.rawValue))
        }
        thread = NamedThread.start("ballast-admin") { self.run() }
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        loop.wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        close()
    }

    private func close() {
        for l in listeners {
            Sys.close(l.fd)
            if let p = l.path { unlink(p) }
        }
        listeners = []
    }

    // MARK: - Loop

    private func run() {
        lastSample = monotonicMillis()
        while !stopping.load(ordering: .relaxed) {
            let n = (try? loop.wait(timeoutMs: ready.isEmpty ? 200 : 0)) ?? 0
            let now = monotonicMillis()
            for k in 0..<n {
                let (token, ev) = loop.event(at: k)
                switch Kind(rawValue: token.kind) {
                case .listener:
                    accept(Int(token.index), now)
                case .client:
                    let id = UInt64(UInt32(bitPattern: token.index)) | (UInt64(token.generation) << 32)
                    if let c = clients[id] { handle(c, ev, now) }
                case nil:
                    continue  // the loop's wake-up: `stopping` is read below
                }
            }
            let turn = ready
            ready.removeAll(keepingCapacity: true)
            readySet.removeAll(keepingCapacity: true)
            for id in turn {
                if let c = clients[id] { work(c) }
            }
            if now - lastSample >= 1000 {
                sample()
                lastSample = now
            }
            let timeout = limits.withLock { $0.timeout }
            for c in Array(clients.values) where now - c.last > timeout { drop(c) }
        }
        for c in Array(clients.values) { drop(c) }
    }

    /// Once a second: session rates for every service and server, and the process.
    private func sample() {
        var accepted: UInt64 = 0
        var sessions: UInt64 = 0
        var keep = Set<ObjectIdentifier>()
        for svc in ctx.table.services {
            let c = svc.stats.counters.raw()
            accepted &+= c.accepted
            sessions &+= c.sessions
            ctx.rates.sample(svc.stats.counters, c.accepted)
            ctx.rates.sample(svc.stats, c.sessions)
            keep.insert(ObjectIdentifier(svc.stats.counters))
            keep.insert(ObjectIdentifier(svc.stats))
            for s in svc.servers {
                ctx.rates.sample(s.counters, s.counters.raw().sessions)
                keep.insert(ObjectIdentifier(s.counters))
            }
        }
        ctx.rates.sample(RateKeys.process, accepted)
        ctx.rates.sample(RateKeys.processSessions, sessions)
        for k in [RateKeys.process, RateKeys.processSessions, RateKeys.processBytesOut] {
            keep.insert(ObjectIdentifier(k))
        }
        ctx.rates.forget(except: keep)
    }

    private func accept(_ index: Int, _ now: Int64) {
        guard index >= 0 && index < listeners.count else { return }
        let l = listeners[index]
        for _ in 0..<32 {
            var peer = sockaddr_storage()
            guard case .done(let fd)? = try? Socket.accept(l.fd, &peer) else { return }
            // At the cap, the client idle the longest makes room: a new operator always gets in.
            let cap = limits.withLock { $0.maxconn }
            let same = clients.values.filter { $0.metrics == l.metrics }
            if same.count >= cap,
                let victim = same.filter(\.idle).min(by: { $0.last < $1.last }) ?? same.min(by: { $0.last < $1.last })
            {
                drop(victim)
            }
            let c = Client(id: nextId, fd: fd, level: l.level, metrics: l.metrics, now: now)
            nextId += 1
            clients[c.id] = c
            c.interest = Epoll.in | Epoll.rdhup
            try? loop.add(fd, c.interest, c.token)
        }
    }

    private func drop(_ c: Client) {
        loop.remove(c.fd)
        Sys.close(c.fd)
        clients[c.id] = nil
    }

    private func markReady(_ c: Client) {
        if readySet.insert(c.id).inserted { ready.append(c.id) }
    }

    private func handle(_ c: Client, _ ev: UInt32, _ now: Int64) {
        if ev & Epoll.out != 0 {
            flush(c)
            guard clients[c.id] != nil else { return }
            if c.pending < AdminServer.outputHigh && c.hasWork { markReady(c) }
        }
        if ev & (Epoll.in | Epoll.rdhup) != 0 && !c.eof { read(c, now) }
        guard clients[c.id] != nil else { return }
        // Hung up with nothing more to say or hear: done.
        if ev & (Epoll.hup | Epoll.err) != 0 && (c.idle || ev & Epoll.err != 0) { return drop(c) }
        updateInterest(c)
    }

    /// Reads while less than a line's worth is waiting to be run; what it read is run in turn.
    private func read(_ c: Client, _ now: Int64) {
        if c.consumed > 0 && (c.consumed >= 16384 || c.consumed == c.input.count) {
            c.input.removeFirst(c.consumed)
            c.scanned -= c.consumed
            c.consumed = 0
        }
        var buf = [UInt8](repeating: 0, count: 16384)
        while c.discarding || c.unconsumed <= AdminServer.maxLine {
            let r = try? buf.withUnsafeMutableBytes { try Sys.recv(c.fd, $0.baseAddress!, $0.count) }
            guard let r else { return drop(c) }
            guard case .done(let n) = r else { break }
            if n == 0 {
                c.eof = true
                break
            }
            c.last = now
            if c.discarding || c.closing { continue }
            c.input += buf[0..<n]
        }
        if c.discarding && c.eof && c.idle { return drop(c) }
        markReady(c)
    }

    /// One turn: a few of the client's commands, as long as its output is not backed up.
    private func work(_ c: Client) {
        if c.sent > 0 {
            c.output.removeFirst(c.sent)
            c.sent = 0
        }
        if c.metrics {
            if !c.closing { serveHTTP(c) }
        } else {
            let started = monotonicNanos()
            var ran = 0
            let cli = CLI(ctx: ctx)
            while !c.closing && ran < AdminServer.turnCommands && c.pending < AdminServer.outputHigh {
                if c.queued < c.queue.count {
                    cli.run(c.queue[c.queued], session: &c.session, into: &c.output)
                    c.queued += 1
                    ran += 1
                    if c.session.closeAfter || (!c.session.prompt && c.queued == c.queue.count) { c.closing = true }
                    if monotonicNanos() - started > AdminServer.turnNanos { break }
                    continue
                }
                guard let lineBytes = c.nextLine() else { break }
                if lineBytes.count > AdminServer.maxLine {
                    tooLong(c)
                    break
                }
                switch CLI.commands(of: String(decoding: lineBytes, as: UTF8.self)) {
                case .failure(let e):
                    reply(c, e.message + "\n\n")
                    if !c.session.prompt { c.closing = true }
                case .success(let commands):
                    c.queue = commands
                    c.queued = 0
                }
            }
            if !c.closing && c.queued == c.queue.count && c.unconsumed > AdminServer.maxLine && !c.hasWork {
                tooLong(c)
            }
        }
        // A line without its newline is never run (as in HAProxy); what was answered is sent.
        if c.eof && !c.hasWork { c.closing = true }
        flush(c)
        guard clients[c.id] != nil else { return }
        if !c.closing && c.pending < AdminServer.outputHigh && c.hasWork { markReady(c) }
        updateInterest(c)
    }

    private func tooLong(_ c: Client) {
        reply(c, "Command line too long (over \(AdminServer.maxLine) bytes).\n\n")
        c.input.removeAll()
        c.consumed = 0
        c.scanned = 0
        c.queue = []
        c.queued = 0
        c.closing = true
        c.discarding = true
    }

    /// Reading while there is room (and until EOF when discarding), writing while output waits.
    private func updateInterest(_ c: Client) {
        var want: UInt32 = 0
        if !c.eof && (c.discarding || (!c.closing && c.unconsumed <= AdminServer.maxLine)) {
            want |= Epoll.in | Epoll.rdhup
        }
        if c.pending > 0 { want |= Epoll.out }
        if want != c.interest {
            c.interest = want
            try? loop.modify(c.fd, want, c.token)
        }
    }

    private func reply(_ c: Client, _ text: String) {
        var t = text
        t.withUTF8 { c.output.append(contentsOf: $0) }
    }

    private func flush(_ c: Client) {
        while c.sent < c.output.count {
            let r = try? c.output.withUnsafeBytes { try Sys.send(c.fd, $0.baseAddress! + c.sent, $0.count - c.sent) }
            guard let r else { return drop(c) }
            guard case .done(let n) = r else { return }
            c.sent += n
        }
        // A big reply's buffer goes back once it is sent; a small one is kept for the next.
        if c.output.capacity > 4 * AdminServer.outputHigh {
            c.output = []
        } else {
            c.output.removeAll(keepingCapacity: true)
        }
        c.sent = 0
        if c.closing {
            if c.discarding {
                // Keep reading until the client is done, so closing does not reset the reply away.
                Sys.shutdownWrite(c.fd)
                if c.eof { drop(c) }
                return
            }
            drop(c)
        }
    }

    // MARK: - /metrics

    private func serveHTTP(_ c: Client) {
        guard let end = findHeaderEnd(c.input) else {
            if c.input.count > 8192 {
                reply(
                    c, "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                c.closing = true
                c.discarding = true
            }
            return
        }
        let head = String(decoding: c.input[..<end], as: UTF8.self)
        c.input.removeAll()
        let requestLine = head.split(separator: "\r\n", maxSplits: 1).first.map(String.init) ?? ""
        let parts = requestLine.split(separator: " ")
        var status = "200 OK"
        var body = ""
        var type = "text/plain; version=0.0.4; charset=utf-8"
        if parts.count < 3 || !parts[2].hasPrefix("HTTP/1.") {
            status = "400 Bad Request"
            body = "bad request\n"
            type = "text/plain"
        } else if parts[0] != "GET" && parts[0] != "HEAD" {
            status = "405 Method Not Allowed"
            body = "only GET\n"
            type = "text/plain"
        } else if parts[1] != "/metrics" && !parts[1].hasPrefix("/metrics?") {
            status = "404 Not Found"
            body = "see /metrics\n"
            type = "text/plain"
        } else {
            body = metrics.render()
        }
        let bytes = Array(body.utf8)
        reply(
            c,
            "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(bytes.count)\r\nConnection: close\r\n\r\n"
        )
        if parts.first != "HEAD" { c.output += bytes }
        c.closing = true
    }

    private func findHeaderEnd(_ b: [UInt8]) -> Int? {
        guard b.count >= 4 else { return nil }
        for i in 0...(b.count - 4) where b[i] == 13 && b[i + 1] == 10 && b[i + 2] == 13 && b[i + 3] == 10 { return i }
        return nil
    }
}
