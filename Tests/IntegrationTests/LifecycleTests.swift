import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The command line, reload, graceful stop and scheduling as a user sees them.
@Suite(.serialized) struct LifecycleTests {
    /// Connects, reads the server's name, closes.
    static func whoAnswers(_ port: UInt16) throws -> String {
        let fd = try Net.connect(port, timeout: 5)
        defer { close(fd) }
        return String(decoding: Net.readAll(fd).0, as: UTF8.self).trimmingCharacters(in: .newlines)
    }

    /// The 1-based line of the first line of `yaml` containing `text`.
    static func line(of text: String, in yaml: String) -> Int {
        (yaml.split(separator: "\n", omittingEmptySubsequences: false).firstIndex { $0.contains(text) } ?? -1) + 1
    }

    @Test func checkPrintsWhatWouldRun() throws {
        let dir = TempDir()
        let path = dir.write(
            "ok.yaml",
            configYAML(services: [
                serviceYAML(servers: [("a", 7001), ("b", 7002)], serverExtra: ["b": "weight: 3, backup: true"])
            ]))
        let (status, out, err) = try runCommand(Repo.ballast, ["check", "-c", path])
        #expect(status == 0, "\(err)")
        #expect(out.contains("service svc: mode proxy, balance roundrobin"))
        #expect(out.contains("  bind 127.0.0.1:0\n"))
        #expect(out.contains("  server a 127.0.0.1:7001 (weight 1)\n"))
        #expect(out.contains("  server b 127.0.0.1:7002 (weight 3, backup)\n"))
        #expect(out.hasSuffix("Configuration file is valid\n"))
    }

    @Test func checkRejectsBadConfigWithLocation() throws {
        let dir = TempDir()
        let path = dir.write("bad.yaml", "services:\n  - name: a\n    bind: [\"127.0.0.1:1\"]\n    servers: []\n")
        let (status, out, err) = try runCommand(Repo.ballast, ["check", "-c", path])
        #expect(status == 1)
        #expect(out.isEmpty)
        #expect(err == "ballast: \(path):4:14: service 'a': 'servers' must be a non-empty list of servers\n")
    }

    @Test func checkAndRunRejectABindInUse() throws {
        let (busy, port) = try Net.listen()
        defer { close(busy) }
        let dir = TempDir()
        let yaml = configYAML(services: [serviceYAML(bind: "127.0.0.1:\(port)", servers: [("a", 7001)])])
        let path = dir.write("bind.yaml", yaml)
        let line = Self.line(of: "bind:", in: yaml)
        let (status, _, err) = try runCommand(Repo.ballast, ["check", "-c", path])
        #expect(status == 1)
        #expect(
            err == "ballast: \(path):\(line):12: service 'svc': cannot bind 127.0.0.1:\(port): Address already in use\n"
        )
        // `run` refuses to start at all: nothing is applied.
        let (rs, _, rerr) = try runCommand(Repo.ballast, ["run", "-c", path], timeout: 10)
        #expect(rs == 1)
        #expect(
            rerr.contains("\(path):\(line):12: service 'svc': cannot bind 127.0.0.1:\(port): Address already in use"))
        #expect(!rerr.contains("started"))
    }

    @Test func missingFile() throws {
        let (status, _, err) = try runCommand(Repo.ballast, ["run", "-c", "/nonexistent/ballast.yaml"])
        #expect(status == 1)
        #expect(err == "ballast: /nonexistent/ballast.yaml: cannot read the config: No such file or directory\n")
    }

    @Test("a FIFO, /dev/zero, a directory or a 17 MiB file as the config: refused at once, nothing read into memory")
    func configThatIsNotAFile() throws {
        let dir = TempDir()
        let fifo = dir.file("fifo.yaml")
        #expect(mkfifo(fifo, 0o600) == 0)
        let big = dir.write("big.yaml", String(repeating: " ", count: 17 << 20))
        for (path, why) in [
            (fifo, "not a regular file (a FIFO)"), ("/dev/zero", "not a regular file (a character device)"),
            (dir.path, "not a regular file (a directory)"), (big, "larger than 16 MiB"),
        ] {
            for command in ["check", "run"] {
                let t0 = Date()
                let (status, _, err) = try runCommand(Repo.ballast, [command, "-c", path], timeout: 10)
                #expect(status == 1)
                #expect(err == "ballast: \(path): cannot read the config: \(why)\n")
                #expect(Date().timeIntervalSince(t0) < 5, "\(command) \(path) took \(Date().timeIntervalSince(t0)) s")
            }
        }
    }

    @Test(
        "check refuses what run would: a stats socket in a missing directory, a metrics address in use by another program"
    )
    func checkMatchesRun() throws {
        let dir = TempDir()
        let missing = configYAML(
            global: "workers: 1\nstats: { sockets: [{ path: \"\(dir.path)/nope/admin.sock\", level: admin }] }",
            services: [serviceYAML(servers: [("a", 7001)])])
        let path = dir.write("missing.yaml", missing)
        let line = Self.line(of: "sockets:", in: missing)
        for command in ["check", "run"] {
            let (status, _, err) = try runCommand(Repo.ballast, [command, "-c", path], timeout: 10)
            #expect(status == 1, "\(command)")
            #expect(err.contains("\(path):\(line):"), "\(command): \(err)")
            #expect(err.contains("\(dir.path)/nope"), "\(command): \(err)")
        }
        let (busy, port) = try Net.listen()
        defer { close(busy) }
        let inUse = configYAML(
            global: "workers: 1\nmetrics: { address: \"127.0.0.1:\(port)\" }",
            services: [serviceYAML(servers: [("a", 7001)])])
        let p2 = dir.write("inuse.yaml", inUse)
        let (cs, _, cerr) = try runCommand(Repo.ballast, ["check", "-c", p2], timeout: 10)
        #expect(cs == 0 && cerr.contains("warning:") && cerr.contains("metrics 127.0.0.1:\(port) is in use"), "\(cerr)")
        let (rs, _, rerr) = try runCommand(Repo.ballast, ["run", "-c", p2], timeout: 10)
        #expect(rs == 1 && rerr.contains("Address already in use"), "\(rerr)")
        // A maxconn that no descriptor limit here can hold (above fs.nr_open, 1,048,576 by default).
        let huge = configYAML(global: "workers: 1\nmaxconn: 9000000", services: [serviceYAML(servers: [("a", 7001)])])
        let p3 = dir.write("maxconn.yaml", huge)
        let (hs, _, herr) = try runCommand(Repo.ballast, ["check", "-c", p3], timeout: 10)
        #expect(
            hs == 1 && herr.contains("\(p3):\(Self.line(of: "maxconn:", in: huge)):")
                && herr.contains("needs 18001024 open files"), "\(herr)")
        let (hr, _, hrerr) = try runCommand(Repo.ballast, ["run", "-c", p3], timeout: 10)
        #expect(hr != 0 && hrerr.contains("global.maxconn 9000000 needs 18001024 open files"), "\(hrerr)")
    }

    @Test func versionAndHelp() throws {
        let (vs, vout, _) = try runCommand(Repo.ballast, ["--version"])
        #expect(vs == 0)
        #expect(vout.hasPrefix("ballast 0."))
        for sub in [["--help"], ["run", "--help"], ["check", "--help"]] {
            let (s, out, _) = try runCommand(Repo.ballast, sub)
            #expect(s == 0)
            #expect(out.contains("USAGE: ballast"))
        }
        // `help SUB` is `SUB --help`; a command with subcommands and nothing to run shows its help.
        #expect(
            try runCommand(Repo.ballast, ["help", "ctl"]).1 == (try runCommand(Repo.ballast, ["ctl", "--help"]).1))
        let (ns, nout, _) = try runCommand(Repo.ballast, ["nft"])
        #expect(ns == 0 && nout.contains("USAGE: ballast nft <subcommand>") && nout.contains("  show  "), "\(nout)")
        // Usage errors: exit status 64, what is wrong, and the command's usage line.
        let bad: [([String], String, String)] = [
            (["run"], "Error: Missing expected argument '--config <config>'", "Usage: ballast run --config <config>"),
            (["check", "--bogus"], "Error: Unknown option '--bogus'", "Usage: ballast check --config <config>"),
            (["bogus"], "Error: Unexpected argument 'bogus'", "Usage: ballast <subcommand>"),
            (
                ["health", "--timeout", "soon"], "Error: The value 'soon' is invalid for '--timeout <timeout>'",
                "Usage: ballast health"
            ),
            (["health", "--timeout=0"], "Error: --timeout must be between 1 and 60000 ms", "Usage: ballast health"),
            (["check", "-c"], "Error: Missing value for '--config <config>'", "Usage: ballast check"),
            (
                ["ctl", "--socket", "--config", "x"], "Error: Missing value for '--socket <socket>'",
                "Usage: ballast ctl"
            ),
            (["nft", "show"], "Error: give --socket (live) or -c FILE (from a config)", "Usage: ballast nft show"),
            (["debug", "maglev", "--size", "12", "a:1"], "Error: --size must be prime", "Usage: ballast debug maglev"),
        ]
        for (args, error, usage) in bad {
            let (s, out, err) = try runCommand(Repo.ballast, args)
            #expect(s == 64 && out.isEmpty && err.contains(error) && err.contains(usage), "\(args): \(s) \(err)")
        }
        // Options as `-cFILE`, `--config=FILE`, `-c FILE`; a failure of the command itself is exit 1.
        for args in [["check", "-c/nonexistent.yaml"], ["check", "--config=/nonexistent.yaml"]] {
            let (s, _, err) = try runCommand(Repo.ballast, args)
            #expect(s == 1 && err.contains("/nonexistent.yaml: cannot read the config"), "\(args): \(err)")
        }
        let (ms, mout, _) = try runCommand(Repo.ballast, ["debug", "maglev", "--size", "13", "a:3", "b:1"])
        #expect(ms == 0 && mout.hasPrefix("size 13 digest ") && mout.hasSuffix("a 10\nb 3\n"), "\(mout)")
    }

    @Test("weights are honoured and backups stay idle while an active server is up")
    func weightsAndBackup() throws {
        let a = try TestServer.named("a")
        let b = try TestServer.named("b")
        let spare = try TestServer.named("spare")
        defer { [a, b, spare].forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1",
                services: [
                    serviceYAML(
                        servers: [("a", a.port), ("b", b.port), ("spare", spare.port)],
                        serverExtra: ["a": "weight: 3", "spare": "backup: true"])
                ]))
        defer { p.stop() }
        var counts: [String: Int] = [:]
        for _ in 0..<40 { counts[try Self.whoAnswers(p.port("svc")), default: 0] += 1 }
        #expect(counts == ["a": 30, "b": 10])
    }

    @Test("backup takes over when every active server is refusing")
    func backupWhenActiveDown() throws {
        let spare = try TestServer.named("spare")
        defer { spare.stop() }
        let dead = try Net.freePort()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1", defaults: "retries: 1",
                services: [
                    serviceYAML(
                        servers: [("dead", dead), ("spare", spare.port)], serverExtra: ["spare": "backup: true"])
                ]))
        defer { p.stop() }
        // Without health checks a refusing server still counts as up; the retry goes to the
        // backup because redispatch moves away from the server that failed.
        #expect(try Self.whoAnswers(p.port("svc")) == "spare")
    }

    @Test("reload: new servers get new connections, open connections finish intact, listeners never close")
    func reloadUnderTraffic() throws {
        let echo = try TestServer.echo()
        let a = try TestServer.named("a")
        let b = try TestServer.named("b")
        defer { [echo, a, b].forEach { $0.stop() } }
        let listenPort = try Net.freePort()
        func config(_ named: (String, UInt16)) -> String {
            configYAML(
                global: "workers: 2",
                services: [
                    serviceYAML(name: "echo", bind: "127.0.0.1:\(listenPort)", servers: [("e", echo.port)]),
                    serviceYAML(name: "who", servers: [named]),
                ])
        }
        let p = try BallastProcess(config: config(("a", a.port)))
        defer { p.stop() }
        let whoPort = p.port("who")
        #expect(try Self.whoAnswers(whoPort) == "a")

        // Long transfers in flight across the reload.
        let sizes = [3 << 20, 5 << 20, 7 << 20]
        let results = Mutex<[Int: (Int, Int?, Net.ReadEnd)]>([:])
        let started = Atomic<Int>(0)
        let transfers = sizes.enumerated().map { (k, size) in
            TestThread {
                started.wrappingAdd(1, ordering: .relaxed)
                let r = try? RelayTests.echoExchange(port: listenPort, size: size, seed: UInt64(k))
                results.withLock { $0[k] = r.map { ($0.received, $0.mismatch, $0.end) } ?? (-1, nil, .timeout) }
            }
        }
        // Connection attempts all through the reload: none may be refused.
        let refused = Atomic<Int>(0)
        let attempts = Atomic<Int>(0)
        let stopProbe = Atomic<Bool>(false)
        let probe = TestThread {
            while !stopProbe.load(ordering: .relaxed) {
                attempts.wrappingAdd(1, ordering: .relaxed)
                if let fd = try? Net.connect(listenPort, timeout: 2) {
                    close(fd)
                } else {
                    refused.wrappingAdd(1, ordering: .relaxed)
                }
                usleep(2000)
            }
        }
        // Connections certainly open across the reload: half their bytes before, half after.
        let held = try (0..<4).map { _ in try Net.connect(listenPort) }
        defer { held.forEach { close($0) } }
        for (k, fd) in held.enumerated() {
            try Net.sendAll(fd, "before-\(k)")
            #expect(Net.readExactly(fd, 8) == Array("before-\(k)".utf8))
        }
        while started.load(ordering: .relaxed) < sizes.count { usleep(1000) }
        usleep(50_000)
        let outcome = p.reload(config(("b", b.port)))
        for (k, fd) in held.enumerated() {
            try Net.sendAll(fd, "after-\(k)")
            Net.shutdownWrite(fd)
            let (rest, end) = Net.readAll(fd)
            #expect(String(decoding: rest, as: UTF8.self) == "after-\(k)")
            #expect(end == .eof)
        }
        #expect(outcome?.contains("reloaded") == true, "\(p.log)")
        #expect(try Self.whoAnswers(whoPort) == "b")
        for t in transfers { t.join() }
        stopProbe.store(true, ordering: .relaxed)
        probe.join()
        for (k, size) in sizes.enumerated() {
            let r = results.withLock { $0[k] }
            #expect(r?.0 == size)
            #expect(r?.1 == nil)
            #expect(r?.2 == .eof)
        }
        #expect(attempts.load(ordering: .relaxed) > 10)
        #expect(refused.load(ordering: .relaxed) == 0)
    }

    @Test("a bad reload keeps the old config serving and logs file:line:column")
    func badReload() throws {
        let a = try TestServer.named("a")
        defer { a.stop() }
        let good = configYAML(services: [serviceYAML(name: "who", servers: [("a", a.port)])])
        let p = try BallastProcess(config: good)
        defer { p.stop() }
        let port = p.port("who")
        let bad = good.replacingOccurrences(of: "name: a,", with: "nmae: a,")
        let outcome = p.reload(bad)
        #expect(
            outcome?.contains(
                "reload failed, keeping the current configuration: \(p.configPath):\(Self.line(of: "nmae", in: bad)):11: unknown key 'nmae'"
            ) == true,
            "\(outcome ?? p.log)")
        #expect(try Self.whoAnswers(port) == "a")
        // A reload whose new bind cannot be bound is refused whole, too.
        let (busy, busyPort) = try Net.listen()
        defer { close(busy) }
        let withBusy = configYAML(services: [
            serviceYAML(name: "who", servers: [("a", a.port)]),
            serviceYAML(name: "more", bind: "127.0.0.1:\(busyPort)", servers: [("a", a.port)]),
        ])
        let o2 = p.reload(withBusy)
        #expect(o2?.contains("cannot bind 127.0.0.1:\(busyPort): Address already in use") == true)
        #expect(try Self.whoAnswers(port) == "a")
    }

    @Test("reload removes a service: its listener closes, its open connections finish")
    func reloadRemovesService() throws {
        let echo = try TestServer.echo()
        let a = try TestServer.named("a")
        defer { [echo, a].forEach { $0.stop() } }
        let p = try BallastProcess(
            config: configYAML(services: [
                serviceYAML(name: "echo", servers: [("e", echo.port)]),
                serviceYAML(name: "who", servers: [("a", a.port)]),
            ]))
        defer { p.stop() }
        let echoPort = p.port("echo")
        let open = try Net.connect(echoPort)
        defer { close(open) }
        try Net.sendAll(open, "before")
        #expect(Net.readExactly(open, 6) == Array("before".utf8))
        let outcome = p.reload(configYAML(services: [serviceYAML(name: "who", servers: [("a", a.port)])]))
        #expect(outcome?.contains("reloaded") == true)
        try Net.sendAll(open, "after")
        #expect(Net.readExactly(open, 5) == Array("after".utf8))
        usleep(100_000)
        #expect(throws: Net.Failure.self) { _ = try Net.connect(echoPort, timeout: 1) }
    }

    @Test("SIGTERM: stop accepting, let open connections finish, exit 0")
    func gracefulStop() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try BallastProcess(
            config: configYAML(global: "grace: 10s", services: [serviceYAML(servers: [("e", echo.port)])]))
        let port = p.port("svc")
        let open = try Net.connect(port)
        defer { close(open) }
        try Net.sendAll(open, "one")
        #expect(Net.readExactly(open, 3) == Array("one".utf8))
        p.signal(SIGTERM)
        #expect(p.waitForLog("waiting up to 10s for 1 connections") != nil)
        #expect(throws: Net.Failure.self) { _ = try Net.connect(port, timeout: 1) }
        try Net.sendAll(open, "two")
        #expect(Net.readExactly(open, 3) == Array("two".utf8))
        Net.shutdownWrite(open)
        #expect(Net.readAll(open).1 == .eof)
        #expect(p.waitExit(timeout: 5) == 0)
    }

    @Test("SIGTERM with a connection that outlives the grace period: closed, exit 0")
    func graceExpires() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try BallastProcess(
            config: configYAML(global: "grace: 500ms", services: [serviceYAML(servers: [("e", echo.port)])]))
        let open = try Net.connect(p.port("svc"), timeout: 5)
        defer { close(open) }
        try Net.sendAll(open, "x")
        _ = Net.readExactly(open, 1)
        let start = Date()
        p.signal(SIGTERM)
        #expect(p.waitExit(timeout: 5) == 0)
        let elapsed = Date().timeIntervalSince(start)
        #expect(elapsed >= 0.4 && elapsed < 3)
        #expect(Net.readAll(open).1 != .timeout)
        #expect(p.log.contains("closing 1 connections still open"))
    }

    @Test("JSON logs: one object per line")
    func jsonLogs() throws {
        let a = try TestServer.named("a")
        defer { a.stop() }
        let p = try BallastProcess(
            config: configYAML(
                global: "log: { format: json, connections: true }", services: [serviceYAML(servers: [("a", a.port)])]))
        #expect(try Self.whoAnswers(p.port("svc")) == "a")
        let line = try #require(p.waitForLog("connection closed"))
        let obj = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        #expect(obj?["msg"] as? String == "connection closed")
        #expect(obj?["server"] as? String == "a")
        #expect(obj?["bytes_out"] as? String == "2")
        #expect(obj?["end"] as? String == "done")
        p.stop()
    }

    @Test("a floating address: check says what to do without freebind; with it Ballast starts listening")
    func floatingAddress() throws {
        let dir = TempDir()
        let port = try Net.freePort()
        let bad = dir.write(
            "bad.yaml", configYAML(services: [serviceYAML(bind: "192.0.2.77:\(port)", servers: [("s", 1)])]))
        let (s1, _, e1) = try runCommand(Repo.ballast, ["check", "-c", bad])
        #expect(s1 == 1)
        #expect(
            e1.contains(
                "service 'svc': cannot bind 192.0.2.77:\(port): Cannot assign requested address (address not on this host; for a floating address set freebind: true)"
            ),
            "\(e1)")
        var yaml = configYAML(services: [serviceYAML(bind: "192.0.2.77:\(port)", servers: [("s", 1)])])
        yaml = yaml.replacingOccurrences(
            of: "bind: [\"192.0.2.77:\(port)\"]", with: "bind: [{ address: \"192.0.2.77:\(port)\", freebind: true }]")
        let good = dir.write("good.yaml", yaml)
        let (s2, o2, e2) = try runCommand(Repo.ballast, ["check", "-c", good])
        #expect(s2 == 0, "\(o2)\(e2)")
        let p = try BallastProcess(config: yaml)
        defer { p.stop() }
        #expect(p.log.contains("service svc listening on 192.0.2.77:\(port)"), "\(p.log)")
        // check on the live config: bound beside the running listeners, never listening itself.
        let (s3, _, e3) = try runCommand(Repo.ballast, ["check", "-c", p.configPath])
        #expect(s3 == 0, "\(e3)")
    }

    @Test("a default start logs no warning: maxconn follows the descriptor limit (here 4096 by prlimit)")
    func defaultStartIsSilent() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let sock = dir.file("admin.sock")
        let p = try BallastProcess(
            config: configYAML(
                global: "stats: { sockets: [{ path: \"\(sock)\" }] }",
                services: [serviceYAML(servers: [("s", echo.port)])]),
            prefix: ["/usr/bin/prlimit", "--nofile=4096:4096"])
        defer { p.stop() }
        usleep(300_000)
        let warnings = p.logLines.filter {
            $0.contains(" warning ") || $0.contains(" error ") || $0.contains(" critical ")
        }
        #expect(warnings.isEmpty, "\(warnings)")
        let (_, info, _) = try runCommand(Repo.ballast, ["ctl", "--socket", sock, "show", "info"])
        func field(_ name: String) -> Int {
            Int(info.split(separator: "\n").first { $0.hasPrefix("\(name): ") }?.split(separator: " ").last ?? "") ?? -1
        }
        // Whatever the limit became (root may raise it), maxconn fits in it: 2 per connection + 1024.
        #expect(field("Maxconn") > 0 && field("Maxconn") * 2 + 1024 <= field("Maxsock"), "\(info)")
        if geteuid() != 0 { #expect(field("Maxconn") == (4096 - 1024) / 2) }
    }

    @Test(
        "a start that fails at any step leaves no socket file and no thread behind",
        arguments: ["admin", "workers", "checker"])
    func failedStartCleansUp(step: String) throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        let sock = dir.file("admin.sock")
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nstats: { sockets: [{ path: \"\(sock)\" }] }",
                services: [serviceYAML(servers: [("s", echo.port)], extra: "check: { type: tcp, interval: 200ms }")]),
            environment: ["BALLAST_TEST_FAIL_START": step], waitReady: false)
        let status = p.waitExit(timeout: 10)
        #expect(status == 1, "\(p.log)")
        #expect(p.log.contains("failure injected at \(step) (BALLAST_TEST_FAIL_START)"), "\(p.log)")
        #expect(!FileManager.default.fileExists(atPath: sock), "the runtime API socket file was left behind")
        #expect(!p.log.contains("started"), "\(p.log)")
    }
}
