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

/// `role: master` services: every master answer through the service's `MasterArbiter`, the
/// demotion of the others, and what Sentinel names.
extension HealthChecker {
    /// A `role: master` check's answer goes through the service's arbiter: a master answer
    /// that another master outranks becomes a refusal; one that takes over takes the others
    /// down at once. True when the server should come UP on this answer.
    func arbitrate(_ t: CheckTask, _ v: inout Verdict, _ now: Int64) -> Bool {
        guard var arbiter = arbiters[t.service] else { return false }
        defer { arbiters[t.service] = arbiter }
        guard v.status.passed, let rep = v.replication, rep.isMaster else {
            // Anything but a master answer; a timeout keeps the claim (one slow answer is noise).
            if v.replication != nil || v.status == .l4con || v.status == .sockError || v.status == .l7response {
                arbiter.noClaim(t.key)
            }
            return false
        }
        let claim = MasterArbiter.Claim(
            name: t.server.name, address: t.server.address, replid: rep.replid, replid2: rep.replid2)
        switch arbiter.masterAnswer(t.key, claim) {
        case .refuse(let reason):
            v = Verdict(.l7response, reason, definite: true, replication: rep)
            return false
        case .accept(let takeover, let demote):
            arbiters[t.service] = arbiter
            demoteTasks(t.service, demote, now)
            if takeover {
                logger.notice(
                    "Service \(t.service): \(t.server.name) takes the writes (\(arbiter.usesSentinel ? "named by sentinel" : "replication history"))."
                )
            }
            return takeover || (arbiter.usesSentinel && arbiter.named != nil)
        }
    }

    /// Takes servers down at once on the arbiter's word (another server is the master).
    func demoteTasks(_ service: String, _ demote: [Int: String], _ now: Int64) {
        for (key, reason) in demote {
            guard let d = tasks.first(where: { $0?.key == key }) ?? nil, d.service == service else { continue }
            let r = CheckResult(status: .l7response, code: nil, detail: reason, durationMs: 0)
            d.last = r
            if d.up { transition(d, up: false, r) }
            // Ask again soon: the demoted server's next answer confirms or ends the conflict.
            if d.fd < 0 { d.nextDue = min(d.nextDue, now + d.config.fast.value) }
            publish(d)
        }
    }

    /// Keeps one arbiter per `role: master` service and one Sentinel watcher per `sentinel:`.
    func updateArbiters(_ next: [CheckTask?], sentinelConfigs: [String: SentinelConfig]) {
        var keys: [String: Set<Int>] = [:]
        for case let t? in next where t.config.type == .redis && t.config.role == .master {
            keys[t.service, default: []].insert(t.key)
        }
        var fresh: [String: MasterArbiter] = [:]
        for (service, live) in keys {
            let usesSentinel = sentinelConfigs[service] != nil
            var a =
                arbiters[service].flatMap { $0.usesSentinel == usesSentinel ? $0 : nil }
                ?? MasterArbiter(usesSentinel: usesSentinel)
            for k in a.claims.keys where !live.contains(k) { a.noClaim(k) }
            fresh[service] = a
        }
        arbiters = fresh
        for (service, w) in sentinels where sentinelConfigs[service] != w.config || fresh[service] == nil {
            w.stop()
            sentinels[service] = nil
        }
        for (service, c) in sentinelConfigs where sentinels[service] == nil && fresh[service] != nil {
            let w = SentinelWatcher(service: service, config: c, logger: logger) { [weak self] address in
                self?.post { $0.sentinelNamed(service, address) }
            }
            w.start()
            sentinels[service] = w
        }
    }

    /// Sentinel named the master of `service` (a majority agreed, or `+switch-master`).
    func sentinelNamed(_ service: String, _ address: SocketAddress) {
        guard var a = arbiters[service] else { return }
        let changed = a.named != address
        let demote = a.sentinelNamed(address)
        arbiters[service] = a
        let now = monotonic()
        demoteTasks(service, demote, now)
        // Ask the named server now (unless it is already UP): its answer brings it UP at once.
        for case let t? in tasks
        where t.service == service && t.server.address == address && t.fd < 0 && t.enabled && !t.up {
            t.nextDue = now
        }
        guard changed else { return }
        if !tasks.contains(where: { $0?.service == service && $0?.server.address == address }) {
            logger.warning(
                "Service \(service): sentinel names \(address) the master, which is not a server of this service; no server takes writes."
            )
        }
    }
}
