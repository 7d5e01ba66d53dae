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
        _ = FileManager.default.createFile(atPath: p, contents: Data(contents.utf8))
        return p
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs a short command and returns its exit status (128 + the signal when a signal ended it),
/// standard output and standard error; past `timeout` the command is killed. Started with
/// `posix_spawn` and reaped here with `waitpid`, not through Foundation's `Process`: its exit is
/// seen as soon as it happens, even while the test process is busy with many children (the
/// shared reaper of `Process` has been seen to report an exit late, or never). Standard input is
/// /dev/null; no descriptor of the test process but the two pipes reaches the command.
func runCommand(_ path: String, _ args: [String], timeout: Double = 60) throws -> (Int32, String, String) {
    ignoreSIGPIPE
    var outPipe: [Int32] = [-1, -1]
    var errPipe: [Int32] = [-1, -1]
    guard pipe2(&outPipe, O_CLOEXEC) == 0 else { throw Net.Failure("pipe: errno \(errno)") }
    guard pipe2(&errPipe, O_CLOEXEC) == 0 else {
        close(outPipe[0])
        close(outPipe[1])
        throw Net.Failure("pipe: errno \(errno)")
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    _ = posix_spawn_file_actions_addclosefrom_np(&actions, 3)
    // The test process ignores SIGPIPE; the command gets the default back, and no blocked signal.
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var defaults = sigset_t()
    sigemptyset(&defaults)
    sigaddset(&defaults, SIGPIPE)
    posix_spawnattr_setsigdefault(&attr, &defaults)
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attr, &none)
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
    let argv = ([path] + args).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, &attr, argv, environ)
    close(outPipe[1])
    close(errPipe[1])
    guard rc == 0 else {
        close(outPipe[0])
        close(errPipe[0])
        throw Net.Failure("\(path): cannot start: \(String(cString: strerror(rc)))")
    }
    let outData = Mutex(Data())
    let errData = Mutex(Data())
    let (outFD, errFD) = (outPipe[0], errPipe[0])
    let t1 = TestThread { outData.withLock { $0 = readToEnd(outFD) } }
    let t2 = TestThread { errData.withLock { $0 = readToEnd(errFD) } }
    var status: Int32 = 0
    var reaped = false
    let deadline = Date().addingTimeInterval(timeout)
    while !reaped {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid || (r < 0 && errno != EINTR) {
            reaped = true
        } else if Date() >= deadline {
            kill(pid, SIGKILL)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            reaped = true
        } else {
            usleep(2_000)
        }
    }
    // A command that left a child holding its output open must not hold the test forever.
    t1.join(timeout: 10)
    t2.join(timeout: 10)
    let signal = status & 0x7f
    let code = signal == 0 ? (status >> 8) & 0xff : 128 + signal
    return (
        code, String(decoding: outData.withLock { $0 }, as: UTF8.self),
        String(decoding: errData.withLock { $0 }, as: UTF8.self)
    )
}

// glibc functions Swift's Glibc module leaves out (they need _GNU_SOURCE); plain C calls.
@_silgen_name("pipe2") private func pipe2(_ fds: UnsafeMutablePointer<Int32>, _ flags: Int32) -> Int32
@_silgen_name("posix_spawn_file_actions_addclosefrom_np")
private func posix_spawn_file_actions_addclosefrom_np(
    _ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ from: Int32
) -> Int32

/// Everything readable from `fd` until end of file; closes it.
private func readToEnd(_ fd: Int32) -> Data {
    var data = Data()
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 {
            data.append(contentsOf: buf[0..<n])
        } else if n < 0 && errno == EINTR {
            continue
        } else {
            break
        }
    }
    close(fd)
    return data
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
