import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Direct routing on one L2 segment, each host a network namespace on one bridge:
///
/// ```
/// c 10.81.0.10-18, fd81::10     lb 10.81.0.2, fd81::2 (+ VIPs 10.81.0.100, .101, fd81::100)
/// s1 10.81.0.21, fd81::21       s2 10.81.0.22, fd81::22   (both: VIPs on lo, arp_ignore=1, arp_announce=2)
/// ```
///
/// The balancer holds the service addresses (clients find them by ARP/NDP there); the servers
/// hold them on their loopback without answering ARP for them, and answer the client directly.
/// Each server runs socat on port 80 (IPv4 and IPv6): it says its name, then echoes.
final class DSRLab: @unchecked Sendable {
    let net = Netns(prefix: "bd\(Int.random(in: 100...999))")
    static let ip = "/usr/sbin/ip"
    let vip = "10.81.0.100"
    let vip6 = "fd81::100"
    /// A second address on the balancer, for a nat service beside the dsr one.
    let natVip = "10.81.0.101"
    let lbAddr = "10.81.0.2"
    let dir = TempDir()

    static var available: Bool { NatLab.available }

    func ns(_ host: String) -> String { net.ns(host) }
    var lbDev: String { net.dev("lb") }
    func dev(_ host: String) -> String { net.dev(host) }
    func serverAddr(_ k: Int) -> String { "10.81.0.\(21 + k)" }
    func serverAddr6(_ k: Int) -> String { "fd81::\(21 + k)" }
    /// The client's addresses (several, for per-address placement).
    let clients = (10...18).map { "10.81.0.\($0)" }

    init() throws {
        try net.addSwitches(["sw"])
        try net.addHosts(["c", "lb", "s1", "s2"])
        try net.plug("c", "c", "10.81.0.10", sw: "sw")
        for a in clients.dropFirst() { try net.ipn("c", "addr", "add", "\(a)/24", "dev", dev("c")) }
        try net.ipn("c", "-6", "addr", "add", "fd81::10/64", "dev", dev("c"), "nodad")
        try net.plug("lb", "lb", lbAddr, sw: "sw")
        try net.ipn("lb", "-6", "addr", "add", "fd81::2/64", "dev", lbDev, "nodad")
        for v in [vip, natVip] { try net.ipn("lb", "addr", "add", "\(v)/32", "dev", lbDev) }
        // Deprecated at once (preferred_lft 0): never the source of the balancer's own packets
        // (health checks), whose answers would otherwise stay on the server that holds it too.
        try net.ipn("lb", "-6", "addr", "add", "\(vip6)/128", "dev", lbDev, "nodad", "preferred_lft", "0")
        try net.sysctl("lb", "net.ipv4.ip_forward=1")
        for (k, s) in ["s1", "s2"].enumerated() {
            try net.plug(s, s, serverAddr(k), sw: "sw")
            try net.ipn(s, "-6", "addr", "add", "\(serverAddr6(k))/64", "dev", dev(s), "nodad")
            try net.ipn(s, "addr", "add", "\(vip)/32", "dev", "lo")
            try net.ipn(s, "-6", "addr", "add", "\(vip6)/128", "dev", "lo")
            // The usual LVS-DR server settings: never answer ARP for the VIP, never use it as
            // the source of an ARP request; announce a MAC change (gratuitous ARP).
            try net.sysctl(
                s, "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.all.arp_notify=1", "net.ipv4.conf.\(dev(s)).arp_notify=1")
            try startServer(s)
        }
        usleep(300_000)
    }

    /// socat on port 80 of server `s`, IPv4 and IPv6.
    func startServer(_ s: String) throws {
        try net.spawn(in: s, ["/usr/bin/socat", "TCP4-LISTEN:80,fork,reuseaddr", "SYSTEM:echo \(s); cat"])
        try net.spawn(in: s, ["/usr/bin/socat", "TCP6-LISTEN:80,fork,reuseaddr,ipv6only=1", "SYSTEM:echo \(s); cat"])
    }

    func config(_ services: String) -> String {
        "global:\n  user: root\n  workers: 1\n  stats: { sockets: [{ path: \"\(dir.file("lb.sock"))\", level: admin }] }\n"
            + "  metrics: { address: \"127.0.0.1:9109\" }\nservices:\n" + services
    }

    /// `/metrics` as seen inside the balancer's namespace.
    func metrics() throws -> String {
        try Netns.sh([Self.ip, "netns", "exec", ns("lb"), "/usr/bin/curl", "-s", "http://127.0.0.1:9109/metrics"])
    }

    func startBallast(_ services: String) throws -> BallastProcess {
        try BallastProcess(config: config(services), prefix: [Self.ip, "netns", "exec", ns("lb")])
    }

    var socket: String { dir.file("lb.sock") }

    /// One dsr service (its servers s1 and s2 on port 80 unless `servers` says otherwise).
    func dsrService(
        name: String = "web", bind: String? = nil, extra: String = "", servers: [(String, String)]? = nil,
        serverExtra: [String: String] = [:]
    ) -> String {
        let list = servers ?? [("s1", "\(serverAddr(0)):80"), ("s2", "\(serverAddr(1)):80")]
        var s = "  - name: \(name)\n    mode: dsr\n    interface: \(lbDev)\n    bind: \"\(bind ?? "\(vip):80")\"\n"
        s += "    check: { type: tcp, interval: 300ms, fall: 2, rise: 1 }\n"
        for line in extra.split(separator: "\n") { s += "    \(line)\n" }
        s += "    servers:\n"
        for (n, a) in list {
            s += "      - { name: \(n), address: \"\(a)\"\(serverExtra[n].map { ", " + $0 } ?? "") }\n"
        }
        return s
    }

    /// What a client sees: `count` connections to `host:port` from the client namespace (from
    /// each of `sources` in turn, else the first client address), each reading the server's
    /// name, sending a line and reading it back. Per server, how many answered with their bytes
    /// intact; "error" counts the others.
    func connect(_ host: String, _ port: Int, count: Int, sources: [String] = []) throws -> [String: Int] {
        try perSource(host, port, count: count, sources: sources).values.reduce(into: [:]) { out, m in
            for (k, v) in m { out[k, default: 0] += v }
        }
    }

    /// As `connect`, by source address.
    func perSource(_ host: String, _ port: Int, count: Int, sources: [String] = []) throws -> [String: [String: Int]] {
        let script = """
            import socket, sys, json
            host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
            sources = [s for s in sys.argv[4].split(",") if s]
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            out = {}
            for k in range(count):
                src = sources[k % len(sources)] if sources else ""
                seen = "error"
                try:
                    s = socket.socket(fam, socket.SOCK_STREAM)
                    s.settimeout(3)
                    if src: s.bind((src, 0))
                    s.connect((host, port))
                    f = s.makefile("rb")
                    name = f.readline().decode().strip()
                    msg = ("message %d from %s " % (k, src) + "x" * (k % 700) + "\\n").encode()
                    s.sendall(msg)
                    back = f.read(len(msg))
                    seen = name if back == msg else "error"
                    s.close()
                except Exception as e:
                    seen = "error"
                out.setdefault(src, {}).setdefault(seen, 0)
                out[src][seen] += 1
            print(json.dumps(out))
            """
        let (status, out, err) = try runCommand(
            Self.ip,
            [
                "netns", "exec", ns("c"), "python3", "-c", script, host, "\(port)", "\(count)",
                sources.joined(separator: ","),
            ],
            timeout: 120)
        guard status == 0, let data = out.data(using: .utf8),
            let json = try JSONSerialization.jsonObject(with: data) as? [String: [String: Int]]
        else { throw Net.Failure("client failed (\(status)): \(out) \(err)") }
        return json
    }

    /// A table's listing in the balancer's namespace (nil: no such table or object).
    func nft(_ args: String...) -> String? {
        try? Netns.sh([Self.ip, "netns", "exec", ns("lb"), "/usr/sbin/nft"] + args)
    }

    deinit {
        _ = nft("delete", "table", "netdev", "ballast")
        net.teardown()
    }
}
