import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Two balancer nodes on one L2 segment with a client and two servers, each host a network
/// namespace of its own, all joined by a Linux bridge in a "switch" namespace. keepalived
/// (Debian's) runs VRRP over unicast between the nodes and moves the floating address; Ballast
/// runs on both nodes, bound to the floating address with `freebind`.
final class HALab: @unchecked Sendable {
    let net = Netns(prefix: "bh\(Int.random(in: 100...999))")
    var prefix: String { net.prefix }
    static let ip = "/usr/sbin/ip"
    let vip = "10.78.0.100"
    let nodes = ["a", "b"]
    let dir = TempDir()
    private var keepalived: [String: Process] = [:]

    static var available: Bool {
        geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/keepalived")
            && FileManager.default.isExecutableFile(atPath: ip)
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/socat")
    }

    func ns(_ host: String) -> String { net.ns(host) }
    func nodeAddr(_ n: String) -> String { n == "a" ? "10.78.0.2" : "10.78.0.3" }
    func serverAddr(_ k: Int) -> String { "10.78.0.\(21 + k)" }
    func dev(_ host: String) -> String { net.dev(host) }

    @discardableResult
    static func sh(_ args: [String]) throws -> String { try NatLab.sh(args) }

    init() throws {
        try net.addSwitches(["sw"])
        try net.addHosts(["c", "a", "b", "s1", "s2"])
        let addrs = [
            ("c", "10.78.0.10"), ("a", nodeAddr("a")), ("b", nodeAddr("b")), ("s1", serverAddr(0)),
            ("s2", serverAddr(1)),
        ]
        for (h, addr) in addrs { try net.plug(h, h, addr, sw: "sw") }
        for s in ["s1", "s2"] { try net.startEchoServer(in: s) }
        usleep(200_000)
    }

    /// Ballast on node `n`: the service on the floating address (freebind), the two servers.
    func ballastConfig(_ n: String, extra: String = "") -> String {
        configYAML(
            global: "workers: 1\nstats: { sockets: [{ path: \"\(dir.file("\(n).sock"))\", level: admin }] }",
            services: [
                "  - name: redis\n    bind: [{ address: \"\(vip):6379\", freebind: true }]\n    balance: source\n    check: { type: tcp, interval: 500ms }\n"
                    + (extra.isEmpty ? "" : "    \(extra)\n")
                    + "    servers:\n      - { name: s1, address: \"\(serverAddr(0)):80\" }\n      - { name: s2, address: \"\(serverAddr(1)):80\" }\n"
            ])
    }

    func startBallast(_ n: String) throws -> BallastProcess {
        try BallastProcess(config: ballastConfig(n), prefix: [HALab.ip, "netns", "exec", ns(n)])
    }

    /// keepalived on node `n` (VRRP only, foreground, logging to a file), tracking `ballast health`.
    func startKeepalived(_ n: String, priority: Int, preempt: Bool, advert: String = "1") throws {
        let peer = n == "a" ? nodeAddr("b") : nodeAddr("a")
        let conf = dir.write(
            "keepalived-\(n).conf",
            """
            global_defs {
                router_id ballast-\(n)
                script_user root
                enable_script_security
                vrrp_version 3
            }
            vrrp_script chk_ballast {
                script "\(Repo.ballast) health --socket \(dir.file("\(n).sock")) --timeout 300"
                interval 1
                fall 1
                rise 2
            }
            vrrp_instance VI_1 {
                state BACKUP
                interface \(dev(n))
                virtual_router_id 51
                priority \(priority)
                advert_int \(advert)
                \(preempt ? "" : "nopreempt")
                unicast_src_ip \(nodeAddr(n))
                unicast_peer {
                    \(peer)
                }
                virtual_ipaddress {
                    \(vip)/24 dev \(dev(n))
                }
                track_script {
                    chk_ballast
                }
            }

            """)
        _ = FileManager.default.createFile(atPath: dir.file("keepalived-\(n).log"), contents: nil)  // a new log
        keepalived[n] = try net.spawn(
            in: n,
            [
                "/usr/sbin/keepalived", "-n", "-l", "-P", "-f", conf, "-p", dir.file("ka-\(n).pid"), "-r",
                dir.file("vrrp-\(n).pid"),
            ], log: dir.file("keepalived-\(n).log"))
    }

    func stopKeepalived(_ n: String) {
        guard let p = keepalived[n] else { return }
        p.signal(SIGTERM)
        NatLab.waitGone(p)
        keepalived[n] = nil
    }

    func keepalivedLog(_ n: String) -> String {
        (try? String(contentsOfFile: dir.file("keepalived-\(n).log"), encoding: .utf8)) ?? ""
    }

    /// Whether node `n`'s link carries the floating address now (the other node may too, for a
    /// moment, while a move is under way).
    func holds(_ n: String) -> Bool {
        (try? addresses(n))?.contains("\(vip)/") ?? false
    }

    /// `ip -4 addr` of node `n`'s link.
    func addresses(_ n: String) throws -> String {
        try HALab.sh([HALab.ip, "-n", ns(n), "-4", "addr", "show", "dev", dev(n)])
    }

    /// What each node's link carries now, for a failure message: the time and `ip addr` of both.
    func addressReport() -> String {
        var out = "at \(Date()):"
        for n in nodes {
            let text: String
            do { text = try addresses(n) } catch { text = "\(error)" }
            out += "\n\(n): \(text)"
        }
        return out
    }

    /// How the last `waitHolder` went (time, looks, the slowest), for failure messages.
    private(set) var lastWait = ""

    func waitHolder(_ n: String, timeout: Double = 15) -> Bool {
        HALab.waitHolder(n, timeout: timeout, holds: holds, report: &lastWait)
    }

    /// Polls `holds(n)` until it is true or `timeout` passes; `report` says how long it took, how
    /// many looks were taken and the slowest (a loaded host slows each `ip` call).
    static func waitHolder(
        _ n: String, timeout: Double, holds: (String) -> Bool, report: inout String
    ) -> Bool {
        let start = Date()
        var polls = 0
        var slowest = 0.0
        var held = false
        while !held && Date().timeIntervalSince(start) < timeout {
            if polls > 0 { usleep(50_000) }
            let t = Date()
            held = holds(n)
            polls += 1
            slowest = max(slowest, Date().timeIntervalSince(t))
        }
        let waited = String(format: "%.2f", Date().timeIntervalSince(start))
        report =
            "\(held ? "" : "not ")held by \(n) after \(waited) s (timeout \(timeout) s): \(polls) looks, "
            + "slowest \(String(format: "%.2f", slowest)) s"
        return held
    }

    /// Times a node entered MASTER state, from its keepalived log.
    func masterEntries(_ n: String) -> Int {
        keepalivedLog(n).components(separatedBy: "Entering MASTER STATE").count - 1
    }

    /// A client in its namespace opening a new connection to the VIP every 50 ms for `seconds`;
    /// each line of the result: `epoch-seconds ok <server>` or `epoch-seconds err <why>`.
    func startClient(seconds: Double) throws -> (Process, String) {
        let out = dir.file("client-\(Int.random(in: 0...1_000_000)).log")
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        let script = """
            import socket, sys, time
            vip, seconds = sys.argv[1], float(sys.argv[2])
            end = time.time() + seconds
            out = open(sys.argv[3], "w", buffering=1)
            while time.time() < end:
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect((vip, 6379))
                    name = s.recv(100).decode().strip()
                    out.write("%.3f ok %s\\n" % (time.time(), name))
                except Exception as e:
                    out.write("%.3f err %s\\n" % (time.time(), e))
                s.close()
                time.sleep(0.05)
            """
        return (try net.spawn(in: "c", ["python3", "-c", script, vip, "\(seconds)", out]), out)
    }

    /// The connections of a client log made at or after `t`: when each ended, and whether it
    /// succeeded.
    static func attempts(_ log: String, after t: Double) -> [(time: Double, ok: Bool)] {
        log.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: " ", maxSplits: 2)
            guard parts.count >= 2, let ts = Double(parts[0]), ts >= t else { return nil }
            return (ts, parts[1] == "ok")
        }
    }

    /// Waits until the client log at `path` has a successful connection stamped after `t`.
    static func waitClientOK(_ path: String, after t: Double, timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let log = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            if attempts(log, after: t).contains(where: \.ok) { return true }
            usleep(100_000)
        }
        return false
    }

    /// From a client log: for a fault at `t`, how long until connections succeeded again (0 when
    /// none failed), and how many failed before that.
    static func recovery(_ log: String, after t: Double) -> (seconds: Double, failures: Int) {
        var failures = 0
        for attempt in attempts(log, after: t) {
            if !attempt.ok {
                failures += 1
            } else if failures > 0 {
                return (attempt.time - t, failures)
            }
        }
        return failures == 0 ? (0, 0) : (Double.infinity, failures)
    }

    deinit {
        for n in Array(keepalived.keys) { stopKeepalived(n) }
        net.teardown()
    }
}
