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

/// The listener (HAProxy's listener.c): accepting under the process-wide maxconn, pausing when
/// descriptors or the connection table run out, and who may connect (`admit`).
extension Worker {
    // MARK: - Accept

    func acceptLoop(_ slot: Int) {
        var budget = 64
        while budget > 0, let l = listeners[slot], !l.paused {
            budget -= 1
            // Reserve a place under the process-wide maxconn before taking the connection, so
            // at the limit the listener pauses and clients wait in the backlog instead of failing.
            let count = shared.connections.wrappingAdd(1, ordering: .relaxed).newValue
            if count > shared.maxconn.load(ordering: .relaxed) {
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                pausedForMaxconn = true
                pauseListeners()
                return
            }
            guard let i = table.allocate() else {
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                pausedForMaxconn = true
                pauseListeners()
                return
            }
            let c = table[i]
            let r: IOResult<Int32>
            do {
                r = try withUnsafeMutablePointer(to: &c.pointee.clientAddr) { p throws(SysError) in
                    try Socket.accept(l.fd, p)
                }
            } catch {
                table.free(i)
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                switch error.errno {
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    pauseForResources("accept on \(l.address)", error)
                case ECONNABORTED, EPERM, EPROTO:
                    continue
                default:
                    logger.error("worker \(id): accept on \(l.address): \(error)")
                }
                return
            }
            guard case .done(let fd) = r else {
                table.free(i)
                shared.connections.wrappingSubtract(1, ordering: .relaxed)
                return
            }
            shared.totalConnections.wrappingAdd(1, ordering: .relaxed)
            c.pointee.clientFd = fd
            c.pointee.service = l.service
            c.pointee.acceptedAt = now
            c.pointee.state = .connecting  // provisional until assign() decides
            // Who may connect is decided before anything is counted, picked or connected (with
            // accept_proxy, once the header has named the client).
            if !l.acceptProxy && !admit(i) { continue }
            let stats = l.service.service.stats
            let slot = stats.counters.slot(id)
            slot.pointee.accepted &+= 1
            c.pointee.serviceSlot = slot
            raiseMax(stats.clientsMax, to: stats.clients.wrappingAdd(1, ordering: .relaxed).newValue)
            c.pointee.lastClientIO = now
            c.pointee.retriesLeft = l.service.retries
            c.pointee.tried = 0
            if ring != nil && !l.acceptProxy {
                // The ring receives on it once a server is connected; nothing to watch before.
                assign(i, exclude: -1)
                continue
            }
            c.pointee.clientOnEpoll = true
            do {
                try loop.add(
                    fd, Epoll.in | Epoll.out | Epoll.rdhup | Epoll.edgeTriggered, token(i, .client, c.pointee.gen))
            } catch {
                finish(i, .clientReset)
                continue
            }
            if l.acceptProxy {
                // Nothing is relayed before a valid header: bounded by the client timeout.
                c.pointee.state = .proxyHeader
                wheel.arm(i, at: now + l.service.clientMs, in: table)
                continue
            }
            assign(i, exclude: -1)
        }
    }

    /// Out of descriptors or memory: stop accepting for a moment instead of spinning on a listener
    /// that stays readable. The pending clients wait in the backlog.
    func pauseForResources(_ what: String, _ error: SysError) {
        if !pausedForFds {
            logger.warning("worker \(id): \(what) failed (\(error)); pausing listeners for 100ms")
        }
        pausedForFds = true
        pausedUntil = now + 100
        pauseListeners()
    }

    func pauseListeners() {
        for k in listeners.indices {
            guard let l = listeners[k], !l.paused else { continue }
            try? loop.modify(l.fd, 0, token(Int32(k), .listener, l.gen))
            listeners[k]!.paused = true
        }
    }

    func maybeResumeListeners() {
        if pausedForFds && now < pausedUntil { return }
        if shared.connections.load(ordering: .relaxed) >= shared.maxconn.load(ordering: .relaxed) { return }
        if table.live >= table.capacity { return }
        pausedForFds = false
        pausedForMaxconn = false
        for k in listeners.indices {
            guard let l = listeners[k], l.paused else { continue }
            try? loop.modify(l.fd, Epoll.in, token(Int32(k), .listener, l.gen))
            listeners[k]!.paused = false
        }
    }

    /// The service's access list and per-client limits for a new client: a refused one is reset
    /// at once (HAProxy's `tcp-request connection reject`), counted, and logged by the admin
    /// thread's once-a-second summary, never here (a flood must not become a log flood).
    func admit(_ i: Int32) -> Bool {
        let c = table[i]
        guard let svc = c.pointee.service?.service else { return true }
        let access = svc.stats.access
        guard access.active.load(ordering: .relaxed) else { return true }
        var refusal: Refusal?
        switch access.check(c.pointee.clientAddr) {
        case .denied: refusal = .denied
        case .notAllowed: refusal = .notAllowed
        case .admitted:
            let limits = svc.config.limits
            if !limits.isEmpty {
                refusal = access.tracker.admit(c.pointee.clientAddr, limits: limits, now: now)
                c.pointee.sourceCounted = refusal == nil
            }
        }
        guard let refusal else { return true }
        access.count(refusal, from: c.pointee.clientAddr)
        finish(i, .refused)
        return false
    }
}
