import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The network namespaces one test builds (the labs of HA, nat pair and ECMP tests share it):
/// hosts, "switches" (a namespace holding bridge `br0`), veth links, and the processes started
/// in them. `teardown()` (also run at deinit) ends those processes by PID, then anything still
/// running in the namespaces (a server's forked children), then deletes the namespaces.
final class Netns: @unchecked Sendable {
    static let ip = "/usr/sbin/ip"
    let prefix: String
    private(set) var hosts: [String] = []
    private var procs: [Process] = []

    init(prefix: String) { self.prefix = prefix }

    deinit { teardown() }

    func ns(_ host: String) -> String { "\(prefix)-\(host)" }
    /// An interface name unique to this lab (interfaces are created in the test's namespace first).
    func dev(_ name: String) -> String { "\(prefix)\(name)" }

    @discardableResult
    static func sh(_ args: [String]) throws -> String { try NatLab.sh(args) }

    func ipn(_ host: String, _ args: String...) throws { try Self.sh([Self.ip, "-n", ns(host)] + args) }

    func sysctl(_ host: String, _ settings: String...) throws {
        try Self.sh([Self.ip, "netns", "exec", ns(host), "sysctl", "-qw"] + settings)
    }

    /// New hosts, each with its loopback up.
    func addHosts(_ names: [String]) throws {
        for h in names {
            try Self.sh([Self.ip, "netns", "add", ns(h)])
            hosts.append(h)
            try ipn(h, "link", "set", "lo", "up")
        }
    }

    /// New switches: a host each, holding bridge `br0`.
    func addSwitches(_ names: [String]) throws {
        try addHosts(names)
        for sw in names {
            try ipn(sw, "link", "add", "br0", "type", "bridge")
            try ipn(sw, "link", "set", "br0", "up")
        }
    }

    /// A veth from `host` (its end named `dev(name)`, address `addr`, /24 unless given) into
    /// bridge `br0` of switch `sw`.
    func plug(_ host: String, _ name: String, _ addr: String, sw: String) throws {
        let d = dev(name)
        try Self.sh([Self.ip, "link", "add", d, "type", "veth", "peer", "name", "\(d)p"])
        try Self.sh([Self.ip, "link", "set", d, "netns", ns(host)])
        try Self.sh([Self.ip, "link", "set", "\(d)p", "netns", ns(sw)])
        try ipn(sw, "link", "set", "\(d)p", "master", "br0", "up")
        try ipn(host, "addr", "add", addr.contains("/") ? addr : "\(addr)/24", "dev", d)
        try ipn(host, "link", "set", d, "up")
    }

    /// A point-to-point veth between two hosts: `dev(nameA)` in `a` with `addrA`, `dev(nameB)` in
    /// `b` with `addrB` (/24 unless given).
    func link(_ a: String, _ nameA: String, _ addrA: String, _ b: String, _ nameB: String, _ addrB: String) throws {
        try Self.sh([Self.ip, "link", "add", dev(nameA), "type", "veth", "peer", "name", dev(nameB)])
        for (h, n, addr) in [(a, nameA, addrA), (b, nameB, addrB)] {
            try Self.sh([Self.ip, "link", "set", dev(n), "netns", ns(h)])
            try ipn(h, "addr", "add", addr.contains("/") ? addr : "\(addr)/24", "dev", dev(n))
            try ipn(h, "link", "set", dev(n), "up")
        }
    }

    /// Runs `args` inside `host`, its output appended to `log` (or discarded). Ended at teardown.
    @discardableResult
    func spawn(in host: String, _ args: [String], log: String? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.ip)
        p.arguments = ["netns", "exec", ns(host)] + args
        if let log {
            if !FileManager.default.fileExists(atPath: log) {
                _ = FileManager.default.createFile(atPath: log, contents: nil)
            }
            let h = FileHandle(forWritingAtPath: log)
            h?.seekToEndOfFile()
            p.standardOutput = h
            p.standardError = h
        } else {
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
        }
        try p.run()
        procs.append(p)
        return p
    }

    /// socat on `port` of `host`: says the host's name, then echoes what it gets.
    func startEchoServer(in host: String, port: Int = 80) throws {
        try spawn(in: host, ["/usr/bin/socat", "TCP4-LISTEN:\(port),fork,reuseaddr", "SYSTEM:echo \(host); cat"])
    }

    func teardown() {
        for p in procs where p.isRunning { p.signal(SIGKILL) }
        procs.removeAll()
        for h in hosts { NatLab.killAll(in: ns(h)) }
        for h in hosts { _ = try? Self.sh([Self.ip, "netns", "del", ns(h)]) }
        hosts.removeAll()
    }
}
