import BallastCore
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

    public init(pipeSize: Int, copyBufferSize: Int, tableCapacity: Int, logConnections: Bool) {
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
    /// Do nothing but count a heartbeat: the runtime's watchdog checks the loop is alive.
    case ping
    /// Close every connection and leave the loop.
    case exit
}
