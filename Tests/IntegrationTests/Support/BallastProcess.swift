import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Paths of the repository and of the built `ballast` binary (`swift build` first; CI does).
/// A write to a pipe or socket whose reader is gone must fail with EPIPE, not end the whole
/// test process silently with SIGPIPE (a client script that exited early, a killed daemon).
/// Every helper that spawns or talks to a process calls this first.
let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

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
        ignoreSIGPIPE
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
/// Runs a short command and returns its exit status, standard output and standard error; past
/// `timeout` the command is killed, and the wait for it is bounded too.
func runCommand(_ path: String, _ args: [String], timeout: Double = 60) throws -> (Int32, String, String) {
    ignoreSIGPIPE
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let outData = Mutex(Data())
    let errData = Mutex(Data())
    let t1 = TestThread {
        let d = out.fileHandleForReading.readDataToEndOfFile()
        outData.withLock { $0 = d }
    }
    let t2 = TestThread {
        let d = err.fileHandleForReading.readDataToEndOfFile()
        errData.withLock { $0 = d }
    }
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(10_000) }
    if p.isRunning {
        p.signal(SIGKILL)
        // Bounded: Foundation's reaper has been seen to leave an exited child unreported.
        NatLab.waitGone(p, timeout: 5)
    }
    t1.join()
    t2.join()
    // A child Foundation never reported as ended has no status to read (reading it would trap).
    return (
        p.isRunning ? -1 : p.terminationStatus, String(decoding: outData.withLock { $0 }, as: UTF8.self),
        String(decoding: errData.withLock { $0 }, as: UTF8.self)
    )
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
        ignoreSIGPIPE
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

    func signal(_ sig: Int32) { process.signal(sig) }

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

/// HAProxy run beside Ballast for side-by-side comparisons (`haproxy -db -f <config>`), killed
/// by PID at `stop`.
final class HAProxyProcess {
    static let path = "/usr/sbin/haproxy"
    static var available: Bool { FileManager.default.isExecutableFile(atPath: path) }
    let process = Process()

    init(configFile: String) throws {
        process.executableURL = URL(fileURLWithPath: Self.path)
        process.arguments = ["-db", "-f", configFile]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
    }

    func stop() {
        if process.processIdentifier > 1 { process.signal(SIGKILL) }
        NatLab.waitGone(process, timeout: 60)
    }
}
