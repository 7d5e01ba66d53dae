import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One runtime API client flooding the socket must not stall the others, nor grow the process:
/// a bounded flood (30,000 `show stat` in prompt mode, as `yes 'show stat' | socat` does), once
/// from a client that reads its replies and once from one that never does.
@Suite(.serialized) struct AdminFloodTests {
    static func rssMiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return (Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? 0) / 1024
    }

    /// `show info` on a new connection every 20 ms for `seconds`: each one's latency in ms.
    static func showInfoLatencies(_ sock: String, seconds: Double) throws -> [Double] {
        var lat: [Double] = []
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            let t0 = Date()
            let reply = try StatsClient.ask(sock, "show info")
            lat.append(Date().timeIntervalSince(t0) * 1000)
            #expect(reply.hasPrefix("Name: "), "\(reply.prefix(200))")
            usleep(20_000)
        }
        return lat.sorted()
    }

    static func ballast(_ dir: TempDir) throws -> BallastProcess {
        // 50 servers (unchecked, never connected to): each `show stat` is 50-odd rows.
        let servers = (0..<50).map { ("s\($0)", UInt16(20_000 + $0)) }
        return try RuntimeAPITests.start(servers, dir: dir, workers: 1)
    }

    @Test(
        "a reading flood of 30,000 show stat: another client's show info stays fast, memory stays flat",
        arguments: [true, false])
    func flood(reads: Bool) throws {
        let dir = TempDir()
        let b = try Self.ballast(dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        _ = try Self.showInfoLatencies(sock, seconds: 0.2)
        let before = Self.rssMiB(b.pid)

        let fd = try StatsClient.connect(sock)
        defer { close(fd) }
        let received = Atomic<Int>(0)
        let request = Array(("prompt\n" + String(repeating: "show stat\n", count: 30_000)).utf8)
        let writer = Thread {
            _ = try? Net.sendAll(fd, request)
        }
        writer.start()
        if reads {
            Thread {
                var buf = [UInt8](repeating: 0, count: 1 << 16)
                while true {
                    let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
                    if n <= 0 { break }
                    received.add(n, ordering: .relaxed)
                }
            }.start()
        }
        usleep(300_000)
        let lat = try Self.showInfoLatencies(sock, seconds: 2.5)
        let during = Self.rssMiB(b.pid)
        let p99 = lat[min(lat.count - 1, lat.count * 99 / 100)]
        print("flood (\(reads ? "reading" : "not reading")): show info n=\(lat.count) p50 \(lat[lat.count / 2]) ms p99 \(p99) ms max \(lat.last!) ms; RSS \(before) → \(during) MiB; flood replies read \(received.load(ordering: .relaxed)) bytes")
        // Before the applet model one flooding client kept every other one waiting for seconds.
        #expect(lat.count >= 20 && lat.last! < 500, "show info latencies (ms): \(lat)")
        #expect(during - before < 24, "RSS grew from \(before) to \(during) MiB")
        if reads { #expect(received.load(ordering: .relaxed) > 1 << 20, "the flooding client got its replies as well") }
        // The flooder leaves; the process gives back what it used and still answers.
        Net.reset(fd)
        usleep(300_000)
        #expect(Self.rssMiB(b.pid) - before < 16)
        #expect(try StatsClient.ask(sock, "show cli level") == "admin\n\n")
    }

    @Test("SIGTERM during a flood: the process exits at once, the admin thread does not hold it")
    func stopDuringFlood() throws {
        let dir = TempDir()
        let b = try Self.ballast(dir)
        let fd = try StatsClient.connect(dir.file("admin.sock"))
        defer { close(fd) }
        let request = Array(("prompt\n" + String(repeating: "show stat\n", count: 30_000)).utf8)
        Thread { _ = try? Net.sendAll(fd, request) }.start()
        Thread {
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while buf.withUnsafeMutableBytes({ recv(fd, $0.baseAddress!, $0.count, 0) }) > 0 {}
        }.start()
        usleep(500_000)
        let t0 = Date()
        b.signal(SIGTERM)
        #expect(b.waitExit(timeout: 10) == 0)
        #expect(Date().timeIntervalSince(t0) < 2, "exit took \(Date().timeIntervalSince(t0)) s")
    }

    @Test("4,000 commands chained on one line: one error reply, nothing run, the socket answers on")
    func chained() throws {
        let dir = TempDir()
        let b = try Self.ballast(dir)
        defer { b.stop() }
        let sock = dir.file("admin.sock")
        let line = Array(repeating: "show stat", count: 4000).joined(separator: ";")
        #expect(try StatsClient.ask(sock, line) == "Too many commands on one line (4000, at most 64).\n\n")
        // 64 is still a line.
        let ok = try StatsClient.ask(sock, Array(repeating: "show cli level", count: 64).joined(separator: ";"))
        #expect(ok == String(repeating: "admin\n\n", count: 64))
    }
}
