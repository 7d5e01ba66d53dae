import BallastCore
import BallastIO
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Servers given by DNS name, looked up again on the `ballast-dns` thread: every
/// `resolve_interval`, and every 2 s while a server has no address yet or is DOWN (it may have
/// moved). getaddrinfo blocks, so no other thread ever calls it after start. A new address is
/// applied as an admin change would be: new connections and checks go there, established
/// connections stay where they are, nat mode's maps follow (the state change wakes its thread).
final class DNSWatcher: @unchecked Sendable {
    private let logger: Logger
    private let resolve: NameResolver
    private let table: @Sendable () -> ServiceTable
    private let stopping = Atomic<Bool>(false)
    private let wake: EventLoop
    private var thread: pthread_t?
    /// Per server object: when it is due, and the last failure said (said once, not every time).
    private var due: [ObjectIdentifier: Int64] = [:]
    private var said: [ObjectIdentifier: String] = [:]
    static let retryMs: Int64 = 2000

    init(logger: Logger, resolve: @escaping NameResolver, table: @escaping @Sendable () -> ServiceTable) throws {
        self.logger = logger
        self.resolve = resolve
        self.table = table
        wake = try EventLoop(capacity: 1)
    }

    func start() {
        thread = NamedThread.start("ballast-dns") { [self] in run() }
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        wake.wake()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    /// Looks up every server due now, then sleeps until the next is due (at most 1 s, so a
    /// reload's new servers are seen soon).
    private func run() {
        while !stopping.load(ordering: .relaxed) {
            let now = monotonicMillis()
            round(now: now)
            _ = try? wake.wait(timeoutMs: 1000)
        }
    }

    /// One pass: each due name is asked once, whatever number of servers use it.
    func round(now: Int64) {
        var answers: [String: Result<[SocketAddress], NameLookupError>] = [:]
        var seen = Set<ObjectIdentifier>()
        for svc in table().services {
            let family = svc.config.mode.isKernel ? svc.config.binds.first?.address.family : nil
            for (j, s) in svc.servers.enumerated() {
                guard let host = s.hostname else { continue }
                let id = ObjectIdentifier(s)
                seen.insert(id)
                let conf = svc.config.servers[j]
                // A server the config's load resolved is looked at again one interval later;
                // one without an address, at once.
                let at = due[id] ?? (s.hasAddress.load(ordering: .relaxed) ? now + conf.resolveInterval.value : now)
                due[id] = at
                guard now >= at else { continue }
                if answers[host] == nil { answers[host] = resolve(host) }
                apply(answers[host]!, to: s, service: svc.name, host: host, family: family)
                let retry = !s.hasAddress.load(ordering: .relaxed) || !s.up.load(ordering: .relaxed)
                due[id] = now + (retry ? min(Self.retryMs, conf.resolveInterval.value) : conf.resolveInterval.value)
            }
        }
        due = due.filter { seen.contains($0.key) }
        said = said.filter { seen.contains($0.key) }
    }

    private func apply(
        _ answer: Result<[SocketAddress], NameLookupError>, to s: Server, service: String, host: String, family: Int32?
    ) {
        let id = ObjectIdentifier(s)
        let has = s.hasAddress.load(ordering: .relaxed)
        let current = has ? s.address : nil
        let keeping = current.map { "; keeping \($0)" } ?? "; the server stays out of service"
        switch answer {
        case .failure(let e):
            say(id, "service \(service): server \(s.name): \(host) does not resolve (\(e.message))\(keeping)")
        case .success(let list):
            switch AddressChoice.choose(
                current: current, answers: list, port: s.address.port, family: family ?? current?.family)
            {
            case .keep:
                said[id] = nil
            case .empty:
                say(id, "service \(service): server \(s.name): \(host) has no address\(keeping)")
            case .otherFamily(let a):
                say(
                    id,
                    "service \(service): server \(s.name): \(host) now resolves to \(a.hostText) only, another address family than the server's\(keeping)"
                )
            case .move(let a):
                said[id] = nil
                let old = s.setAddress(a)
                if let old {
                    logger.notice("service \(service): server \(s.name) moved from \(old) to \(a) (\(host))")
                } else {
                    logger.notice("service \(service): server \(s.name) resolved: \(host) is \(a)")
                }
            }
        }
    }

    private func say(_ id: ObjectIdentifier, _ line: String) {
        guard said[id] != line else { return }
        said[id] = line
        logger.warning("\(line)")
    }
}
