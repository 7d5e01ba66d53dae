import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A real `redis-server` (Debian package) behind Ballast, driven by the real `redis-cli` and
/// `redis-benchmark`.
@Suite(.serialized) struct RedisTests {
    static let haveRedis = FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-server")

    final class RedisServer {
        let port: UInt16
        let dir = TempDir()
        let process = Process()
        var auth: [String] = []

        func cli(_ args: String...) throws -> String {
            try runCommand("/usr/bin/redis-cli", ["-p", "\(port)", "--no-auth-warning"] + auth + args).1
        }

        init(extra: [String] = []) throws {
            port = try Net.freePort()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
            process.arguments =
                [
                    "--port", "\(port)", "--bind", "127.0.0.1", "--dir", dir.path, "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--logfile", dir.file("redis.log"),
                ] + extra
            if let k = extra.firstIndex(of: "--requirepass") { auth = ["-a", extra[k + 1]] }
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline {
                if let (s, out, _) = try? runCommand(
                    "/usr/bin/redis-cli", ["-p", "\(port)", "--no-auth-warning"] + auth + ["PING"]), s == 0,
                    out == "PONG\n"
                {
                    return
                }
                usleep(50_000)
            }
            throw Net.Failure("redis-server did not start")
        }

        deinit {
            // SIGKILL: a child spawned from the test runner inherits its blocked SIGTERM, and this
            // throwaway server has nothing to save.
            process.signal(SIGKILL)
            NatLab.waitGone(process, timeout: 60)
        }
    }

    @Test(.enabled(if: haveRedis, "redis-server is not installed (apt-get install redis-server)"))
    func setAndGetThroughBallast() throws {
        let redis = try RedisServer()
        let p = try BallastProcess(
            config: configYAML(services: [serviceYAML(name: "redis", servers: [("r1", redis.port)])]))
        defer { p.stop() }
        let port = "\(p.port("redis"))"
        let (s1, o1, e1) = try runCommand(
            "/usr/bin/redis-cli", ["-p", port, "SET", "ballast:key", "value through the proxy"])
        #expect(s1 == 0, "\(e1)")
        #expect(o1 == "OK\n")
        // Read back directly from the server: the proxy really wrote it there.
        let (_, direct, _) = try runCommand("/usr/bin/redis-cli", ["-p", "\(redis.port)", "GET", "ballast:key"])
        #expect(direct == "value through the proxy\n")
        let (_, o2, _) = try runCommand("/usr/bin/redis-cli", ["-p", port, "GET", "ballast:key"])
        #expect(o2 == "value through the proxy\n")
        // A 1 MiB value crosses the copy→splice switch both ways.
        let big = String(repeating: "0123456789abcdef", count: 65536)
        let dir = TempDir()
        let f = dir.write("big", big)
        let (s3, _, e3) = try runCommand("/bin/sh", ["-c", "/usr/bin/redis-cli -p \(port) -x SET big < \(f)"])
        #expect(s3 == 0, "\(e3)")
        let (_, o4, _) = try runCommand("/usr/bin/redis-cli", ["-p", port, "STRLEN", "big"])
        #expect(o4 == "\(big.utf8.count)\n")
        let (_, o5, _) = try runCommand("/usr/bin/redis-cli", ["-p", port, "GET", "big"])
        #expect(o5 == big + "\n")
    }

    @Test(.enabled(if: haveRedis, "redis-server is not installed (apt-get install redis-server)"))
    func redisBenchmarkThroughBallast() throws {
        let redis = try RedisServer()
        let p = try BallastProcess(
            config: configYAML(services: [serviceYAML(name: "redis", servers: [("r1", redis.port)])]))
        defer { p.stop() }
        let (s, out, err) = try runCommand(
            "/usr/bin/redis-benchmark", ["-p", "\(p.port("redis"))", "-c", "20", "-n", "4000", "-t", "set,get", "-q"],
            timeout: 60)
        #expect(s == 0, "\(err)")
        #expect(out.contains("SET: "), "\(out)")
        #expect(out.contains("GET: "), "\(out)")
        let (_, dbsize, _) = try runCommand("/usr/bin/redis-cli", ["-p", "\(redis.port)", "DBSIZE"])
        #expect(dbsize == "1\n")  // redis-benchmark's key:__rand_int__
    }
}
