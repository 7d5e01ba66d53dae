import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// examples/deployments/web as a test: two real nginx servers (Debian's nginx-light) behind
/// Ballast with an HTTP check on /healthz, wrk through Ballast, one nginx stopped and started
/// again mid-run.
@Suite(.serialized) struct WebDeploymentTests {
    static let available =
        FileManager.default.isExecutableFile(atPath: "/usr/sbin/nginx")
        && FileManager.default.isExecutableFile(atPath: "/usr/bin/wrk")

    final class Nginx: @unchecked Sendable {
        let name: String
        let port: UInt16
        let dir: TempDir
        var process: Process?

        init(_ name: String, dir: TempDir) throws {
            self.name = name
            self.dir = dir
            port = try Net.freePort()
            let template = try String(
                contentsOf: Repo.root.appendingPathComponent("examples/deployments/web/nginx.conf.in"), encoding: .utf8)
            _ = dir.write(
                "\(name).conf",
                template.replacingOccurrences(of: "@DIR@", with: dir.path).replacingOccurrences(
                    of: "@NAME@", with: name
                )
                .replacingOccurrences(of: "@PORT@", with: "\(port)"))
            try start()
        }

        func start() throws {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/sbin/nginx")
            p.arguments = ["-c", dir.file("\(name).conf"), "-p", dir.path, "-e", dir.file("nginx-\(name).err")]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            process = p
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline {
                if let fd = try? Net.connect(port, timeout: 1) {
                    close(fd)
                    return
                }
                usleep(20_000)
            }
            throw Net.Failure("nginx \(name) did not start")
        }

        /// SIGTERM: nginx's fast stop (connections are closed, then it exits). Waits until the
        /// port refuses connections.
        func stop() {
            guard let p = process else { return }
            p.signal(SIGTERM)
            let deadline = Date().addingTimeInterval(5)
            while Date() < deadline {
                guard let fd = try? Net.connect(port, timeout: 1) else { break }
                close(fd)
                usleep(20_000)
            }
            process = nil
        }

        deinit {
            // The master stops its workers; SIGTERM is nginx's own fast shutdown.
            if let p = process { p.signal(SIGTERM) }
        }
    }

    @Test(
        "web: wrk through Ballast while one nginx stops and comes back: no connect error, no failed request",
        .enabled(if: available, "nginx or wrk is not installed (apt-get install nginx-light wrk)"))
    func nginxStopAndStart() throws {
        let dir = TempDir()
        let web1 = try Nginx("web1", dir: dir)
        let web2 = try Nginx("web2", dir: dir)
        let p = try BallastProcess(
            config: configYAML(
                global: "workers: 1\nlog: { connections: true }", defaults: "retries: 2",
                services: [
                    serviceYAML(
                        name: "web", servers: [("web1", web1.port), ("web2", web2.port)],
                        extra: "check: { type: http, path: /healthz, interval: 300ms, rise: 2, fall: 2 }")
                ]))
        defer { p.stop() }
        let port = p.port("web")
        usleep(400_000)
        let wrk = Process()
        wrk.executableURL = URL(fileURLWithPath: "/usr/bin/wrk")
        wrk.arguments = ["-t1", "-c20", "-d6s", "--timeout", "2s", "http://127.0.0.1:\(port)/"]
        // A file, not a pipe: the nginx started again meanwhile would inherit the pipe's write end.
        let outPath = dir.write("wrk.out", "")
        wrk.standardOutput = FileHandle(forWritingAtPath: outPath)
        wrk.standardError = FileHandle.nullDevice
        try wrk.run()
        usleep(1_500_000)
        web1.stop()
        let down = try #require(p.waitForLog("Server web/web1 is DOWN", timeout: 3))
        #expect(down.contains("Connection refused"), "\(down)")
        usleep(1_500_000)
        try web1.start()
        #expect(p.waitForLog("Server web/web1 is UP", timeout: 3) != nil)
        NatLab.waitGone(wrk, timeout: 60)
        let report = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        // wrk prints "Socket errors: connect C, read R, write W, timeout T" only when there were any,
        // and "Non-2xx or 3xx responses: N" only when there were some.
        #expect(!report.contains("Non-2xx"), "\(report)")
        let errors = report.split(separator: "\n").first { $0.contains("Socket errors") }.map(String.init) ?? ""
        if !errors.isEmpty {
            let numbers = errors.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
            // connect, read, write, timeout: keep-alive connections open on web1 when it stopped
            // end (read errors, at most the 20 connections); nothing else.
            #expect(
                numbers.count == 4 && numbers[0] == 0 && numbers[2] == 0 && numbers[3] == 0 && numbers[1] <= 20,
                "\(report)")
        }
        let requests =
            report.split(separator: "\n").first { $0.contains("requests in") }.flatMap {
                Int($0.split(separator: " ")[0])
            } ?? 0
        #expect(requests > 1000, "\(report)")
        // Both servers answer again after the restart.
        var seen = Set<String>()
        for _ in 0..<8 {
            let fd = try Net.connect(port, timeout: 2)
            try Net.sendAll(fd, "GET / HTTP/1.0\r\n\r\n")
            let (data, _) = Net.readAll(fd)
            close(fd)
            if let line = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isNewline).last {
                seen.insert(String(line))
            }
        }
        #expect(seen == ["served by web1", "served by web2"], "\(seen)")
        print(
            "web: \(requests) requests through Ballast in 6 s with one nginx stopped for 1.5 s; \(errors.isEmpty ? "no socket errors" : errors)"
        )
    }
}
