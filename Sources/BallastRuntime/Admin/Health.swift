import BallastCore
import BallastIO

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `ballast health`: for keepalived's `track_script` and container health checks. Asks the
/// running Ballast `show health` on its stats socket within its own deadline and prints one line:
/// exit 0 with `ok: …`, exit 1 with why not. Never waits longer than the deadline, needs no root
/// (only the socket's permission).
public enum Health {
    public struct Outcome: Equatable {
        public var ok: Bool
        public var line: String
    }

    public static func check(target: String, services: [String], timeoutMs: Int) -> Outcome {
        let deadline = monotonicMillis() + Int64(timeoutMs)
        func left() -> Int32 { Int32(max(0, deadline - monotonicMillis())) }
        let fd: Int32
        do {
            fd = try connect(target, left)
        } catch {
            return Outcome(ok: false, line: "no answer on \(target): \(error.description)")
        }
        defer { Sys.close(fd) }
        let request = Array((["show", "health"] + services).joined(separator: " ").utf8) + [10]
        var sent = 0
        while sent < request.count {
            guard Socket.wait(fd, forWrite: true, timeoutMs: left()) else {
                return Outcome(ok: false, line: "no answer on \(target) within \(timeoutMs) ms")
            }
            let r = try? request.withUnsafeBytes { try Sys.send(fd, $0.baseAddress! + sent, $0.count - sent) }
            guard case .done(let n)? = r else {
                if r == nil { return Outcome(ok: false, line: "no answer on \(target): connection closed") }
                continue
            }
            sent += n
        }
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while reply.count < 65536 {
            guard Socket.wait(fd, timeoutMs: left()) else {
                return Outcome(ok: false, line: "no answer on \(target) within \(timeoutMs) ms")
            }
            let r = try? buf.withUnsafeMutableBytes { try Sys.recv(fd, $0.baseAddress!, $0.count) }
            guard let r else { break }  // reset: judge what came
            guard case .done(let n) = r else { continue }
            if n == 0 { break }
            reply += buf[0..<n]
        }
        return judge(String(decoding: reply, as: UTF8.self), target: target)
    }

    /// Reads `show health`'s reply.
    static func judge(_ text: String, target: String) -> Outcome {
        let lines = text.split(separator: "\n").map(String.init).filter { !$0.isEmpty }
        if lines.count == 1, lines[0].hasPrefix("ok: ") { return Outcome(ok: true, line: lines[0]) }
        let fails = lines.filter { $0.hasPrefix("fail: ") }.map { String($0.dropFirst(6)) }
        if !fails.isEmpty && fails.count == lines.count {
            return Outcome(ok: false, line: fails.joined(separator: "; "))
        }
        if lines.isEmpty {
            return Outcome(ok: false, line: "no answer on \(target): connection closed without a reply")
        }
        let shown = String(lines.joined(separator: " ").prefix(80))
        return Outcome(ok: false, line: "unexpected answer from \(target): \(shown)")
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func reason(_ e: Int32) -> String {
        switch e {
        case ENOENT: return "no such socket (is Ballast running?)"
        case EACCES, EPERM: return "permission denied"
        case EAGAIN: return "its backlog is full"
        default: return String(cString: strerror(e)).lowercased()
        }
    }

    static func connect(_ target: String, _ left: () -> Int32) throws(Failure) -> Int32 {
        if target.hasPrefix("/") || target.hasPrefix(".") || !target.contains(":") {
            do { return try Socket.connectUnix(target, nonblocking: true) } catch {
                throw Failure(description: reason(error.errno))
            }
        }
        let address: SocketAddress
        do { address = try SocketAddress(parsing: target) } catch { throw Failure(description: "\(error)") }
        let fd: Int32
        do {
            switch try Socket.connect(address) {
            case .connected(let f): return f
            case .inProgress(let f): fd = f
            }
        } catch {
            throw Failure(description: reason(error.errno))
        }
        guard Socket.wait(fd, forWrite: true, timeoutMs: left()) else {
            Sys.close(fd)
            throw Failure(description: "no connection within the deadline")
        }
        let e = Socket.pendingError(fd)
        if e != 0 {
            Sys.close(fd)
            throw Failure(description: reason(e))
        }
        return fd
    }
}
