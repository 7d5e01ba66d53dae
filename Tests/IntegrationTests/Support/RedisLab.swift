import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A Redis master, its replicas and three Sentinels from Debian's `redis-server`, on loopback in
/// a temporary directory; every process started here is killed by PID at the end.
final class RedisLab: @unchecked Sendable {
    static let available = FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-server")

    let dir = TempDir()
    let master = "mymaster"
    /// Data nodes by index; node 0 starts as the master.
    private(set) var ports: [UInt16] = []
    private(set) var sentinelPorts: [UInt16] = []
    private var processes: [Int: Process] = [:]
    private var sentinels: [Process] = []

    init(replicas: Int = 2, sentinels count: Int = 3, downAfterMs: Int = 2500) throws {
        for _ in 0...replicas { ports.append(try Net.freePort()) }
        for k in ports.indices { try startNode(k, replicaOf: k == 0 ? nil : ports[0]) }
        for k in 0..<count {
            let port = try Net.freePort()
            sentinelPorts.append(port)
            let conf = dir.write(
                "sentinel-\(k).conf",
                """
                port \(port)
                bind 127.0.0.1
                daemonize no
                dir \(dir.path)
                logfile \(dir.file("sentinel-\(k).log"))
                sentinel monitor \(master) 127.0.0.1 \(ports[0]) 2
                sentinel down-after-milliseconds \(master) \(downAfterMs)
                sentinel failover-timeout \(master) 10000
                sentinel parallel-syncs \(master) 2

                """)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
            p.arguments = [conf, "--sentinel"]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            sentinels.append(p)
        }
        // Ready when every Sentinel knows both replicas and the other Sentinels (hello messages
        // every 2 s), so that a failover can be agreed.
        let deadline = Date().addingTimeInterval(40)
        while Date() < deadline {
            let ready = sentinelPorts.allSatisfy { port in
                let r = (try? Self.command(port, ["SENTINEL", "replicas", master])) ?? ""
                let s = (try? Self.command(port, ["SENTINEL", "sentinels", master])) ?? ""
                return r.hasPrefix("*\(replicas)\r\n") && s.hasPrefix("*\(count - 1)\r\n")
            }
            if ready && replicasInSync(except: 0) { return }
            usleep(200_000)
        }
        throw Net.Failure("the sentinels did not discover the replicas and each other within 40 s")
    }

    /// Every node but `master` is a replica whose link is up (its initial sync is done).
    func replicasInSync(except master: Int) -> Bool {
        ports.indices.allSatisfy { k in
            guard k != master, processes[k] != nil else { return true }
            let info = (try? Self.command(ports[k], ["INFO", "replication"])) ?? ""
            return info.contains("role:slave") && info.contains("master_link_status:up")
                && info.contains("master_port:\(ports[master])") && info.contains("master_sync_in_progress:0")
        }
    }

    /// Waits until the cluster has settled around `master` (Sentinel converts an old master
    /// into a replica on its own schedule, up to about 10 s after a failover).
    func waitSettled(master: Int, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if replicasInSync(except: master) { return true }
            usleep(100_000)
        }
        return false
    }

    func startNode(_ k: Int, replicaOf: UInt16?) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        var args = [
            "--port", "\(ports[k])", "--bind", "127.0.0.1", "--dir", dir.path, "--dbfilename", "dump-\(k).rdb",
            "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--logfile", dir.file("redis-\(k).log"),
            "--repl-diskless-sync-delay", "0",
        ]
        if let m = replicaOf { args += ["--replicaof", "127.0.0.1", "\(m)"] }
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        processes[k] = p
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? Self.command(ports[k], ["PING"])) == "+PONG\r\n" { return }
            usleep(20_000)
        }
        throw Net.Failure("redis-server on \(ports[k]) did not start")
    }

    /// The Sentinels' own logs, for a failure message.
    func sentinelLogs() -> String {
        sentinelPorts.indices.map { k in
            "--- sentinel \(sentinelPorts[k])\n"
                + ((try? String(contentsOfFile: dir.file("sentinel-\(k).log"), encoding: .utf8)) ?? "")
        }.joined(separator: "\n")
    }

    /// SIGKILL: the process dies without a word to anyone, as on a crashed host.
    func kill(_ k: Int) {
        guard let p = processes[k] else { return }
        p.signal(SIGKILL)
        NatLab.waitGone(p, timeout: 60)
        processes[k] = nil
    }

    /// The node the Sentinels name now (by the first Sentinel that answers).
    func namedMaster() -> Int? {
        for s in sentinelPorts {
            guard let r = try? Self.command(s, ["SENTINEL", "get-master-addr-by-name", master]) else { continue }
            for (k, p) in ports.enumerated() where r.contains("\r\n\(p)\r\n") { return k }
        }
        return nil
    }

    func role(_ k: Int) -> String? {
        guard let r = try? Self.command(ports[k], ["INFO", "replication"]) else { return nil }
        return r.contains("role:master") ? "master" : r.contains("role:slave") ? "slave" : nil
    }

    /// Sends one command and returns the raw reply (what arrives within 200 ms after the first bytes).
    static func command(_ port: UInt16, _ args: [String], timeout: Double = 1) throws -> String {
        let fd = try Net.connect(port, timeout: timeout)
        defer { close(fd) }
        Net.setTimeout(fd, timeout)
        var req = "*\(args.count)\r\n"
        for a in args { req += "$\(a.utf8.count)\r\n\(a)\r\n" }
        try Net.sendAll(fd, req)
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n <= 0 { break }
            out += buf[0..<n]
            if RedisLab.complete(out) { break }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A whole RESP reply (enough of a parser for the replies the tests read).
    static func complete(_ b: [UInt8]) -> Bool { skip(b, 0) != nil }

    private static func skip(_ b: [UInt8], _ i: Int) -> Int? {
        guard i < b.count else { return nil }
        var end = i
        while end + 1 < b.count && !(b[end] == 13 && b[end + 1] == 10) { end += 1 }
        guard end + 1 < b.count else { return nil }
        let n = Int(String(decoding: b[(i + 1)..<end], as: UTF8.self)) ?? 0
        switch b[i] {
        case UInt8(ascii: "$"): return n < 0 ? end + 2 : (b.count >= end + 2 + n + 2 ? end + 2 + n + 2 : nil)
        case UInt8(ascii: "*"):
            var k = end + 2
            for _ in 0..<max(0, n) {
                guard let next = skip(b, k) else { return nil }
                k = next
            }
            return k
        default: return end + 2
        }
    }

    deinit {
        for p in sentinels {
            p.signal(SIGKILL)
            NatLab.waitGone(p, timeout: 60)
        }
        for k in Array(processes.keys) { kill(k) }
    }
}

/// Writes `RPUSH acked <seq>` through the balancer one at a time, as a careful application does,
/// and records every write the server acknowledged, with the time. Reconnects after any error.
final class AckedWriter: @unchecked Sendable {
    struct Ack {
        var seq: Int
        var at: Date
    }

    let acks = Mutex<[Ack]>([])
    let errors = Mutex<[String]>([])
    private let stopFlag = Atomic<Bool>(false)
    private var thread: TestThread?

    init(port: UInt16) {
        thread = TestThread { [self] in
            var seq = 0
            var fd: Int32 = -1
            while !stopFlag.load(ordering: .relaxed) {
                if fd < 0 {
                    fd = (try? Net.connect(port, timeout: 1)) ?? -1
                    if fd < 0 {
                        usleep(10_000)
                        continue
                    }
                    Net.setTimeout(fd, 1)
                }
                seq += 1
                let s = "\(seq)"
                let req = "*3\r\n$5\r\nRPUSH\r\n$5\r\nacked\r\n$\(s.utf8.count)\r\n\(s)\r\n"
                var reply: [UInt8] = []
                var ok = (try? Net.sendAll(fd, req)) != nil
                var buf = [UInt8](repeating: 0, count: 256)
                while ok && !(reply.count >= 2 && reply[reply.count - 2] == 13 && reply.last == 10) {
                    let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
                    if n <= 0 { ok = false } else { reply += buf[0..<n] }
                }
                if ok && reply.first == UInt8(ascii: ":") {
                    let now = Date()
                    acks.withLock { $0.append(Ack(seq: seq, at: now)) }
                } else {
                    let text = ok ? String(decoding: reply, as: UTF8.self) : "connection closed"
                    errors.withLock { $0.append(text.trimmingCharacters(in: .whitespacesAndNewlines)) }
                    close(fd)
                    fd = -1
                    usleep(10_000)
                }
            }
            if fd >= 0 { close(fd) }
        }
    }

    var count: Int { acks.withLock { $0.count } }

    func waitForAcks(beyond n: Int, timeout: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if count > n { return true }
            usleep(10_000)
        }
        return false
    }

    func stop() {
        stopFlag.store(true, ordering: .relaxed)
        _ = thread?.join(timeout: 10)
        thread = nil
    }

    /// Acknowledged writes missing from `port`'s list (the final master's).
    func missing(on port: UInt16) throws -> [Ack] {
        // The acknowledgements first: a write acknowledged after the LRANGE is not in its answer.
        let acked = acks.withLock { $0 }
        let reply = try RedisLab.command(port, ["LRANGE", "acked", "0", "-1"], timeout: 5)
        var present = Set<Int>()
        for line in reply.split(separator: "\r\n") where !line.hasPrefix("$") && !line.hasPrefix("*") {
            if let v = Int(line) { present.insert(v) }
        }
        return acked.filter { !present.contains($0.seq) }
    }

    /// The first acknowledgement after `t`.
    func firstAck(after t: Date) -> Date? { acks.withLock { $0.first { $0.at > t }?.at } }
}
