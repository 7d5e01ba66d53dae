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
    /// One flooding client: a writer thread (and a reader thread when it reads its replies). The
    /// socket is closed once, after both threads have returned: a descriptor closed while another
    /// thread still uses it may be reused by an unrelated pipe of a parallel test.
    final class Flooder: @unchecked Sendable {
        let fd: Int32
        let received = Atomic<Int>(0)
        private let running = Atomic<Int>(0)

        init(_ sock: String, commands: Int, reads: Bool) throws {
            fd = try StatsClient.connect(sock)
            let request = Array(("prompt\n" + String(repeating: "show stat\n", count: commands)).utf8)
            running.store(reads ? 2 : 1, ordering: .relaxed)
            let fd = fd
            Thread { [self] in
                _ = try? Net.sendAll(fd, request)
                running.subtract(1, ordering: .relaxed)
            }.start()
            if reads {
                Thread { [self] in
                    var buf = [UInt8](repeating: 0, count: 1 << 16)
                    while true {
                        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
                        if n <= 0 { break }
                        received.add(n, ordering: .relaxed)
                    }
                    running.subtract(1, ordering: .relaxed)
                }.start()
            }
        }

        /// Resets the connection, waits for the threads, then closes the descriptor.
        func stop() {
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
            shutdown(fd, Int32(SHUT_RDWR))
            let deadline = Date().addingTimeInterval(15)
            while running.load(ordering: .relaxed) > 0 && Date() < deadline { usleep(10_000) }
            if running.load(ordering: .relaxed) == 0 { close(fd) }  // else leak it rather than close it under a thread
        }
    }

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

        let flooder = try Flooder(sock, commands: 30_000, reads: reads)

        usleep(300_000)
        let lat = try Self.showInfoLatencies(sock, seconds: 2.5)
        let during = Self.rssMiB(b.pid)
        let p99 = lat[min(lat.count - 1, lat.count * 99 / 100)]
        print(
            "flood (\(reads ? "reading" : "not reading")): show info n=\(lat.count) p50 \(lat[lat.count / 2]) ms p99 \(p99) ms max \(lat.last!) ms; RSS \(before) → \(during) MiB; flood replies read \(flooder.received.load(ordering: .relaxed)) bytes"
        )
        // Before the applet model one flooding client kept every other one waiting for seconds.
        #expect(lat.count >= 20 && lat.last! < 500, "show info latencies (ms): \(lat)")
        #expect(during - before < 24, "RSS grew from \(before) to \(during) MiB")
        if reads {
            #expect(flooder.received.load(ordering: .relaxed) > 1 << 20, "the flooding client got its replies as well")
        }
        // The flooder leaves; the process gives back what it used and still answers.
        flooder.stop()
        usleep(300_000)
        #expect(Self.rssMiB(b.pid) - before < 16)
        #expect(try StatsClient.ask(sock, "show cli level") == "admin\n\n")
    }

    @Test("SIGTERM during a flood: the process exits at once, the admin thread does not hold it")
    func stopDuringFlood() throws {
        let dir = TempDir()
        let b = try Self.ballast(dir)
        let flooder = try Flooder(dir.file("admin.sock"), commands: 30_000, reads: true)
        defer { flooder.stop() }
        usleep(500_000)
        let t0 = Date()
        b.signal(SIGTERM)
        #expect(b.waitExit(timeout: 10) == 0)
        // Held by the admin thread, it would last as long as the flood (about 12 s); on a loaded
        // machine (the whole suite at once, two cores) a prompt exit has taken up to 3 s.
        #expect(Date().timeIntervalSince(t0) < 5, "exit took \(Date().timeIntervalSince(t0)) s")
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
