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

/// One data-plane thread: its own event loop, listeners (one `SO_REUSEPORT` socket per bind),
/// connection table, pipe and buffer pools, timer wheel and per-service schedulers.
/// A connection lives on one worker from accept to close; nothing here takes a lock except the
/// inbox, which is read only when the runtime kicks the eventfd (reload, stop).
public final class Worker: @unchecked Sendable {
    public let id: Int
    let loop: EventLoop
    let shared: ProxyShared
    let logger: Logger
    let inbox = Mutex<[WorkerCommand]>([])

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

    var settings: WorkerSettings
    let table: ConnTable
    var wheel: TimerWheel
    var now: Int64
    var running = true

    // Listeners: parallel arrays indexed by listener slot.
    struct Listener {
        var fd: Int32
        var address: SocketAddress
        var service: WorkerService
        var acceptProxy: Bool
        var paused = false
        var gen: UInt32
    }
    var listeners: [Listener?] = []
    var listenerGen: UInt32 = 0
    var pausedUntil: Int64 = 0
    var pausedForMaxconn = false
    var pausedForFds = false

    var services: [String: WorkerService] = [:]
    var queued = 0

    // Pools. Idle pipes and buffers are kept up to a cap; in-flight ones belong to a direction.
    var pipes: PipePool
    var buffers: BufferPool

    /// The io_uring engine's ring (made on the worker's thread); nil with the epoll engine.
    var ring: Ring?
    /// Receives that found every buffer in flight (connection, generation, direction).
    var starved: [(Int32, UInt32, Bool)] = []

    var deferredList: [Int32] = []
    var expired: [Int32] = []
    static let maxEvents: Int32 = 256
    /// Bytes one direction may move per wake-up before yielding to other connections.
    static let budget = 4 << 20
    /// Room a pipe needs for a read between two partial flushes to be worth it.
    static let minRoom = 64 << 10

    /// What an event token's index refers to: a connection's client or server socket (index
    /// in the connection table) or a listener (slot in `listeners`).
    enum Kind: UInt8 {
        case client = 0
        case server = 1
        case listener = 2
    }

    public init(id: Int, shared: ProxyShared, settings: WorkerSettings, logger: Logger) throws(SysError) {
        self.id = id
        self.shared = shared
        self.settings = settings
        self.logger = logger
        self.loop = try EventLoop(capacity: Worker.maxEvents)
        self.table = ConnTable(capacity: settings.tableCapacity)
        self.now = monotonicMillis()
        self.wheel = TimerWheel(now: now)
        self.pipes = PipePool(size: settings.pipeSize)
        self.buffers = BufferPool(size: settings.copyBufferSize)
        deferredList.reserveCapacity(1024)
        expired.reserveCapacity(1024)
    }

    deinit {
        buffers.deallocateAll()
    }

    /// Queues a command and wakes the worker. Callable from any thread. A ping (four a second,
    /// from the runtime) is a flag, not a queued command: it allocates nothing.
    public func send(_ command: WorkerCommand) {
        if case .ping = command {
            pingPending.store(true, ordering: .releasing)
        } else {
            inbox.withLock { $0.append(command) }
        }
        loop.wake()
    }

    let pingPending = Atomic<Bool>(false)

    // MARK: - Loop

    /// Runs the event loop on the calling thread until `.exit`.
    public func run() {
        if settings.engine.usesRing { ring = makeRing() }
        while running && turn() {}
        closeEverything()
        finished.store(true, ordering: .releasing)
    }

    /// One turn of the loop: wait (at most until the next timer, or `maxWaitMs`), handle what is
    /// ready, run deferred work, timers and queues. False when the loop cannot go on.
    func turn(maxWaitMs: Int32 = -1) -> Bool {
        if let ring { return ringTurn(ring, maxWaitMs: maxWaitMs) }
        let n: Int
        do {
            n = try loop.wait(timeoutMs: waitTimeout(maxWaitMs))
        } catch {
            logger.critical("worker \(id): \(error)")
            return false
        }
        now = monotonicMillis()
        dispatchEvents(n)
        afterEvents()
        return true
    }

    /// How long a turn may wait (both engines): at most `maxWaitMs` (-1: no limit) and until the
    /// next timer; not at all with deferred relays; 10 ms while connections queue or listeners
    /// are paused (their state is polled).
    func waitTimeout(_ maxWaitMs: Int32) -> Int32 {
        var timeout = maxWaitMs
        if let t = wheel.timeoutMs(now: now) { timeout = timeout < 0 ? t : min(timeout, t) }
        if !deferredList.isEmpty { timeout = 0 }
        if queued > 0 || pausedForMaxconn || pausedForFds { timeout = timeout < 0 ? 10 : min(timeout, 10) }
        return timeout
    }

    /// Handles the `n` events the last `loop.wait` returned.
    func dispatchEvents(_ n: Int) {
        for k in 0..<n {
            let (token, ev) = loop.event(at: k)
            dispatch(token, ev)
        }
    }

    /// The end of every turn, after the events (both engines): deferred relays, expired timers,
    /// queued connections, paused listeners.
    func afterEvents() {
        runDeferred()
        expired.removeAll(keepingCapacity: true)
        wheel.advance(now: now, in: table, into: &expired)
        for i in expired { onTimer(i) }
        if queued > 0 { serveQueues() }
        if pausedForMaxconn || pausedForFds { maybeResumeListeners() }
    }

    @inline(__always)
    func token(_ i: Int32, _ kind: Kind, _ gen: UInt32) -> EventToken {
        EventToken(index: i, kind: kind.rawValue, generation: gen)
    }

    func dispatch(_ token: EventToken, _ ev: UInt32) {
        if token.isWake { return processInbox() }
        let index = token.index
        guard let kind = Kind(rawValue: token.kind) else { return }
        switch kind {
        case .listener:
            guard Int(index) < listeners.count, let l = listeners[Int(index)], token.matches(l.gen) else { return }
            acceptLoop(Int(index))
        case .client, .server:
            let c = table[index]
            guard c.pointee.state != .free, token.matches(c.pointee.gen) else { return }
            // With io_uring, epoll only reads PROXY headers (and the ring may have the socket now).
            if ring != nil && (kind == .server || c.pointee.state == .established) { return }
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
                    connectCompleted(index, failed: ev & (Epoll.err | Epoll.hup) != 0)
                    return
                }
            }
            if c.pointee.state == .established { pump(index) }
        }
    }

    // MARK: - Inbox

    func processInbox() {
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
                    pipes.resize(pipeSize)
                }
            case .stopAccepting:
                for k in listeners.indices {
                    if let l = listeners[k] {
                        loop.remove(l.fd)
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

    func apply(_ snapshot: ServiceTable, _ specs: [ListenerSpec]) {
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
                loop.remove(l.fd)
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
                listeners[slot] = Listener(
                    fd: spec.fd, address: spec.address, service: svc, acceptProxy: spec.acceptProxy, gen: listenerGen)
            } else {
                slot = listeners.count
                listeners.append(
                    Listener(
                        fd: spec.fd, address: spec.address, service: svc, acceptProxy: spec.acceptProxy,
                        gen: listenerGen))
            }
            let paused = pausedForMaxconn || pausedForFds
            listeners[slot]!.paused = paused
            do {
                try loop.add(spec.fd, paused ? 0 : Epoll.in, token(Int32(slot), .listener, listenerGen))
            } catch {
                logger.error("worker \(id): cannot watch listener \(spec.address): \(error)")
            }
        }
    }

}
