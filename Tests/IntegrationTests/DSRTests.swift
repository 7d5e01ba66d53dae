import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// mode: dsr in network namespaces: a client, a balancer and two servers on one bridge; the
/// servers hold the service address on their loopback and answer the client directly.
@Suite(.serialized) struct DSRTests {
    static let enabled = DSRLab.available

    /// The `show stat` row of a server, by column.
    static func row(_ lab: DSRLab, _ service: String, _ server: String) throws -> [String: String] {
        StatsClient.row(try StatsClient.stat(lab.socket), server, proxy: service)
    }

    @Test(
        "IPv4 and IPv6 connections are answered by the servers directly: bytes both ways, weights split new connections, no server→client packet passes the balancer",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func bothFamiliesAndWeights() throws {
        let lab = try DSRLab()
        let b = try lab.startBallast(
            lab.dsrService(extra: "hash_key: source-port", serverExtra: ["s1": "weight: 3"])
                + lab.dsrService(
                    name: "web6", bind: "[\(lab.vip6)]:80", extra: "hash_key: source-port",
                    servers: [("s1", "[\(lab.serverAddr6(0))]:80"), ("s2", "[\(lab.serverAddr6(1))]:80")]))
        defer { b.stop() }
        #expect(b.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil, "\(b.log)")
        #expect(b.waitForLog("Server web6/s2 has L2 neighbour", timeout: 5) != nil, "\(b.log)")
        usleep(800_000)  // the first checks

        let seen = try lab.connect(lab.vip, 80, count: 200)
        #expect(seen["error"] == nil, "\(seen)")
        let s1 = seen["s1"] ?? 0
        let s2 = seen["s2"] ?? 0
        #expect(s1 + s2 == 200)
        // Weights 3:1 over Maglev slots, flows hashed by client address and port.
        #expect(s1 >= 120 && s1 <= 175, "s1 \(s1), s2 \(s2)")
        let seen6 = try lab.connect(lab.vip6, 80, count: 40)
        #expect(seen6["error"] == nil && (seen6["s1"] ?? 0) + (seen6["s2"] ?? 0) == 40, "\(seen6)")

        usleep(1_100_000)  // rule counters are read at most once a second
        for (svc, counts) in [("web", seen), ("web6", seen6)] {
            for s in ["s1", "s2"] {
                let r = try Self.row(lab, svc, s)
                // New connections from the SYN counter; bytes only client → server.
                #expect(Int(r["stot"] ?? "") ?? -1 >= counts[s] ?? 0, "\(svc)/\(s): \(r)")
                #expect((Int(r["bin"] ?? "") ?? 0) > 0 || (counts[s] ?? 0) == 0, "\(svc)/\(s): \(r)")
                #expect(r["bout"] == "0", "\(svc)/\(s) saw server → client bytes: \(r)")
                #expect(r["status"] == "UP", "\(r)")
            }
        }
        // `show nft` prints the netdev table, with the frames sent out of the lab's interface.
        let text = try StatsClient.ask(lab.socket, "show nft")
        #expect(
            text.contains("table netdev ballast") && text.contains("fwd to \"\(lab.lbDev)\""), "\(text.prefix(400))")
        // The same plan as nft text is a ruleset nft accepts in place of the live one (checked
        // against this namespace's interfaces, without applying it).
        let file = lab.dir.write("dsr.nft", "table netdev ballast\ndelete table netdev ballast\n" + text)
        let (cs, _, cerr) = try runCommand(
            DSRLab.ip, ["netns", "exec", lab.ns("lb"), "/usr/sbin/nft", "-c", "-f", file])
        #expect(cs == 0, "\(cerr)")
    }

    @Test(
        "a killed server is taken out and its flows go to the other; a server with no L2 neighbour is DOWN with the reason, never black-holed",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func killedServerAndNoNeighbour() throws {
        let lab = try DSRLab()
        let b = try lab.startBallast(
            lab.dsrService(
                extra: "hash_key: source-port",
                servers: [
                    ("s1", "\(lab.serverAddr(0)):80"), ("s2", "\(lab.serverAddr(1)):80"), ("ghost", "10.81.0.99:80"),
                ]))
        defer { b.stop() }
        let ghost = try #require(
            b.waitForLog("Server web/ghost is DOWN, reason: no L2 neighbour on \(lab.lbDev)", timeout: 5))
        #expect(!ghost.isEmpty)
        #expect(b.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        usleep(800_000)
        let r = try Self.row(lab, "web", "ghost")
        #expect(r["status"] == "DOWN" && r["last_chk"] == "no L2 neighbour on \(lab.lbDev)", "\(r)")
        let before = try lab.connect(lab.vip, 80, count: 60)
        #expect(before["error"] == nil && before["ghost"] == nil && (before["s1"] ?? 0) > 0, "\(before)")

        // kill -9 of s1's server: its check fails twice, its slots go to s2.
        NatLab.killAll(in: lab.ns("s1"))
        let t0 = Date()
        #expect(b.waitForLog("Server web/s1 is DOWN", timeout: 5) != nil, "\(b.log)")
        // The nat thread moves s1's half of 65,537 Maglev slots in one batch (about 0.2 s in a
        // debug build, on a loaded machine more).
        usleep(1_200_000)
        let after = try lab.connect(lab.vip, 80, count: 60)
        #expect(after == ["s2": 60], "\(after) (\(Date().timeIntervalSince(t0)) s after the kill)")

        // Back: the check sees it, the slots return.
        try lab.startServer("s1")
        #expect(b.waitForLog("Server web/s1 is UP", timeout: 5) != nil)
        usleep(300_000)
        let back = try lab.connect(lab.vip, 80, count: 60)
        #expect(back["error"] == nil && (back["s1"] ?? 0) > 0, "\(back)")
    }

    @Test(
        "drain and maint take a server's slots away (no connection state: they move at once), ready gives them back; a backup takes over when no active server is usable; /metrics counts",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func adminStatesAndBackup() throws {
        let lab = try DSRLab()
        let b = try lab.startBallast(
            lab.dsrService(extra: "hash_key: source-port", serverExtra: ["s2": "backup: true"]))
        defer { b.stop() }
        #expect(b.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        usleep(800_000)
        #expect(try lab.connect(lab.vip, 80, count: 30) == ["s1": 30])  // the backup waits
        for state in ["drain", "maint"] {
            #expect(try StatsClient.ask(lab.socket, "set server web/s1 state \(state)") == "\n")
            usleep(1_200_000)  // the slots move in one batch
            #expect(try lab.connect(lab.vip, 80, count: 30) == ["s2": 30], "\(state)")
            #expect(try StatsClient.ask(lab.socket, "set server web/s1 state ready") == "\n")
            usleep(1_200_000)
            #expect(try lab.connect(lab.vip, 80, count: 30) == ["s1": 30], "back from \(state)")
        }
        usleep(1_100_000)
        let m = try lab.metrics()
        let line = m.split(separator: "\n").first {
            $0.hasPrefix("ballast_server_sessions_total{proxy=\"web\",server=\"s1\"}")
        }
        let total = line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? -1
        #expect(total >= 90, "\(line ?? "no line")")
        #expect(m.contains("ballast_server_bytes_out_total{proxy=\"web\",server=\"s1\"} 0"), "\(m.prefix(300))")
        // set server addr: the server's `be-` element follows its new address's MAC address, as
        // a difference (no "refused … replacing the tables whole").
        #expect(
            try StatsClient.ask(lab.socket, "set server web/s2 addr \(lab.serverAddr(0)) port 80").hasPrefix(
                "IP changed from"))
        let s1Mac = try #require(
            try Netns.sh([DSRLab.ip, "-n", lab.ns("s1"), "-br", "link", "show", "dev", lab.dev("s1")])
                .split(separator: " ", omittingEmptySubsequences: true).dropFirst(2).first)
        let deadline = Date().addingTimeInterval(3)
        var map = ""
        while Date() < deadline {
            map = lab.nft("list", "map", "netdev", "ballast", "be-web") ?? ""
            if map.components(separatedBy: String(s1Mac)).count == 3 { break }
            usleep(100_000)
        }
        #expect(map.components(separatedBy: String(s1Mac)).count == 3, "\(map)")
        #expect(!b.log.contains("replacing the tables whole"), "\(b.log)")
    }

    @Test(
        "a server's new MAC address is followed (gratuitous ARP → neighbour table → map), and connections go on",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func macChange() throws {
        let lab = try DSRLab()
        let b = try lab.startBallast(lab.dsrService(extra: "hash_key: source-port"))
        defer { b.stop() }
        #expect(b.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        usleep(1_200_000)  // past the neighbour entry's lock time: a gratuitous ARP may override it
        let mac = "02:81:00:00:00:22"
        try lab.net.ipn("s2", "link", "set", "dev", lab.dev("s2"), "address", mac)
        let line = try #require(b.waitForLog("Server web/s2 has L2 neighbour \(mac)", timeout: 6), "\(b.log)")
        #expect(line.contains("(was "))
        // The map follows in the same pass of the nat thread, right after the log line.
        let deadline = Date().addingTimeInterval(3)
        var programmed = false
        while !programmed && Date() < deadline {
            programmed = lab.nft("list", "map", "netdev", "ballast", "be-web")?.contains(mac) == true
            if !programmed { usleep(100_000) }
        }
        #expect(programmed, "\(lab.nft("list", "map", "netdev", "ballast", "be-web") ?? "no map")")
        let seen = try lab.connect(lab.vip, 80, count: 60)
        #expect(seen["error"] == nil && (seen["s2"] ?? 0) > 0, "\(seen)")
    }

    @Test(
        "one Maglev table: each client address lands on the same server in dsr, nat and proxy mode",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func sameServerInEveryMode() throws {
        let lab = try DSRLab()
        let servers =
            "    servers:\n      - { name: s1, address: \"\(lab.serverAddr(0)):80\" }\n      - { name: s2, address: \"\(lab.serverAddr(1)):80\" }\n"
        let b = try lab.startBallast(
            lab.dsrService()
                + "  - name: viaNat\n    mode: nat\n    bind: \"\(lab.natVip):80\"\n    balance: source\n    nat: { snat: masquerade }\n"
                + servers
                + "  - name: viaProxy\n    bind: \"\(lab.lbAddr):8080\"\n    balance: source\n" + servers)
        defer { b.stop() }
        #expect(b.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        usleep(800_000)
        func placement(_ host: String, _ port: Int) throws -> [String: String] {
            try lab.perSource(host, port, count: lab.clients.count * 2, sources: lab.clients).mapValues { m in
                m.count == 1 ? m.keys.first! : "split \(m)"
            }
        }
        let dsr = try placement(lab.vip, 80)
        let nat = try placement(lab.natVip, 80)
        let proxy = try placement(lab.lbAddr, 8080)
        #expect(
            dsr.count == lab.clients.count && !dsr.values.contains { $0.hasPrefix("split") || $0 == "error" }, "\(dsr)")
        #expect(Set(dsr.values).count == 2, "every client on one server: \(dsr)")
        #expect(dsr == nat, "dsr \(dsr)\nnat \(nat)")
        #expect(dsr == proxy, "dsr \(dsr)\nproxy \(proxy)")
    }

    @Test(
        "stop removes the netdev table; after kill -9 a new start replaces it (one ingress chain), and it forwards",
        .enabled(if: enabled, "needs root, nft, ip and socat (network namespaces)"))
    func cleanupAndReconcile() throws {
        let lab = try DSRLab()
        let first = try lab.startBallast(lab.dsrService())
        #expect(first.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        first.signal(SIGKILL)
        usleep(300_000)
        #expect(
            lab.nft("list", "chain", "netdev", "ballast", "ingress-\(lab.lbDev)") != nil, "kill -9 leaves the rules")
        let second = try lab.startBallast(lab.dsrService())
        #expect(second.waitForLog("Server web/s2 has L2 neighbour", timeout: 5) != nil)
        usleep(800_000)
        let chains = lab.nft("list", "chains", "netdev") ?? ""
        #expect(chains.components(separatedBy: "chain ingress-").count == 2, "\(chains)")
        let seen = try lab.connect(lab.vip, 80, count: 20)
        #expect(seen["error"] == nil && seen.values.reduce(0, +) == 20, "\(seen)")
        // A reload by difference: a weight change is a map update (the server chains and their
        // counters stay), a new service is added beside it.
        usleep(1_100_000)
        let before = try Self.row(lab, "web", "s1")["stot"]
        let line = second.reload(
            lab.config(
                lab.dsrService(serverExtra: ["s1": "weight: 2"])
                    + lab.dsrService(
                        name: "web2", bind: "\(lab.vip):81",
                        servers: [("s1", "\(lab.serverAddr(0)):81"), ("s2", "\(lab.serverAddr(1)):81")])))
        #expect(line?.contains("reloaded") == true, "\(second.log)")
        #expect(second.log.contains("nat: reload: web maps updated, web2 added"), "\(second.log)")
        usleep(1_100_000)
        #expect(try Self.row(lab, "web", "s1")["stot"] == before)
        #expect(lab.nft("list", "chain", "netdev", "ballast", "svc-web2") != nil)
        #expect(second.stop() == 0)
        #expect(lab.nft("list", "table", "netdev", "ballast") == nil, "the table outlived a clean stop")
    }

    @Test(
        "an interface that does not exist: ballast check names the file, line and column",
        .enabled(if: enabled, "needs root"))
    func missingInterface() throws {
        let dir = TempDir()
        let path = dir.write(
            "b.yaml",
            "services:\n  - name: web\n    mode: dsr\n    interface: nosuchif0\n    bind: 10.81.9.100:80\n    servers:\n      - { name: s1, address: 10.81.9.21:80 }\n"
        )
        let (status, _, err) = try runCommand(Repo.ballast, ["check", "-c", path])
        #expect(status != 0)
        #expect(err.contains("\(path):4:16") && err.contains("interface nosuchif0 does not exist"), "\(err)")
        // The shipped example is a valid config (on a host with its interface: `lo` here).
        let example = try String(
            contentsOf: Repo.root.appendingPathComponent("examples/dsr/ballast.yaml"), encoding: .utf8)
        let local = dir.write(
            "example.yaml",
            example.replacingOccurrences(of: "interface: eth1", with: "interface: lo").replacingOccurrences(
                of: "/run/ballast/admin.sock", with: dir.file("admin.sock")))
        let (cs, _, cerr) = try runCommand(Repo.ballast, ["check", "-c", local])
        #expect(cs == 0, "\(cerr)")
    }
}
