import BallastCore

/// A worker's own view of one service: the snapshot's `Service`, this worker's scheduler state
/// and its FIFO of connections waiting for a server below `maxconn`. Only its worker touches it.
public final class WorkerService {
    let service: Service
    let scheduler: Scheduler
    var queueHead: Int32 = -1
    var queueTail: Int32 = -1
    var queueCount = 0
    /// Set on reload when the service left the config: its queued connections are closed.
    var retired = false

    // Copied out of the config once, so the hot path reads plain fields instead of the config struct.
    let connectMs: Int64
    let clientMs: Int64
    let serverMs: Int64
    let queueMs: Int64
    let retries: Int32
    let maxqueue: Int
    private let backup: [Bool]

    init(service: Service) {
        self.service = service
        let c = service.config
        scheduler = makeScheduler(c.balance, weights: c.servers.map(\.weight))
        connectMs = c.timeouts.connect.value
        clientMs = c.timeouts.client.value
        serverMs = c.timeouts.server.value
        queueMs = c.timeouts.queue.value
        retries = Int32(c.retries)
        maxqueue = c.maxqueue
        backup = c.servers.map(\.backup)
    }

    var name: String { service.name }
    var config: ServiceConfig { service.config }

    /// Picks a usable server with room, skipping `exclude` when another one qualifies
    /// (redispatch after a failed connect). Backups are used only when no active server is usable.
    func pick(exclude: Int32) -> Int32? {
        let servers = service.servers
        let ex = Int(exclude)
        // Redispatch order: another active server, then a backup, and only then the one that failed.
        if let i = scheduler.pick({ i in i != ex && !isBackup(i) && servers[i].usable && servers[i].hasRoom }) {
            return Int32(i)
        }
        if !hasUsableActive(except: ex) {
            // No other active server: the first usable backup in config order (HAProxy's default).
            for i in service.backupIndices where i != ex && servers[i].usable && servers[i].hasRoom { return Int32(i) }
        }
        if ex >= 0, let i = scheduler.pick({ i in !isBackup(i) && servers[i].usable && servers[i].hasRoom }) {
            return Int32(i)
        }
        if ex >= 0 && !hasUsableActive(except: -1) {
            for i in service.backupIndices where servers[i].usable && servers[i].hasRoom { return Int32(i) }
        }
        return nil
    }

    private func hasUsableActive(except ex: Int) -> Bool {
        for i in service.activeIndices where i != ex && service.servers[i].usable { return true }
        return false
    }

    @inline(__always)
    private func isBackup(_ i: Int) -> Bool { backup[i] }

    /// True when some server could take connections but all are at maxconn: worth queueing.
    var anyUsable: Bool {
        for s in service.servers where s.usable { return true }
        return false
    }
}
