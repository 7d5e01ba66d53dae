import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// systemd's notify protocol against a test Unix datagram socket standing in for systemd.
@Suite(.serialized) struct NotifyTests {
    final class FakeSystemd {
        let dir = TempDir()
        let fd: Int32
        var path: String { dir.file("notify.sock") }

        init() throws {
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(dir.file("notify.sock").utf8)
            withUnsafeMutableBytes(of: &addr.sun_path) { p in for (k, b) in bytes.enumerated() { p[k] = b } }
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            guard r == 0 else { throw Net.Failure("bind notify socket: \(errno)") }
            Net.setTimeout(fd, 5)
        }

        /// The next message, or nil after the timeout.
        func next() -> String? {
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            return n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : nil
        }

        /// Skips watchdog pings until a message containing `text`.
        func wait(for text: String) -> String? {
            while let m = next() {
                if m.contains(text) { return m }
            }
            return nil
        }

        deinit { close(fd) }
    }

    @Test("READY at start, RELOADING then READY around a reload, WATCHDOG pings, STOPPING at stop")
    func lifecycle() throws {
        let sd = try FakeSystemd()
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let config = configYAML(services: [serviceYAML(servers: [("e", echo.port)])])
        let p = try BallastProcess(
            config: config, extraArgs: ["--notify"], environment: ["NOTIFY_SOCKET": sd.path, "WATCHDOG_USEC": "200000"])
        defer { p.stop() }
        let ready = try #require(sd.wait(for: "READY=1"))
        #expect(ready.contains("MAINPID=\(p.pid)"))
        #expect(sd.wait(for: "WATCHDOG=1") != nil)
        #expect(sd.wait(for: "WATCHDOG=1") != nil)
        _ = p.reload(config)
        let reloading = try #require(sd.wait(for: "RELOADING=1"))
        #expect(reloading.contains("MONOTONIC_USEC="))
        #expect(sd.wait(for: "READY=1") == "READY=1")
        p.signal(SIGTERM)
        #expect(sd.wait(for: "STOPPING=1") == "STOPPING=1")
        #expect(p.waitExit() == 0)
    }

    @Test("--notify without $NOTIFY_SOCKET: a clear message and no start")
    func notifyWithoutSocket() throws {
        let dir = TempDir()
        let path = dir.write("b.yaml", configYAML(services: [serviceYAML(servers: [("e", 7001)])]))
        let (status, _, err) = try runCommand(
            "/usr/bin/env", ["-u", "NOTIFY_SOCKET", Repo.ballast, "run", "-c", path, "--notify"])
        #expect(status != 0)
        #expect(err.contains("--notify needs $NOTIFY_SOCKET, which systemd sets for Type=notify units"))
        #expect(!err.contains("started"))
    }
}
