#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Parses and validates a YAML configuration. Everything is checked before anything is returned:
/// a bad file yields one `ConfigError` naming file, line and column, and nothing is applied.
typealias Node = YAMLNode

public enum ConfigLoader {
    /// Keys accepted at each level; anything else is an error (a typo must not be silently ignored).
    public static let topKeys = ["global", "defaults", "services"]
    public static let globalKeys = [
        "workers", "maxconn", "log", "pipe_size", "engine", "grace", "user", "group", "stats", "metrics", "state_file",
        "nat",
    ]
    public static let globalNatKeys = ["keep_on_exit"]
    public static let serviceNatKeys = ["snat"]
    public static let statsKeys = ["sockets", "timeout", "maxconn"]
    public static let statsSocketKeys = ["path", "address", "mode", "owner", "group", "level", "allow_world_writable"]
    public static let metricsKeys = ["address"]
    public static let logKeys = ["level", "format", "connections"]
    public static let defaultsKeys = ["timeout", "retries", "check"]
    public static let checkKeys = [
        "type", "interval", "fastinterval", "downinterval", "timeout", "rise", "fall", "port", "address", "method",
        "path",
        "host", "expect", "body", "username", "user", "password", "password_file", "role", "require", "query", "send",
        "send_proxy",
        "max_lag", "init_state",
    ]
    public static let sentinelKeys = [
        "addresses", "master", "username", "password", "password_file", "interval", "timeout",
    ]
    public static let timeoutKeys = ["connect", "client", "server", "queue"]
    public static let serviceKeys = [
        "name", "mode", "bind", "balance", "hash_key", "hash_table_size", "allbackups", "slowstart", "timeout",
        "retries", "maxqueue", "check", "observe", "on_marked_down", "on_marked_up", "servers", "nat",
        "sentinel", "allow", "deny", "limits", "init_addr", "resolve_interval", "interface",
    ]
    public static let limitKeys = ["conn_per_source", "new_conn_rate_per_source"]
    public static let serverKeys = [
        "name", "address", "weight", "maxconn", "backup", "slowstart", "state", "check", "send_proxy", "allow_self",
        "init_addr", "resolve_interval",
    ]
    /// Service and server names: at most this long (they are typed in runtime API commands).
    public static let maxNameLength = 64
    /// Durations: at most 2^31-1 ms (24.8 days), HAProxy's ceiling for its timers.
    public static let maxDurationMillis: Int64 = Int64(Int32.max)
    public static let bindKeys = ["address", "accept_proxy", "freebind"]

    /// `resolve` looks up servers given by DNS name (nil: such a server is an error).
    public static func load(path: String, contents: String, resolve: NameResolver? = nil) throws(ConfigError) -> Config
    {
        let parser = Parser(file: path, resolve: resolve)
        return try parser.parse(contents)
    }

    final class Parser {
        let file: String
        let resolve: NameResolver?
        var warnings: [String] = []
        var defaultsDigest: UInt64 = 0

        init(file: String, resolve: NameResolver?) {
            self.file = file
            self.resolve = resolve
        }

        func loc(_ node: Node) -> SourceLocation {
            SourceLocation(file: file, line: node.mark.line, column: node.mark.column)
        }

        func fail(_ node: Node, _ message: String) -> ConfigError { ConfigError(loc(node), message) }

        func parse(_ text: String) throws(ConfigError) -> Config {
            let root: Node?
            do {
                root = try YAMLNode.parse(text)
            } catch {
                // A duplicated key is well-formed text with a meaning YAML forbids: said plainly.
                let text = error.message.hasPrefix("duplicate key") ? error.message : "invalid YAML: \(error.message)"
                throw ConfigError(SourceLocation(file: file, line: error.line, column: error.column), text)
            }
            guard let root else {
                throw ConfigError(
                    SourceLocation(file: file, line: 1, column: 1),
                    "the file is empty: at least one service is required")
            }
            let top = try mapping(root, "the top level", allowed: ConfigLoader.topKeys)
            var config = Config(file: file)
            if let g = top["global"] { config.global = try parseGlobal(g.value) }
            if let d = top["defaults"] {
                try parseDefaults(d.value, into: &config)
                defaultsDigest = ConfigLoader.digest(d.value)
            }
            guard let servicesEntry = top["services"] else {
                throw fail(root, "missing required key 'services'")
            }
            guard case .sequence(let seq, _) = servicesEntry.value, !seq.isEmpty else {
                throw fail(servicesEntry.value, "'services' must be a non-empty list of services")
            }
            var names: [String: SourceLocation] = [:]
            var binds: [SocketAddress: (String, SourceLocation)] = [:]
            for (i, node) in seq.enumerated() {
                let svc = try parseService(node, index: i, config: config)
                if let prev = names[svc.name] {
                    throw ConfigError(svc.location, "duplicate service name '\(svc.name)' (first defined at \(prev))")
                }
                names[svc.name] = svc.location
                for b in svc.binds where b.address.port != 0 {
                    if let (other, prevLoc) = binds[b.address] {
                        throw ConfigError(
                            b.location, "bind \(b.address) is already used by service '\(other)' at \(prevLoc)")
                    }
                    binds[b.address] = (svc.name, b.location)
                }
                config.services.append(svc)
            }
            try checkListeners(config)
            try checkLoops(config)
            config.warnings = warnings
            return config
        }

        /// Every address this config listens on (service binds, TCP stats sockets, the metrics
        /// endpoint) once: two that would take each other's connections are an error here rather
        /// than an EADDRINUSE at start.
        func checkListeners(_ config: Config) throws(ConfigError) {
            var all: [(SocketAddress, String, SourceLocation)] = []
            for svc in config.services {
                for b in svc.binds where b.address.port != 0 {
                    all.append((b.address, "the bind of service '\(svc.name)'", b.location))
                }
            }
            for sock in config.global.stats.sockets {
                if let a = sock.address, a.port != 0 { all.append((a, "a TCP stats socket", sock.location)) }
            }
            if let m = config.global.metrics, m.port != 0 {
                all.append(
                    (
                        m, "the metrics endpoint",
                        config.global.metricsLocation ?? SourceLocation(file: file, line: 1, column: 1)
                    ))
            }
            for (i, (a, what, at)) in all.enumerated() {
                for (b, other, otherAt) in all[..<i] where a.covers(b) || b.covers(a) {
                    // Two services on one address are reported by the bind check with both names.
                    if what.hasPrefix("the bind") && other.hasPrefix("the bind") && a == b { continue }
                    throw ConfigError(at, "\(a) (\(what)) takes the same connections as \(b) (\(other), \(otherAt))")
                }
            }
        }

        /// A server that is one of this config's own binds sends every connection back into
        /// Ballast: one client would loop until maxconn. Refused unless `allow_self: true`.
        func checkLoops(_ config: Config) throws(ConfigError) {
            for svc in config.services {
                for s in svc.servers where !s.allowSelf {
                    for other in config.services {
                        for b in other.binds
                        where b.address.covers(s.address) && (b.address == s.address || s.address.isLoopback) {
                            let whose =
                                other.name == svc.name
                                ? "this service's own bind" : "the bind of service '\(other.name)'"
                            throw ConfigError(
                                s.location,
                                "service '\(svc.name)' server '\(s.name)': \(s.address) is \(whose) (\(b.location)): every connection would come back to Ballast; set allow_self: true if a chain through Ballast is meant"
                            )
                        }
                    }
                }
            }
        }

        // MARK: Structure helpers

        struct Entry {
            var key: Node
            var value: Node
        }

        /// Returns the entries of a mapping after rejecting unknown and duplicated keys.
        func mapping(_ node: Node, _ what: String, allowed: [String]) throws(ConfigError) -> [String: Entry] {
            guard case .mapping(let m, _) = node else {
                throw fail(node, "\(what) must be a mapping of keys to values")
            }
            var out: [String: Entry] = [:]
            for (k, v) in m {
                guard case .scalar(let ks, _) = k else { throw fail(k, "keys must be plain words") }
                let key = ks.string
                if !allowed.contains(key) {
                    let hint = suggestion(key, allowed).map { " (did you mean '\($0)'?)" } ?? ""
                    throw fail(
                        k, "unknown key '\(key)' in \(what)\(hint); expected one of: \(allowed.joined(separator: ", "))"
                    )
                }
                if out[key] != nil { throw fail(k, "duplicate key '\(key)' in \(what)") }
                out[key] = Entry(key: k, value: v)
            }
            return out
        }

        func suggestion(_ key: String, _ allowed: [String]) -> String? {
            let best = allowed.map { ($0, editDistance(key, $0)) }.min { $0.1 < $1.1 }
            guard let best, best.1 <= 2 else { return nil }
            return best.0
        }

        func scalar(_ node: Node, _ what: String) throws(ConfigError) -> String {
            guard case .scalar(let s, _) = node else { throw fail(node, "\(what) must be a single value") }
            if s.isNull {
                throw fail(node, "\(what) needs a value")
            }
            return s.string
        }

        func string(_ node: Node, _ what: String) throws(ConfigError) -> String {
            let s = try scalar(node, what)
            if s.isEmpty { throw fail(node, "\(what) must not be empty") }
            return s
        }

        /// `v1` or `v2` (PROXY protocol), for servers and for checks.
        func proxyVersion(_ node: Node, _ label: String) throws(ConfigError) -> ProxyProtocol.Version {
            let v = try scalar(node, label)
            guard let version = ProxyProtocol.Version(text: v) else {
                throw fail(node, "\(label): unknown value '\(v)'; expected one of: v1, v2")
            }
            return version
        }

        /// A service or server name: what the runtime API and logs refer to it by.
        func identifier(_ node: Node, _ what: String) throws(ConfigError) -> String {
            let name = try string(node, what)
            guard !name.isEmpty else { throw fail(node, "\(what) is empty") }
            guard name.utf8.count <= ConfigLoader.maxNameLength else {
                throw fail(
                    node,
                    "\(what) '\(name.prefix(32))…' is \(name.utf8.count) characters long; at most \(ConfigLoader.maxNameLength)"
                )
            }
            guard name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:".contains($0)) }) else {
                throw fail(node, "\(what) '\(name)' may contain only letters, digits, '-', '_', '.' and ':'")
            }
            guard name != "FRONTEND" && name != "BACKEND" else {
                throw fail(
                    node, "\(what) '\(name)' is reserved: show stat names a service's own rows FRONTEND and BACKEND")
            }
            return name
        }

        /// A list of networks (`[10.0.0.0/8, "2001:db8::/32"]`), or one; each mistake at its item.
        func prefixes(_ node: Node, _ what: String) throws(ConfigError) -> [IPPrefix] {
            let items: [Node]
            switch node {
            case .sequence(let s, _): items = Array(s)
            default: items = [node]
            }
            var out: [IPPrefix] = []
            var seen = Set<IPPrefix>()
            for item in items {
                let text = try string(item, what)
                let p: IPPrefix
                do { p = try IPPrefix(parsing: text) } catch { throw fail(item, "\(what): \(error)") }
                if !seen.insert(p).inserted { throw fail(item, "\(what): \(p) is listed twice") }
                out.append(p)
            }
            return out
        }

        func integer(_ node: Node, _ what: String, min: Int, max: Int) throws(ConfigError) -> Int {
            let s = try scalar(node, what)
            guard let v = Int(s) else { throw fail(node, "\(what) must be an integer, not '\(s)'") }
            guard v >= min && v <= max else {
                throw fail(node, "\(what) must be between \(min) and \(max), not \(v)")
            }
            return v
        }

        func bool(_ node: Node, _ what: String) throws(ConfigError) -> Bool {
            let s = try scalar(node, what)
            switch s.lowercased() {
            case "true", "yes", "on": return true
            case "false", "no", "off": return false
            default: throw fail(node, "\(what) must be true or false, not '\(s)'")
            }
        }

        /// A duration above zero (or zero, where zero means off), at most `maxDurationMillis`.
        func duration(_ node: Node, _ what: String, zeroMeansOff: Bool = false) throws(ConfigError) -> Millis {
            let s = try scalar(node, what)
            guard let v = ConfigLoader.parseDuration(s) else {
                throw fail(
                    node, "\(what): '\(s)' is not a duration (use a number with ms, s, m, h or d, such as 500ms or 2s)")
            }
            guard v.value > 0 || zeroMeansOff else { throw fail(node, "\(what) must be greater than zero") }
            guard v.value <= ConfigLoader.maxDurationMillis else {
                throw fail(node, "\(what): '\(s)' is too long; at most 24d (2147483647 ms)")
            }
            return v
        }

        func size(_ node: Node, _ what: String) throws(ConfigError) -> Int {
            let s = try scalar(node, what)
            guard let v = ConfigLoader.parseSize(s) else {
                throw fail(node, "\(what): '\(s)' is not a size (bytes, or a number with k or m, such as 64k or 1m)")
            }
            return v
        }

        func enumValue<E: RawRepresentable & CaseIterable>(_ node: Node, _ what: String, _: E.Type) throws(ConfigError)
            -> E where E.RawValue == String
        {
            let s = try scalar(node, what)
            guard let v = E(rawValue: s) else {
                throw fail(
                    node,
                    "\(what): unknown value '\(s)'; expected one of: \(E.allCases.map(\.rawValue).joined(separator: ", "))"
                )
            }
            return v
        }

        // MARK: Sections

        func parseGlobal(_ node: Node) throws(ConfigError) -> GlobalConfig {
            var g = GlobalConfig()
            let m = try mapping(node, "global", allowed: ConfigLoader.globalKeys)
            if let e = m["workers"] {
                if case .scalar(let s, _) = e.value, s.string == "auto" {
                    g.workers = nil
                } else {
                    g.workers = try integer(e.value, "global.workers (a number or auto)", min: 1, max: 256)
                }
            }
            if let e = m["maxconn"] {
                g.maxconn = try integer(e.value, "global.maxconn", min: 1, max: 10_000_000)
                g.maxconnExplicit = true
                g.maxconnLocation = loc(e.value)
            }
            if let e = m["grace"] { g.grace = try duration(e.value, "global.grace") }
            if let e = m["engine"] {
                let v = try string(e.value, "global.engine")
                guard let engine = Engine(rawValue: v) else {
                    throw fail(e.value, "global.engine must be epoll, io_uring or io_uring_sqpoll, not '\(v)'")
                }
                g.engine = engine
            }
            if let e = m["pipe_size"] {
                let v = try size(e.value, "global.pipe_size")
                guard v >= 4096 && v <= 64 << 20 else {
                    throw fail(e.value, "global.pipe_size must be between 4k and 64m, not \(v)")
                }
                g.pipeSize = v
            }
            if let e = m["user"] {
                let name = try string(e.value, "global.user")
                guard let pw = getpwnam(name) else { throw fail(e.value, "global.user: no such user '\(name)'") }
                g.user = (name, pw.pointee.pw_uid, pw.pointee.pw_gid)
            }
            if let e = m["group"] {
                let name = try string(e.value, "global.group")
                guard let gr = getgrnam(name) else { throw fail(e.value, "global.group: no such group '\(name)'") }
                g.group = (name, gr.pointee.gr_gid)
                guard g.user != nil else { throw fail(e.key, "global.group needs global.user") }
            }
            if let e = m["stats"] { g.stats = try parseStats(e.value) }
            if let e = m["metrics"] {
                let mm = try mapping(e.value, "global.metrics", allowed: ConfigLoader.metricsKeys)
                guard let a = mm["address"] else {
                    throw fail(e.value, "global.metrics: missing required key 'address'")
                }
                g.metrics = try loopbackAddress(a.value, "global.metrics.address")
                g.metricsLocation = loc(a.value)
            }
            if let e = m["nat"] {
                let nm = try mapping(e.value, "global.nat", allowed: ConfigLoader.globalNatKeys)
                if let k = nm["keep_on_exit"] { g.natKeepOnExit = try bool(k.value, "global.nat.keep_on_exit") }
            }
            if let e = m["state_file"] {
                let path = try string(e.value, "global.state_file")
                guard path.hasPrefix("/") else { throw fail(e.value, "global.state_file must be an absolute path") }
                g.stateFile = path
            }
            if let e = m["log"] {
                let lm = try mapping(e.value, "global.log", allowed: ConfigLoader.logKeys)
                if let l = lm["level"] { g.log.level = try enumValue(l.value, "global.log.level", LogLevel.self) }
                if let f = lm["format"] { g.log.format = try enumValue(f.value, "global.log.format", LogFormat.self) }
                if let c = lm["connections"] { g.log.connections = try bool(c.value, "global.log.connections") }
            }
            return g
        }

        /// An `ip:port` that only this host can reach: the runtime API and metrics have no
        /// authentication, so they stay on loopback.
        func loopbackAddress(_ node: Node, _ what: String) throws(ConfigError) -> SocketAddress {
            let text = try string(node, what)
            let a: SocketAddress
            do { a = try SocketAddress(parsing: text) } catch {
                throw fail(node, "\(what): '\(text)' is not an ip:port address (\(error))")
            }
            guard a.isLoopback else {
                throw fail(
                    node,
                    "\(what): \(a) is not a loopback address; the runtime API and metrics have no authentication, so they listen on 127.0.0.0/8 or ::1 only"
                )
            }
            return a
        }

        func parseStats(_ node: Node) throws(ConfigError) -> StatsConfig {
            var st = StatsConfig()
            let m = try mapping(node, "global.stats", allowed: ConfigLoader.statsKeys)
            if let e = m["timeout"] { st.timeout = try duration(e.value, "global.stats.timeout") }
            if let e = m["maxconn"] { st.maxconn = try integer(e.value, "global.stats.maxconn", min: 1, max: 10_000) }
            guard let e = m["sockets"] else { throw fail(node, "global.stats: missing required key 'sockets'") }
            guard case .sequence(let seq, _) = e.value, !seq.isEmpty else {
                throw fail(e.value, "global.stats.sockets must be a non-empty list of sockets")
            }
            var seen: [String: SourceLocation] = [:]
            for (i, item) in seq.enumerated() {
                let what = "global.stats.sockets[\(i)]"
                let sm = try mapping(item, what, allowed: ConfigLoader.statsSocketKeys)
                var sock = StatsSocketConfig(location: loc(item))
                switch (sm["path"], sm["address"]) {
                case (let p?, nil):
                    let path = try string(p.value, "\(what).path")
                    guard path.hasPrefix("/") else { throw fail(p.value, "\(what).path must be an absolute path") }
                    guard path.utf8.count < 108 else {
                        throw fail(p.value, "\(what).path is longer than a Unix socket path may be (107 bytes)")
                    }
                    sock.path = path
                case (nil, let a?):
                    sock.address = try loopbackAddress(a.value, "\(what).address")
                    for k in ["mode", "owner", "group"] where sm[k] != nil {
                        throw fail(sm[k]!.key, "\(what): '\(k)' applies to a Unix socket (path), not to a TCP address")
                    }
                case (nil, nil):
                    throw fail(item, "\(what): give path (a Unix socket) or address (TCP on loopback)")
                case (_?, let a?):
                    throw fail(a.key, "\(what): give path or address, not both")
                }
                if let prev = seen[sock.name] { throw fail(item, "\(what): \(sock.name) is already listed at \(prev)") }
                seen[sock.name] = sock.location
                if let e = sm["mode"] {
                    let text = try scalar(e.value, "\(what).mode")
                    guard let v = UInt32(text, radix: 8), v <= 0o777 else {
                        throw fail(e.value, "\(what).mode: '\(text)' is not an octal file mode such as 600 or 660")
                    }
                    sock.mode = v
                }
                if let e = sm["owner"] {
                    let name = try string(e.value, "\(what).owner")
                    guard let pw = getpwnam(name) else { throw fail(e.value, "\(what).owner: no such user '\(name)'") }
                    sock.uid = pw.pointee.pw_uid
                }
                if let e = sm["group"] {
                    let name = try string(e.value, "\(what).group")
                    guard let gr = getgrnam(name) else { throw fail(e.value, "\(what).group: no such group '\(name)'") }
                    sock.gid = gr.pointee.gr_gid
                }
                if let e = sm["level"] { sock.level = try enumValue(e.value, "\(what).level", CLILevel.self) }
                let insist =
                    try sm["allow_world_writable"].map { e throws(ConfigError) in
                        try bool(e.value, "\(what).allow_world_writable")
                    } ?? false
                // Connecting to a Unix socket takes write permission: o+w lets every local user in.
                if sock.path != nil && sock.mode & 0o002 != 0 && !insist {
                    let at = sm["mode"].map { loc($0.value) } ?? loc(item)
                    switch sock.level {
                    case .admin:
                        throw ConfigError(
                            at,
                            "\(what): mode \(String(sock.mode, radix: 8)) lets every local user in at level admin (the runtime API has no authentication); use 600 or 660 with group, or set allow_world_writable: true"
                        )
                    case .operator:
                        warnings.append(
                            "\(at): \(what): mode \(String(sock.mode, radix: 8)) lets every local user in at level operator (they can drain servers and clear counters)"
                        )
                    case .user:
                        break
                    }
                }
                st.sockets.append(sock)
            }
            return st
        }

        func parseTimeouts(_ node: Node, _ what: String, base: Timeouts) throws(ConfigError) -> Timeouts {
            var t = base
            let m = try mapping(node, what, allowed: ConfigLoader.timeoutKeys)
            if let e = m["connect"] { t.connect = try duration(e.value, "\(what).connect") }
            if let e = m["client"] { t.client = try duration(e.value, "\(what).client") }
            if let e = m["server"] { t.server = try duration(e.value, "\(what).server") }
            if let e = m["queue"] { t.queue = try duration(e.value, "\(what).queue") }
            return t
        }

        func parseDefaults(_ node: Node, into config: inout Config) throws(ConfigError) {
            let m = try mapping(node, "defaults", allowed: ConfigLoader.defaultsKeys)
            if let e = m["timeout"] {
                config.timeouts = try parseTimeouts(e.value, "defaults.timeout", base: config.timeouts)
            }
            if let e = m["retries"] { config.retries = try integer(e.value, "defaults.retries", min: 0, max: 100) }
            if let e = m["check"] { config.check = try parseCheck(e.value, "defaults.check", base: config.check) }
        }

        /// A `check:` mapping applied over `base`. Every field is validated here, and the
        /// combination once it is complete (`validateCheck`).
        func parseCheck(_ node: Node, _ what: String, base: CheckConfig) throws(ConfigError) -> CheckConfig {
            var c = base
            let m = try mapping(node, what, allowed: ConfigLoader.checkKeys)
            if let e = m["type"] {
                c.type = try enumValue(e.value, "\(what).type", CheckType.self)
            }
            if let e = m["interval"] { c.interval = try duration(e.value, "\(what).interval") }
            if let e = m["fastinterval"] { c.fastinterval = try duration(e.value, "\(what).fastinterval") }
            if let e = m["downinterval"] { c.downinterval = try duration(e.value, "\(what).downinterval") }
            if let e = m["timeout"] { c.timeout = try duration(e.value, "\(what).timeout") }
            if let e = m["rise"] { c.rise = try integer(e.value, "\(what).rise", min: 1, max: 100) }
            if let e = m["fall"] { c.fall = try integer(e.value, "\(what).fall", min: 1, max: 100) }
            if let e = m["port"] { c.port = UInt16(try integer(e.value, "\(what).port", min: 1, max: 65535)) }
            if let e = m["address"] {
                let text = try string(e.value, "\(what).address")
                do {
                    c.address = try SocketAddress(
                        parsing: text.contains(":") && !text.hasPrefix("[") ? "[\(text)]:0" : "\(text):0")
                } catch {
                    throw fail(e.value, "\(what).address: '\(text)' is not a numeric IPv4 or IPv6 address")
                }
            }
            if let e = m["method"] { c.method = try string(e.value, "\(what).method") }
            if let e = m["path"] {
                c.path = try string(e.value, "\(what).path")
                guard c.path.hasPrefix("/") else { throw fail(e.value, "\(what).path must start with '/'") }
            }
            if let e = m["host"] { c.host = try string(e.value, "\(what).host") }
            if let e = m["body"] { c.body = try string(e.value, "\(what).body") }
            if let e = m["expect"] {
                // mysql: the value the query must return; otherwise HTTP status codes.
                if c.type == .mysql {
                    c.queryExpect = try scalar(e.value, "\(what).expect")
                } else {
                    c.expect = try parseExpect(e.value, "\(what).expect")
                }
            }
            if let e = m["username"] { c.username = try string(e.value, "\(what).username") }
            if m["password"] != nil && m["password_file"] != nil {
                throw fail(m["password_file"]!.key, "\(what): give password or password_file, not both")
            }
            if let e = m["password"] { c.password = try scalar(e.value, "\(what).password") }
            if let e = m["password_file"] { c.password = try passwordFile(e.value, "\(what).password_file") }
            if let e = m["role"] { c.role = try enumValue(e.value, "\(what).role", RedisRole.self) }
            if let e = m["send"] { c.send = try scalar(e.value, "\(what).send") }
            if let e = m["user"] { c.username = try string(e.value, "\(what).user") }
            if let e = m["send_proxy"] { c.sendProxy = try proxyVersion(e.value, "\(what).send_proxy") }
            if let e = m["require"] { c.mysqlRequire = try enumValue(e.value, "\(what).require", MySQLRequire.self) }
            if let e = m["query"] { c.query = try string(e.value, "\(what).query") }
            if let e = m["max_lag"] { c.maxLag = try duration(e.value, "\(what).max_lag") }
            if let e = m["init_state"] { c.initState = try enumValue(e.value, "\(what).init_state", InitState.self) }
            if c.type == .mysql && c.password != nil && c.username == nil {
                throw fail(node, "\(what): a mysql password needs a user")
            }
            if c.type == .mysql, c.queryExpect != nil, c.query == nil {
                throw fail(m["expect"]?.key ?? node, "\(what): expect needs a query whose first value it checks")
            }
            if c.type == .mysql, c.query != nil || c.mysqlRequire != .any, c.username == nil {
                throw fail(
                    m["query"]?.key ?? m["require"]?.key ?? node, "\(what): query and require need a user to log in as")
            }
            if c.maxLag != nil {
                let replica =
                    (c.type == .redis && c.role == .replica) || (c.type == .mysql && c.mysqlRequire == .replica)
                guard replica else {
                    throw fail(
                        m["max_lag"]?.key ?? node,
                        "\(what): max_lag applies to replica checks only (type: redis with role: replica, or type: mysql with require: replica), not to a \(c.type.rawValue) check"
                    )
                }
            }
            if m["timeout"] != nil { c.timeoutSet = true }
            // As HAProxy: with no timeout written, a check never outlasts its interval.
            if !c.timeoutSet { c.timeout = min(Defaults.checkTimeout, c.interval) }
            if c.timeout > c.interval {
                throw fail(
                    m["timeout"]?.value ?? m["interval"]?.value ?? node,
                    "\(what): timeout \(c.timeout) is above interval \(c.interval); a check must end before the next one starts"
                )
            }
            return c
        }

        /// A secret kept in a file of its own (one line; relative to the config file's directory).
        func passwordFile(_ node: Node, _ what: String) throws(ConfigError) -> String {
            let path = try string(node, what)
            let dir = file.contains("/") ? String(file[..<file.lastIndex(of: "/")!]) : "."
            let full = path.hasPrefix("/") ? path : dir + "/" + path
            switch RegularFile.text(full, limit: 64 << 10) {
            case .failure(let e): throw fail(node, "\(what): cannot read '\(full)': \(e)")
            case .success(let text): return text.hasSuffix("\n") ? String(text.dropLast()) : text
            }
        }

        func parseSentinel(_ node: Node, _ what: String) throws(ConfigError) -> SentinelConfig {
            let m = try mapping(node, what, allowed: ConfigLoader.sentinelKeys)
            guard let a = m["addresses"] else { throw fail(node, "\(what): missing required key 'addresses'") }
            let items: [Node]
            switch a.value {
            case .sequence(let seq, _): items = Array(seq)
            case .scalar: items = [a.value]
            default: throw fail(a.value, "\(what).addresses must be a list of ip:port")
            }
            guard !items.isEmpty else { throw fail(a.value, "\(what).addresses must list at least one Sentinel") }
            var addrs: [SocketAddress] = []
            for item in items {
                let text = try string(item, "\(what).addresses")
                let addr: SocketAddress
                do { addr = try SocketAddress(parsing: text) } catch {
                    throw fail(item, "\(what).addresses: '\(text)': \(error)")
                }
                if addr.port == 0 { throw fail(item, "\(what).addresses: '\(text)': port 0 cannot be connected to") }
                if addrs.contains(addr) { throw fail(item, "\(what).addresses: \(addr) is listed twice") }
                addrs.append(addr)
            }
            guard let n = m["master"] else {
                throw fail(node, "\(what): missing required key 'master' (the name in 'sentinel monitor NAME …')")
            }
            var c = SentinelConfig(addresses: addrs, master: try string(n.value, "\(what).master"), location: loc(node))
            if let e = m["username"] { c.username = try string(e.value, "\(what).username") }
            if m["password"] != nil && m["password_file"] != nil {
                throw fail(m["password_file"]!.key, "\(what): give password or password_file, not both")
            }
            if let e = m["password"] { c.password = try scalar(e.value, "\(what).password") }
            if let e = m["password_file"] { c.password = try passwordFile(e.value, "\(what).password_file") }
            if let e = m["interval"] { c.interval = try duration(e.value, "\(what).interval") }
            if let e = m["timeout"] { c.timeout = try duration(e.value, "\(what).timeout") }
            if m["timeout"] == nil { c.timeout = Millis(min(c.timeout.value, c.interval.value)) }
            if c.timeout > c.interval {
                throw fail(m["timeout"]!.value, "\(what): timeout \(c.timeout) is above interval \(c.interval)")
            }
            return c
        }

        func parseExpect(_ node: Node, _ what: String) throws(ConfigError) -> [ClosedRange<Int>] {
            let items: [Node]
            switch node {
            case .sequence(let s, _): items = Array(s)
            default: items = [node]
            }
            var out: [ClosedRange<Int>] = []
            for item in items {
                let t = try scalar(item, what)
                let parts = t.split(separator: "-", omittingEmptySubsequences: false)
                guard (1...2).contains(parts.count), let lo = Int(parts[0]), let hi = Int(parts.last!),
                    (100...599).contains(lo),
                    (100...599).contains(hi), lo <= hi
                else {
                    throw fail(
                        item,
                        "\(what): '\(t)' is not a status code or range between 100 and 599 (such as 200 or 200-299)")
                }
                out.append(lo...hi)
            }
            return out
        }

        func parseService(_ node: Node, index: Int, config: Config) throws(ConfigError) -> ServiceConfig {
            let m = try mapping(node, "services[\(index)]", allowed: ConfigLoader.serviceKeys)
            guard let nameEntry = m["name"] else { throw fail(node, "services[\(index)]: missing required key 'name'") }
            let name = try identifier(nameEntry.value, "service name")
            let what = "service '\(name)'"
            var svc = ServiceConfig(name: name, timeouts: config.timeouts, retries: config.retries, location: loc(node))
            svc.digest = ConfigLoader.digest(node) ^ defaultsDigest &* 0x9E37_79B9_7F4A_7C15
            if let e = m["mode"] {
                svc.mode = try enumValue(e.value, "\(what): mode", ServiceMode.self)
            }
            if let e = m["balance"] {
                svc.balance = try enumValue(e.value, "\(what): balance", Balance.self)
            } else if svc.mode == .dsr {
                svc.balance = .source  // the only flow-stable choice without connection state
            }
            if let e = m["hash_key"] {
                guard svc.balance == .source else {
                    throw fail(
                        e.key, "\(what): hash_key applies only to balance: source (balance is \(svc.balance.rawValue))")
                }
                svc.hashKey = try enumValue(e.value, "\(what): hash_key", HashKey.self)
            }
            if let e = m["hash_table_size"] {
                guard svc.balance == .source else {
                    throw fail(
                        e.key,
                        "\(what): hash_table_size applies only to balance: source (balance is \(svc.balance.rawValue))")
                }
                let n = try integer(e.value, "\(what): hash_table_size", min: 2, max: 10_000_000)
                guard MaglevTable.isPrime(n) else {
                    throw fail(
                        e.value,
                        "\(what): hash_table_size \(n) is not prime (Maglev needs a prime table size; the next prime is \(ConfigLoader.nextPrime(n)))"
                    )
                }
                svc.hashTableSize = n
            }
            if let e = m["allbackups"] { svc.allbackups = try bool(e.value, "\(what): allbackups") }
            let allow = try m["allow"].map { e throws(ConfigError) in try prefixes(e.value, "\(what): allow") } ?? []
            let deny = try m["deny"].map { e throws(ConfigError) in try prefixes(e.value, "\(what): deny") } ?? []
            if let problem = AccessList.conflict(allow: allow, deny: deny) {
                throw fail(m["allow"]!.key, "\(what): \(problem)")
            }
            svc.access = AccessList(allow: allow, deny: deny)
            if let e = m["limits"] {
                let lm = try mapping(e.value, "\(what) limits", allowed: ConfigLoader.limitKeys)
                if let c = lm["conn_per_source"] {
                    svc.limits.connections = try integer(
                        c.value, "\(what) limits.conn_per_source", min: 1, max: 10_000_000)
                }
                if let r = lm["new_conn_rate_per_source"] {
                    let text = try scalar(r.value, "\(what) limits.new_conn_rate_per_source")
                    guard let (n, period) = SourceLimits.parseRate(text) else {
                        throw fail(
                            r.value,
                            "\(what) limits.new_conn_rate_per_source: '\(text)' is not a rate (connections per s, m or h, such as 50/s)"
                        )
                    }
                    svc.limits.rate = n
                    svc.limits.ratePeriodMs = period
                }
            }
            var serviceSlowstart = Millis(0)
            if let e = m["slowstart"] {
                serviceSlowstart = try duration(e.value, "\(what): slowstart", zeroMeansOff: true)
            }
            // For the servers given by DNS name (numeric ones have nothing to resolve).
            var naming = Naming()
            if let e = m["init_addr"] { naming.initAddr = try initAddr(e.value, "\(what): init_addr") }
            if let e = m["resolve_interval"] {
                naming.interval = try resolveInterval(e.value, "\(what): resolve_interval")
            }
            var serviceCheck: CheckConfig?
            if let e = m["check"] { serviceCheck = try parseCheck(e.value, "\(what) check", base: config.check) }
            if let e = m["observe"] {
                let om = try mapping(e.value, "\(what) observe", allowed: ["fails"])
                guard let f = om["fails"] else { throw fail(e.value, "\(what) observe: missing required key 'fails'") }
                svc.observeFails = try integer(f.value, "\(what) observe.fails", min: 1, max: 1000)
                guard serviceCheck != nil else {
                    throw fail(e.key, "\(what): observe needs an active check (check:) to bring a server back up")
                }
            }
            if let e = m["sentinel"] {
                guard let c = serviceCheck, c.type == .redis, c.role == .master else {
                    throw fail(
                        e.key,
                        "\(what): sentinel needs the service's check to be 'type: redis, role: master' (Sentinel names the master; the check confirms it)"
                    )
                }
                svc.sentinel = try parseSentinel(e.value, "\(what) sentinel")
            }
            if let e = m["on_marked_down"] {
                svc.onMarkedDown = try enumValue(e.value, "\(what): on_marked_down", MarkedDownAction.self)
            }
            if let e = m["on_marked_up"] {
                svc.onMarkedUp = try enumValue(e.value, "\(what): on_marked_up", MarkedUpAction.self)
            }
            if let e = m["timeout"] { svc.timeouts = try parseTimeouts(e.value, "\(what) timeout", base: svc.timeouts) }
            if let e = m["retries"] { svc.retries = try integer(e.value, "\(what): retries", min: 0, max: 100) }
            if let e = m["maxqueue"] {
                svc.maxqueue = try integer(e.value, "\(what): maxqueue", min: 0, max: 10_000_000)
            }

            guard let bindEntry = m["bind"] else { throw fail(node, "\(what): missing required key 'bind'") }
            let bindNodes: [Node]
            switch bindEntry.value {
            case .sequence(let s, _): bindNodes = Array(s)
            case .scalar: bindNodes = [bindEntry.value]
            default: throw fail(bindEntry.value, "\(what): bind must be an address or a list of addresses")
            }
            if bindNodes.isEmpty { throw fail(bindEntry.value, "\(what): bind must list at least one address") }
            for bindNode in bindNodes {
                var b = bindNode
                var acceptProxy = false
                var freebind: Node?
                if case .mapping = bindNode {
                    let bm = try mapping(bindNode, "\(what) bind", allowed: ConfigLoader.bindKeys)
                    guard let a = bm["address"] else {
                        throw fail(bindNode, "\(what) bind: missing required key 'address'")
                    }
                    b = a.value
                    if let e = bm["accept_proxy"] { acceptProxy = try bool(e.value, "\(what) bind accept_proxy") }
                    if let e = bm["freebind"], try bool(e.value, "\(what) bind freebind") { freebind = e.key }
                }
                let text = try string(b, "\(what): bind address")
                let addr: SocketAddress
                do { addr = try SocketAddress(parsing: text) } catch {
                    throw fail(b, "\(what): bind '\(text)': \(error)")
                }
                if svc.binds.contains(where: { $0.address == addr }) {
                    throw fail(b, "\(what): bind \(addr) is listed twice")
                }
                if let f = freebind, svc.mode.isKernel {
                    throw fail(
                        f,
                        "\(what): freebind applies to proxy mode (\(svc.mode.rawValue) mode matches the service address whether or not this host holds it)"
                    )
                }
                svc.binds.append(
                    BindConfig(address: addr, acceptProxy: acceptProxy, freebind: freebind != nil, location: loc(b)))
            }

            guard let serversEntry = m["servers"] else { throw fail(node, "\(what): missing required key 'servers'") }
            guard case .sequence(let seq, _) = serversEntry.value, !seq.isEmpty else {
                throw fail(serversEntry.value, "\(what): 'servers' must be a non-empty list of servers")
            }
            for (i, sn) in seq.enumerated() {
                svc.serverCheck = serviceCheck
                svc.serverSlowstart = serviceSlowstart
                let server = try parseServer(
                    sn, index: i, service: what, slowstart: serviceSlowstart, check: serviceCheck,
                    defaults: config.check,
                    naming: naming, family: svc.mode.isKernel ? svc.binds.first?.address.family : nil)
                if let prev = svc.servers.first(where: { $0.name == server.name }) {
                    throw ConfigError(
                        server.location,
                        "\(what): duplicate server name '\(server.name)' (first defined at \(prev.location))")
                }
                svc.servers.append(server)
            }
            if svc.mode == .dsr { try validateDSR(&svc, m, node) }
            if svc.mode.isKernel { try validateNat(&svc, m, node) }
            if svc.mode != .nat, let e = m["nat"] {
                throw fail(
                    e.key,
                    svc.mode == .dsr
                        ? "\(what): nat.snat is not possible in dsr mode (the servers answer the clients directly, from the service address)"
                        : "\(what): 'nat' applies to mode: nat services")
            }
            if svc.mode != .dsr, let e = m["interface"] {
                throw fail(e.key, "\(what): 'interface' applies to mode: dsr services")
            }
            if svc.balance == .source, let e = m["hash_table_size"] ?? m["balance"],
                svc.hashTableSize < 10 * svc.servers.count
            {
                throw fail(
                    e.value,
                    "\(what): hash_table_size \(svc.hashTableSize) is too small for \(svc.servers.count) servers (Maglev needs at least 10 slots per server; try \(ConfigLoader.nextPrime(100 * svc.servers.count)))"
                )
            }
            return svc
        }

        /// What direct routing adds to the kernel modes' rules: one L2 segment (the interface),
        /// no port translation, no connection state (so a flow-stable hash), numeric servers.
        func validateDSR(_ svc: inout ServiceConfig, _ m: [String: Entry], _ node: Node) throws(ConfigError) {
            let what = "service '\(svc.name)'"
            guard let e = m["interface"] else {
                throw fail(
                    node,
                    "\(what): mode dsr needs 'interface' (the interface on the servers' L2 segment, where the frames are sent out again)"
                )
            }
            let name = try string(e.value, "\(what): interface")
            guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.contains(where: \.isWhitespace) else {
                throw fail(e.value, "\(what): interface '\(name)' is not an interface name")
            }
            svc.interface = name
            svc.interfaceLocation = loc(e.value)
            if svc.balance != .source {
                throw fail(
                    m["balance"]!.value,
                    "\(what): balance \(svc.balance.rawValue) is not possible in dsr mode: without connection state every packet is placed on its own, so only a hash of the flow keeps a connection on one server; use balance: source (Maglev, the same table as nat and proxy mode)"
                )
            }
            for key in ["allow", "deny", "limits"] {
                if let e = m[key] {
                    throw fail(
                        e.key,
                        "\(what): \(key) is not possible in dsr mode (the frames are switched before any connection is known); filter on the router in front, or use mode: nat"
                    )
                }
            }
            for s in svc.servers {
                if s.hostname != nil {
                    throw ConfigError(
                        s.location,
                        "\(what): server \(s.name): dsr mode needs a numeric address (the server is reached by its L2 neighbour entry for that address)"
                    )
                }
                for b in svc.binds where b.address.port != s.address.port {
                    throw ConfigError(
                        s.location,
                        "\(what): server \(s.name) listens on port \(s.address.port) but the service on \(b.address.port): dsr cannot translate ports (the server gets the packet as the client sent it, to the service address and port); give the server port \(b.address.port), or use mode: nat"
                    )
                }
            }
        }

        /// What the kernel can and cannot do for a `mode: nat` (or `dsr`) service, said at load time.
        func validateNat(_ svc: inout ServiceConfig, _ m: [String: Entry], _ node: Node) throws(ConfigError) {
            let what = "service '\(svc.name)'"
            let mode = svc.mode.rawValue
            if svc.balance == .leastconn || svc.balance == .first {
                throw fail(
                    m["balance"]!.value,
                    "\(what): balance \(svc.balance.rawValue) is not possible in \(mode) mode (the kernel does not count connections per server); use roundrobin or random (weighted), source (Maglev, the same table as proxy mode), or mode: proxy"
                )
            }
            if let e = m["nat"] {
                let nm = try mapping(e.value, "\(what) nat", allowed: ConfigLoader.serviceNatKeys)
                if let sn = nm["snat"] {
                    let v = try string(sn.value, "\(what) nat.snat")
                    switch v {
                    case "none": svc.snat = .none
                    case "masquerade": svc.snat = .masquerade
                    default:
                        let text = v.contains(":") ? "[\(v)]:0" : "\(v):0"
                        guard let a = try? SocketAddress(parsing: text) else {
                            throw fail(
                                sn.value,
                                "\(what) nat.snat: '\(v)' is not none, masquerade or a numeric IPv4/IPv6 address")
                        }
                        svc.snat = .address(a)
                    }
                }
            }
            if let e = m["slowstart"] {
                throw fail(
                    e.key, "\(what): slowstart is not possible in \(mode) mode (the kernel map has fixed weights)")
            }

            if let e = m["maxqueue"] {
                throw fail(e.key, "\(what): maxqueue is not possible in \(mode) mode (the kernel does not queue)")
            }
            if let e = m["observe"] {
                throw fail(
                    e.key,
                    "\(what): observe is not possible in \(mode) mode (the kernel's connects are not seen); use an active check"
                )
            }
            if let e = m["timeout"] {
                throw fail(e.key, "\(what): timeouts do not apply in \(mode) mode (conntrack's timeouts do)")
            }
            let family = svc.binds.first?.address.family
            for b in svc.binds {
                if b.address.port == 0 || b.address.hostText == "0.0.0.0" || b.address.hostText == "::" {
                    throw ConfigError(
                        b.location,
                        "\(what): a \(mode) bind needs an explicit address and port (the service address the kernel matches), not \(b.address)"
                    )
                }
                if b.acceptProxy {
                    throw ConfigError(
                        b.location,
                        "\(what): accept_proxy is not possible in \(mode) mode (the kernel forwards packets, it reads no header)"
                    )
                }
                if b.address.family != family {
                    throw ConfigError(
                        b.location, "\(what): a \(mode) service is IPv4 or IPv6, not both (make two services)")
                }
            }
            if case .address(let a) = svc.snat, a.family != family {
                throw fail(
                    m["nat"]!.value, "\(what): nat.snat \(a.hostText) is not the same family as the service address")
            }
            for s in svc.servers {
                if s.address.family != family {
                    throw ConfigError(
                        s.location,
                        "\(what): server \(s.name) \(s.address) is not the same family as the service address")
                }
                if s.maxconn > 0 {
                    throw ConfigError(
                        s.location,
                        "\(what): server \(s.name): maxconn is not possible in \(mode) mode (the kernel does not count connections per server)"
                    )
                }
                if s.sendProxy != nil {
                    throw ConfigError(
                        s.location,
                        "\(what): server \(s.name): send_proxy is not possible in \(mode) mode (the kernel forwards packets unchanged)"
                    )
                }
                if s.slowstart.value > 0 {
                    throw ConfigError(
                        s.location, "\(what): server \(s.name): slowstart is not possible in \(mode) mode")
                }
            }
            if svc.servers.count > 4095 {
                throw fail(node, "\(what): \(mode) mode takes at most 4095 servers per service")
            }
        }

        /// How servers given by name start and how often they are looked up again.
        struct Naming {
            var initAddr: [InitAddr] = [.libc]
            var interval = Defaults.resolveInterval
        }

        /// One step of `init_addr` (HAProxy's `init-addr`): look the name up, start without an
        /// address, or start on this one.
        enum InitAddr: Equatable {
            case libc, none
            case address(SocketAddress)
        }

        func initAddr(_ node: Node, _ what: String) throws(ConfigError) -> [InitAddr] {
            let text = try string(node, what)
            var out: [InitAddr] = []
            for part in text.split(separator: ",").map({ String($0).trimmingSpaces }) {
                switch part {
                case "libc": out.append(.libc)
                case "none": out.append(.none)
                case "last":
                    throw fail(
                        node,
                        "\(what): 'last' (the address in a state file) is not supported; use libc, none or an address, in the order to try them"
                    )
                default:
                    let t = part.contains(":") ? "[\(part)]:1" : "\(part):1"
                    guard let a = try? SocketAddress(parsing: t) else {
                        throw fail(node, "\(what): '\(part)' is not libc, none or a numeric address")
                    }
                    out.append(.address(a))
                }
            }
            if out.isEmpty { throw fail(node, "\(what): expected libc, none or an address, separated by commas") }
            return out
        }

        func resolveInterval(_ node: Node, _ what: String) throws(ConfigError) -> Millis {
            let d = try duration(node, what)
            if d.value < 100 { throw fail(node, "\(what): \(d) is too short (at least 100ms)") }
            return d
        }

        /// A server given as `name:port`: looked up now, in `init_addr`'s order.
        func named(
            _ host: String, port: UInt16, _ node: Node, _ what: String, naming: Naming, family: Int32?
        ) throws(ConfigError) -> (SocketAddress, resolved: Bool) {
            var why: [String] = []
            for step in naming.initAddr {
                switch step {
                case .libc:
                    guard let resolve else {
                        throw fail(node, "\(what): '\(host)' is a name and names are not resolved here")
                    }
                    switch resolve(host) {
                    case .failure(let e): why.append(e.message)
                    case .success(let answers):
                        switch AddressChoice.choose(current: nil, answers: answers, port: port, family: family) {
                        case .move(let a): return (a, true)
                        case .keep, .empty: why.append("no address")
                        case .otherFamily(let a):
                            why.append("it resolves to \(a.hostText) only, not an address of the service's family")
                        }
                    }
                case .none:
                    let any = family == Int32(AF_INET6) ? "[::]:\(port)" : "0.0.0.0:\(port)"
                    return (try! SocketAddress(parsing: any), false)
                case .address(var a):
                    a.port = port
                    if let family, a.family != family {
                        throw fail(node, "\(what): init_addr \(a.hostText) is not the service's family")
                    }
                    return (a, true)
                }
            }
            throw fail(
                node,
                "\(what): '\(host)' does not resolve (\(why.joined(separator: "; "))); init_addr: none starts the server out of service until it does"
            )
        }

        func parseServer(
            _ node: Node, index: Int, service: String, slowstart: Millis, check: CheckConfig?, defaults: CheckConfig,
            naming serviceNaming: Naming, family: Int32?
        ) throws(ConfigError) -> ServerConfig {
            let m = try mapping(node, "\(service) servers[\(index)]", allowed: ConfigLoader.serverKeys)
            guard let n = m["name"] else {
                throw fail(node, "\(service) servers[\(index)]: missing required key 'name'")
            }
            let name = try identifier(n.value, "server name")
            let what = "\(service) server '\(name)'"
            guard let a = m["address"] else { throw fail(node, "\(what): missing required key 'address'") }
            let text = try string(a.value, "\(what): address")
            let addr: SocketAddress
            var hostname: String?
            var resolved = true
            var naming = serviceNaming
            if let e = m["init_addr"] { naming.initAddr = try initAddr(e.value, "\(what): init_addr") }
            if let e = m["resolve_interval"] {
                naming.interval = try resolveInterval(e.value, "\(what): resolve_interval")
            }
            switch Result(catching: { () throws(SocketAddress.ParseError) in try SocketAddress(parsing: text) }) {
            case .success(let numeric):
                if let e = m["init_addr"] ?? m["resolve_interval"] {
                    throw fail(
                        e.key,
                        "\(what): \(e.key.string ?? "init_addr") applies to a server given by DNS name, and '\(text)' is an address"
                    )
                }
                addr = numeric
            case .failure(let error):
                guard let (host, port) = HostName.split(text) else {
                    throw fail(a.value, "\(what): address '\(text)': \(error) (nor is it a DNS name and a port)")
                }
                if port == 0 { throw fail(a.value, "\(what): address '\(text)': port 0 cannot be connected to") }
                (addr, resolved) = try named(host, port: port, a.value, what, naming: naming, family: family)
                hostname = host
            }
            if addr.port == 0 { throw fail(a.value, "\(what): address '\(text)': port 0 cannot be connected to") }
            if resolved, let kind = addr.notUnicast {
                throw fail(
                    a.value,
                    "\(what): address '\(text)'\(hostname == nil ? "" : " (\(addr.hostText))") is \(kind); a server needs a unicast address"
                )
            }
            var s = ServerConfig(name: name, address: addr, location: loc(node))
            s.hostname = hostname
            s.resolved = resolved
            s.resolveInterval = naming.interval
            if let e = m["weight"] {
                s.weight = try integer(e.value, "\(what): weight", min: 0, max: Defaults.maxWeight)
            }
            if let e = m["maxconn"] { s.maxconn = try integer(e.value, "\(what): maxconn", min: 0, max: 10_000_000) }
            if let e = m["backup"] { s.backup = try bool(e.value, "\(what): backup") }
            s.slowstart = slowstart
            s.check = check
            if let e = m["check"] {
                // `check: false` turns the service's check off for this server; a mapping adjusts it.
                if case .scalar = e.value {
                    if try bool(e.value, "\(what): check") { s.check = check ?? defaults } else { s.check = nil }
                } else {
                    s.check = try parseCheck(e.value, "\(what) check", base: check ?? defaults)
                }
            }
            if let e = m["slowstart"] { s.slowstart = try duration(e.value, "\(what): slowstart", zeroMeansOff: true) }
            if let e = m["allow_self"] { s.allowSelf = try bool(e.value, "\(what): allow_self") }
            if let e = m["send_proxy"] { s.sendProxy = try proxyVersion(e.value, "\(what): send_proxy") }
            if let e = m["state"] {
                let v = try scalar(e.value, "\(what): state")
                switch v {
                case "ready": s.state = .ready
                case "drain": s.state = .drain
                case "maint": s.state = .maint
                default:
                    throw fail(e.value, "\(what): state: unknown value '\(v)'; expected one of: ready, drain, maint")
                }
            }
            return s
        }
    }

    /// FNV-1a of a node as YAML writes it back (comments, spacing and position do not count).
    static func digest(_ node: Node) -> UInt64 {
        let text = node.canonical
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    /// `500ms`, `2s`, `1m`, `1h`, `1d`; a bare number is milliseconds.
    public static func parseDuration(_ text: String) -> Millis? {
        let t = text.trimmingSpaces
        let digits = t.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let n = Int64(digits) else { return nil }
        let unit = t.dropFirst(digits.count)
        let factor: Int64
        switch unit {
        case "", "ms": factor = 1
        case "s": factor = 1000
        case "m": factor = 60_000
        case "h": factor = 3_600_000
        case "d": factor = 86_400_000
        default: return nil
        }
        let (r, overflow) = n.multipliedReportingOverflow(by: factor)
        return overflow ? nil : Millis(r)
    }

    public static func nextPrime(_ n: Int) -> Int {
        var p = max(2, n)
        while !MaglevTable.isPrime(p) { p += 1 }
        return p
    }

    /// `65536`, `64k`, `1m` (binary units).
    public static func parseSize(_ text: String) -> Int? {
        let t = text.trimmingSpaces.lowercased()
        let digits = t.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let n = Int(digits), n < 1 << 40 else { return nil }
        switch t.dropFirst(digits.count) {
        case "", "b": return n
        case "k", "kb", "kib": return n << 10
        case "m", "mb", "mib": return n << 20
        default: return nil
        }
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}

public func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a)
    let b = Array(b)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var prev = Array(0...b.count)
    var cur = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        cur[0] = i
        for j in 1...b.count {
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        swap(&prev, &cur)
    }
    return prev[b.count]
}
