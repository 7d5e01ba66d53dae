import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The standard LVS-NAT pair in network namespaces: a client segment (client, node a, node b;
/// front VIP 10.79.1.100), a server segment (nodes, two servers whose default gateway is the back
/// VIP 10.79.2.1), and a direct link between the nodes for conntrackd. Ballast in nat mode on both
/// nodes, keepalived moving both VIPs together, conntrackd (FTFW) syncing the flows.
final class NatHALab: @unchecked Sendable {
    let net = Netns(prefix: "bx\(Int.random(in: 100...999))")
    var prefix: String { net.prefix }
    static let ip = "/usr/sbin/ip"
    let vip = "10.79.1.100"
    let backVip = "10.79.2.1"
    let dir = TempDir()
    private var daemons: [String: Process] = [:]

    static var available: Bool {
        HALab.available && FileManager.default.isExecutableFile(atPath: "/usr/sbin/conntrackd")
            && FileManager.default.isExecutableFile(atPath: "/usr/sbin/nft")
    }

    func ns(_ host: String) -> String { net.ns(host) }
    func front(_ n: String) -> String { net.dev("\(n)f") }
    func back(_ n: String) -> String { net.dev("\(n)k") }
    func sync(_ n: String) -> String { net.dev("\(n)y") }
    func frontAddr(_ n: String) -> String { n == "a" ? "10.79.1.2" : "10.79.1.3" }
    func backAddr(_ n: String) -> String { n == "a" ? "10.79.2.2" : "10.79.2.3" }
    func syncAddr(_ n: String) -> String { n == "a" ? "10.79.3.2" : "10.79.3.3" }
    func serverAddr(_ k: Int) -> String { "10.79.2.\(21 + k)" }

    @discardableResult
    static func sh(_ args: [String]) throws -> String { try NatLab.sh(args) }

    private func ipn(_ host: String, _ args: String...) throws { try Self.sh([Self.ip, "-n", ns(host)] + args) }

    init() throws {
        try net.addSwitches(["swf", "swk"])
        try net.addHosts(["c", "a", "b", "s1", "s2"])
        try net.plug("c", "cf", "10.79.1.10", sw: "swf")
        try ipn("c", "route", "add", "default", "via", vip)
        for n in ["a", "b"] {
            try net.plug(n, "\(n)f", frontAddr(n), sw: "swf")
            try net.plug(n, "\(n)k", backAddr(n), sw: "swk")
            // Picked-up flows (committed by conntrackd mid-connection) are tracked as they are
            // (tcp_loose). A node taking a flow back holds an older entry for it (conntrackd
            // commits only new ones): without tcp_be_liberal its TCP window check finds the
            // sequence numbers far ahead and the packets INVALID.
            try net.sysctl(
                n, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.netfilter.nf_conntrack_tcp_loose=1",
                "net.netfilter.nf_conntrack_tcp_be_liberal=1")
        }
        try net.link("a", "ay", syncAddr("a"), "b", "by", syncAddr("b"))
        for (k, s) in ["s1", "s2"].enumerated() {
            try net.plug(s, s, serverAddr(k), sw: "swk")
            try ipn(s, "route", "add", "default", "via", backVip)
            try net.startEchoServer(in: s)
        }
        usleep(200_000)
    }

    func ballastConfig(_ n: String) -> String {
        configYAML(
            global:
                "workers: 1\nstats: { sockets: [{ path: \"\(dir.file("\(n).sock"))\", level: admin }] }\nnat: { keep_on_exit: true }",
            services: [
                "  - name: web\n    mode: nat\n    bind: \"\(vip):80\"\n    balance: source\n    check: { type: tcp, interval: 500ms }\n"
                    + "    servers:\n      - { name: s1, address: \"\(serverAddr(0)):80\" }\n      - { name: s2, address: \"\(serverAddr(1)):80\" }\n"
            ])
    }

    func startBallast(_ n: String) throws -> BallastProcess {
        try BallastProcess(config: ballastConfig(n), prefix: [Self.ip, "netns", "exec", ns(n)])
    }

    private func run(_ name: String, _ n: String, _ args: [String]) throws {
        daemons["\(name)-\(n)"] = try net.spawn(in: n, args, log: dir.file("\(name)-\(n).log"))
    }

    func conntrackdConf(_ n: String) -> String { dir.file("conntrackd-\(n).conf") }

    func startConntrackd(_ n: String) throws {
        let peer = n == "a" ? "b" : "a"
        _ = dir.write(
            "conntrackd-\(n).conf",
            Self.conntrackdConfig(
                dir: dir, node: n, local: syncAddr(n), peer: syncAddr(peer), interface: sync(n), ignore: "10.79.3.0/24",
                externalCache: true))
        try run("conntrackd", n, ["/usr/sbin/conntrackd", "-C", conntrackdConf(n)])
    }

    /// conntrackd in FTFW mode over a dedicated link. With `externalCache` the peer's flows wait
    /// in a cache until a notify script commits them (active/backup); without it they go into
    /// the kernel's table as they arrive (active/active, where either node may see any flow).
    static func conntrackdConfig(
        dir: TempDir, node n: String, local: String, peer: String, interface: String, ignore: String,
        externalCache: Bool
    ) -> String {
        """
        Sync {
            Mode FTFW {
                DisableExternalCache \(externalCache ? "Off" : "On")
            }
            UDP {
                IPv4_address \(local)
                IPv4_Destination_Address \(peer)
                Port 3780
                Interface \(interface)
                Checksum on
            }
        }
        General {
            HashSize 8192
            HashLimit 65535
            LogFile \(dir.file("conntrackd-\(n).log"))
            LockFile \(dir.file("conntrackd-\(n).lock"))
            UNIX { Path \(dir.file("conntrackd-\(n).ctl")) }
            NetlinkBufferSize 2097152
            NetlinkBufferSizeMaxGrowth 8388608
            Filter From Userspace {
                Protocol Accept { TCP }
                Address Ignore {
                    IPv4_address 127.0.0.1
                    IPv4_address \(ignore)
                }
            }
        }

        """
    }

    /// keepalived with both VIPs in one sync group; transitions run the conntrackd notify script.
    func startKeepalived(_ n: String, priority: Int) throws {
        let peer = n == "a" ? "b" : "a"
        let notify = dir.write(
            "notify-\(n).sh",
            (try String(contentsOf: Repo.root.appendingPathComponent("examples/ha/ballast-notify.sh"), encoding: .utf8))
                .replacingOccurrences(
                    of: "${CONNTRACKD_CONF:-/etc/conntrackd/conntrackd.conf}", with: conntrackdConf(n)))
        chmod(notify, 0o755)
        chmod(dir.path, 0o755)
        let conf = dir.write(
            "keepalived-\(n).conf",
            """
            global_defs {
                router_id nat-\(n)
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
            vrrp_sync_group G {
                group {
                    VI_FRONT
                    VI_BACK
                }
                notify_master "\(notify) primary"
                notify_backup "\(notify) backup"
                notify_fault "\(notify) fault"
            }
            vrrp_instance VI_FRONT {
                state BACKUP
                interface \(front(n))
                virtual_router_id 61
                priority \(priority)
                advert_int 0.5
                unicast_src_ip \(frontAddr(n))
                unicast_peer {
                    \(frontAddr(peer))
                }
                virtual_ipaddress {
                    \(vip)/24 dev \(front(n))
                }
                track_script {
                    chk_ballast
                }
            }
            vrrp_instance VI_BACK {
                state BACKUP
                interface \(back(n))
                virtual_router_id 62
                priority \(priority)
                advert_int 0.5
                unicast_src_ip \(backAddr(n))
                unicast_peer {
                    \(backAddr(peer))
                }
                virtual_ipaddress {
                    \(backVip)/24 dev \(back(n))
                }
                track_script {
                    chk_ballast
                }
            }

            """)
        try run(
            "keepalived", n,
            [
                "/usr/sbin/keepalived", "-n", "-l", "-P", "-f", conf, "-p", dir.file("ka-\(n).pid"), "-r",
                dir.file("vrrp-\(n).pid"),
            ])
    }

    func log(_ name: String, _ n: String) -> String {
        (try? String(contentsOfFile: dir.file("\(name)-\(n).log"), encoding: .utf8)) ?? ""
    }

    /// How the last `waitHolder` went (time, looks, the slowest), for failure messages.
    private(set) var lastWait = ""

    /// Whether node `n`'s client-side link carries the floating addresses now.
    func holds(_ n: String) -> Bool {
        let out = try? Self.sh([Self.ip, "-n", ns(n), "-4", "addr", "show", "dev", front(n)])
        return out?.contains("\(vip)/") ?? false
    }

    func waitHolder(_ n: String, timeout: Double = 15) -> Bool {
        HALab.waitHolder(n, timeout: timeout, holds: holds, report: &lastWait)
    }

    /// One long-lived TCP conversation through the VIP: a numbered line every 50 ms, each echoed
    /// back and checked, until `stopConversation` (or `seconds` at most). The result file ends
    /// with a summary line: `done sent=N ok=N longest_gap=S last_ok=EPOCH error=…`.
    func startConversation(seconds: Double) throws -> (Process, String) {
        let out = dir.file("conversation.log")
        let script = """
            import os, socket, sys, time
            vip, seconds, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
            out = open(path, "w", buffering=1)
            s = socket.create_connection((vip, 80), timeout=10)
            f = s.makefile("rb")
            server = f.readline().decode().strip()
            out.write("server %s\\n" % server)
            sent = ok = 0
            last = time.time()
            gap = 0.0
            err = ""
            end = time.time() + seconds
            try:
                while time.time() < end and not os.path.exists(path + ".stop"):
                    sent += 1
                    msg = "message %d\\n" % sent
                    s.sendall(msg.encode())
                    back = f.readline().decode()
                    now = time.time()
                    if back != msg:
                        err = "expected %r, got %r" % (msg, back)
                        break
                    ok += 1
                    gap = max(gap, now - last)
                    last = now
                    time.sleep(0.05)
            except Exception as e:
                err = repr(e)
            out.write("done sent=%d ok=%d longest_gap=%.3f last_ok=%.3f error=%s\\n" % (sent, ok, gap, last, err))
            """
        return (try net.spawn(in: "c", ["python3", "-c", script, vip, "\(seconds)", out]), out)
    }

    /// Asks the conversation to end after its current message (it checks between messages).
    func stopConversation(_ out: String) {
        _ = FileManager.default.createFile(atPath: out + ".stop", contents: nil)
    }

    func stop(_ name: String, _ n: String) {
        guard let p = daemons["\(name)-\(n)"] else { return }
        p.signal(SIGTERM)
        NatLab.waitGone(p)
        daemons["\(name)-\(n)"] = nil
    }

    deinit {
        for k in Array(daemons.keys) {
            let parts = k.split(separator: "-")
            stop(String(parts[0]), String(parts[1]))
        }
        for n in ["a", "b"] {
            _ = try? Self.sh([Self.ip, "netns", "exec", ns(n), "/usr/sbin/nft", "delete", "table", "ip", "ballast"])
        }
        net.teardown()
    }
}
