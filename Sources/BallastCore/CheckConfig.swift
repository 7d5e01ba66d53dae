/// Active health check of a server (`check:` on a service, overridable per server).
public enum CheckType: String, Sendable, CaseIterable {
    case tcp, http, redis, mysql
    /// HAProxy's agent-check protocol: the server's agent answers one line that sets state and weight.
    case agent
    /// Check types from the design that a later release adds.
    static let planned: [String: String] = [:]
}

public enum MySQLRequire: String, Sendable, CaseIterable {
    case primary, replica, any
}

public enum RedisRole: String, Sendable, CaseIterable {
    case master, replica, any
}

public struct CheckConfig: Sendable, Equatable {
    public var type = CheckType.tcp
    public var interval = Defaults.checkInterval
    /// While a server is changing state (some failures while up, some successes while down).
    public var fastinterval: Millis?
    /// While a server is down.
    public var downinterval: Millis?
    public var timeout = Defaults.checkTimeout
    public var rise = Defaults.checkRise
    public var fall = Defaults.checkFall
    /// Check another port or address than the server's.
    public var port: UInt16?
    public var address: SocketAddress?
    // http
    public var method = "GET"
    public var path = "/"
    public var host: String?
    /// Accepted status codes; empty: 200–399.
    public var expect: [ClosedRange<Int>] = []
    public var body: String?
    // redis
    public var username: String?
    public var password: String?
    public var role = RedisRole.any
    // mysql
    public var mysqlRequire = MySQLRequire.any
    /// One query run after login; the check fails if it returns an error.
    public var query: String?
    /// Send a PROXY protocol header first (HAProxy `check-send-proxy`), for servers that require one.
    public var sendProxy: ProxyProtocol.Version?
    // agent
    /// A line sent to the agent before it answers (HAProxy `agent-send`).
    public var send: String?

    public init() {}

    public var fast: Millis { fastinterval ?? interval }
    public var down: Millis { downinterval ?? interval }

    public func accepts(status: Int) -> Bool {
        expect.isEmpty ? (200...399).contains(status) : expect.contains { $0.contains(status) }
    }
}

/// What to do with established connections when a server changes health.
public enum MarkedDownAction: String, Sendable, CaseIterable {
    case none
    case shutdownSessions = "shutdown-sessions"
}

public enum MarkedUpAction: String, Sendable, CaseIterable {
    case none
    case shutdownBackupSessions = "shutdown-backup-sessions"
}
