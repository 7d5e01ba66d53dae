import BallastCore
import BallastHealth
import BallastIO

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `show servers state` (format version 1), which is also the state file: what an operator set
/// at run time (maintenance, drain, weight, forced health) written on every change and read back
/// at start, so a restart does not lose it (HAProxy issue #199).
enum StateFile {
    static let header =
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n"

    /// HAProxy's HCHK_STATUS numbers.
    static func number(_ s: CheckStatus) -> Int {
        switch s {
        case .initializing: return 1
        case .sockError: return 5
        case .l4ok: return 6
        case .l4timeout: return 7
        case .l4con: return 8
        case .l7timeout: return 12
        case .l7response: return 13
        case .l7ok: return 15
        case .l7status: return 17
        }
    }

    static func line(_ iid: Int, _ svc: Service, _ j: Int, _ s: Server, _ check: CheckView?, _ now: Int64) -> String {
        let conf = svc.config.servers[j]
        let up = s.up.load(ordering: .relaxed)
        let ramping = s.effectiveWeight(now: now) < s.weight
        let op = up ? (ramping ? 1 : 2) : 0
        var admin = 0
        switch s.adminState {
        case .maint: admin = conf.state == .maint ? 0x04 : 0x01
        case .drain: admin = 0x08
        case .ready: admin = 0
        }
        var status = 1
        var result = 0
        var health = 0
        var state = 0
        var agent = 0
        var checkPort = 0
        var checkAddr = "-"
        if let v = check {
            let isAgent = v.type == .agent
            status = v.last.map { number($0.status) } ?? 1
            // As HAProxy: the result is unknown (0) while a check is under way.
            result = v.running ? 0 : v.last.map { $0.status.passed ? 3 : 2 } ?? 0
            health = v.health
            let bits = 0x2 | (v.enabled ? 0x4 : 0) | (v.running ? 0x1 : 0)
            if isAgent { agent = bits | 0x10 } else { state = bits }
            if v.port != s.address.port { checkPort = Int(v.port) }
            if v.address.hostText != s.address.hostText { checkAddr = v.address.hostText }
        } else {
            health = 2
        }
        let since = max(0, now - s.lastChange.load(ordering: .relaxed)) / 1000
        let addr = s.hasAddress.load(ordering: .relaxed) ? s.address.hostText : "-"
        return
            "\(iid) \(svc.name) \(j + 1) \(s.name) \(addr) \(op) \(admin) \(s.weight) \(s.initialWeight.load(ordering: .relaxed)) \(since) \(status) \(result) \(health) \(state) \(agent) 0 0 \(s.hostname ?? "-") \(s.address.port) - 0 \(checkPort) \(checkAddr) - 0\n"
    }

    static func render(_ table: ServiceTable, checker: HealthChecker?, only: Service? = nil) -> String {
        let now = monotonicMillis()
        var out = header
        for (k, svc) in table.services.enumerated() where only == nil || only === svc {
            for (j, s) in svc.servers.enumerated() { out += line(k + 1, svc, j, s, checker?.view(s), now) }
        }
        return out
    }

    /// Writes `text` to `path` through a temporary file and a rename, so a crash never leaves
    /// half a file. Returns an error text on failure.
    /// Why the state file could not be saved: the step and the system's error.
    struct WriteError: Error, CustomStringConvertible {
        enum Step: String { case create = "cannot create", write = "cannot write", rename = "cannot rename" }
        var step: Step
        var errno: Int32
        var path: String
        var description: String { "\(step.rawValue) \(path): \(String(cString: strerror(errno)))" }
    }

    /// Writes `text` to a temporary file beside `path`, syncs it and renames it over `path`.
    static func write(_ text: String, to path: String) throws(WriteError) {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw WriteError(step: .create, errno: errno, path: tmp) }
        guard Sys.writeAll(fd, Array(text.utf8)) else {
            let e = errno
            Sys.close(fd)
            throw WriteError(step: .write, errno: e, path: tmp)
        }
        fsync(fd)
        close(fd)
        guard rename(tmp, path) == 0 else { throw WriteError(step: .rename, errno: errno, path: tmp) }
    }

    struct Saved {
        var address: String
        var port: UInt16
        var opState: Int
        var admin: Int
        var weight: Int
        var initialWeight: Int
    }

    static func parse(_ text: String) -> [String: Saved] {
        var out: [String: Saved] = [:]
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.drop { $0 == " " || $0 == "\t" }
            if line.isEmpty || line.hasPrefix("#") { continue }
            let f = line.split(separator: " ").map(String.init)
            guard f.count >= 19, let op = Int(f[5]), let admin = Int(f[6]), let uw = Int(f[7]), let iw = Int(f[8]),
                let port = UInt16(f[18])
            else { continue }
            out["\(f[1])/\(f[3])"] = Saved(
                address: f[4], port: port, opState: op, admin: admin, weight: uw, initialWeight: iw)
        }
        return out
    }

    // MARK: - Server changes made at run time

    /// The runtime API's `add server`, `del server` and `set server … addr`, as comment lines
    /// after the rows (HAProxy reads `#` lines as comments), each service's under the digest of
    /// the text they were made against:
    /// `#ballast-service <svc> <digest>`, `#ballast-add <svc> <srv> <addr> <weight> <backup> <maxconn>`,
    /// `#ballast-del <svc> <srv>`, `#ballast-addr <svc> <srv> <addr>`.
    static func renderChanges(_ changes: RuntimeServers) -> String {
        var out = ""
        for name in changes.services.keys.sorted() {
            let c = changes.services[name]!
            out += "#ballast-service \(name) \(String(c.digest, radix: 16))\n"
            for a in c.added {
                out += "#ballast-add \(name) \(a.name) \(a.address) \(a.weight) \(a.backup ? 1 : 0) \(a.maxconn)\n"
            }
            for d in c.deleted { out += "#ballast-del \(name) \(d)\n" }
            for (srv, a) in c.addresses.sorted(by: { $0.key < $1.key }) { out += "#ballast-addr \(name) \(srv) \(a)\n" }
        }
        return out
    }

    static func parseChanges(_ text: String) -> RuntimeServers {
        var all: [String: RuntimeServers.Changes] = [:]
        for raw in text.split(whereSeparator: \.isNewline) where raw.hasPrefix("#ballast-") {
            let f = raw.split(separator: " ").map(String.init)
            guard f.count >= 3 else { continue }
            let svc = f[1]
            switch (f[0], f.count) {
            case ("#ballast-service", 3):
                if let d = UInt64(f[2], radix: 16) { all[svc] = RuntimeServers.Changes(digest: d) }
            case ("#ballast-add", 7):
                guard let a = try? SocketAddress(parsing: f[3]), let w = Int(f[4]), let b = Int(f[5]), let m = Int(f[6])
                else { continue }
                var s = AddedServer(name: f[2], address: a)
                s.weight = w
                s.backup = b != 0
                s.maxconn = m
                all[svc]?.added.append(s)
            case ("#ballast-del", 3):
                all[svc]?.deleted.append(f[2])
            case ("#ballast-addr", 4):
                if let a = try? SocketAddress(parsing: f[3]) { all[svc]?.addresses[f[2]] = a }
            default:
                continue
            }
        }
        var out = RuntimeServers()
        for (k, v) in all { out.restore(k, v) }
        return out
    }

    /// Applies a saved file to a freshly built table. A server whose address or port changed in
    /// the config, or whose configured weight changed, takes the config instead; servers no
    /// longer in the config are simply not found. Returns log lines.
    static func restore(_ text: String, into table: ServiceTable) -> [String] {
        let saved = parse(text)
        var notes: [String] = []
        let now = monotonicMillis()
        var restored = 0
        for svc in table.services {
            for (j, s) in svc.servers.enumerated() {
                guard let v = saved["\(svc.name)/\(s.name)"] else { continue }
                // A server given by name may have moved since; its name is what the file keeps.
                if s.hostname == nil, v.address != s.address.hostText || v.port != s.address.port {
                    notes.append(
                        "state file: \(svc.name)/\(s.name) now has address \(s.address) in the config (saved: \(v.address):\(v.port)); the config wins"
                    )
                    continue
                }
                let state: AdminState = v.admin & 0x05 != 0 ? .maint : v.admin & 0x18 != 0 ? .drain : .ready
                if state != s.adminState { s.setAdmin(state, now: now) }
                if v.initialWeight == svc.config.servers[j].weight, v.weight != s.weight,
                    (0...Defaults.maxWeight).contains(v.weight)
                {
                    s.setWeight(v.weight, now: now)
                }
                if v.opState == 0 { s.setUp(false, now: now) }
                restored += 1
            }
        }
        if restored > 0 { notes.append("state file: restored the runtime state of \(restored) servers") }
        return notes
    }
}
