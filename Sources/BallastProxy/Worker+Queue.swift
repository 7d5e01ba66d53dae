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

/// The queue (HAProxy's queue.c): connections waiting for a server below its maxconn, per service.
extension Worker {
    // MARK: - Queue

    func enqueue(_ i: Int32, into svc: WorkerService) {
        let c = table[i]
        c.pointee.queueNext = -1
        c.pointee.queuePrev = svc.queueTail
        if svc.queueTail >= 0 { table[svc.queueTail].pointee.queueNext = i } else { svc.queueHead = i }
        svc.queueTail = i
        svc.queueCount += 1
        queued += 1
        let stats = svc.service.stats
        raiseMax(stats.queuedMax, to: stats.queued.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    func dequeue(_ i: Int32, from svc: WorkerService) {
        let c = table[i]
        let n = c.pointee.queueNext
        let p = c.pointee.queuePrev
        if p >= 0 { table[p].pointee.queueNext = n } else { svc.queueHead = n }
        if n >= 0 { table[n].pointee.queuePrev = p } else { svc.queueTail = p }
        c.pointee.queueNext = -1
        c.pointee.queuePrev = -1
        svc.queueCount -= 1
        queued -= 1
        svc.service.stats.queued.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Hands freed server slots to waiting connections, oldest first.
    func serveQueue(_ svc: WorkerService) {
        while svc.queueHead >= 0 {
            let i = svc.queueHead
            let hash = svc.balance == .source ? clientHash(table[i], svc) : 0
            guard let s = svc.pick(exclude: -1, hash: hash, now: now) else { return }
            let server = svc.service.servers[Int(s)]
            guard server.tryAcquire() else { return }
            dequeue(i, from: svc)
            wheel.disarm(i, in: table)
            attach(i, server, s, svc)
            startConnect(i)
        }
    }

    /// Slots freed on other workers are seen here, every loop turn while something waits.
    func serveQueues() {
        for svc in services.values where svc.queueCount > 0 { serveQueue(svc) }
    }
}
