import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message to the
/// Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
public final class SystemdNotifier: Sendable {
    let path: String
    /// `$WATCHDOG_USEC`: how often systemd expects `WATCHDOG=1`; nil when the watchdog is off.
    public let watchdogMicros: Int?

    /// nil when `$NOTIFY_SOCKET` is unset (not started by systemd with `Type=notify`).
    public init?(environment: [String: String]) {
        guard let p = environment["NOTIFY_SOCKET"], !p.isEmpty else { return nil }
        path = p
        if let w = environment["WATCHDOG_USEC"], let v = Int(w), v > 0,
            environment["WATCHDOG_PID"].map({ Int32($0) == getpid() }) ?? true
        {
            watchdogMicros = v
        } else {
            watchdogMicros = nil
        }
    }

    public static func fromProcessEnvironment() -> SystemdNotifier? {
        var env: [String: String] = [:]
        for key in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            if let v = getenv(key) { env[key] = String(cString: v) }
        }
        return SystemdNotifier(environment: env)
    }

    /// Sends one message, such as `READY=1`. Failures are returned, not thrown: notification is
    /// best effort, as in sd_notify.
    @discardableResult
    public func send(_ message: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (k, b) in bytes.enumerated() { p[k] = b } }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (bytes.first == 0 ? 0 : 1))
        let payload = Array(message.utf8)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                payload.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, len) }
            }
        }
        return r == payload.count
    }
}
