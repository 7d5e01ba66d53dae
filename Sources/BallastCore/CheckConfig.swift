/// Active health check of a server (`check:` on a service, overridable per server).
public enum CheckType: String, Sendable, CaseIterable {
    case tcp, http, redis, mysql
    /// HAProxy's agent-check protocol: the server's agent answers one line that sets state and weight.
    case agent

}

public enum MySQLRequire: String, Sendable, CaseIterable {
    case primary, replica, any
}

public enum RedisRole: String, Sendable, CaseIterable {
    case master, replica, any
}

/// A server's health before its first check (HAProxy 3's `init-state`).
public enum InitState: String, Sendable, CaseIterable {
    /// UP; `fall` failed checks take it down (Ballast's default for plain checks).
    case fullyUp = "fully-up"
    /// UP, but the first failed check takes it down.
    case up
    /// DOWN until its first check passes (the default for role and `require` checks: a replica
    /// must never take writes while the balancer has not asked yet).
    case down
    /// DOWN until `rise` checks have passed.
    case fullyDown = "fully-down"
}

public struct CheckConfig: Sendable, Equatable {
    public var type = CheckType.tcp
    public var interval = Defaults.checkInterval
    /// While a server is changing state (some failures while up, some successes while down).
    public var fastinterval: Millis?
    /// While a server is down.
    public var downinterval: Millis?
    public var timeout = Defaults.checkTimeout
    /// `timeout` was written in the file; otherwise it is the smaller of the default and `interval`.
    public var timeoutSet = false
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
    /// One query run after login (after the `require` test); the check fails if it returns an
    /// error at any point of its result.
    public var query: String?
    /// The value the first column of the query's first row must have.
    public var queryExpect: String?
    /// Replicas (redis `role: replica`, mysql `require: replica`): how far behind the master a
    /// replica may be and still serve reads.
    public var maxLag: Millis?
    /// Health before the first check; nil: `down` for role/require checks, `fully-up` otherwise.
    public var initState: InitState?
    /// Send a PROXY protocol header first (HAProxy `check-send-proxy`), for servers that require one.
    public var sendProxy: ProxyProtocol.Version?
    // agent
    /// A line sent to the agent before it answers (HAProxy `agent-send`).
    public var send: String?

    public init() {}

    /// The check asks a server what it is (master/replica, primary/replica): its answer is
    /// definite and acts at once, and the server takes no traffic before the first answer.
    public var asksRole: Bool {
        (type == .redis && role != .any) || (type == .mysql && mysqlRequire != .any)
    }

    public var effectiveInitState: InitState { initState ?? (asksRole ? .down : .fullyUp) }

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

/// `sentinel:` on a service whose check is `type: redis, role: master`: the Sentinels decide which
/// server is the master; only that server takes writes.
public struct SentinelConfig: Sendable, Equatable {
    public var addresses: [SocketAddress]
    /// The master's name in Sentinel (`sentinel monitor NAME …`).
    public var master: String
    public var username: String?
    public var password: String?
    /// Each Sentinel is asked this often (and at once after a `+switch-master` event).
    public var interval = Millis(1000)
    public var timeout = Millis(500)
    public var location: SourceLocation

    public init(addresses: [SocketAddress], master: String, location: SourceLocation) {
        self.addresses = addresses
        self.master = master
        self.location = location
    }
}
