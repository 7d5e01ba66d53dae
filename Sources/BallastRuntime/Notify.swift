import BallastIO
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
        Socket.sendDatagram(toUnix: path, Array(message.utf8))
    }
}
