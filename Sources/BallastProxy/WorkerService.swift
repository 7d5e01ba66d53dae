import BallastCore

/// A worker's own view of one service: the snapshot's `Service`, this worker's scheduler state
/// and its FIFO of connections waiting for a server below `maxconn`. Only its worker touches it.
public final class WorkerService {
    let service: Service
    let scheduler: Scheduler
    var queueHead: Int32 = -1
    var queueTail: Int32 = -1
    var queueCount = 0

    // Copied out of the config once, so the hot path reads plain fields instead of the config struct.
    let connectMs: Int64
    let clientMs: Int64
    let serverMs: Int64
    let queueMs: Int64
    let retries: Int32
    let maxqueue: Int

    let balance: Balance
    let hashWithPort: Bool
    let allbackups: Bool
    let observeFails: Int

    init(service: Service, seed: UInt64) {
        self.service = service
        let c = service.config
        scheduler = makeScheduler(
            c.balance, servers: c.servers, tableSize: c.hashTableSize, seed: seed, turn: service.turn)
        connectMs = c.timeouts.connect.value
        clientMs = c.timeouts.client.value
        serverMs = c.timeouts.server.value
        queueMs = c.timeouts.queue.value
        retries = Int32(c.retries)
        maxqueue = c.maxqueue
        balance = c.balance
        hashWithPort = c.hashKey == .sourcePort
        allbackups = c.allbackups
        observeFails = c.observeFails
    }

    var name: String { service.name }
    var config: ServiceConfig { service.config }

    /// Picks a usable server with room, skipping `exclude` when another one qualifies
    /// (redispatch after a failed connect). Backups are used only when no active server is
    /// usable: the first one in config order, or all of them through the policy with `allbackups`.
    func pick(exclude: Int32, tried: UInt64 = 0, hash: UInt32, now: Int64) -> Int32? {
        let ex = Int(exclude)
        // Redispatch order: an active server not tried yet, then a backup not tried yet, then
        // one tried before (not the one that just failed), and only then the one that failed.
        if let i = pickTier(backup: false, exclude: ex, tried: tried, hash: hash, now: now) { return Int32(i) }
        if !hasUsableActive(except: ex, tried: tried),
            let i = pickBackup(exclude: ex, tried: tried, hash: hash, now: now)
        {
            return Int32(i)
        }
        if tried != 0 {
            if let i = pickTier(backup: false, exclude: ex, tried: 0, hash: hash, now: now) { return Int32(i) }
            if !hasUsableActive(except: ex, tried: 0), let i = pickBackup(exclude: ex, tried: 0, hash: hash, now: now) {
                return Int32(i)
            }
        }
        if ex >= 0 {
            if let i = pickTier(backup: false, exclude: -1, tried: 0, hash: hash, now: now) { return Int32(i) }
            if !hasUsableActive(except: -1, tried: 0), let i = pickBackup(exclude: -1, tried: 0, hash: hash, now: now) {
                return Int32(i)
            }
        }
        return nil
    }

    private func pickBackup(exclude ex: Int, tried: UInt64, hash: UInt32, now: Int64) -> Int? {
        if allbackups { return pickTier(backup: true, exclude: ex, tried: tried, hash: hash, now: now) }
        let servers = service.servers
        for i in service.backupIndices
        where i != ex && !Self.isTried(i, tried) && servers[i].usable && servers[i].hasRoom {
            return i
        }
        return nil
    }

    private func pickTier(backup tier: Bool, exclude ex: Int, tried: UInt64, hash: UInt32, now: Int64) -> Int? {
        PickView.with(
            servers: service.handles, backup: service.backupFlags, tier: tier, exclude: ex, tried: tried, now: now,
            staticWeights: balance == .source, hash: hash, version: service.states.version.load(ordering: .acquiring)
        ) { scheduler.pick($0) }
    }

    private func hasUsableActive(except ex: Int, tried: UInt64) -> Bool {
        for i in service.activeIndices where i != ex && !Self.isTried(i, tried) && service.servers[i].usable {
            return true
        }
        return false
    }

    @inline(__always)
    static func isTried(_ i: Int, _ tried: UInt64) -> Bool { i < 64 && tried & (1 << UInt64(i)) != 0 }

    /// True when some server could take connections but all are at maxconn: worth queueing.
    var anyUsable: Bool {
        for s in service.servers where s.usable { return true }
        return false
    }
}
