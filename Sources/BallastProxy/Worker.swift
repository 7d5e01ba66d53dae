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

/// One data-plane thread: its own epoll instance, listeners (one `SO_REUSEPORT` socket per bind),
/// connection table, pipe and buffer pools, timer wheel and per-service schedulers.
/// A connection lives on one worker from accept to close; nothing here takes a lock except the
/// inbox, which is read only when the runtime kicks the eventfd (reload, stop).
public final class Worker: @unchecked Sendable {
    public let id: Int
    let epfd: Int32
    let wakeFd: Int32
    let shared: ProxyShared
    let logger: Logger
    private let inbox = Mutex<[WorkerCommand]>([])

    /// Commands processed: the watchdog's proof that this loop still turns.
    public let heartbeat = Atomic<Int>(0)
    /// Monotonic ms of the last command processed (`ballast health`: the runtime pings every
    /// worker several times a second, so an old value means a stuck loop).
    public let lastBeat = Atomic<Int64>(monotonicMillis())
    /// Set when the loop has returned.
    public let finished = Atomic<Bool>(false)
    /// Pipes this worker holds, and how many of them are idle in its pool (`show info`).
    public let pipesTotal = Atomic<Int>(0)
    public let pipesIdle = Atomic<Int>(0)

    private var settings: WorkerSettings
    private let table: ConnTable
    private var wheel: TimerWheel
    private var now: Int64
    private var running = true

    // Listeners: parallel arrays indexed by listener slot.
    private struct Listener {
        var fd: Int32
        var address: SocketAddress
        var service: WorkerService
        var acceptProxy: Bool
        var paused = false
        var gen: UInt32
    }
    private var listeners: [Listener?] = []
    private var listenerGen: UInt32 = 0
    private var pausedUntil: Int64 = 0
    private var pausedForMaxconn = false
    private var pausedForFds = false

    private var services: [String: WorkerService] = [:]
    private var queued = 0

    // Pools. Idle pipes and buffers are kept up to a cap; in-flight ones belong to a direction.
    private var pipeR: [Int32] = []
    private var pipeW: [Int32] = []
    private var pipeFree: [Int32] = []
    private var pipeCapacity: Int
    private var buffers: [UnsafeMutableRawPointer] = []
    private var bufferFree: [Int32] = []

    private var deferredList: [Int32] = []
    private var expired: [Int32] = []
    private let events: UnsafeMutablePointer<ballast_epoll_event>
    private static let maxEvents: Int32 = 256
    /// Bytes one direction may move per wake-up before yielding to other connections.
    private static let budget = 4 << 20
    /// Room a pipe needs for a read between two partial flushes to be worth it.
    private static let minRoom = 64 << 10
    private static let maxIdlePipes = 256
    private static let maxIdleBuffers = 1024

    // epoll data: index (32 bits) | kind (2 bits) | generation (24 bits).
    private enum Kind: UInt64 {
        case client = 0, server = 1, listener = 2, wake = 3
    }

    public init(id: Int, shared: ProxyShared, settings: WorkerSettings, logger: Logger) throws(SysError) {
        self.id = id
        self.shared = shared
        self.settings = settings
        self.logger = logger
        self.epfd = try Epoll.create()
        self.wakeFd = try EventFd.create()
        self.table = ConnTable(capacity: settings.tableCapacity)
        self.now = monotonicMillis()
        self.wheel = TimerWheel(now: now)
        self.pipeCapacity = settings.pipeSize
        self.events = .allocate(capacity: Int(Worker.maxEvents))
        try Epoll.add(epfd, wakeFd, events: Epoll.in, data: Kind.wake.rawValue << 32)
        deferredList.reserveCapacity(1024)
        expired.reserveCapacity(1024)
        pipeR.reserveCapacity(1024)
        pipeW.reserveCapacity(1024)
        pipeFree.reserveCapacity(1024)
        bufferFree.reserveCapacity(4096)
    }

    deinit {
        events.deallocate()
        for b in buffers { b.deallocate() }
    }

    /// Queues a command and wakes the worker. Callable from any thread. A ping (four a second,
    /// from the runtime) is a flag, not a queued command: it allocates nothing.
    public func send(_ command: WorkerCommand) {
        if case .ping = command {
            pingPending.store(true, ordering: .releasing)
        } else {
            inbox.withLock { $0.append(command) }
        }
        EventFd.signal(wakeFd)
    }

    private let pingPending = Atomic<Bool>(false)

    // MARK: - Loop

    /// Runs the event loop on the calling thread until `.exit`.
    public func run() {
        while running {
            var timeout: Int32 = -1
            if let t = wheel.timeoutMs(now: now) { timeout = t }
            if !deferredList.isEmpty { timeout = 0 }
            if queued > 0 || pausedForMaxconn || pausedForFds { timeout = timeout < 0 ? 10 : min(timeout, 10) }
            let n: Int
            do {
                n = try Epoll.wait(epfd, events, max: Worker.maxEvents, timeoutMs: timeout)
            } catch {
                logger.critical("worker \(id): \(error)")
                break
            }
            now = monotonicMillis()
            for k in 0..<n {
                let ev = events[k]
                dispatch(ev.data, ev.events)
            }
            runDeferred()
            expired.removeAll(keepingCapacity: true)
            wheel.advance(now: now, in: table, into: &expired)
            for i in expired { onTimer(i) }
            if queued > 0 { serveQueues() }
            if pausedForMaxconn || pausedForFds { maybeResumeListeners() }
        }
        closeEverything()
        finished.store(true, ordering: .releasing)
    }

    @inline(__always)
    private func token(_ i: Int32, _ kind: Kind, _ gen: UInt32) -> UInt64 {
        UInt64(UInt32(bitPattern: i)) | (kind.rawValue << 32) | (UInt64(gen & 0xFF_FFFF) << 34)
    }

    private func dispatch(_ data: UInt64, _ ev: UInt32) {
        let index = Int32(bitPattern: UInt32(truncatingIfNeeded: data))
        let kind = Kind(rawValue: (data >> 32) & 3)!
        let gen = UInt32(truncatingIfNeeded: data >> 34) & 0xFF_FFFF
        switch kind {
        case .wake:
            EventFd.drain(wakeFd)
            processInbox()
        case .listener:
            guard Int(index) < listeners.count, let l = listeners[Int(index)], l.gen & 0xFF_FFFF == gen else { return }
            acceptLoop(Int(index))
        case .client, .server:
            let c = table[index]
            guard c.pointee.state != .free, c.pointee.gen & 0xFF_FFFF == gen else { return }
            let readable = ev & (Epoll.in | Epoll.rdhup | Epoll.hup | Epoll.err) != 0
            let writable = ev & (Epoll.out | Epoll.err | Epoll.hup) != 0
            let hangup = ev & (Epoll.rdhup | Epoll.hup | Epoll.err) != 0
            if kind == .client {
                if readable { c.pointee.clientReadable = true }
                if writable { c.pointee.clientWritable = true }
                if hangup { c.pointee.clientRdHup = true }
                if c.pointee.state == .proxyHeader {
                    if readable { readProxyHeader(index) }
                    return
                }
                if c.pointee.state == .queued {
                    // A client that went away while waiting leaves the queue now.
                    if ev & (Epoll.hup | Epoll.err) != 0 { finish(index, .clientReset) }
                    return
                }
                if c.pointee.state == .connecting { return }
            } else {
                if readable { c.pointee.serverReadable = true }
                if writable { c.pointee.serverWritable = true }
                if hangup { c.pointee.serverRdHup = true }
                if c.pointee.state == .connecting {
                    guard writable || ev & (Epoll.err | Epoll.hup) != 0 else { return }
                    connectCompleted(index)
                    return
                }
            }
            if c.pointee.state == .established { pump(index) }
        }
    }

    // MARK: - Inbox

    private func processInbox() {
        let commands = inbox.withLock { box -> [WorkerCommand] in
            let c = box
            box.removeAll()
            return c
        }
        if pingPending.exchange(false, ordering: .acquiring) {
            heartbeat.wrappingAdd(1, ordering: .relaxed)
            lastBeat.store(monotonicMillis(), ordering: .relaxed)
        }
        if !commands.isEmpty { lastBeat.store(monotonicMillis(), ordering: .relaxed) }
        for command in commands {
            heartbeat.wrappingAdd(1, ordering: .relaxed)
            switch command {
            case .ping:
                break
            case .apply(let table, let specs, let logConnections, let pipeSize):
                apply(table, specs)
                settings.logConnections = logConnections
                if pipeSize != settings.pipeSize {
                    settings.pipeSize = pipeSize
                    // Idle pipes have the old size; let new ones be made.
                    for p in pipeFree { closePipe(p) }
                    pipeFree.removeAll(keepingCapacity: true)
                    pipeCapacity = pipeSize
                }
            case .stopAccepting:
                for k in listeners.indices {
                    if let l = listeners[k] {
                        Epoll.remove(epfd, l.fd)
                        Sys.close(l.fd)
                        listeners[k] = nil
                    }
                }
            case .shutdownSessions(let server):
                closeConnections(reason: .serverDown) { $0.server === server }
            case .shutdownBackupSessions(let service):
                closeConnections(reason: .activeServerUp) { c in
                    guard let svc = c.service, svc.name == service, c.serverIndex >= 0 else { return false }
                    return svc.config.servers[Int(c.serverIndex)].backup
                }
            case .listSessions(let report):
                report.add(describeSessions())
            case .shutdownSession(let index, let generation, let report):
                if index >= 0 && index < table.highWater, table[index].pointee.state != .free,
                    table[index].pointee.gen & 0xFF_FFFF == generation
                {
                    report.found.store(true, ordering: .relaxed)
                    finish(index, .shutdown)
                }
                report.add([])
            case .exit:
                running = false
            }
        }
    }

    private func apply(_ snapshot: ServiceTable, _ specs: [ListenerSpec]) {
        var next: [String: WorkerService] = [:]
        for svc in snapshot.services {
            if let old = services[svc.name], old.service === svc {
                next[svc.name] = old
            } else {
                next[svc.name] = WorkerService(service: svc, seed: UInt64(id + 1))
            }
        }
        // Queued connections follow their service to its new version, in order; a removed
        // service's queue is closed (its listeners are closing too).
        for (name, old) in services where next[name] !== old {
            var i = old.queueHead
            while i >= 0 {
                let nxt = table[i].pointee.queueNext
                if let ns = next[name] {
                    dequeue(i, from: old)
                    table[i].pointee.service = ns
                    enqueue(i, into: ns)
                } else {
                    finish(i, .serviceRemoved)
                }
                i = nxt
            }
        }
        services = next

        // Listeners: keep the ones still listed (same fd), close the others, add the new ones.
        let keep = Set(specs.map(\.fd))
        for k in listeners.indices {
            guard let l = listeners[k] else { continue }
            if !keep.contains(l.fd) {
                Epoll.remove(epfd, l.fd)
                Sys.close(l.fd)
                listeners[k] = nil
            }
        }
        for spec in specs {
            guard let svc = next[spec.serviceName] else { continue }
            if let k = listeners.firstIndex(where: { $0?.fd == spec.fd }) {
                listeners[k]!.service = svc
                listeners[k]!.acceptProxy = spec.acceptProxy
                continue
            }
            listenerGen &+= 1
            let slot: Int
            if let free = listeners.firstIndex(where: { $0 == nil }) {
                slot = free
                listeners[slot] = Listener(fd: spec.fd, address: spec.address, service: svc, acceptProxy: spec.acceptProxy, gen: listenerGen)
            } else {
                slot = listeners.count
                listeners.append(Listener(fd: spec.fd, address: spec.address, service: svc, acceptProxy: spec.acceptProxy, gen: listenerGen))
            }
            let paused = pausedForMaxconn || pausedForFds
            listeners[slot]!.paused = paused
            do {
                try Epoll.add(
                    epfd, spec.fd, events: paused ? 0 : Epoll.in, data: token(Int32(slot), .listener, listenerGen))
            } catch {
                logger.error("worker \(id): cannot watch listener \(spec.address): \(error)")
            }
        }
    }

    // MARK: - Accept

    private func acceptLoop(_ slot: Int) {
        var budget = 64
        while budget > 0, let l = listeners[slot], !l.paused {
            budget -= 1
            // Reserve a place under the process-wide maxconn before taking the connection, so
            // at the limit the listener pauses and clients wait in the backlog instead of failing.
            let count = shared.connections.wrappingAdd(1, ordering: .relaxed).newValue
            if count > shared.maxconn.load(ordering: .relaxed) {
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                pausedForMaxconn = true
                pauseListeners()
                return
            }
            guard let i = table.allocate() else {
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                pausedForMaxconn = true
                pauseListeners()
                return
            }
            let c = table[i]
            let r: IOResult<Int32>
            do {
                r = try withUnsafeMutablePointer(to: &c.pointee.clientAddr) { p throws(SysError) in
                    try Socket.accept(l.fd, p)
                }
            } catch {
                table.free(i)
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                switch error.errno {
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    pauseForResources("accept on \(l.address)", error)
                case ECONNABORTED, EPERM, EPROTO:
                    continue
                default:
                    logger.error("worker \(id): accept on \(l.address): \(error)")
                }
                return
            }
            guard case .done(let fd) = r else {
                table.free(i)
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                return
            }
            shared.totalConnections.wrappingAdd(1, ordering: .relaxed)
            c.pointee.clientFd = fd
            c.pointee.service = l.service
            c.pointee.acceptedAt = now
            c.pointee.state = .connecting  // provisional until assign() decides
            // Who may connect is decided before anything is counted, picked or connected (with
            // accept_proxy, once the header has named the client).
            if !l.acceptProxy && !admit(i) { continue }
            let stats = l.service.service.stats
            let slot = stats.counters.slot(id)
            slot.pointee.accepted &+= 1
            c.pointee.serviceSlot = slot
            raiseMax(stats.clientsMax, to: stats.clients.wrappingAdd(1, ordering: .relaxed).newValue)
            c.pointee.lastClientIO = now
            c.pointee.retriesLeft = l.service.retries
            c.pointee.tried = 0
            Socket.setNoDelay(fd)
            do {
                try Epoll.add(
                    epfd, fd, events: Epoll.in | Epoll.out | Epoll.rdhup | Epoll.edgeTriggered,
                    data: token(i, .client, c.pointee.gen))
            } catch {
                finish(i, .clientReset)
                continue
            }
            if l.acceptProxy {
                // Nothing is relayed before a valid header: bounded by the client timeout.
                c.pointee.state = .proxyHeader
                wheel.arm(i, at: now + l.service.clientMs, in: table)
                continue
            }
            assign(i, exclude: -1)
        }
    }

    /// Out of descriptors or memory: stop accepting for a moment instead of spinning on a listener
    /// that stays readable. The pending clients wait in the backlog.
    private func pauseForResources(_ what: String, _ error: SysError) {
        if !pausedForFds {
            logger.warning("worker \(id): \(what) failed (\(error)); pausing listeners for 100ms")
        }
        pausedForFds = true
        pausedUntil = now + 100
        pauseListeners()
    }

    private func pauseListeners() {
        for k in listeners.indices {
            guard let l = listeners[k], !l.paused else { continue }
            try? Epoll.modify(epfd, l.fd, events: 0, data: token(Int32(k), .listener, l.gen))
            listeners[k]!.paused = true
        }
    }

    private func maybeResumeListeners() {
        if pausedForFds && now < pausedUntil { return }
        if shared.connections.load(ordering: .relaxed) >= shared.maxconn.load(ordering: .relaxed) { return }
        if table.live >= table.capacity { return }
        pausedForFds = false
        pausedForMaxconn = false
        for k in listeners.indices {
            guard let l = listeners[k], l.paused else { continue }
            try? Epoll.modify(epfd, l.fd, events: Epoll.in, data: token(Int32(k), .listener, l.gen))
            listeners[k]!.paused = false
        }
    }

    // MARK: - Server choice and connect

    /// Chooses a server and starts connecting, or queues, or closes the client when no server can
    /// ever take it.
    /// `failedErr`: the errno of the failed connect to `exclude` this is a retry of (logged
    /// with the server actually tried next).
    private func assign(_ i: Int32, exclude: Int32, failedErr: Int32 = 0) {
        let c = table[i]
        guard let svc = c.pointee.service else { return finish(i, .noServer) }
        let hash = svc.balance == .source ? clientHash(c, svc) : 0
        var attempts = svc.service.servers.count + 1
        while attempts > 0 {
            attempts -= 1
            guard let s = svc.pick(exclude: exclude, tried: c.pointee.tried, hash: hash, now: now) else { break }
            let server = svc.service.servers[Int(s)]
            // Another worker may have taken the last slot since the pick: pick again.
            guard server.tryAcquire() else { continue }
            if exclude >= 0 && s != exclude {
                c.pointee.serviceSlot?.pointee.redispatches &+= 1
                c.pointee.serverSlot?.pointee.redispatches &+= 1
            }
            if exclude >= 0 && settings.logConnections {
                logger.info(
                    "\(svc.name): connect to \(svc.service.servers[Int(exclude)].name) failed (\(String(cString: strerror(failedErr)))), retrying on \(s == exclude ? "the same server (no other is usable)" : server.name)")
            }
            attach(i, server, s, svc)
            startConnect(i)
            return
        }
        if svc.anyUsable {
            if svc.queueCount >= svc.maxqueue { return finish(i, .queueFull) }
            c.pointee.state = .queued
            c.pointee.phaseDeadline = now + svc.queueMs
            enqueue(i, into: svc)
            wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
        } else {
            finish(i, c.pointee.serverIndex >= 0 ? .connectFailed : .noServer)
        }
    }

    /// Gives the connection the server whose slot it just reserved, and counts the pick.
    @inline(__always)
    private func attach(_ i: Int32, _ server: Server, _ s: Int32, _ svc: WorkerService) {
        let c = table[i]
        c.pointee.server = server
        c.pointee.serverIndex = s
        let slot = server.counters.slot(id)
        c.pointee.serverSlot = slot
        slot.pointee.picks &+= 1
        c.pointee.serviceSlot?.pointee.picks &+= 1
        raiseMax(server.activeMax, to: server.active.load(ordering: .relaxed))
        let stats = svc.service.stats
        raiseMax(stats.assignedMax, to: stats.assigned.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    /// Peeks at what the client sent; once a whole PROXY header is there, consumes exactly it,
    /// takes the client address it names, and goes on to pick a server.
    private func readProxyHeader(_ i: Int32) {
        let c = table[i]
        var peek = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))  // 240 bytes
        let fd = c.pointee.clientFd
        let outcome: ProxyProtocol.Parsed? = withUnsafeMutableBytes(of: &peek) { buf -> ProxyProtocol.Parsed? in
            let n = recv(fd, buf.baseAddress!, ProxyProtocol.maxHeader, Int32(MSG_PEEK))
            if n < 0 { return errno == EAGAIN ? .incomplete : nil }
            if n == 0 { return .invalid("connection closed before a complete header") }
            let parsed = ProxyProtocol.parse(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            if parsed == .incomplete && n >= ProxyProtocol.maxHeader { return .invalid("header over \(ProxyProtocol.maxHeader) bytes") }
            if case .header(let length, _) = parsed {
                // Consume exactly the header; the bytes after it belong to the relay.
                _ = recv(fd, buf.baseAddress!, length, 0)
            }
            return parsed
        }
        switch outcome {
        case .none:
            finish(i, .clientReset)
        case .incomplete?:
            if c.pointee.clientRdHup { rejectProxy(i, "connection closed before a complete header") }
        case .invalid(let reason)?:
            rejectProxy(i, reason)
        case .header(_, let source)?:
            if let source { withUnsafeMutablePointer(to: &c.pointee.clientAddr) { source.store(into: $0) } }
            guard admit(i) else { return }
            wheel.disarm(i, in: table)
            c.pointee.state = .connecting
            c.pointee.lastClientIO = now
            assign(i, exclude: -1)
        }
    }

    private func rejectProxy(_ i: Int32, _ reason: String) {
        let c = table[i]
        let client = SocketAddress(storage: c.pointee.clientAddr)?.description ?? "?"
        logger.warning("\(c.pointee.service?.name ?? "?"): PROXY header from \(client) rejected: \(reason)")
        finish(i, .badProxyHeader)
    }

    /// Puts the PROXY header for this connection in the client→server buffer, so it goes out
    /// before the first relayed byte.
    private func queueProxyHeader(_ i: Int32, _ version: ProxyProtocol.Version) {
        let c = table[i]
        guard let b = acquireBuffer(c, true) else { return }
        var local = Socket.localStorage(c.pointee.clientFd) ?? sockaddr_storage()
        let n = withUnsafePointer(to: &c.pointee.clientAddr) { src in
            withUnsafePointer(to: &local) { dst in ProxyProtocol.encode(version, src: src, dst: dst, into: buffers[Int(b)]) }
        }
        c.pointee.up.bufStart = 0
        c.pointee.up.bufEnd = Int32(n)
    }

    @inline(__always)
    private func clientHash(_ c: UnsafeMutablePointer<Conn>, _ svc: WorkerService) -> UInt32 {
        withUnsafePointer(to: &c.pointee.clientAddr) { SourceHash.hash($0, withPort: svc.hashWithPort) }
    }

    private func startConnect(_ i: Int32) {
        let c = table[i]
        let server = c.pointee.server!
        c.pointee.state = .connecting
        c.pointee.serverReadable = false
        c.pointee.serverWritable = false
        c.pointee.serverRdHup = false
        let result: Socket.ConnectResult
        do {
            result = try Socket.connect(server.address)
        } catch {
            if error.errno == EMFILE || error.errno == ENFILE {
                pauseForResources("connect to \(server.address)", error)
            }
            return connectFailed(i, error.errno)
        }
        let fd: Int32
        switch result {
        case .connected(let f), .inProgress(let f): fd = f
        }
        c.pointee.serverFd = fd
        Socket.setNoDelay(fd)
        do {
            try Epoll.add(
                epfd, fd, events: Epoll.in | Epoll.out | Epoll.rdhup | Epoll.edgeTriggered,
                data: token(i, .server, c.pointee.gen))
        } catch {
            return connectFailed(i, error.errno)
        }
        c.pointee.phaseDeadline = now + c.pointee.service!.connectMs
        wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
    }

    private func connectCompleted(_ i: Int32) {
        let c = table[i]
        let err = Socket.pendingError(c.pointee.serverFd)
        if err != 0 { return connectFailed(i, err) }
        c.pointee.state = .established
        c.pointee.serverWritable = true
        c.pointee.serverSlot?.pointee.sessions &+= 1
        c.pointee.serviceSlot?.pointee.sessions &+= 1
        if let server = c.pointee.server { server.lastSession.store(now, ordering: .relaxed) }
        c.pointee.service?.service.stats.lastSession.store(now, ordering: .relaxed)
        if let server = c.pointee.server, let v = ProxyProtocol.Version(rawValue: server.sendProxy.load(ordering: .relaxed)) {
            queueProxyHeader(i, v)
        }
        if let server = c.pointee.server, server.connectFailures.load(ordering: .relaxed) != 0 {
            server.connectFailures.store(0, ordering: .relaxed)
        }
        c.pointee.lastClientIO = now
        c.pointee.lastServerIO = now
        armIdle(i)
        pump(i)
    }

    private func connectFailed(_ i: Int32, _ err: Int32) {
        let c = table[i]
        if c.pointee.serverFd >= 0 {
            Sys.close(c.pointee.serverFd)
            c.pointee.serverFd = -1
        }
        let failed = c.pointee.serverIndex
        c.pointee.serverSlot?.pointee.connectErrors &+= 1
        c.pointee.serviceSlot?.pointee.connectErrors &+= 1
        if c.pointee.retriesLeft > 0 {
            c.pointee.serverSlot?.pointee.retries &+= 1
            c.pointee.serviceSlot?.pointee.retries &+= 1
        }
        if let svc = c.pointee.service, svc.observeFails > 0, let server = c.pointee.server {
            observeFailure(server, svc, err)
        }
        releaseServer(i)
        if failed >= 0 && failed < 64 { c.pointee.tried |= 1 << UInt64(failed) }
        if c.pointee.retriesLeft > 0 {
            c.pointee.retriesLeft -= 1
            return assign(i, exclude: failed, failedErr: err)
        }
        finish(i, err == ETIMEDOUT ? .connectTimeout : .connectFailed)
    }

    /// Passive observation: enough consecutive failed connects mark the server DOWN at once;
    /// the active check brings it back after `rise` successes.
    private func observeFailure(_ server: Server, _ svc: WorkerService, _ err: Int32) {
        let n = server.connectFailures.wrappingAdd(1, ordering: .relaxed).newValue
        guard n >= svc.observeFails else { return }
        guard server.setUp(false, now: now) else { return }
        logger.warning(
            "Server \(svc.name)/\(server.name) is DOWN, reason: passive observation, info: \"\(n) consecutive failed connects, last: \(String(cString: strerror(err)))\".")
    }

    private func releaseServer(_ i: Int32) {
        let c = table[i]
        guard let server = c.pointee.server else { return }
        c.pointee.server = nil
        c.pointee.service?.service.stats.assigned.wrappingSubtract(1, ordering: .relaxed)
        returnSlot(server, c.pointee.service)
    }

    /// Gives a server's connection slot back and hands it to the oldest waiting connection.
    private func returnSlot(_ server: Server, _ svc: WorkerService?) {
        server.release()
        if let svc, svc.queueCount > 0 { serveQueue(svc) }
    }

    // MARK: - Queue

    private func enqueue(_ i: Int32, into svc: WorkerService) {
        let c = table[i]
        c.pointee.queueNext = -1
        c.pointee.queuePrev = svc.queueTail
        if svc.queueTail >= 0 { table[svc.queueTail].pointee.queueNext = i } else { svc.queueHead = i }
        svc.queueTail = i
        svc.queueCount += 1
        queued += 1
        let stats = svc.service.stats
        raiseMax(stats.queuedMax, to: stats.queued.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    private func dequeue(_ i: Int32, from svc: WorkerService) {
        let c = table[i]
        let n = c.pointee.queueNext
        let p = c.pointee.queuePrev
        if p >= 0 { table[p].pointee.queueNext = n } else { svc.queueHead = n }
        if n >= 0 { table[n].pointee.queuePrev = p } else { svc.queueTail = p }
        c.pointee.queueNext = -1
        c.pointee.queuePrev = -1
        svc.queueCount -= 1
        queued -= 1
        svc.service.stats.queued.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Hands freed server slots to waiting connections, oldest first.
    private func serveQueue(_ svc: WorkerService) {
        while svc.queueHead >= 0 {
            let i = svc.queueHead
            let hash = svc.balance == .source ? clientHash(table[i], svc) : 0
            guard let s = svc.pick(exclude: -1, hash: hash, now: now) else { return }
            let server = svc.service.servers[Int(s)]
            guard server.tryAcquire() else { return }
            dequeue(i, from: svc)
            wheel.disarm(i, in: table)
            attach(i, server, s, svc)
            startConnect(i)
        }
    }

    /// Slots freed on other workers are seen here, every loop turn while something waits.
    private func serveQueues() {
        for svc in services.values where svc.queueCount > 0 { serveQueue(svc) }
    }

    // MARK: - Timers

    private func armIdle(_ i: Int32) {
        let c = table[i]
        let svc = c.pointee.service!
        let due = min(c.pointee.lastClientIO + svc.clientMs, c.pointee.lastServerIO + svc.serverMs)
        wheel.arm(i, at: due, in: table)
    }

    private func onTimer(_ i: Int32) {
        let c = table[i]
        switch c.pointee.state {
        case .free:
            return
        case .proxyHeader:
            rejectProxy(i, "no complete header within the client timeout")
        case .queued:
            finish(i, .queueTimeout)
        case .connecting:
            if c.pointee.phaseDeadline <= now {
                connectFailed(i, ETIMEDOUT)
            } else {
                wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
            }
        case .established:
            // Activity only updates timestamps; the deadline is checked here, when the timer fires.
            let svc = c.pointee.service!
            if c.pointee.lastClientIO + svc.clientMs <= now {
                finish(i, .clientTimeout)
            } else if c.pointee.lastServerIO + svc.serverMs <= now {
                finish(i, .serverTimeout)
            } else {
                armIdle(i)
            }
        }
    }

    // MARK: - Relay

    private enum Step {
        case blocked
        case progressed
        case failed(EndReason)
    }

    /// Moves what can be moved in both directions, then closes the connection if both are done.
    private func pump(_ i: Int32) {
        let c = table[i]
        var more = false
        for k in 0..<2 {
            switch pumpDirection(i, up: k == 0) {
            case .failed(let r): return finish(i, r)
            case .progressed: more = true
            case .blocked: break
            }
        }
        if c.pointee.up.shut && c.pointee.down.shut { return finish(i, .done) }
        if more, !c.pointee.deferred {
            c.pointee.deferred = true
            deferredList.append(i)
        }
    }

    private func runDeferred() {
        guard !deferredList.isEmpty else { return }
        let n = deferredList.count
        for k in 0..<n {
            let i = deferredList[k]
            let c = table[i]
            guard c.pointee.deferred else { continue }
            c.pointee.deferred = false
            if c.pointee.state == .established { pump(i) }
        }
        deferredList.removeFirst(n)
    }

    /// One direction: flush what is in flight, pass on EOF, read more. Returns `.progressed`
    /// only when it stopped because of the fairness budget (more to do right away).
    private func pumpDirection(_ i: Int32, up: Bool) -> Step {
        let c = table[i]
        let src = up ? c.pointee.clientFd : c.pointee.serverFd
        let dst = up ? c.pointee.serverFd : c.pointee.clientFd
        var moved = 0
        while true {
            // 1. Flush what is in flight.
            if withDir(c, up, { $0.bufEnd > $0.bufStart }) {
                guard dstWritable(c, up) else { return .blocked }
                let (b, start, end) = withDir(c, up) { ($0.buffer, $0.bufStart, $0.bufEnd) }
                let r: IOResult<Int>
                do {
                    r = try Sys.send(dst, buffers[Int(b)] + Int(start), Int(end - start))
                } catch {
                    return .failed(up ? .serverReset : .clientReset)
                }
                guard case .done(let n) = r else {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                touch(c, dstIsClient: !up)
                withDir(c, up) { $0.bufStart += Int32(n) }
                if start + Int32(n) < end {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                withDir(c, up) {
                    $0.bufStart = 0
                    $0.bufEnd = 0
                }
                releaseBuffer(c, up)
            }
            if withDir(c, up, { $0.inPipe > 0 }) {
                guard dstWritable(c, up) else { return .blocked }
                let (p, inPipe) = withDir(c, up) { ($0.pipe, $0.inPipe) }
                let r: IOResult<Int>
                do {
                    r = try Sys.splice(from: pipeR[Int(p)], to: dst, inPipe)
                } catch {
                    return .failed(up ? .serverReset : .clientReset)
                }
                guard case .done(let n) = r else {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                touch(c, dstIsClient: !up)
                withDir(c, up) { $0.inPipe -= n }
                if n < inPipe {
                    // The socket took what fitted. Its buffer drains as ACKs arrive, often before
                    // the next call: with room in the pipe and more to read, read on and flush
                    // again (as HAProxy does); only EAGAIN, a full pipe or nothing to read means
                    // waiting for EPOLLOUT (the short write armed it).
                    let room = pipeCapacity - (inPipe - n)
                    if room < Worker.minRoom || !srcReadable(c, up) || withDir(c, up, { $0.eof }) || moved >= Worker.budget {
                        setDstWritable(c, up, false)
                        return .blocked
                    }
                }
            }
            // 2. Source finished and everything delivered: pass the FIN on.
            if withDir(c, up, { $0.eof }) {
                releasePipe(c, up)
                if !withDir(c, up, { $0.shut }) {
                    Sys.shutdownWrite(dst)
                    withDir(c, up) { $0.shut = true }
                }
                return .blocked
            }
            // 3. Read more.
            guard srcReadable(c, up) else {
                releasePipe(c, up)
                return .blocked
            }
            if moved >= Worker.budget { return .progressed }
            if withDir(c, up, { $0.splicing }), let p = acquirePipe(c, up) {
                let room = pipeCapacity - withDir(c, up) { $0.inPipe }
                let r: IOResult<Int>
                do {
                    r = try Sys.splice(from: src, to: pipeW[Int(p)], room)
                } catch {
                    return .failed(up ? .clientReset : .serverReset)
                }
                switch r {
                case .done(0):
                    withDir(c, up) { $0.eof = true }
                case .done(let n):
                    moved += n
                    withDir(c, up) {
                        $0.inPipe += n
                        $0.bytes &+= UInt64(n)
                    }
                    count(c, up, n, spliced: true)
                    touch(c, dstIsClient: up)
                case .wouldBlock:
                    // Ambiguous: the socket is empty or the pipe is full. With data in the pipe,
                    // flush and retry; with an empty pipe the socket is drained: back to copying.
                    if withDir(c, up, { $0.inPipe }) == 0 {
                        setSrcReadable(c, up, false)
                        releasePipe(c, up)
                        withDir(c, up) { $0.splicing = false }
                        return .blocked
                    }
                }
            } else {
                guard let b = acquireBuffer(c, up) else { return .blocked }
                let size = settings.copyBufferSize
                let r: IOResult<Int>
                do {
                    r = try Sys.recv(src, buffers[Int(b)], size)
                } catch {
                    releaseBuffer(c, up)
                    return .failed(up ? .clientReset : .serverReset)
                }
                switch r {
                case .done(0):
                    releaseBuffer(c, up)
                    withDir(c, up) { $0.eof = true }
                case .done(let n):
                    moved += n
                    withDir(c, up) {
                        $0.bufStart = 0
                        $0.bufEnd = Int32(n)
                        $0.bytes &+= UInt64(n)
                        // A full buffer means bulk: splice from now on. A short read means the
                        // socket is empty (edge-triggered epoll reports new data), unless the peer
                        // already hung up, when the FIN must still be read.
                        if n == size { $0.splicing = true }
                    }
                    count(c, up, n, spliced: false)
                    if n < size && !srcRdHup(c, up) { setSrcReadable(c, up, false) }
                    touch(c, dstIsClient: up)
                case .wouldBlock:
                    releaseBuffer(c, up)
                    setSrcReadable(c, up, false)
                    return .blocked
                }
            }
        }
    }

    /// Adds relayed bytes to this worker's slots of the service and the server.
    @inline(__always)
    private func count(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ n: Int, spliced: Bool) {
        let v = UInt64(n)
        if up {
            c.pointee.serviceSlot?.pointee.bytesIn &+= v
            c.pointee.serverSlot?.pointee.bytesIn &+= v
        } else {
            c.pointee.serviceSlot?.pointee.bytesOut &+= v
            c.pointee.serverSlot?.pointee.bytesOut &+= v
            if spliced { c.pointee.serviceSlot?.pointee.splicedOut &+= v }
        }
    }

    @inline(__always)
    private func withDir<R>(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ body: (inout Direction) -> R) -> R {
        up ? body(&c.pointee.up) : body(&c.pointee.down)
    }

    @inline(__always)
    private func dstWritable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.serverWritable : c.pointee.clientWritable
    }

    @inline(__always)
    private func setDstWritable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ v: Bool) {
        if up { c.pointee.serverWritable = v } else { c.pointee.clientWritable = v }
    }

    @inline(__always)
    private func srcReadable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.clientReadable : c.pointee.serverReadable
    }

    @inline(__always)
    private func setSrcReadable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ v: Bool) {
        if up { c.pointee.clientReadable = v } else { c.pointee.serverReadable = v }
    }

    @inline(__always)
    private func srcRdHup(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.clientRdHup : c.pointee.serverRdHup
    }

    @inline(__always)
    private func touch(_ c: UnsafeMutablePointer<Conn>, dstIsClient: Bool) {
        // Reading from one side and writing to the other are both activity on that side.
        if dstIsClient { c.pointee.lastClientIO = now } else { c.pointee.lastServerIO = now }
    }

    // MARK: - Pools

    private func acquirePipe(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Int32? {
        let have = withDir(c, up) { $0.pipe }
        if have >= 0 { return have }
        let p: Int32
        if let f = pipeFree.popLast() {
            p = f
        } else {
            do {
                let (r, w) = try Pipe.create()
                do {
                    pipeCapacity = try Pipe.setSize(w, settings.pipeSize)
                } catch {
                    // Above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: keep the kernel default.
                    if !warnedPipeSize {
                        warnedPipeSize = true
                        logger.warning("worker \(id): cannot set pipe size to \(settings.pipeSize) (\(error)); using the kernel default")
                    }
                    pipeCapacity = Int(ballast_get_pipe_size(w))
                }
                if let dead = deadPipes.popLast() {
                    p = dead
                    pipeR[Int(p)] = r
                    pipeW[Int(p)] = w
                } else {
                    p = Int32(pipeR.count)
                    pipeR.append(r)
                    pipeW.append(w)
                }
            } catch {
                // No pipe (out of descriptors): this direction copies instead.
                withDir(c, up) { $0.splicing = false }
                return nil
            }
        }
        withDir(c, up) { $0.pipe = p }
        pipesTotal.store(pipeR.count - deadPipes.count, ordering: .relaxed)
        pipesIdle.store(pipeFree.count, ordering: .relaxed)
        return p
    }

    /// Returns an empty pipe to the pool; a pipe that still holds bytes (aborted connection) is closed.
    private func releasePipe(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) {
        let (p, inPipe) = withDir(c, up) { ($0.pipe, $0.inPipe) }
        guard p >= 0 else { return }
        withDir(c, up) {
            $0.pipe = -1
            $0.inPipe = 0
        }
        if inPipe == 0 && pipeFree.count < Worker.maxIdlePipes {
            pipeFree.append(p)
        } else {
            closePipe(p)
        }
        pipesTotal.store(pipeR.count - deadPipes.count, ordering: .relaxed)
        pipesIdle.store(pipeFree.count, ordering: .relaxed)
    }

    private func closePipe(_ p: Int32) {
        Sys.close(pipeR[Int(p)])
        Sys.close(pipeW[Int(p)])
        // The slot is reused by the next pipe created.
        pipeR[Int(p)] = -1
        pipeW[Int(p)] = -1
        deadPipes.append(p)
    }

    private var deadPipes: [Int32] = []
    private var warnedPipeSize = false

    private func acquireBuffer(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Int32? {
        let have = withDir(c, up) { $0.buffer }
        if have >= 0 { return have }
        let b: Int32
        if let f = bufferFree.popLast() {
            b = f
        } else {
            b = Int32(buffers.count)
            buffers.append(.allocate(byteCount: settings.copyBufferSize, alignment: 16))
        }
        withDir(c, up) { $0.buffer = b }
        return b
    }

    private func releaseBuffer(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) {
        let b = withDir(c, up) { $0.buffer }
        guard b >= 0 else { return }
        withDir(c, up) {
            $0.buffer = -1
            $0.bufStart = 0
            $0.bufEnd = 0
        }
        bufferFree.append(b)
    }

    // MARK: - Close

    /// Ends a connection: both sockets closed (with a RST towards a peer whose partner reset),
    /// pools and server slot returned, slot freed.
    /// The service's access list and per-client limits for a new client: a refused one is reset
    /// at once (HAProxy's `tcp-request connection reject`), counted, and logged by the admin
    /// thread's once-a-second summary, never here (a flood must not become a log flood).
    private func admit(_ i: Int32) -> Bool {
        let c = table[i]
        guard let svc = c.pointee.service?.service else { return true }
        let access = svc.stats.access
        guard access.active.load(ordering: .relaxed) else { return true }
        var refusal: Refusal?
        switch access.check(c.pointee.clientAddr) {
        case .denied: refusal = .denied
        case .notAllowed: refusal = .notAllowed
        case .admitted:
            let limits = svc.config.limits
            if !limits.isEmpty {
                refusal = access.tracker.admit(c.pointee.clientAddr, limits: limits, now: now)
                c.pointee.sourceCounted = refusal == nil
            }
        }
        guard let refusal else { return true }
        access.count(refusal, from: c.pointee.clientAddr)
        finish(i, .refused)
        return false
    }

    private func finish(_ i: Int32, _ reason: EndReason) {
        let c = table[i]
        guard c.pointee.state != .free else { return }
        if c.pointee.sourceCounted, let svc = c.pointee.service {
            svc.service.stats.access.tracker.release(c.pointee.clientAddr)
        }
        wheel.disarm(i, in: table)
        if c.pointee.state == .queued, let svc = c.pointee.service { dequeue(i, from: svc) }
        releasePipe(c, true)
        releasePipe(c, false)
        releaseBuffer(c, true)
        releaseBuffer(c, false)
        if c.pointee.clientFd >= 0 {
            if reason == .serverReset || reason == .refused { Socket.setLingerZero(c.pointee.clientFd) }
            Sys.close(c.pointee.clientFd)
        }
        if c.pointee.serverFd >= 0 {
            if reason == .clientReset { Socket.setLingerZero(c.pointee.serverFd) }
            Sys.close(c.pointee.serverFd)
        }
        if settings.logConnections { logClose(c, reason) }
        let server = c.pointee.server
        let svc = c.pointee.service
        switch reason {
        case .clientReset:
            c.pointee.serviceSlot?.pointee.clientAborts &+= 1
            if server != nil { c.pointee.serverSlot?.pointee.clientAborts &+= 1 }
        case .serverReset:
            c.pointee.serviceSlot?.pointee.serverAborts &+= 1
            c.pointee.serviceSlot?.pointee.responseErrors &+= 1
            if server != nil {
                c.pointee.serverSlot?.pointee.serverAborts &+= 1
                c.pointee.serverSlot?.pointee.responseErrors &+= 1
            }
        case .badProxyHeader:
            c.pointee.serviceSlot?.pointee.requestErrors &+= 1
        default:
            break
        }
        if let stats = svc?.service.stats, c.pointee.serviceSlot != nil {
            stats.clients.wrappingSubtract(1, ordering: .relaxed)
            if server != nil { stats.assigned.wrappingSubtract(1, ordering: .relaxed) }
        }
        c.pointee.server = nil
        table.free(i)
        shared.connections.wrappingSubtract(1, ordering: .relaxed)
        // After the slot is free: serving the queue may start (or end) other connections.
        if let server { returnSlot(server, svc) }
        if pausedForMaxconn { maybeResumeListeners() }
    }

    private func logClose(_ c: UnsafeMutablePointer<Conn>, _ reason: EndReason) {
        let client = SocketAddress(storage: c.pointee.clientAddr)?.description ?? "?"
        let svcName = c.pointee.service?.name ?? "?"
        var serverName = "-"
        if let svc = c.pointee.service, c.pointee.serverIndex >= 0 {
            serverName = svc.service.servers[Int(c.pointee.serverIndex)].name
        }
        logger.info(
            "connection closed",
            metadata: [
                "service": "\(svcName)", "server": "\(serverName)", "client": "\(client)",
                "bytes_in": "\(c.pointee.up.bytes)", "bytes_out": "\(c.pointee.down.bytes)",
                "duration_ms": "\(now - c.pointee.acceptedAt)", "end": "\(reason)",
            ])
    }

    /// One `show sess` line per open connection, HAProxy's `key=value` style.
    private func describeSessions() -> [String] {
        var out: [String] = []
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            let c = table[i]
            guard c.pointee.state != .free else { continue }
            let client = SocketAddress(storage: c.pointee.clientAddr)
            let proto = client.map { $0.family == AF_INET6 ? "tcpv6" : "tcpv4" } ?? "tcpv4"
            let svc = c.pointee.service?.name ?? "<NONE>"
            let srv = c.pointee.server?.name ?? "<none>"
            let state: String
            switch c.pointee.state {
            case .free: state = "free"
            case .proxyHeader: state = "proxy-header"
            case .queued: state = "queued"
            case .connecting: state = "connecting"
            case .established: state = "established"
            }
            let age = (now - c.pointee.acceptedAt) / 1000
            let id = SessionID.make(worker: self.id, index: i, generation: c.pointee.gen)
            out.append(
                "\(SessionID.text(id)): proto=\(proto) src=\(client?.description ?? "?") fe=\(svc) be=\(svc) srv=\(srv) ts=00 age=\(age)s state=\(state) thr=\(self.id) bin=\(c.pointee.up.bytes) bout=\(c.pointee.down.bytes) scf=[fd=\(c.pointee.clientFd)] scb=[fd=\(c.pointee.serverFd)]"
            )
        }
        return out
    }

    /// Closes the established or connecting connections that `matches` selects.
    private func closeConnections(reason: EndReason, _ matches: (Conn) -> Bool) {
        var closed = 0
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            let c = table[i]
            guard c.pointee.state == .established || c.pointee.state == .connecting, matches(c.pointee) else { continue }
            finish(i, reason)
            closed += 1
        }
        if closed > 0 { logger.info("worker \(id): closed \(closed) connections (\(reason))") }
    }

    private func closeEverything() {
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            if table[i].pointee.state != .free { finish(i, .shutdown) }
        }
        for k in listeners.indices {
            if let l = listeners[k] {
                Sys.close(l.fd)
                listeners[k] = nil
            }
        }
        for p in pipeR.indices where pipeR[p] >= 0 {
            Sys.close(pipeR[p])
            Sys.close(pipeW[p])
        }
        Sys.close(wakeFd)
        Sys.close(epfd)
    }
}
