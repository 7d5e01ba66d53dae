import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// global.user / global.group: bind as root, then serve as the configured user.
@Suite(.serialized) struct PrivilegeTests {
    static let root = geteuid() == 0

    @Test(
        "after start the process runs as the configured user and still serves",
        .enabled(if: root, "needs root to switch users"))
    func dropsToUser() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 2\nuser: nobody\ngroup: nogroup", services: [serviceYAML(servers: [("e", echo.port)])]
            ))
        defer { p.stop() }
        #expect(p.waitForLog("running as user nobody (uid 65534, gid 65534)") != nil)
        let status = try String(contentsOfFile: "/proc/\(p.pid)/status", encoding: .utf8)
        let uid = status.split(separator: "\n").first { $0.hasPrefix("Uid:") }
        let gid = status.split(separator: "\n").first { $0.hasPrefix("Gid:") }
        #expect(uid?.split(separator: "\t").dropFirst().allSatisfy { $0 == "65534" } == true, "\(uid ?? "")")
        #expect(gid?.split(separator: "\t").dropFirst().allSatisfy { $0 == "65534" } == true, "\(gid ?? "")")
        // Every thread, the data plane's included.
        for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(p.pid)/task") {
            let t = try String(contentsOfFile: "/proc/\(p.pid)/task/\(task)/status", encoding: .utf8)
            #expect(t.contains("Uid:\t65534\t65534\t65534\t65534"))
        }
        let fd = try Net.connect(p.port("svc"))
        defer { close(fd) }
        try Net.sendAll(fd, "still serving")
        #expect(Net.readExactly(fd, 13) == Array("still serving".utf8))
    }

    @Test(
        "a group the user cannot switch to: a clear message, no partial start",
        .enabled(if: root, "needs root to start as another user"))
    func groupNotReachable() throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dir = TempDir()
        chmod(dir.path, 0o755)
        let path = dir.write(
            "b.yaml",
            configYAML(
                global: "workers: 1\nuser: nobody\ngroup: root", services: [serviceYAML(servers: [("e", echo.port)])]))
        chmod(path, 0o644)
        // Started as nobody (not as root): it cannot take group root.
        let (status, _, err) = try runCommand(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Repo.ballast, "run", "-c", path],
            timeout: 20)
        #expect(status == 1)
        #expect(
            err.contains(
                "cannot switch to group root (gid 0) as user nobody: Operation not permitted; start Ballast as root to switch user and group"
            ), "\(err)")
        #expect(!err.contains("started"))
    }

    @Test("unknown user or group: a config error with file:line:column")
    func unknownUser() throws {
        let dir = TempDir()
        for (yaml, expected) in [
            ("global: { user: no-such-user-here }\n", ":1:17: global.user: no such user 'no-such-user-here'"),
            ("global: { user: nobody, group: no-such-group }\n", ":1:32: global.group: no such group 'no-such-group'"),
        ] {
            let path = dir.write(
                "u.yaml",
                yaml
                    + "services:\n  - name: a\n    bind: [\"127.0.0.1:0\"]\n    servers: [{ name: s, address: 127.0.0.1:1 }]\n"
            )
            let (status, _, err) = try runCommand(Repo.ballast, ["check", "-c", path])
            #expect(status == 1)
            #expect(err == "ballast: \(path)\(expected)\n")
        }
    }

    @Test("as root without global.user: refuses to serve, and says how to insist", .enabled(if: root))
    func refusesRoot() throws {
        let dir = TempDir()
        let path = dir.write(
            "r.yaml",
            "services:\n  - name: a\n    bind: [\"127.0.0.1:0\"]\n    servers: [{ name: s, address: 127.0.0.1:1 }]\n")
        let (status, _, err) = try runCommand(Repo.ballast, ["run", "-c", path], timeout: 10)
        #expect(status == 1)
        #expect(
            err.contains(
                "refusing to serve as root: set global.user to the user to run as after binding (or global.user: root to insist)"
            ))
        #expect(!err.contains("started"))
    }
}
