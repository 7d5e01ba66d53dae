import BallastCore
import BallastHealth
import BallastIO
import BallastNat
import BallastProxy
import CLinux
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Reads a config file and parses it; every failure is a `ConfigError` with file:line:column.
/// Only a regular file of at most 16 MiB is read (a FIFO or `/dev/zero` is refused at once).
public func loadConfig(path: String) throws(ConfigError) -> Config {
    switch RegularFile.text(path) {
    case .failure(let e):
        throw ConfigError(SourceLocation(file: path, line: 0, column: 0), "cannot read the config: \(e)")
    case .success(let text): return try ConfigLoader.load(path: path, contents: text, resolve: Resolver.system)
    }
}

/// Listeners are identified by address; a port-0 bind (the kernel picks the port) belongs to its
/// service, since two services may both ask for port 0.
func listenerKey(_ b: BindConfig, _ service: String) -> String {
    b.address.port == 0 ? "\(service)#\(b.address)" : b.address.description
}

/// The listening sockets of one bind address: one per worker, all bound with `SO_REUSEPORT`.
struct BoundListener {
    var configured: SocketAddress
    var actual: SocketAddress
    var service: String
    var fds: [Int32]
}

/// Opens one socket per worker for `bind`. Port 0 picks a free port once; the other workers bind
/// the same one. On failure closes what it opened and reports the config location.
func openListeners(_ bind: BindConfig, service: String, count: Int, listen: Bool = true) throws(ConfigError)
    -> BoundListener
{
    var fds: [Int32] = []
    var address = bind.address
    for _ in 0..<count {
        do {
            let fd = try Socket.listen(
                address, reusePort: true, backlog: Int32(Defaults.backlog), freebind: bind.freebind, listen: listen)
            if address.port == 0, let actual = Socket.localAddress(fd) { address = actual }
            fds.append(fd)
        } catch {
            for fd in fds { Sys.close(fd) }
            var why = String(cString: strerror(error.errno))
            if error.errno == EADDRNOTAVAIL && !bind.freebind {
                why += " (address not on this host; for a floating address set freebind: true)"
            }
            throw ConfigError(bind.location, "service '\(service)': cannot bind \(bind.address): \(why)")
        }
    }
    return BoundListener(configured: bind.address, actual: address, service: service, fds: fds)
}

/// The start-up of the components, in order. A step registers how to stop its component before
/// starting it; `unwind` stops every registered one in reverse. This is swift-service-lifecycle's
/// `ServiceGroup` contract kept without it: Ballast's components are OS threads with their own
/// event loops (a data plane that must not hop executors), started synchronously, some of them
/// as root before privileges are dropped, and a graceful stop has an order of its own (listeners
/// first, connections drained for `grace`, then the rest); ServiceGroup runs async `Service`s as
/// child tasks and cancels them together, which fits neither.
struct StartSequence {
    private(set) var started: [(name: String, stop: () -> Void)] = []

    mutating func step(_ name: String, stop: @escaping () -> Void = {}, _ body: () throws -> Void) throws {
        started.append((name, stop))
        try body()
    }

    /// Stops what was started (or began to start), last first.
    func unwind() {
        for s in started.reversed() { s.stop() }
    }
}

/// A start-up step that failed, with what to log (nil: the step logged it already).
struct StartFailure: Error {
    var message: String?
    init(_ message: String?) { self.message = message }
}

/// Owns the workers and the listeners, applies configs, reloads on SIGHUP and stops gracefully on
/// SIGTERM/SIGINT. Signals are read from a signalfd on the main thread; the data-plane threads
/// have them blocked and hear about them through their eventfds.
public final class Runtime {
    let configPath: String
    var config: Config
    var table: ServiceTable
    private var listeners: [String: BoundListener] = [:]
    var workers: [Worker] = []
    private var threads: [pthread_t] = []
    private let shared: ProxyShared
    let logger: Logger
    var generation: UInt64 = 1
    var checker: HealthChecker?
    private let notifier = SystemdNotifier.fromProcessEnvironment()
    /// Workers' answers to the last watchdog round (each bumps its heartbeat on any command).
    private var lastHeartbeats: [Int] = []
    /// What each service does on health transitions; read by the checker thread.
    private let actions = ServiceActions()
    /// Connection tables are sized for this at start.
    private let startMaxconn: Int
    /// The runtime API and /metrics.
    private var admin: AdminServer?
    var adminContext: AdminContext?
    /// nat mode: the kernel's rules and maps.
    var nat: NatController?
    /// Where every server state change is announced (schedulers, nat mode).
    let states: ServerStates
    /// The config as the file says it; `config` is this with `serverChanges` laid over it.
    var fileConfig: Config
    /// `add server`, `del server`, `set server … addr`: kept while their service's text stays.
    /// The runtime API's copy (saved with the state) follows every change.
    var serverChanges = RuntimeServers() {
        didSet {
            let now = serverChanges
            adminContext?.serverChanges.withLock { $0 = now }
        }
    }
    /// The state file as it was at start (read once: the server changes it keeps are laid over
    /// the config in `init`, the servers' state restored in `run`).
    private var savedState: Result<String, RegularFile.Failure>?
    /// Server changes from the runtime API, for the main thread.
    private var changes: ChangeQueue?
    /// Servers given by DNS name, looked up again while Ballast runs.
    private var dns: DNSWatcher?

    public static func bootstrapLogging(_ config: LogConfig) {
        LogState.set(config)
        LoggingSystem.bootstrap { label in LineLogHandler(label: label) }
    }

    public init(configPath: String, config: Config) {
        self.configPath = configPath
        var config = config
        // As HAProxy: without a maxconn in the file, the default is what the descriptor limit
        // allows (a default never warns on a host with a lower limit).
        if !config.global.maxconnExplicit { config.global.maxconn = Runtime.defaultMaxconn() }
        self.fileConfig = config
        self.logger = Logger(label: "ballast")
        // Servers added, deleted or moved at run time by the last run, while their service's
        // text is the same (the state file keeps them).
        var dropped: [String] = []
        savedState = config.global.stateFile.map { RegularFile.text($0) }
        if case .success(let text) = savedState {
            serverChanges = StateFile.parseChanges(text)
            (config, dropped) = serverChanges.apply(to: config)
        }
        self.config = config
        // Counter slots per server and service: one per worker, fixed before any table exists.
        states = ServerStates(slots: config.global.workers ?? max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        self.table = ServiceTable.build(
            config: config, generation: 1, previous: nil, now: monotonicMillis(), states: states)
        self.shared = ProxyShared(maxconn: config.global.maxconn)
        self.startMaxconn = config.global.maxconn
        for name in dropped {
            logger.notice(
                "state file: the server changes made at run time to service \(name) are dropped: the config changed the service"
            )
        }
        for (name, c) in serverChanges.services {
            logger.info(
                "state file: service \(name) keeps the server changes made at run time (\(c.added.count) added, \(c.deleted.count) deleted, \(c.addresses.count) moved)"
            )
        }
    }

    var workerCount: Int {
        if let w = config.global.workers { return w }
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    /// Runs until stopped by a signal. Returns the process exit code.
    public func run() -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        // Runtime API replies (show stat with many servers) are large and short-lived: keep
        // such buffers in the heap instead of mapping and faulting in fresh pages each time.
        ballast_tune_malloc()
        let signals = [SIGTERM, SIGINT, SIGHUP]
        SignalFd.block(signals)
        // The main thread's loop: signals (a signalfd) and, through its wake-up, the server
        // changes the runtime API asks for.
        let sigfd: Int32
        let events: EventLoop
        do {
            sigfd = try SignalFd.create(signals)
            events = try EventLoop(capacity: 4)
            try events.add(sigfd, Epoll.in, EventToken(index: 0))
        } catch {
            logger.critical("cannot receive signals: \(error)")
            return 1
        }
        if !raiseFileLimit() { return 1 }

        // The components, in order; each one's stop is registered before it starts, so a
        // failure anywhere (a step's own, or one injected by a test) stops what was started,
        // in reverse, and the process leaves no table, socket file or thread behind.
        var startup = StartSequence()
        let ctx: AdminContext
        do {
            // Bind everything before any thread starts: a bind error stops start-up whole.
            try startup.step("listeners", stop: { [self] in closeAllListeners() }) {
                for svc in config.services where svc.mode == .proxy {
                    for b in svc.binds {
                        listeners[listenerKey(b, svc.name)] = try openListeners(
                            b, service: svc.name, count: workerCount)
                    }
                }
            }
            // The runtime API sockets are created as root too, with their configured owner and mode.
            try startup.step("runtime API sockets", stop: { [self] in stopAdmin() }) {
                do {
                    let a = try AdminServer(config: config.global, logger: logger)
                    admin = a
                    try a.open(config.global)
                } catch let error as ConfigError {
                    throw StartFailure(error.description)
                } catch {
                    throw StartFailure("cannot start the runtime API: \(error)")
                }
                try injected(.admin)
            }
            restoreState()
            // nat mode: program the kernel before anything serves; a failure names the object
            // and leaves nothing half-applied (one atomic batch per family).
            try startup.step("nat tables", stop: { [self] in stopNat(removing: true) }) {
                guard config.services.contains(where: { $0.mode.isKernel }) else { return }
                var created: NatController?
                do {
                    let n = try NatController(logger: logger)
                    created = n
                    try n.apply(table)
                    nat = n
                } catch {
                    created?.remove()  // a family programmed before another failed goes too
                    let hint =
                        geteuid() != 0 && ballast_has_net_admin() == 0
                        ? " (nat mode needs CAP_NET_ADMIN: start Ballast as root, with global.user to drop to)" : ""
                    throw StartFailure("nat: \(error)\(hint)")
                }
                logger.info(
                    "nat: programmed table \(NatController.tableName) (ip/ip6 for nat, netdev for dsr) for \(NatController.natServices(config).count) services"
                )
                try injected(.nat)
            }
            try startup.step("privileges") {
                if !dropPrivileges() { throw StartFailure(nil) }
            }
            try startup.step("workers", stop: { [self] in stopWorkers() }) {
                let settings = WorkerSettings(
                    pipeSize: config.global.pipeSize, copyBufferSize: Defaults.copyBufferSize,
                    tableCapacity: config.global.maxconn, logConnections: config.global.log.connections,
                    engine: chooseEngine())
                do {
                    for id in 0..<workerCount {
                        workers.append(try Worker(id: id, shared: shared, settings: settings, logger: logger))
                    }
                } catch {
                    throw StartFailure("cannot create worker: \(error)")
                }
                try injected(.workers)
                publish()
                for w in workers { threads.append(NamedThread.start("ballast-w\(w.id)") { w.run() }) }
            }
            setActions(config)
            let transition = transitionAction()
            try startup.step("health checks", stop: { [self] in stopChecker() }) {
                do {
                    let c = try HealthChecker(logger: logger, onTransition: transition)
                    c.update(table)
                    c.start()
                    checker = c
                } catch {
                    throw StartFailure("cannot start health checks: \(error)")
                }
                try injected(.checker)
            }
            let context = AdminContext(
                table: table, checker: checker, workers: workers, shared: shared, logger: logger,
                hardMaxconn: startMaxconn, onTransition: transition)
            context.stateFile.withLock { $0 = config.global.stateFile }
            context.serverChanges.withLock { $0 = serverChanges }
            try startup.step("DNS thread", stop: { [self] in stopDNS() }) {
                do {
                    let queue = ChangeQueue(waking: events)
                    changes = queue
                    context.changeServers = { queue.ask($0) }
                    let d = try DNSWatcher(logger: logger, resolve: Resolver.system) { context.table }
                    dns = d
                    d.start()
                } catch {
                    throw StartFailure("cannot start the DNS resolver thread: \(error)")
                }
            }
            ctx = context
        } catch {
            if let message = (error as? StartFailure)?.message ?? (error is StartFailure ? nil : "\(error)") {
                logger.critical("\(message)")
            }
            startup.unwind()
            return 1
        }
        ctx.listeners.store(listeners.values.reduce(0) { $0 + $1.fds.count }, ordering: .relaxed)
        adminContext = ctx
        if let admin, admin.hasListeners {
            admin.ctx = ctx
            admin.start()
            for n in admin.names { logger.info("\(n) ready") }
        }
        ctx.saveState()
        ctx.nat = nat
        nat?.start(following: states)
        for svc in config.services where svc.mode.isKernel {
            let how = svc.mode == .dsr ? "interface \(svc.interface ?? "")" : "snat \(svc.snat)"
            logger.info(
                "service \(svc.name) (\(svc.mode.rawValue)) on \(svc.binds.map(\.address.description).joined(separator: ", ")), \(svc.servers.count) servers, balance \(svc.balance.rawValue), \(how)"
            )
        }
        for svc in config.services where svc.mode == .proxy {
            let binds = svc.binds.map { listeners[listenerKey($0, svc.name)]!.actual.description }.joined(
                separator: ", ")
            logger.info(
                "service \(svc.name) listening on \(binds), \(svc.servers.count) servers, balance \(svc.balance.rawValue)"
            )
        }
        for w in config.warnings { logger.warning("\(w)") }
        logger.info(
            "ballast \(BallastVersion.string) started",
            metadata: [
                "pid": "\(getpid())", "workers": "\(workerCount)", "maxconn": "\(config.global.maxconn)",
                "config": "\(configPath)",
            ])

        notifier?.send("READY=1\nSTATUS=serving \(config.services.count) services\nMAINPID=\(getpid())")
        // Watchdog: ping at half systemd's interval, and only while every worker answers.
        // Every worker is also pinged four times a second, so `ballast health` can tell a stuck
        // one (its last answer grows old) from an idle one.
        let tick = min(
            Self.healthPingMs, notifier?.watchdogMicros.map { Int32(max(10, $0 / 2000)) } ?? Self.healthPingMs)
        var refusals = RefusalReport()
        while true {
            let n: Int
            do {
                n = try events.wait(timeoutMs: tick)
            } catch {
                logger.critical("main loop: \(error)")
                break
            }
            if (0..<n).contains(where: { events.event(at: $0).token.isWake }) { changes?.serve { apply($0) } }
            if notifier?.watchdogMicros != nil { watchdog() }
            refusals.tick(ctx.table, logger: logger, now: monotonicMillis())
            for w in workers { w.send(.ping) }
            while let sig = SignalFd.next(sigfd) {
                switch sig {
                case SIGHUP:
                    reload()
                default:
                    logger.info("received \(sig == SIGINT ? "SIGINT" : "SIGTERM"), stopping")
                    let code = shutdown(sigfd: sigfd, events)
                    Sys.close(sigfd)
                    return code
                }
            }
            if workers.contains(where: { $0.finished.load(ordering: .acquiring) }) {
                logger.critical("a worker stopped unexpectedly; exiting")
                return 1
            }
        }
        return 1
    }

    static let healthPingMs: Int32 = 250

    /// The start-up steps, in order; `BALLAST_TEST_FAIL_START=<step>` makes one fail (tests
    /// check that a failed start leaves nothing behind).
    enum StartStep: String { case admin, nat, workers, checker }

    struct InjectedFailure: Error, CustomStringConvertible {
        var step: StartStep
        var description: String { "failure injected at \(step.rawValue) (BALLAST_TEST_FAIL_START)" }
    }

    private func injected(_ step: StartStep) throws {
        if let v = getenv("BALLAST_TEST_FAIL_START"), String(cString: v) == step.rawValue {
            throw InjectedFailure(step: step)
        }
    }

    /// Component stops, for a start that failed part-way (each tolerates a component that
    /// started only in part) and for the end of a graceful stop.
    func closeAllListeners() {
        for l in listeners.values { for fd in l.fds { Sys.close(fd) } }
        listeners.removeAll()
    }

    func stopAdmin() {
        admin?.stop()
        admin = nil
    }

    func stopNat(removing: Bool) {
        nat?.stop()
        if removing { nat?.remove() }
        nat = nil
    }

    func stopWorkers() {
        for w in workers { w.send(.exit) }
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
        workers.removeAll()
    }

    func stopChecker() {
        checker?.stop()
        checker = nil
    }

    func stopDNS() {
        dns?.stop()
        dns = nil
        changes = nil
    }

    /// Runtime server state saved by the last run (drain, maint, weights, forced health).
    private func restoreState() {
        guard let path = config.global.stateFile, let saved = savedState else { return }
        savedState = nil
        switch saved {
        case .success(let text):
            for line in StateFile.restore(text, into: table) { logger.info("\(line)") }
        case .failure(.cannotOpen(errno: ENOENT)):
            break  // the first start: nothing saved yet
        case .failure(let e):
            logger.warning("state file \(path) not restored: \(e)")
        }
    }

    /// What a service does when a server goes down or comes back (checks, CLI, passive).
    private func transitionAction() -> @Sendable (String, Server, Bool) -> Void {
        let workers = self.workers
        let actions = self.actions
        let nat = self.nat
        return { service, server, up in
            guard let (down, upAction) = actions.map.withLock({ $0[service] }) else { return }
            if !up && down == .shutdownSessions, let nat, nat.isNat(service) {
                // The map drops the server first (the state change woke the nat thread); then
                // its flows go, so their clients get a reset instead of hanging.
                nat.sync()
                nat.flush(service: service, server: server)
            }
            if !up && down == .shutdownSessions {
                for w in workers { w.send(.shutdownSessions(server)) }
            } else if up && upAction == .shutdownBackupSessions {
                for w in workers { w.send(.shutdownBackupSessions(service: service)) }
            }
        }
    }

    /// Sends `WATCHDOG=1` when every worker has processed the previous round's ping; a stuck
    /// worker stops the pings and systemd restarts the service.
    private func watchdog() {
        let beats = workers.map { $0.heartbeat.load(ordering: .relaxed) }
        if lastHeartbeats.isEmpty || zip(beats, lastHeartbeats).allSatisfy({ $0 > $1 }) {
            notifier?.send("WATCHDOG=1")
            lastHeartbeats = beats
            for w in workers { w.send(.ping) }
        }
    }

    private func setActions(_ config: Config) {
        var a: [String: (MarkedDownAction, MarkedUpAction)] = [:]
        for s in config.services { a[s.name] = (s.onMarkedDown, s.onMarkedUp) }
        actions.map.withLock { $0 = a }
    }

    /// Sends each worker the current table and its own listener sockets.
    func publish() {
        for (k, w) in workers.enumerated() {
            var specs: [ListenerSpec] = []
            for svc in config.services where svc.mode == .proxy {
                for b in svc.binds {
                    guard let l = listeners[listenerKey(b, svc.name)], k < l.fds.count else { continue }
                    specs.append(
                        ListenerSpec(fd: l.fds[k], serviceName: svc.name, address: l.actual, acceptProxy: b.acceptProxy)
                    )
                }
            }
            w.send(
                .apply(table, specs, logConnections: config.global.log.connections, pipeSize: config.global.pipeSize))
        }
    }

    /// SIGHUP: validate the new file; on any error keep serving the old config. Listeners whose
    /// address stays are kept open (no refused connection); established connections are never cut.
    func reload() {
        logger.info("received SIGHUP, reloading \(configPath)")
        notifier?.send("RELOADING=1\nMONOTONIC_USEC=\(monotonicNanos() / 1000)")
        defer { notifier?.send("READY=1") }
        var next: Config
        do {
            next = try loadConfig(path: configPath)
        } catch {
            logger.error("reload failed, keeping the current configuration: \(error)")
            return
        }
        for w in next.warnings { logger.warning("\(w)") }
        if !next.global.maxconnExplicit { next.global.maxconn = startMaxconn }
        // Server changes made at run time stay over the reload while their service's text does.
        let file = next
        var kept = serverChanges
        let dropped: [String]
        (next, dropped) = kept.apply(to: next)
        var opened: [String: BoundListener] = [:]
        var keptListeners: [String: BoundListener] = [:]
        do {
            for svc in next.services where svc.mode == .proxy {
                for b in svc.binds {
                    let key = listenerKey(b, svc.name)
                    if var l = listeners[key] {
                        l.service = svc.name
                        keptListeners[key] = l
                    } else {
                        opened[key] = try openListeners(b, service: svc.name, count: workers.count)
                    }
                }
            }
        } catch {
            for l in opened.values { for fd in l.fds { Sys.close(fd) } }
            logger.error("reload failed, keeping the current configuration: \(error)")
            return
        }
        if next.global.workers != config.global.workers {
            logger.warning("global.workers changed: takes effect at the next restart")
        }
        if next.global.engine != config.global.engine {
            logger.warning("global.engine changed: takes effect at the next restart")
        }
        if next.global.maxconn > startMaxconn {
            // The connection tables were sized at start; a larger maxconn needs a restart to be reached.
            logger.warning("global.maxconn raised: connection tables keep their start-up size until the next restart")
        }
        if next.global.stats.sockets != config.global.stats.sockets || next.global.metrics != config.global.metrics {
            logger.warning("global.stats sockets and global.metrics take effect at the next restart")
        }
        let removed = listeners.filter { keptListeners[$0.key] == nil }.map(\.value)
        config = next
        fileConfig = file
        serverChanges = kept
        for name in dropped {
            logger.notice(
                "service \(name): the server changes made at run time are dropped: the config changed the service")
        }
        generation += 1
        nat?.holdSync()
        table = ServiceTable.build(
            config: next, generation: generation, previous: table, now: monotonicMillis(), states: states)
        listeners = keptListeners.merging(opened) { a, _ in a }
        shared.maxconn.store(min(next.global.maxconn, startMaxconn), ordering: .relaxed)
        LogState.set(next.global.log)
        // Workers close the listeners they no longer get; the runtime never closes a worker's fd.
        publish()
        setActions(next)
        checker?.update(table)
        if next.services.contains(where: { $0.mode.isKernel }) || nat != nil {
            do {
                if nat == nil { nat = try NatController(logger: logger) }
                try nat!.apply(table)
                if adminContext?.nat == nil {
                    adminContext?.nat = nat
                    nat!.start(following: states)
                }
            } catch {
                logger.error("nat: reload could not program the kernel, the previous rules stay: \(error)")
            }
        }
        if let ctx = adminContext {
            ctx.table = table
            ctx.stateFile.withLock { $0 = next.global.stateFile }
            ctx.listeners.store(listeners.values.reduce(0) { $0 + $1.fds.count }, ordering: .relaxed)
            admin?.update(next.global)
            // Servers that left the config lose their saved state.
            ctx.saveState()
        }
        for svc in next.services where svc.mode == .proxy {
            for b in svc.binds {
                if let l = opened[listenerKey(b, svc.name)] {
                    logger.info("service \(svc.name) listening on \(l.actual)")
                }
            }
        }
        for r in removed { logger.info("stopped listening on \(r.actual) (service \(r.service))") }
        logger.info("reloaded: \(next.services.count) services, generation \(generation)")
    }

    /// Stops accepting, lets connections finish within the grace period, then closes the rest.
    private func shutdown(sigfd: Int32, _ events: EventLoop) -> Int32 {
        notifier?.send("STOPPING=1")
        adminContext?.stopping.store(true, ordering: .relaxed)
        adminContext?.saveState()
        dns?.stop()
        dns = nil
        for w in workers { w.send(.stopAccepting) }
        let deadline = monotonicMillis() + config.global.grace.value
        var open = shared.connections.load(ordering: .relaxed)
        if open > 0 {
            logger.info("waiting up to \(config.global.grace) for \(open) connections to finish")
        }
        while open > 0 && monotonicMillis() < deadline {
            _ = try? events.wait(timeoutMs: 50)
            if let sig = SignalFd.next(sigfd), sig != SIGHUP {
                logger.info("second stop signal: closing connections now")
                break
            }
            open = shared.connections.load(ordering: .relaxed)
        }
        if open > 0 { logger.warning("closing \(open) connections still open") }
        checker?.stop()
        for w in workers { w.send(.exit) }
        for t in threads { pthread_join(t, nil) }
        if let nat {
            nat.stop()
            if config.global.natKeepOnExit {
                logger.info(
                    "nat: table \(NatController.tableName) kept (global.nat.keep_on_exit); the kernel goes on forwarding"
                )
            } else {
                nat.remove()
            }
        }
        admin?.stop()
        logger.info("stopped")
        return 0
    }

    /// Listeners are bound: switch to `global.user`/`global.group` before serving. As root
    /// without a configured user, say so (running a balancer as root is rarely wanted).
    /// The engine the workers run: `global.engine`, else `BALLAST_ENGINE` from the environment,
    /// else the default. io_uring falls back to epoll, with one log line, where the kernel refuses
    /// a ring (`kernel.io_uring_disabled`, a seccomp filter, a kernel before 6.0).
    func chooseEngine() -> Engine {
        var engine = config.global.engine ?? Defaults.engine
        if config.global.engine == nil, let env = getenv("BALLAST_ENGINE"),
            let e = Engine(rawValue: String(cString: env))
        {
            engine = e
        }
        if engine.usesRing, let refused = Ring.probe(sqpoll: engine == .ioUringSQPoll) {
            let line: Logger.Message = "io_uring refused by the kernel (\(refused)): workers use epoll"
            if config.global.engine?.usesRing == true { logger.warning(line) } else { logger.info(line) }
            return .epoll
        }
        logger.info("workers: \(engine.rawValue) engine")
        return engine
    }

    private func dropPrivileges() -> Bool {
        guard let user = config.global.user else {
            if geteuid() == 0 {
                logger.critical(
                    "refusing to serve as root: set global.user to the user to run as after binding (or global.user: root to insist)"
                )
                return false
            }
            return true
        }
        let gid = config.global.group?.gid ?? user.gid
        if geteuid() != 0 {
            if geteuid() == user.uid {
                // Already that user; a different group still has to be reachable.
                if getegid() != gid && setgid(gid) != 0 {
                    logger.critical(
                        "cannot switch to group \(config.global.group?.name ?? "\(gid)") (gid \(gid)) as user \(user.name): \(String(cString: strerror(errno))); start Ballast as root to switch user and group"
                    )
                    return false
                }
                return true
            }
            logger.critical("global.user \(user.name) needs Ballast started as root (running as uid \(geteuid()))")
            return false
        }
        var groups = [gid]
        let keepNetAdmin = nat != nil && user.uid != 0
        if keepNetAdmin && ballast_keep_caps_across_setuid() != 0 {
            logger.critical("cannot keep CAP_NET_ADMIN for nat mode: \(String(cString: strerror(errno)))")
            return false
        }
        guard setgroups(1, &groups) == 0, setgid(gid) == 0, setuid(user.uid) == 0 else {
            logger.critical(
                "cannot switch to user \(user.name) (uid \(user.uid), gid \(gid)): \(String(cString: strerror(errno)))")
            return false
        }
        // Root must be gone for good.
        guard user.uid == 0 || (setuid(0) != 0 && geteuid() == user.uid) else {
            logger.critical("privileges were not dropped")
            return false
        }
        if keepNetAdmin {
            guard ballast_only_net_admin() == 0 else {
                logger.critical("cannot keep CAP_NET_ADMIN for nat mode: \(String(cString: strerror(errno)))")
                return false
            }
            logger.info("running as user \(user.name) (uid \(user.uid), gid \(gid)) with CAP_NET_ADMIN only (nat mode)")
            return true
        }
        logger.info("running as user \(user.name) (uid \(user.uid), gid \(gid))")
        return true
    }

    /// `Defaults.maxconn`, or less when the open file limit cannot be raised to 2 per connection
    /// + 1024 (root may raise the hard limit up to `fs.nr_open`; others up to the hard limit).
    static func defaultMaxconn() -> Int {
        var rl = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 else { return Defaults.maxconn }
        let needed = rlim_t(Defaults.maxconn * 2 + 1024)
        if rl.rlim_max >= needed { return Defaults.maxconn }
        // Can the hard limit be raised? Try it (this process's own limit; raiseFileLimit sets it anyway).
        var want = rlimit(rlim_cur: rl.rlim_cur, rlim_max: needed)
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &want) == 0 { return Defaults.maxconn }
        // 2 per connection, and 1024 (or a quarter of a small limit) for everything else.
        let limit = Int(rl.rlim_max)
        return max(1, min(Defaults.maxconn, (limit - min(1024, limit / 4)) / 2))
    }

    /// Raises the descriptor limit for maxconn: every connection needs two sockets. Pipes (two
    /// more while bulk data moves) are optional: without a descriptor for one, a direction copies.
    private func raiseFileLimit() -> Bool {
        var rl = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 else { return true }
        let needed = rlim_t(config.global.maxconn * 2 + 1024)
        let old = rl.rlim_cur
        if rl.rlim_cur < needed {
            // Root may raise the hard limit too (up to fs.nr_open); others go as far as the hard limit.
            var want = rlimit(rlim_cur: max(needed, rl.rlim_cur), rlim_max: max(needed, rl.rlim_max))
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &want) != 0 {
                want = rlimit(rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max)
                _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &want)
            }
            _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        }
        if rl.rlim_cur != old { logger.info("raised the open file limit from \(old) to \(rl.rlim_cur)") }
        if rl.rlim_cur < needed {
            if config.global.maxconnExplicit {
                // Above fs.nr_open not even root can raise it. As HAProxy does for an explicit maxconn: a promise that cannot be kept stops the start.
                logger.critical(
                    "global.maxconn \(config.global.maxconn) needs \(needed) open files (2 per connection + 1024) but the limit is \(rl.rlim_cur) and cannot be raised (hard limit \(rl.rlim_max)); raise it (LimitNOFILE=\(needed) in the unit, ulimit -n) or lower global.maxconn to \(max(1, (Int(rl.rlim_cur) - 1024) / 2))"
                )
                return false
            }
            // Only when the limit moved down between the start's reading and now.
            logger.warning(
                "open file limit is \(rl.rlim_cur) but maxconn \(config.global.maxconn) may need \(needed); accept pauses when descriptors run out (set global.maxconn to make the limit a start condition)"
            )
        }
        return true
    }
}

final class ServiceActions: Sendable {
    let map = Mutex<[String: (MarkedDownAction, MarkedUpAction)]>([:])
}

/// Tries to bind every listener once (and closes it), so `ballast check` reports an address that
/// cannot be bound with its config location. It binds without listening: a listening socket
/// would join the live listener group of a running Ballast for that moment and the kernel could
/// queue a new client on it, reset when it closes.
/// The stats sockets and the metrics endpoint the same way: a TCP address is bound (not
/// listened on), a Unix socket's directory must exist and be writable. A TCP address in use is
/// a warning, not an error: `check` is run beside the Ballast that holds it, before a reload.
public func checkBinds(_ config: Config) throws(ConfigError) -> [String] {
    var warnings: [String] = []
    // An explicit maxconn needs 2 descriptors per connection + 1024: can this process get them?
    if config.global.maxconnExplicit {
        let needed = UInt64(config.global.maxconn) * 2 + 1024
        var rl = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 && UInt64(rl.rlim_max) < needed {
            // Root may raise the hard limit up to fs.nr_open; nobody goes beyond it.
            let text = (try? RegularFile.text("/proc/sys/fs/nr_open", limit: 64).get()) ?? ""
            let nrOpen = UInt64(text.filter { $0.isNumber }) ?? 0
            let ceiling = geteuid() == 0 ? max(nrOpen, UInt64(rl.rlim_max)) : UInt64(rl.rlim_max)
            if ceiling < needed {
                throw ConfigError(
                    config.global.maxconnLocation ?? SourceLocation(file: config.file, line: 0, column: 0),
                    "global.maxconn \(config.global.maxconn) needs \(needed) open files (2 per connection + 1024) but this process can have at most \(ceiling)\(geteuid() == 0 ? " (fs.nr_open)" : " (hard limit; LimitNOFILE= in the unit, or start as root)"); lower global.maxconn to \(max(1, (Int(ceiling) - 1024) / 2))"
                )
            }
        }
    }
    for svc in config.services where svc.mode == .proxy {
        for b in svc.binds {
            let l = try openListeners(b, service: svc.name, count: 1, listen: false)
            for fd in l.fds { Sys.close(fd) }
        }
    }
    for svc in config.services where svc.mode == .dsr {
        if let dev = svc.interface, Interface.index(dev) == nil {
            throw ConfigError(
                svc.interfaceLocation ?? svc.location,
                "service '\(svc.name)': interface \(dev) does not exist on this host (dsr sends the frames out of it)")
        }
    }
    for sock in config.global.stats.sockets {
        if let path = sock.path {
            let dir = String(path[..<path.lastIndex(of: "/")!])
            let d = dir.isEmpty ? "/" : dir
            var st = stat()
            guard stat(d, &st) == 0 else {
                throw ConfigError(
                    sock.location, "stats socket \(path): directory \(d): \(String(cString: strerror(errno)))")
            }
            guard st.st_mode & S_IFMT == S_IFDIR else {
                throw ConfigError(sock.location, "stats socket \(path): \(d) is not a directory")
            }
            guard access(d, W_OK | X_OK) == 0 else {
                throw ConfigError(
                    sock.location,
                    "stats socket \(path): cannot create a socket in \(d): \(String(cString: strerror(errno)))")
            }
        } else if let a = sock.address {
            do {
                let fd = try Socket.listen(a, reusePort: false, backlog: 1, listen: false)
                Sys.close(fd)
            } catch  where error.errno == EADDRINUSE {
                warnings.append(
                    "\(sock.location): stats socket \(a) is in use (by the running Ballast, or the start will fail)")
            } catch {
                throw ConfigError(
                    sock.location, "stats socket \(a): cannot bind: \(String(cString: strerror(error.errno)))")
            }
        }
    }
    if let m = config.global.metrics {
        let at = config.global.metricsLocation ?? SourceLocation(file: config.file, line: 0, column: 0)
        do {
            let fd = try Socket.listen(m, reusePort: false, backlog: 1, listen: false)
            Sys.close(fd)
        } catch  where error.errno == EADDRINUSE {
            warnings.append("\(at): metrics \(m) is in use (by the running Ballast, or the start will fail)")
        } catch {
            throw ConfigError(at, "metrics \(m): cannot bind: \(String(cString: strerror(error.errno)))")
        }
    }
    return warnings
}

/// Writes a line to standard error with one write(2).
public func writeStderr(_ line: String) {
    Sys.writeAll(2, Array((line.hasSuffix("\n") ? line : line + "\n").utf8))
}
