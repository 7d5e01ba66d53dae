import BallastCore
import BallastIO
import CLinux
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension HealthChecker {
    /// One server's check: its settings, where it stands (connecting, sending, reading), and its
    /// rise/fall counters. (Not Swift's `Task`.)
    final class CheckTask {
        let service: String
        let server: Server
        let config: CheckConfig
        /// Where the check connects: the server's address now (its DNS name or `set server
        /// addr` may move it), or the check's own address/port.
        var target: SocketAddress {
            let at = server.address
            var t = config.address ?? at
            if config.address != nil { t.port = at.port }
            if let p = config.port { t.port = p }
            return t
        }
        let initialWeight: Int
        var nextDue: Int64
        var fd: Int32 = -1
        var started: Int64 = 0
        var deadline: Int64 = 0
        var connected = false
        var request: [UInt8] = []
        var sent = 0
        var response: [UInt8] = []
        var mysql: MySQLConversation?
        var consumed = 0
        var up = true
        var successes = 0
        var failures = 0
        var generation: UInt32 = 0
        /// Stable while the task lives (the master arbiter's key for this server).
        let key: Int
        /// No check has ended yet since start (`init_state` applies to the first result).
        var checkedOnce = false
        var enabled = true
        var running = false
        var last: CheckResult?
        /// Left behind by a reload that changed its check mid-conversation (MySQL only): it is
        /// driven to its end so the server sees a clean `COM_QUIT`, and its result is dropped.
        var retired = false

        init(service: String, server: Server, config: CheckConfig, initialWeight: Int, now: Int64, key: Int) {
            self.key = key
            self.service = service
            self.server = server
            self.config = config
            self.initialWeight = initialWeight
            // A server restored DOWN from the state file starts DOWN and needs `rise` passes.
            up = server.up.load(ordering: .relaxed)
            // Spread the first checks over one interval so they do not fire in lockstep; a server
            // that takes no traffic before its first answer is asked at once.
            let initDown = config.effectiveInitState == .down || config.effectiveInitState == .fullyDown
            nextDue = initDown && !up ? now : now + Int64.random(in: 0...max(0, config.interval.value - 1))
        }
    }
}
