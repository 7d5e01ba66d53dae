import BallastCore
import Logging

/// Refused clients, said once a second per service at most, however many there were: a flood
/// of refused connections must not become a flood of log lines (the workers never log them).
/// Also forgets per-client counts that are over. Run by the main thread's tick.
struct RefusalReport {
    private var seen: [ObjectIdentifier: [UInt64]] = [:]
    private var last: Int64 = 0

    mutating func tick(_ table: ServiceTable, logger: Logger, now: Int64) {
        guard now - last >= 1000 else { return }
        last = now
        var next: [ObjectIdentifier: [UInt64]] = [:]
        for svc in table.services {
            let access = svc.stats.access
            if !svc.config.limits.isEmpty { access.tracker.sweep(now: now, periodMs: svc.config.limits.ratePeriodMs) }
            let counts = Refusal.allCases.map { access.refusals($0) }
            let id = ObjectIdentifier(access)
            next[id] = counts
            let before = seen[id] ?? Array(repeating: 0, count: counts.count)
            // After `clear counters all` a count goes down: nothing to say this time.
            guard zip(counts, before).allSatisfy({ $0 >= $1 }) else { continue }
            let delta = zip(counts, before).map { $0 - $1 }
            let total = delta.reduce(0, +)
            guard total > 0 else { continue }
            let why = Refusal.allCases.enumerated().filter { delta[$0.offset] > 0 }.map {
                "\($0.element.text) \(delta[$0.offset])"
            }
            let from = SocketAddress(storage: access.lastRefused)?.hostText ?? "?"
            logger.notice(
                "service \(svc.name): refused \(total) connections in the last second (\(why.joined(separator: ", "))); the last from \(from)"
            )
        }
        seen = next
    }
}
