import BallastCore
import BallastIO
import Synchronization

/// Facts shared by all workers; atomics only, so nobody waits on anybody.
public final class ProxyShared: Sendable {
    /// Client connections open (queued, connecting or established) in the whole process.
    public let connections = Atomic<Int>(0)
    public let maxconn: Atomic<Int>
    public let totalConnections = Atomic<Int>(0)

    public init(maxconn: Int) {
        self.maxconn = Atomic(maxconn)
    }
}

/// Settings a worker reads when it starts or on reload.
public struct WorkerSettings: Sendable {
    public var pipeSize: Int
    public var copyBufferSize: Int
    public var tableCapacity: Int
    public var logConnections: Bool
    /// How established connections move bytes (fixed for the process's life).
    public var engine: Engine

    public init(
        pipeSize: Int, copyBufferSize: Int, tableCapacity: Int, logConnections: Bool, engine: Engine = .epoll
    ) {
        self.engine = engine
        self.pipeSize = pipeSize
        self.copyBufferSize = copyBufferSize
        self.tableCapacity = tableCapacity
        self.logConnections = logConnections
    }
}

/// A listening socket handed to a worker, and the service it feeds.
public struct ListenerSpec: Sendable {
    public var fd: Int32
    public var serviceName: String
    public var address: SocketAddress
    public var acceptProxy: Bool

    public init(fd: Int32, serviceName: String, address: SocketAddress, acceptProxy: Bool) {
        self.fd = fd
        self.serviceName = serviceName
        self.address = address
        self.acceptProxy = acceptProxy
    }
}

/// What the runtime asks of a worker, delivered through its inbox and eventfd.
public enum WorkerCommand: Sendable {
    /// Serve this table with these listeners. Listeners the worker has but that are not listed
    /// are closed; listed ones it already has are kept open.
    case apply(ServiceTable, [ListenerSpec], logConnections: Bool, pipeSize: Int)
    /// Close all listeners; established connections go on.
    case stopAccepting
    /// Close every connection to this server (`on_marked_down: shutdown-sessions`).
    case shutdownSessions(Server)
    /// Close every connection of this service that is on a backup server
    /// (`on_marked_up: shutdown-backup-sessions`).
    case shutdownBackupSessions(service: String)
    /// Describe every open connection (`show sess`), one line each, into the report.
    case listSessions(SessionReport)
    /// Close one connection by its `show sess` id, if it still exists (`shutdown session`).
    case shutdownSession(index: Int32, generation: UInt32, SessionReport)
    /// Do nothing but count a heartbeat: the runtime's watchdog checks the loop is alive.
    case ping
    /// Close every connection and leave the loop.
    case exit
}

/// Answers of the workers to a `show sess` or `shutdown session`: each worker adds its lines and
/// counts itself done; the runtime API waits for all (bounded).
public final class SessionReport: Sendable {
    private let lines = Mutex<[String]>([])
    /// One signal per worker that answered.
    public let answered = Completion()
    public let found = Atomic<Bool>(false)

    public init() {}

    public func add(_ l: [String]) {
        lines.withLock { $0 += l }
        answered.signal()
    }

    public var collected: [String] { lines.withLock { $0 } }
}

/// A `show sess` id: worker, connection slot and its generation in one number.
public enum SessionID {
    public static func make(worker: Int, index: Int32, generation: UInt32) -> UInt64 {
        (UInt64(worker + 1) << 56) | (UInt64(generation & 0xFF_FFFF) << 32) | UInt64(UInt32(bitPattern: index))
    }

    public static func parse(_ id: UInt64) -> (worker: Int, index: Int32, generation: UInt32)? {
        let w = Int(id >> 56) - 1
        guard w >= 0 else { return nil }
        return (w, Int32(bitPattern: UInt32(truncatingIfNeeded: id)), UInt32(truncatingIfNeeded: id >> 32) & 0xFF_FFFF)
    }

    public static func text(_ id: UInt64) -> String { "0x" + String(id, radix: 16) }
}
