import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The io_uring engine: it really carries the bytes (the ring's own counters say so), and where
/// the kernel refuses io_uring (a container's seccomp profile, `kernel.io_uring_disabled`) Ballast
/// says so in one line and serves with epoll. The whole integration suite also runs with
/// `BALLAST_ENGINE=io_uring` (scripts/test.sh), so every behaviour test covers both engines.
@Suite(.serialized) struct EngineTests {
    /// Submission-queue entries consumed so far by every io_uring instance of `pid`
    /// (`SqHead` in /proc/PID/fdinfo; 0 when the process has none).
    static func ringSubmissions(_ pid: Int32) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        var total = 0
        for fd in fds {
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"),
                target.contains("io_uring"),
                let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8)
            else { continue }
            for line in info.split(separator: "\n") where line.hasPrefix("SqHead:") {
                total += Int(line.split(separator: "\t").last.map(String.init) ?? "") ?? 0
            }
        }
        return total
    }

    /// `count` request/reply exchanges on one connection through `port`; returns the replies' bytes.
    static func exchanges(_ port: UInt16, count: Int) throws -> Int {
        let fd = try Net.connect(port)
        defer { close(fd) }
        Net.setTimeout(fd, 5)
        var got = 0
        for k in 0..<count {
            let msg = "ping \(k)\n"
            try Net.sendAll(fd, msg)
            let reply = Net.readExactly(fd, msg.utf8.count)
            #expect(reply == Array(msg.utf8), "exchange \(k)")
            if reply != Array(msg.utf8) { break }
            got += reply.count
        }
        return got
    }

    /// The names of `pid`'s threads (kernel threads it owns, such as io_uring's SQPOLL thread
    /// `iou-sqp-PID`, included).
    static func threadNames(_ pid: Int32) -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap {
            (try? String(contentsOfFile: "/proc/\(pid)/task/\($0)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
    }

    @Test(
        "engine: io_uring (and io_uring_sqpoll) moves an established connection's bytes through the ring, and a bulk transfer is exact",
        arguments: ["io_uring", "io_uring_sqpoll"])
    func ringCarriesTheBytes(engine: String) throws {
        let echo = try TestServer.echo()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nengine: \(engine)", services: [serviceYAML(servers: [("e", echo.port)])]))
        defer { p.stop() }
        #expect(p.waitForLog("workers: \(engine) engine") != nil, "\(p.log)")
        // With SQPOLL a kernel thread of Ballast's takes the submissions; without, there is none.
        let sqpoll = Self.threadNames(p.pid).filter { $0.hasPrefix("iou-sqp") }
        #expect(engine == "io_uring_sqpoll" ? !sqpoll.isEmpty : sqpoll.isEmpty, "\(Self.threadNames(p.pid))")
        let port = p.port("svc")
        let before = Self.ringSubmissions(p.pid)
        let n = 500
        _ = try Self.exchanges(port, count: n)
        // Each exchange is a receive and a send each way: four ring operations, no recv/send
        // calls; only the first request may go by plain calls, read at accept and sent before
        // the connect is reported (forwardEarly).
        let used = Self.ringSubmissions(p.pid) - before
        #expect(used >= 4 * (n - 1), "ring submissions for \(n) exchanges: \(used)")

        // 8 MiB each way at once: past the copy→splice switch, through ring polls and splice.
        let fd = try Net.connect(port)
        defer { close(fd) }
        Net.setTimeout(fd, 20)
        let size = 8 << 20
        let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 13) }
        let sender = TestThread {
            try? Net.sendAll(fd, payload)
            Net.shutdownWrite(fd)
        }
        let (back, end) = Net.readAll(fd)
        sender.join()
        #expect(back.count == size, "\(end)")
        #expect(back == payload)
    }

    static func openDescriptors(_ pid: Int32) -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
    }

    @Test(
        "engine: io_uring closes every socket it cancels: after 300 connections, held and dropped, no descriptor is left"
    )
    func ringClosesEverything() throws {
        let echo = try TestServer.echo()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nengine: io_uring", services: [serviceYAML(servers: [("e", echo.port)])]))
        defer { p.stop() }
        let port = p.port("svc")
        _ = try Self.exchanges(port, count: 1)
        usleep(200_000)
        let base = Self.openDescriptors(p.pid)
        // Held at once with a receive pending each way, then closed: by the client (FIN),
        // by a reset, and after an exchange, so every close path cancels a pending operation.
        var held: [Int32] = []
        for k in 0..<300 {
            let fd = try Net.connect(port)
            if k % 3 == 2 {
                try Net.sendAll(fd, "x\n")
                #expect(Net.readExactly(fd, 2) == Array("x\n".utf8))
            }
            held.append(fd)
        }
        usleep(200_000)
        #expect(Self.openDescriptors(p.pid) >= base + 300)
        for (k, fd) in held.enumerated() {
            if k % 3 == 1 { Net.reset(fd) } else { close(fd) }
        }
        var now = Self.openDescriptors(p.pid)
        let deadline = Date().addingTimeInterval(5)
        while now > base && Date() < deadline {
            usleep(20_000)
            now = Self.openDescriptors(p.pid)
        }
        #expect(now <= base, "descriptors: \(now) after, \(base) before")
        // Closing a descriptor is not enough: an operation left in the ring would keep the socket
        // open (no FIN, no reset to the server). The echo server sees every connection end.
        var open = echo.openConnections
        while open > 1 && Date() < deadline.addingTimeInterval(5) {
            usleep(20_000)
            open = echo.openConnections
        }
        #expect(open <= 1, "server-side connections still open: \(open)")
        #expect(try Self.exchanges(port, count: 5) > 0)
    }

    /// A seccomp filter that fails io_uring_setup with EPERM (as Docker's default profile does),
    /// then runs the rest of the command line.
    static let denyIOUring = """
        import ctypes, os, platform, struct, sys
        libc = ctypes.CDLL(None, use_errno=True)
        arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
        def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
        def jeq(k, jt, jf): return struct.pack("HBBI", 0x15, jt, jf, k)
        prog = b"".join([
            stmt(0x20, 4), jeq(arch, 1, 0), stmt(0x06, 0x7FFF0000),   # another arch: allow
            stmt(0x20, 0), jeq(425, 0, 1), stmt(0x06, 0x00050001),    # io_uring_setup: EPERM
            stmt(0x06, 0x7FFF0000)])
        buf = ctypes.create_string_buffer(prog, len(prog))
        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fp = Fprog(len(prog) // 8, ctypes.addressof(buf))
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:
            sys.exit("seccomp: errno %d" % ctypes.get_errno())
        os.execv(sys.argv[1], sys.argv[1:])
        """

    @Test("engine: where the kernel refuses io_uring (seccomp), one log line says so and epoll serves")
    func refusedFallsBack() throws {
        let dir = TempDir()
        let wrapper = dir.write("deny-io-uring.py", Self.denyIOUring)
        let echo = try TestServer.echo()
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nengine: io_uring", services: [serviceYAML(servers: [("e", echo.port)])]),
            prefix: ["/usr/bin/python3", wrapper])
        defer { p.stop() }
        let line = p.waitForLog("io_uring refused by the kernel")
        #expect(line?.contains("warning") == true, "\(p.log)")
        #expect(line?.contains("Operation not permitted") == true, "\(line ?? "")")
        #expect(p.logLines.filter { $0.contains("io_uring") }.count == 1, "\(p.log)")
        #expect(Self.ringSubmissions(p.pid) == 0)
        #expect(try Self.exchanges(p.port("svc"), count: 50) > 0)
    }

    @Test("engine: a default start (no engine written) asks for no io_uring fallback and logs no warning")
    func defaultStartIsQuiet() throws {
        let echo = try TestServer.echo()
        let p = try BallastProcess(config: configYAML(services: [serviceYAML(servers: [("e", echo.port)])]))
        defer { p.stop() }
        #expect(try Self.exchanges(p.port("svc"), count: 10) > 0)
        #expect(p.logLines.filter { $0.contains(" warning ") || $0.contains(" error ") }.isEmpty, "\(p.log)")
        #expect(p.waitForLog("engine") != nil)
    }
}
