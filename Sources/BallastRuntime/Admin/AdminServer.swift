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
final class AdminServer: @unchecked Sendable {
    struct Listener {
        var fd: Int32
        var level: CLILevel
        var metrics: Bool
        var path: String?
        var name: String
    }

    final class Client {
        let fd: Int32
        let metrics: Bool
        var session: CLISession
        var input: [UInt8] = []
        var output: [UInt8] = []
        var sent = 0
        var last: Int64
        /// Close once the output is written.
        var closing = false
        /// Reply sent for an over-long line: read and discard until EOF, then close.
        var discarding = false
        var wantsOut = false

        init(fd: Int32, level: CLILevel, metrics: Bool, now: Int64) {
            self.fd = fd
            self.metrics = metrics
            session = CLISession(level: level)
            last = now
        }

        var idle: Bool { output.count == sent }
    }

    /// A request line longer than this gets an error reply instead of being buffered further.
    static let maxLine = 64 << 10

    /// Set by the runtime once the workers and the checker exist, before `start()`.
    var ctx: AdminContext!
    private let logger: Logger
    private var listeners: [Listener] = []
    private var clients: [Int32: Client] = [:]
    private let epfd: Int32
    private let wakeFd: Int32
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?
    private let limits: Mutex<(timeout: Int64, maxconn: Int)>
    private var metrics: MetricsExporter!
    private var lastSample: Int64 = 0

    init(config: GlobalConfig, logger: Logger) throws(SysError) {
        self.logger = logger
        limits = Mutex((config.stats.timeout.value, config.stats.maxconn))
        epfd = try Epoll.create()
        wakeFd = try EventFd.create()
        try Epoll.add(epfd, wakeFd, events: Epoll.in, data: UInt64.max)
    }

    var hasListeners: Bool { !listeners.isEmpty }

    /// Binds every configured socket (as root, before privileges are dropped) and gives Unix
    /// sockets their mode and owner. Throws a config error naming the entry that failed.
    func open(_ config: GlobalConfig) throws(ConfigError) {
        for s in config.stats.sockets {
            do {
                if let path = s.path {
                    let fd = try Socket.listenUnix(path, backlog: 64)
                    if chmod(path, mode_t(s.mode)) != 0 || ((s.uid != nil || s.gid != nil) && chown(path, s.uid ?? UInt32.max, s.gid ?? UInt32.max) != 0) {
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
                throw ConfigError(s.location, "stats socket \(s.name): cannot listen: \(String(cString: strerror(e.errno)))")
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
                throw ConfigError(config.metricsLocation ?? SourceLocation(file: "", line: 0, column: 0),
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
            try? Epoll.add(epfd, l.fd, events: Epoll.in, data: UInt64(k) | (1 << 40))
        }
        thread = NamedThread.start("ballast-admin") { self.loop() }
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        EventFd.signal(wakeFd)
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

    private func loop() {
        let events = UnsafeMutablePointer<ballast_epoll_event>.allocate(capacity: 64)
        defer { events.deallocate() }
        lastSample = monotonicMillis()
        while !stopping.load(ordering: .relaxed) {
            let n = (try? Epoll.wait(epfd, events, max: 64, timeoutMs: 200)) ?? 0
            let now = monotonicMillis()
            for k in 0..<n {
                let data = events[k].data
                if data == UInt64.max {
                    EventFd.drain(wakeFd)
                    continue
                }
                if data & (1 << 40) != 0 {
                    accept(Int(data & 0xFFFF), now)
                } else if let c = clients[Int32(truncatingIfNeeded: data)] {
                    handle(c, events[k].events, now)
                }
            }
            if now - lastSample >= 1000 {
                sample()
                lastSample = now
            }
            let timeout = limits.withLock { $0.timeout }
            for c in Array(clients.values) where now - c.last > timeout { drop(c) }
        }
        for c in Array(clients.values) { drop(c) }
        Sys.close(wakeFd)
        Sys.close(epfd)
    }

    /// Once a second: session rates for every service and server, and the process.
    private func sample() {
        var accepted: UInt64 = 0, sessions: UInt64 = 0
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
        for k in [RateKeys.process, RateKeys.processSessions, RateKeys.processBytesOut] { keep.insert(ObjectIdentifier(k)) }
        ctx.rates.forget(except: keep)
    }

    private func accept(_ index: Int, _ now: Int64) {
        guard index < listeners.count else { return }
        let l = listeners[index]
        for _ in 0..<32 {
            var peer = sockaddr_storage()
            guard case .done(let fd)? = try? Socket.accept(l.fd, &peer) else { return }
            // At the cap, the client idle the longest makes room: a new operator always gets in.
            let cap = limits.withLock { $0.maxconn }
            let same = clients.values.filter { $0.metrics == l.metrics }
            if same.count >= cap, let victim = same.filter(\.idle).min(by: { $0.last < $1.last }) ?? same.min(by: { $0.last < $1.last }) {
                drop(victim)
            }
            let c = Client(fd: fd, level: l.level, metrics: l.metrics, now: now)
            clients[fd] = c
            try? Epoll.add(epfd, fd, events: Epoll.in | Epoll.rdhup, data: UInt64(UInt32(bitPattern: fd)))
        }
    }

    private func drop(_ c: Client) {
        Epoll.remove(epfd, c.fd)
        Sys.close(c.fd)
        clients[c.fd] = nil
    }

    private func handle(_ c: Client, _ ev: UInt32, _ now: Int64) {
        if ev & Epoll.out != 0 { flush(c) }
        guard clients[c.fd] != nil else { return }
        if ev & (Epoll.in | Epoll.rdhup | Epoll.hup | Epoll.err) != 0 { read(c, now) }
    }

    private func read(_ c: Client, _ now: Int64) {
        var buf = [UInt8](repeating: 0, count: 16384)
        var eof = false
        while true {
            let r = try? buf.withUnsafeMutableBytes { try Sys.recv(c.fd, $0.baseAddress!, $0.count) }
            guard let r else {
                return drop(c)
            }
            guard case .done(let n) = r else { break }
            if n == 0 {
                eof = true
                break
            }
            c.last = now
            if c.discarding || c.closing { continue }
            c.input += buf[0..<n]
            if c.metrics {
                serveHTTP(c)
            } else {
                processLines(c)
            }
            if c.input.count > 1 << 20 { break }
        }
        if eof {
            // A line without its newline is never run (as in HAProxy); what was answered is sent.
            if c.idle { return drop(c) }
            c.closing = true
        }
        flush(c)
    }

    private func processLines(_ c: Client) {
        let cli = CLI(ctx: ctx)
        while !c.closing, let nl = c.input.firstIndex(of: UInt8(ascii: "\n")) {
            var lineBytes = c.input[..<nl]
            if lineBytes.last == UInt8(ascii: "\r") { lineBytes = lineBytes.dropLast() }
            c.input.removeFirst(nl + 1)
            if lineBytes.count > AdminServer.maxLine {
                reply(c, "Command line too long (over \(AdminServer.maxLine) bytes).\n\n")
                c.closing = true
                c.discarding = true
                break
            }
            let line = String(decoding: lineBytes, as: UTF8.self)
            cli.run(line: line, session: &c.session, into: &c.output)
            if c.session.closeAfter || !c.session.prompt { c.closing = true }
        }
        if !c.closing && c.input.count > AdminServer.maxLine {
            reply(c, "Command line too long (over \(AdminServer.maxLine) bytes).\n\n")
            c.input.removeAll()
            c.closing = true
            c.discarding = true
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
            guard case .done(let n) = r else {
                if !c.wantsOut {
                    c.wantsOut = true
                    try? Epoll.modify(epfd, c.fd, events: Epoll.in | Epoll.out | Epoll.rdhup, data: UInt64(UInt32(bitPattern: c.fd)))
                }
                return
            }
            c.sent += n
        }
        c.output.removeAll(keepingCapacity: true)
        c.sent = 0
        if c.wantsOut {
            c.wantsOut = false
            try? Epoll.modify(epfd, c.fd, events: Epoll.in | Epoll.rdhup, data: UInt64(UInt32(bitPattern: c.fd)))
        }
        if c.closing {
            if c.discarding {
                // Keep reading until the client is done, so closing does not reset the reply away.
                Sys.shutdownWrite(c.fd)
                return
            }
            drop(c)
        }
    }

    // MARK: - /metrics

    private func serveHTTP(_ c: Client) {
        guard let end = findHeaderEnd(c.input) else {
            if c.input.count > 8192 {
                reply(c, "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
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
        reply(c, "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(bytes.count)\r\nConnection: close\r\n\r\n")
        if parts.first != "HEAD" { c.output += bytes }
        c.closing = true
    }

    private func findHeaderEnd(_ b: [UInt8]) -> Int? {
        guard b.count >= 4 else { return nil }
        for i in 0...(b.count - 4) where b[i] == 13 && b[i + 1] == 10 && b[i + 2] == 13 && b[i + 3] == 10 { return i }
        return nil
    }
}
