import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The hot path (accept, pick, connect, relay, close) allocates nothing once warm. Measured with
/// an LD_PRELOAD shim (Tests/Fixtures/malloccount.c) that counts malloc-family calls made by the
/// data-plane threads of a real `ballast run`.
@Suite(.serialized) struct AllocationTests {
    static var compiler: String? {
        ["/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static func exchange(_ port: UInt16, bytes: Int) throws {
        let fd = try Net.connect(port)
        defer { close(fd) }
        let payload = [UInt8](repeating: 0x5A, count: bytes)
        let reader = TestThread {
            _ = Net.readExactly(fd, bytes)
        }
        try Net.sendAll(fd, payload)
        reader.join()
        Net.shutdownWrite(fd)
        _ = Net.readAll(fd)
    }

    @Test(.enabled(if: compiler != nil, "no C compiler to build the malloc-counting shim"))
    func noAllocationPerConnectionOnceWarm() throws {
        let dir = TempDir()
        let shim = dir.file("malloccount.so")
        let source = Repo.root.appendingPathComponent("Tests/Fixtures/malloccount.c").path
        let (status, _, err) = try runCommand(
            Self.compiler!, ["-shared", "-fPIC", "-O2", "-o", shim, source, "-lpthread"])
        try #require(status == 0, "building the shim failed: \(err)")
        let countFile = dir.file("count")
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try BallastProcess(
            config: configYAML(global: "workers: 1", services: [serviceYAML(servers: [("e1", echo.port)])]),
            environment: ["LD_PRELOAD": shim, "MALLOC_COUNT_FILE": countFile])
        defer { p.stop() }
        let port = p.port("svc")
        func count() -> Int {
            usleep(100_000)
            let text = (try? String(contentsOfFile: countFile, encoding: .utf8)) ?? ""
            return Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        }
        /// One round: sequential small exchanges, bulk transfers in parallel (both directions
        /// splicing at once, partial writes), and a burst of concurrent small ones.
        func round() throws -> Int {
            for _ in 0..<100 { try Self.exchange(port, bytes: 100) }
            let bulk = (0..<4).map { _ in TestThread { try? Self.exchange(port, bytes: 4 << 20) } }
            let burst = (0..<20).map { _ in TestThread { try? Self.exchange(port, bytes: 1000) } }
            (bulk + burst).forEach { $0.join() }
            return 124
        }
        // Warm-up: the connection table chunk, pools of buffers and pipes, scheduler state, and
        // the runtime's one-time work on the first use of each path.
        for _ in 0..<3 { _ = try round() }
        let warm = count()
        #expect(warm > 0, "the shim saw no worker allocation at all: is it loaded?")
        var connections = 0
        for _ in 0..<4 { connections += try round() }
        let after = count()
        // Allocating per connection would show at least one call per connection; a stray one-time
        // allocation on a path first taken now (the machine is shared and timing varies) would not.
        #expect(
            (after - warm) * 50 < connections,
            "\(after - warm) allocations on the worker thread for \(connections) connections once warm")
    }
}
