import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Paths of the repository and of the built `ballast` binary (`swift build` first; CI does).
enum Repo {
    static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var ballast: String {
        if let p = ProcessInfo.processInfo.environment["BALLAST_BIN"] { return p }
        for config in ["debug", "release"] {
            let p = root.appendingPathComponent(".build/\(config)/ballast").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return root.appendingPathComponent(".build/debug/ballast").path
    }
}

/// A temporary directory removed when the test is done.
final class TempDir: @unchecked Sendable {
    let path: String

    init() {
        var template = Array((NSTemporaryDirectory() + "/ballast-test-XXXXXX").utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }

    func file(_ name: String) -> String { path + "/" + name }

    func write(_ name: String, _ contents: String) -> String {
        let p = file(name)
        FileManager.default.createFile(atPath: p, contents: Data(contents.utf8))
        return p
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs a command to completion and returns (exit status, stdout, stderr).
/// Runs a short command and returns its exit status, standard output and standard error. Spawned
/// and reaped here (posix_spawn, waitpid on its own pid), not through Foundation's `Process`:
/// Foundation's reaper sometimes leaves a child that has exited as a zombie it never reports,
/// and a test waiting on it hung a whole run. Past `timeout` the command is killed.
func runCommand(_ path: String, _ args: [String], timeout: Double = 60) throws -> (Int32, String, String) {
    var outPipe: [Int32] = [-1, -1]
    var errPipe: [Int32] = [-1, -1]
    guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else { throw Net.Failure("pipe: \(String(cString: strerror(errno)))") }
    // Only the child's copies (dup2'd to 1 and 2) survive its exec; other children never see these.
    for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
    close(outPipe[1])
    close(errPipe[1])
    defer {
        close(outPipe[0])
        close(errPipe[0])
    }
    guard rc == 0 else { throw Net.Failure("\(path): \(String(cString: strerror(rc)))") }
    var out = [UInt8](), err = [UInt8]()
    var open = [true, true]
    var status: Int32 = 0
    var exited = false
    var exitedAt = Date.distantFuture
    let deadline = Date().addingTimeInterval(timeout)
    var buf = [UInt8](repeating: 0, count: 65536)
    // Read both pipes until they close (a daemon the command left behind may hold them: then
    // stop 2 s after the command exited), and reap the command when it exits.
    while open.contains(true) && Date() < exitedAt.addingTimeInterval(2) {
        var fds = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0), pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        for k in 0..<2 where !open[k] { fds[k].fd = -1 }
        _ = poll(&fds, 2, 50)
        for k in 0..<2 where open[k] && fds[k].revents != 0 {
            let n = buf.withUnsafeMutableBytes { read(fds[k].fd, $0.baseAddress!, $0.count) }
            if n > 0 {
                if k == 0 { out += buf[0..<n] } else { err += buf[0..<n] }
            } else if n == 0 || errno != EINTR {
                open[k] = false
            }
        }
        if !exited && waitpid(pid, &status, WNOHANG) == pid {
            exited = true
            exitedAt = Date()
        }
        if !exited && Date() > deadline {
            kill(pid, SIGKILL)
            _ = waitpid(pid, &status, 0)
            exited = true
            exitedAt = Date()
        }
    }
    while !exited {
        if waitpid(pid, &status, WNOHANG) == pid { break }
        if Date() > deadline {
            kill(pid, SIGKILL)
            _ = waitpid(pid, &status, 0)
            break
        }
        usleep(10_000)
    }
    // WEXITSTATUS, or 128 + the signal that ended it.
    let code = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    return (code, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
}

/// A `ballast run` child process with its log captured line by line.
final class BallastProcess: @unchecked Sendable {
    let dir: TempDir
    let configPath: String
    let process = Process()
    private let lines = LineLog()
    private var reader: TestThread?

    /// Starts Ballast with `config` (YAML) and waits for its "started" line.
    /// `prefix` runs it under another command (for example `prlimit --nofile=…`).
    init(
        config: String, prefix: [String] = [], extraArgs: [String] = [], environment: [String: String] = [:],
        waitReady: Bool = true
    ) throws {
        dir = TempDir()
        configPath = dir.write("ballast.yaml", config)
        if let first = prefix.first {
            process.executableURL = URL(fileURLWithPath: first)
            process.arguments = Array(prefix.dropFirst()) + [Repo.ballast, "run", "-c", configPath] + extraArgs
        } else {
            process.executableURL = URL(fileURLWithPath: Repo.ballast)
            process.arguments = ["run", "-c", configPath] + extraArgs
        }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let handle = err.fileHandleForReading
        reader = TestThread { [lines] in
            var pending = Data()
            while true {
                let d = handle.availableData
                if d.isEmpty { break }
                pending.append(d)
                while let nl = pending.firstIndex(of: 10) {
                    let line = String(decoding: pending[pending.startIndex..<nl], as: UTF8.self)
                    pending.removeSubrange(pending.startIndex...nl)
                    lines.m.withLock { $0.append(line) }
                }
            }
            if !pending.isEmpty {
                let rest = String(decoding: pending, as: UTF8.self)
                lines.m.withLock { $0.append(rest) }
            }
        }
        if waitReady {
            guard waitForLog("started", timeout: 20) != nil else {
                let log = self.log
                stop()
                throw Net.Failure("ballast did not start:\n\(log)")
            }
        }
    }

    var pid: Int32 { process.processIdentifier }
    var log: String { lines.m.withLock { $0.joined(separator: "\n") } }
    var logLines: [String] { lines.m.withLock { $0 } }

    /// Waits until a log line contains `text` (after skipping `after` matches); returns the line.
    @discardableResult
    func waitForLog(_ text: String, count: Int = 1, timeout: Double = 10) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let matches = lines.m.withLock { $0.filter { $0.contains(text) } }
            if matches.count >= count { return matches[count - 1] }
            if !process.isRunning {
                usleep(50_000)
                let m = lines.m.withLock { $0.filter { $0.contains(text) } }
                return m.count >= count ? m[count - 1] : nil
            }
            usleep(10_000)
        }
        return nil
    }

    /// The port a service listens on, from its "listening on" log line.
    func port(_ service: String, index: Int = 0) -> UInt16 {
        guard let line = waitForLog("service \(service) listening on") else { return 0 }
        let part = line.components(separatedBy: "listening on ")[1].components(separatedBy: ",")[index]
        return UInt16(part.split(separator: ":").last!.trimmingCharacters(in: .whitespaces)) ?? 0
    }

    func signal(_ sig: Int32) { kill(process.processIdentifier, sig) }

    /// SIGHUP, then waits for the outcome line ("reloaded" or "reload failed").
    @discardableResult
    func reload(_ newConfig: String) -> String? {
        let before = lines.m.withLock { $0.filter { $0.contains("reloaded") || $0.contains("reload failed") }.count }
        _ = dir.write("ballast.yaml", newConfig)
        signal(SIGHUP)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let m = lines.m.withLock { $0.filter { $0.contains("reloaded") || $0.contains("reload failed") } }
            if m.count > before { return m.last }
            usleep(10_000)
        }
        return nil
    }

    /// Waits for exit; returns the status, or nil on timeout.
    func waitExit(timeout: Double = 15) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { return nil }
        reader?.join(timeout: 5)
        return process.terminationStatus
    }

    /// SIGTERM and wait; SIGKILL if it does not stop.
    @discardableResult
    func stop() -> Int32? {
        guard process.isRunning else { return process.terminationStatus }
        signal(SIGTERM)
        if let s = waitExit(timeout: 15) { return s }
        signal(SIGKILL)
        return waitExit(timeout: 5)
    }

    /// CPU seconds (user + system) the process has used, from /proc/PID/stat.
    var cpuSeconds: Double {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = s.lastIndex(of: ")")
        else { return 0 }
        let fields = s[s.index(after: close)...].split(separator: " ")
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        return ((Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)) / ticks
    }

    deinit { stop() }
}

/// YAML for one service in front of the given ports.
func serviceYAML(
    name: String = "svc", bind: String = "127.0.0.1:0", servers: [(String, UInt16)], extra: String = "",
    serverExtra: [String: String] = [:], host: String = "127.0.0.1"
) -> String {
    var s = "  - name: \(name)\n    bind: [\"\(bind)\"]\n"
    for line in extra.split(separator: "\n") { s += "    \(line)\n" }
    s += "    servers:\n"
    for (n, p) in servers {
        let addr = host.contains(":") ? "[\(host)]:\(p)" : "\(host):\(p)"
        let more = serverExtra[n].map { ", " + $0 } ?? ""
        s += "      - { name: \(n), address: \"\(addr)\"\(more) }\n"
    }
    return s
}

func configYAML(global: String = "workers: 2", defaults: String = "", services: [String]) -> String {
    var s = "global:\n"
    s += global.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n") + "\n"
    // Ballast refuses to serve as root unless told to; the tests run as root in CI.
    if geteuid() == 0 && !global.contains("user:") { s += "  user: root\n" }
    if !defaults.isEmpty {
        s += "defaults:\n" + defaults.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n") + "\n"
    }
    s += "services:\n" + services.joined()
    return s
}

final class LineLog: Sendable {
    let m = Mutex<[String]>([])
}
