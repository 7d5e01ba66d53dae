import BallastCore
import BallastHealth
import BallastNat
import BallastProxy
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What the runtime API and `/metrics` read and act on: the current table, the checker, the
/// workers. Shared by the runtime (which swaps the table on reload) and the admin thread.
final class AdminContext: @unchecked Sendable {
    private let current: Mutex<ServiceTable>
    let checker: HealthChecker?
    let workers: [Worker]
    let shared: ProxyShared
    let logger: Logger
    let startWall: Int64
    let startMono: Int64
    let hardMaxconn: Int
    let rates = RateSampler()
    let stopping = Atomic<Bool>(false)
    /// Listening sockets (binds × workers), for `show info`.
    let listeners = Atomic<Int>(0)
    /// Saves runtime server state after a change (set by the runtime when `state_file` is set).
    let stateFile = Mutex<String?>(nil)
    /// nat mode's kernel programming, when some service uses it.
    var nat: NatController? {
        get { natBox.withLock { $0 } }
        set { natBox.withLock { $0 = newValue } }
    }
    private let natBox = Mutex<NatController?>(nil)
    /// What each service does on health transitions (shared with the checker's callback).
    let onTransition: @Sendable (String, Server, Bool) -> Void

    init(
        table: ServiceTable, checker: HealthChecker?, workers: [Worker], shared: ProxyShared, logger: Logger,
        hardMaxconn: Int, onTransition: @escaping @Sendable (String, Server, Bool) -> Void
    ) {
        current = Mutex(table)
        self.checker = checker
        self.workers = workers
        self.shared = shared
        self.logger = logger
        self.hardMaxconn = hardMaxconn
        self.onTransition = onTransition
        var tv = timeval()
        gettimeofday(&tv, nil)
        startWall = Int64(tv.tv_sec)
        startMono = monotonicMillis()
    }

    var table: ServiceTable {
        get { current.withLock { $0 } }
        set { current.withLock { $0 = newValue } }
    }

    /// Server changes made at run time (`add server` and the like), saved with the state.
    let serverChanges = Mutex(RuntimeServers())
    /// Applies a server change on the main thread and says how it went (set by the runtime).
    var changeServers: (@Sendable (ServerChange) -> Result<String, CLIError>)? {
        get { changeBox.withLock { $0 } }
        set { changeBox.withLock { $0 = newValue } }
    }
    private let changeBox = Mutex<(@Sendable (ServerChange) -> Result<String, CLIError>)?>(nil)

    /// Writes the runtime state of every server to the state file, atomically (temp + rename).
    func saveState() {
        guard let path = stateFile.withLock({ $0 }) else { return }
        let text = StateFile.render(table, checker: checker) + StateFile.renderChanges(serverChanges.withLock { $0 })
        do { try StateFile.write(text, to: path) } catch {
            logger.error("cannot save server state to \(path): \(error)")
        }
    }

    /// Finds `backend/server` (names or `#id`), with HAProxy's error texts.
    func lookup(_ arg: String?) -> Result<(Service, Server, Int), CLIError> {
        guard let arg, let slash = arg.firstIndex(of: "/") else {
            return .failure(CLIError("Require 'backend/server'."))
        }
        let b = String(arg[..<slash])
        let s = String(arg[arg.index(after: slash)...])
        guard let svc = service(b) else { return .failure(CLIError("No such backend.")) }
        let index: Int?
        if s.hasPrefix("#"), let id = Int(s.dropFirst()) {
            index = id >= 1 && id <= svc.servers.count ? id - 1 : nil
        } else {
            index = svc.servers.firstIndex { $0.name == s }
        }
        guard let index else { return .failure(CLIError("No such server.")) }
        return .success((svc, svc.servers[index], index))
    }

    /// A service by name or `#iid`.
    func service(_ name: String) -> Service? {
        let t = table
        if name.hasPrefix("#"), let id = Int(name.dropFirst()) {
            return id >= 1 && id <= t.services.count ? t.services[id - 1] : nil
        }
        return t.services.first { $0.name == name }
    }

    func iid(_ svc: Service) -> Int { (table.services.firstIndex { $0 === svc } ?? 0) + 1 }

    func uptimeSeconds() -> Int64 { (monotonicMillis() - startMono) / 1000 }

    /// Sends a command to every worker and waits (at most a second) for all to answer.
    func askWorkers(_ make: (SessionReport) -> WorkerCommand) -> SessionReport {
        let report = SessionReport()
        for w in workers { w.send(make(report)) }
        _ = report.answered.wait(for: workers.count, timeoutMs: 1000)
        return report
    }
}

struct CLIError: Error {
    var message: String
    init(_ m: String) { message = m }
}

/// Sessions per second over the last second, and the highest seen, for every service and server
/// (HAProxy's `rate`, `rate_max`, `conn_rate`…). Sampled once a second by the admin thread.
final class RateSampler: @unchecked Sendable {
    struct Entry {
        var last: UInt64 = 0
        var rate: UInt64 = 0
        var max: UInt64 = 0
    }
    private let state = Mutex<[ObjectIdentifier: Entry]>([:])

    /// Records `total` for `key` (called once a second).
    func sample(_ key: AnyObject, _ total: UInt64) {
        state.withLock { s in
            var e = s[ObjectIdentifier(key)] ?? Entry(last: total)
            e.rate = total &- e.last
            e.last = total
            e.max = Swift.max(e.max, e.rate)
            s[ObjectIdentifier(key)] = e
        }
    }

    func rate(_ key: AnyObject) -> (UInt64, UInt64) {
        state.withLock { s in s[ObjectIdentifier(key)].map { ($0.rate, $0.max) } ?? (0, 0) }
    }

    func clearMax() {
        state.withLock { s in for k in s.keys { s[k]!.max = s[k]!.rate } }
    }

    func forget(except keep: Set<ObjectIdentifier>) {
        state.withLock { s in s = s.filter { keep.contains($0.key) } }
    }
}

/// Keys for the sampler: a service's frontend and backend rates, the process's connection rate.
final class RateKeys: Sendable {
    static let process = RateKeys()
    static let processSessions = RateKeys()
    static let processBytesOut = RateKeys()
}
