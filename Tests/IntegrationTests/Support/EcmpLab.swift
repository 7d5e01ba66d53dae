import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Active/active nat mode behind routers that spread flows over both balancers (ECMP), each host
/// a network namespace:
///
/// ```
/// c 10.80.0.10 ── r ══(ECMP to VIP 10.80.9.100)══ a 10.80.1.2 / b 10.80.1.3   (bridge sw1)
///                                                  a 10.80.2.2 / b 10.80.2.3 ══ rs   (bridge sw2)
///                     rs ══(ECMP to 10.80.0.0/24 back through a and b)══
///                     rs 10.80.3.1 ── s1 10.80.3.21, s2 10.80.3.22           (bridge sw3)
/// ```
///
/// Both balancers run Ballast with the same config and DNAT only, so a reply must come back
/// through the balancer that holds the flow's conntrack entry. Both routers hash the client's
/// address and port only (`fib_multipath_hash_policy=3`: `r` the source fields of the request,
/// `rs` the destination fields of the reply); the kernel orders the fields before hashing, so a
/// flow and its replies take the same balancer ("symmetric ECMP", as a fabric of routers would
/// be set up for stateful middle boxes). Withdrawing a balancer removes it from both routes, as a
/// routing daemon would when it stops announcing.
final class EcmpLab: @unchecked Sendable {
    let net = Netns(prefix: "be\(Int.random(in: 100...999))")
    var prefix: String { net.prefix }
    static let ip = "/usr/sbin/ip"
    let vip = "10.80.9.100"
    let dir = TempDir()
    private var daemons: [String: Process] = [:]
    static let hosts = ["c", "r", "a", "b", "rs", "s1", "s2", "sw1", "sw2", "sw3"]

    static var available: Bool {
        NatHALab.available && FileManager.default.fileExists(atPath: "/proc/sys/net/ipv4/fib_multipath_hash_fields")
    }

    func ns(_ host: String) -> String { net.ns(host) }
    func dev(_ name: String) -> String { net.dev(name) }
    func frontAddr(_ n: String) -> String { n == "a" ? "10.80.1.2" : "10.80.1.3" }
    func backAddr(_ n: String) -> String { n == "a" ? "10.80.2.2" : "10.80.2.3" }
    func syncAddr(_ n: String) -> String { n == "a" ? "10.80.4.2" : "10.80.4.3" }
    func serverAddr(_ k: Int) -> String { "10.80.3.\(21 + k)" }

    @discardableResult
    static func sh(_ args: [String]) throws -> String { try NatLab.sh(args) }
    private func ipn(_ host: String, _ args: String...) throws { try Self.sh([Self.ip, "-n", ns(host)] + args) }

    init() throws {
        try net.addSwitches(["sw1", "sw2", "sw3"])
        try net.addHosts(["c", "r", "a", "b", "rs", "s1", "s2"])
        // Client and router, point to point.
        try net.link("c", "c", "10.80.0.10", "r", "rc", "10.80.0.1")
        try ipn("c", "route", "add", "default", "via", "10.80.0.1")
        try net.plug("r", "rf", "10.80.1.1", sw: "sw1")
        try net.plug("rs", "rk", "10.80.2.1", sw: "sw2")
        try net.plug("rs", "rs", "10.80.3.1", sw: "sw3")
        for n in ["a", "b"] {
            try net.plug(n, "\(n)f", frontAddr(n), sw: "sw1")
            try net.plug(n, "\(n)k", backAddr(n), sw: "sw2")
            try ipn(n, "route", "add", "10.80.0.0/24", "via", "10.80.1.1")
            try ipn(n, "route", "add", "10.80.3.0/24", "via", "10.80.2.1")
            try net.sysctl(
                n, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.netfilter.nf_conntrack_tcp_loose=1")
        }
        try net.link("a", "ay", syncAddr("a"), "b", "by", syncAddr("b"))
        try net.sysctl(
            "r", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x0011")
        try net.sysctl(
            "rs", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x0022")
        // Kernels from 6.11 seed the hash per namespace when asked: give both routers one seed.
        if FileManager.default.fileExists(atPath: "/proc/sys/net/ipv4/fib_multipath_hash_seed") {
            try net.sysctl("r", "net.ipv4.fib_multipath_hash_seed=4242")
            try net.sysctl("rs", "net.ipv4.fib_multipath_hash_seed=4242")
        }
        try route(through: ["a", "b"])
        for (k, s) in ["s1", "s2"].enumerated() {
            try net.plug(s, s, serverAddr(k), sw: "sw3")
            try ipn(s, "route", "add", "default", "via", "10.80.3.1")
            try net.startEchoServer(in: s)
        }
        usleep(200_000)
    }

    /// Both routers send through exactly these balancers (ECMP when there are two).
    func route(through nodes: [String]) throws {
        func hops(_ addr: (String) -> String) -> [String] { nodes.flatMap { ["nexthop", "via", addr($0)] } }
        try Self.sh([Self.ip, "-n", ns("r"), "route", "replace", "\(vip)/32"] + hops(frontAddr))
        try Self.sh([Self.ip, "-n", ns("rs"), "route", "replace", "10.80.0.0/24"] + hops(backAddr))
    }

    func ballastConfig(_ n: String, balance: String) -> String {
        configYAML(
            global: "workers: 1\nstats: { sockets: [{ path: \"\(dir.file("\(n).sock"))\", level: admin }] }",
            services: [
                "  - name: web\n    mode: nat\n    bind: \"\(vip):80\"\n    balance: \(balance)\n    check: { type: tcp, interval: 500ms }\n"
                    + "    servers:\n      - { name: s1, address: \"\(serverAddr(0)):80\" }\n      - { name: s2, address: \"\(serverAddr(1)):80\" }\n"
            ])
    }

    func startBallast(_ n: String, balance: String) throws -> BallastProcess {
        try BallastProcess(config: ballastConfig(n, balance: balance), prefix: [Self.ip, "netns", "exec", ns(n)])
    }

    /// conntrackd on both nodes, each flow written into the other node's kernel table as it
    /// arrives (no external cache: either node may see any flow at any time).
    func startConntrackd() throws {
        for n in ["a", "b"] {
            let peer = n == "a" ? "b" : "a"
            let conf = dir.write(
                "conntrackd-\(n).conf",
                NatHALab.conntrackdConfig(
                    dir: dir, node: n, local: syncAddr(n), peer: syncAddr(peer), interface: dev("\(n)y"),
                    ignore: "10.80.4.0/24",
                    externalCache: false))
            daemons["conntrackd-\(n)"] = try net.spawn(in: n, ["/usr/sbin/conntrackd", "-C", conf])
        }
        usleep(1_000_000)
    }

    func stopConntrackd() {
        for n in ["a", "b"] {
            guard let p = daemons.removeValue(forKey: "conntrackd-\(n)") else { continue }
            p.signal(SIGTERM)
            NatLab.waitGone(p)
        }
    }

    /// The conntrack entries of node `n` for the VIP: client port → server address.
    func flows(on n: String) -> [Int: String] {
        guard let out = try? Self.sh([Self.ip, "netns", "exec", ns(n), "cat", "/proc/net/nf_conntrack"]) else {
            return [:]
        }
        var result: [Int: String] = [:]
        for line in out.split(separator: "\n") where line.contains("dst=\(vip) ") {
            let fields = line.split(separator: " ")
            let srcs = fields.filter { $0.hasPrefix("src=") }
            guard let sport = fields.first(where: { $0.hasPrefix("sport=") }).flatMap({ Int($0.dropFirst(6)) }),
                srcs.count == 2
            else { continue }
            result[sport] = String(srcs[1].dropFirst(4))
        }
        return result
    }

    struct Flow {
        var port: Int
        /// The server that greeted the connection (each echo server first says its name).
        var server: String
        var sent: Int
        var ok: Int
        var error: String
        /// The balancer that carried the flow before the withdrawal (router `r`'s choice), and the
        /// server the remaining balancer's conntrack table names for it afterwards.
        var carrier = ""
        var after = ""
        var survived: Bool { error.isEmpty && sent == ok && ok > 0 }
    }

    /// `count` long-lived echo conversations through the VIP (one message each every 100 ms, each
    /// echo checked); after `withdrawAfter` seconds balancer `withdraw` is taken out of both
    /// routes, so its flows arrive at the other balancer mid-connection. Ends after `seconds`.
    func conversations(count: Int, seconds: Double, withdraw: String, withdrawAfter: Double) throws -> [Flow] {
        let out = dir.file("flows-\(Int.random(in: 0...1_000_000)).json")
        let script = """
            import json, socket, sys, time
            vip, n, seconds, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
            flows = []
            for i in range(n):
                s = socket.create_connection((vip, 80), timeout=5)
                f = s.makefile("rb")
                server = f.readline().decode().strip()
                s.settimeout(3)
                flows.append({"s": s, "f": f, "port": s.getsockname()[1], "server": server, "sent": 0, "ok": 0, "error": ""})
            with open(path + ".ports", "w") as o:
                o.write(" ".join(str(x["port"]) for x in flows) + "\\n")
            end = time.time() + seconds
            while time.time() < end:
                for x in flows:
                    if x["error"]:
                        continue
                    x["sent"] += 1
                    msg = "flow %d message %d\\n" % (x["port"], x["sent"])
                    try:
                        x["s"].sendall(msg.encode())
                        back = x["f"].readline().decode()
                    except Exception as e:
                        x["error"] = repr(e)
                        continue
                    if back != msg:
                        x["error"] = "expected %r, got %r" % (msg, back)
                        continue
                    x["ok"] += 1
                time.sleep(0.1)
            with open(path, "w") as o:
                for x in flows:
                    o.write(json.dumps({k: x[k] for k in ("port", "server", "sent", "ok", "error")}) + "\\n")
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.ip)
        p.arguments = ["netns", "exec", ns("c"), "python3", "-c", script, vip, "\(count)", "\(seconds)", out]
        _ = FileManager.default.createFile(atPath: out + ".err", contents: nil)
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: out + ".err")
        try p.run()
        let ready = Date().addingTimeInterval(10)
        var ports: [Int] = []
        while ports.isEmpty && p.isRunning && Date() < ready {
            usleep(20_000)
            ports = ((try? String(contentsOfFile: out + ".ports", encoding: .utf8)) ?? "").split(separator: " ")
                .compactMap {
                    Int($0.trimmingCharacters(in: .whitespacesAndNewlines))
                }
        }
        usleep(UInt32(withdrawAfter * 1_000_000))
        var carrier: [Int: String] = [:]
        for port in ports { carrier[port] = try self.carrier(port) }
        let other = withdraw == "a" ? "b" : "a"
        try route(through: [other])
        NatLab.waitGone(p, timeout: seconds + 15)
        if p.isRunning { p.signal(SIGKILL) }
        let afterwards = flows(on: other)
        guard let text = try? String(contentsOfFile: out, encoding: .utf8) else {
            throw Net.Failure(
                "the conversations wrote no result: \((try? String(contentsOfFile: out + ".err", encoding: .utf8)) ?? "")"
            )
        }
        return text.split(separator: "\n").compactMap { line -> Flow? in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                let port = o["port"] as? Int
            else { return nil }
            var f = Flow(
                port: port, server: o["server"] as? String ?? "", sent: o["sent"] as? Int ?? 0,
                ok: o["ok"] as? Int ?? 0,
                error: o["error"] as? String ?? "")
            f.carrier = carrier[port] ?? ""
            f.after = afterwards[port] ?? ""
            return f
        }
    }

    /// The balancer router `r` sends the client's flow from `port` to.
    func carrier(_ port: Int) throws -> String {
        let out = try Self.sh([
            Self.ip, "-n", ns("r"), "route", "get", vip, "from", "10.80.0.10", "iif", dev("rc"), "ipproto", "tcp",
            "sport", "\(port)",
            "dport", "80",
        ])
        return out.contains("via \(frontAddr("a")) ") ? "a" : out.contains("via \(frontAddr("b")) ") ? "b" : "?"
    }

    /// The server's name from its address.
    func name(of addr: String) -> String { addr == serverAddr(0) ? "s1" : addr == serverAddr(1) ? "s2" : addr }

    deinit {
        stopConntrackd()
        for n in ["a", "b"] {
            _ = try? Self.sh([Self.ip, "netns", "exec", ns(n), "/usr/sbin/nft", "delete", "table", "ip", "ballast"])
        }
        net.teardown()
    }
}
