/// Where a value came from in the config file, for `file:line:column: message` errors.
public struct SourceLocation: Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public var description: String { "\(file):\(line):\(column)" }
}

/// A configuration error as the user sees it: `file:line:column: message`.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var location: SourceLocation
    public var message: String

    public init(_ location: SourceLocation, _ message: String) {
        self.location = location
        self.message = message
    }

    /// `file:line:column: message`, or `file: message` for the file as a whole (line 0).
    public var description: String { location.line == 0 ? "\(location.file): \(message)" : "\(location): \(message)" }
}

/// Every default value, written down once. The README's configuration reference lists the same
/// values; `ConfigDefaultsTests` checks that the README and this table agree.
public enum Defaults {
    public static let maxconn = 50_000
    /// How often a server given by DNS name is resolved again (HAProxy's `hold valid` default).
    public static let resolveInterval = Millis(10_000)
    public static let logLevel = LogLevel.info
    public static let logFormat = LogFormat.text
    public static let logConnections = false
    /// 1 MiB: pipe size matters most for bulk throughput (see DESIGN.md, performance facts).
    public static let pipeSize = 1 << 20
    /// Reads that fill this buffer switch a direction from copying to splicing.
    public static let copyBufferSize = 16 << 10
    /// How proxy workers wait and move bytes (BENCHMARKS.md: the engines side by side).
    public static let engine = Engine.epoll
    public static let grace = Millis(10_000)
    public static let connectTimeout = Millis(2_000)
    public static let clientTimeout = Millis(60_000)
    public static let serverTimeout = Millis(60_000)
    public static let queueTimeout = Millis(5_000)
    public static let retries = 2
    public static let weight = 1
    public static let maxWeight = 256
    public static let serverMaxconn = 0  // 0: no limit
    public static let maxqueue = 1024
    public static let backlog = 4096
    public static let mode = ServiceMode.proxy
    public static let balance = Balance.roundrobin
    public static let hashTableSize = MaglevTable.defaultSize
    public static let checkInterval = Millis(2_000)
    public static let checkTimeout = Millis(1_000)
    public static let checkRise = 2
    public static let checkFall = 3
    /// Runtime API: idle clients are closed after this, and at most this many are served at once
    /// (HAProxy's `stats timeout` and `stats maxconn`).
    public static let statsTimeout = Millis(10_000)
    public static let statsMaxconn = 10
    public static let statsLevel = CLILevel.operator
    public static let statsMode: UInt32 = 0o600
}

/// What a runtime API connection may do (HAProxy's stats socket levels).
public enum CLILevel: String, Sendable, CaseIterable, Comparable {
    case user, `operator`, admin

    var rank: Int {
        switch self {
        case .user: return 0
        case .operator: return 1
        case .admin: return 2
        }
    }

    public static func < (a: CLILevel, b: CLILevel) -> Bool { a.rank < b.rank }
}

/// One runtime API socket: a Unix stream socket (path, mode, owner) or a TCP address on loopback.
public struct StatsSocketConfig: Sendable, Equatable {
    public var path: String?
    public var address: SocketAddress?
    public var mode = Defaults.statsMode
    public var uid: UInt32?
    public var gid: UInt32?
    public var level = Defaults.statsLevel
    public var location: SourceLocation

    public init(location: SourceLocation) { self.location = location }

    public var name: String { path ?? address?.description ?? "?" }
}

public struct StatsConfig: Sendable, Equatable {
    public var sockets: [StatsSocketConfig] = []
    public var timeout = Defaults.statsTimeout
    public var maxconn = Defaults.statsMaxconn
    public init() {}
}

/// Milliseconds. Durations in the config take `ms`, `s`, `m`, `h` (`d` too); a bare number is
/// milliseconds, as in HAProxy.
public struct Millis: Sendable, Equatable, Comparable, CustomStringConvertible {
    public var value: Int64
    public init(_ value: Int64) { self.value = value }
    public static func < (a: Millis, b: Millis) -> Bool { a.value < b.value }

    public var description: String {
        let v = value
        if v % 3_600_000 == 0 && v > 0 { return "\(v / 3_600_000)h" }
        if v % 60_000 == 0 && v > 0 { return "\(v / 60_000)m" }
        if v % 1000 == 0 && v > 0 { return "\(v / 1000)s" }
        return "\(v)ms"
    }
}

public enum LogLevel: String, Sendable, CaseIterable {
    case trace, debug, info, notice, warning, error, critical
}

public enum LogFormat: String, Sendable, CaseIterable {
    case text, json
}

public enum ServiceMode: String, Sendable, CaseIterable {
    case proxy, nat, dsr

    /// The kernel forwards (nat, dsr): Ballast programs nftables and decides, it relays nothing.
    public var isKernel: Bool { self != .proxy }
}

public struct LogConfig: Sendable, Equatable {
    public var level = Defaults.logLevel
    public var format = Defaults.logFormat
    /// One line per closed connection: service, server, client, bytes each way, duration, how it ended.
    public var connections = Defaults.logConnections
    public init() {}
}

/// How a proxy worker waits for and moves bytes: readiness (`epoll`, then `recv`/`send`/`splice`)
/// or completions (`io_uring`: operations queued and submitted with the wait, in one call).
public enum Engine: String, Sendable, Equatable, CaseIterable {
    case epoll
    case ioUring = "io_uring"
    /// io_uring with a kernel thread polling each worker's submission queue (SQPOLL): no
    /// system call to submit, at the cost of a thread that spins while there is work (and for
    /// 50 ms after).
    case ioUringSQPoll = "io_uring_sqpoll"

    public var usesRing: Bool { self != .epoll }
}

public struct GlobalConfig: Sendable, Equatable {
    /// nil: one worker per core.
    public var workers: Int?
    public var maxconn = Defaults.maxconn
    /// `maxconn` was written in the file (then an unreachable descriptor limit stops the start).
    public var maxconnExplicit = false
    /// Where `global.maxconn` was written, for `check`'s descriptor-limit error.
    public var maxconnLocation: SourceLocation?
    public var log = LogConfig()
    public var pipeSize = Defaults.pipeSize
    /// nil: not written (the default, or `BALLAST_ENGINE` from the environment).
    public var engine: Engine?
    public var grace = Defaults.grace
    /// Drop to this user (and group) after binding listeners; uid/gid resolved at load.
    public var user: (name: String, uid: UInt32, gid: UInt32)?
    public var group: (name: String, gid: UInt32)?
    /// The runtime API (HAProxy's stats socket protocol).
    public var stats = StatsConfig()
    /// Prometheus `/metrics` over HTTP on this address.
    public var metrics: SocketAddress?
    public var metricsLocation: SourceLocation?
    /// Runtime server state (admin state, weight, forced health) is saved here on every change
    /// and restored at start.
    public var stateFile: String?
    /// nat mode: leave the kernel rules in place at exit, so a restart does not interrupt traffic.
    public var natKeepOnExit = false
    public init() {}

    public static func == (a: GlobalConfig, b: GlobalConfig) -> Bool {
        a.workers == b.workers && a.maxconn == b.maxconn && a.log == b.log && a.pipeSize == b.pipeSize
            && a.engine == b.engine
            && a.grace == b.grace
            && a.user?.uid == b.user?.uid && a.user?.gid == b.user?.gid && a.group?.gid == b.group?.gid
            && a.stats == b.stats && a.metrics == b.metrics && a.stateFile == b.stateFile
            && a.natKeepOnExit == b.natKeepOnExit
    }
}

public struct Timeouts: Sendable, Equatable {
    public var connect = Defaults.connectTimeout
    public var client = Defaults.clientTimeout
    public var server = Defaults.serverTimeout
    public var queue = Defaults.queueTimeout
    public init() {}
}

public struct BindConfig: Sendable, Equatable {
    public var address: SocketAddress
    /// Expect a PROXY protocol header (v1 or v2) from a trusted front balancer on each connection.
    public var acceptProxy = false
    /// Bind even when the address is not on this host (yet): a floating address (IP_FREEBIND).
    public var freebind = false
    public var location: SourceLocation
}

/// What `add server` says of a server: enough to make it again after a reload or a restart.
public struct AddedServer: Sendable, Equatable {
    public var name: String
    public var address: SocketAddress
    public var weight = Defaults.weight
    public var backup = false
    public var maxconn = 0
    public init(name: String, address: SocketAddress) {
        self.name = name
        self.address = address
    }
}

public struct ServerConfig: Sendable, Equatable {
    public var name: String
    public var address: SocketAddress
    public var weight = Defaults.weight
    public var maxconn = Defaults.serverMaxconn
    public var backup = false
    /// Slow start ramp after the server comes back (0: none).
    public var slowstart = Millis(0)
    /// Administrative state at start (`ready`, `drain`: no new connections, `maint`: out of service).
    public var state = AdminState.ready
    /// Write a PROXY protocol header with the real client address before the first relayed byte.
    public var sendProxy: ProxyProtocol.Version?
    /// The health check for this server (the service's, with this server's overrides); nil: none.
    public var check: CheckConfig?
    /// The address is one of this config's own binds, on purpose (a chain through another service).
    public var allowSelf = false
    /// The DNS name `address` was given as (nil: a numeric address). Re-resolved every
    /// `resolveInterval` while Ballast runs; `address` is what it resolved to when loaded.
    public var hostname: String?
    /// False when the name did not resolve at load and `init_addr: none` allowed that: the
    /// server is held out of service until it resolves (`address` has only the port then).
    public var resolved = true
    public var resolveInterval = Defaults.resolveInterval
    public var location: SourceLocation

    /// What identifies where the server is in the file: its name, or its numeric address.
    public var addressKey: String { hostname.map { "\($0):\(address.port)" } ?? address.description }

    public init(name: String, address: SocketAddress, location: SourceLocation) {
        self.name = name
        self.address = address
        self.location = location
    }
}

/// nat mode: how the kernel rewrites a connection's source.
public enum SNATMode: Sendable, Equatable, CustomStringConvertible {
    /// DNAT only: servers route replies back through the balancer.
    case none
    /// Full NAT with the outgoing interface's address.
    case masquerade
    /// Full NAT with this address.
    case address(SocketAddress)

    public var description: String {
        switch self {
        case .none: return "none"
        case .masquerade: return "masquerade"
        case .address(let a): return a.hostText
        }
    }
}

public struct ServiceConfig: Sendable, Equatable {
    public var name: String
    /// nat mode only: source NAT.
    public var snat = SNATMode.none
    public var mode = Defaults.mode
    /// dsr mode only: the interface facing the servers (and the clients: one L2 segment).
    public var interface: String?
    public var interfaceLocation: SourceLocation?
    public var binds: [BindConfig] = []
    public var balance = Defaults.balance
    public var timeouts: Timeouts
    public var retries: Int
    public var maxqueue = Defaults.maxqueue
    public var hashKey = HashKey.source
    public var hashTableSize = MaglevTable.defaultSize
    /// With no active server usable: spread over all backups (true) or use the first (false).
    public var allbackups = false
    /// Passive observation: this many consecutive failed connects mark a server DOWN at once
    /// (0: off); its active check brings it back.
    public var observeFails = 0
    public var onMarkedDown = MarkedDownAction.none
    public var onMarkedUp = MarkedUpAction.none
    /// Redis Sentinel names the master (services whose check requires `role: master`).
    public var sentinel: SentinelConfig?
    /// Who may connect (`allow`, `deny`) and how much one client may take (`limits`).
    public var access = AccessList()
    public var limits = SourceLimits()
    public var servers: [ServerConfig] = []
    public var location: SourceLocation
    /// A digest of the service's text in the file and of `defaults` (not of where it sits):
    /// runtime server changes stay over a reload, and a restart, while this stays the same.
    public var digest: UInt64 = 0
    /// What a server of this service gets when it says nothing itself (for `add server`).
    public var serverCheck: CheckConfig?
    public var serverSlowstart = Millis(0)

    /// A server added at run time, as the file would give it: the service's check and slow start.
    public func makeServer(_ a: AddedServer) -> ServerConfig {
        var s = ServerConfig(name: a.name, address: a.address, location: location)
        s.weight = a.weight
        s.backup = a.backup
        s.maxconn = a.maxconn
        s.check = serverCheck
        s.slowstart = mode.isKernel ? Millis(0) : serverSlowstart
        return s
    }

    public init(name: String, timeouts: Timeouts, retries: Int, location: SourceLocation) {
        self.name = name
        self.timeouts = timeouts
        self.retries = retries
        self.location = location
    }
}

public struct Config: Sendable, Equatable {
    public var file: String
    public var global = GlobalConfig()
    public var timeouts = Timeouts()
    public var retries = Defaults.retries
    /// `defaults.check`: the base every service's `check:` starts from.
    public var check = CheckConfig()
    public var services: [ServiceConfig] = []
    /// Accepted but worth saying (`file:line:column: text`): `check` prints them, `run` logs them.
    public var warnings: [String] = []

    public init(file: String) { self.file = file }
}
