import BallastCore
import BallastIO
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A change of a service's servers asked for on the runtime API.
enum ServerChange: Sendable {
    /// `add server <svc>/<srv> <addr>:<port> [weight N] [backup] [maxconn N]`
    case add(service: String, AddedServer)
    /// `del server <svc>/<srv>`
    case delete(service: String, server: String)
    /// `set server <svc>/<srv> addr <ip> [port <p>]`
    case move(service: String, server: String, address: String, port: String?)
}

/// Server changes wait here for the main thread, which owns the config and the table (as it
/// does for a reload): the asking thread wakes the main thread's event loop and waits for the
/// answer on a `Completion`.
final class ChangeQueue: @unchecked Sendable {
    final class Pending: @unchecked Sendable {
        let change: ServerChange
        let done = Completion()
        let answer = Mutex<Result<String, CLIError>?>(nil)
        init(_ change: ServerChange) { self.change = change }
    }

    private let loop: EventLoop
    private let queue = Mutex<[Pending]>([])

    init(waking loop: EventLoop) { self.loop = loop }

    /// Asks the main thread and waits for its answer (at most 10 s: a reload may be under way).
    func ask(_ change: ServerChange) -> Result<String, CLIError> {
        let p = Pending(change)
        queue.withLock { $0.append(p) }
        loop.wake()
        guard p.done.wait(timeoutMs: 10_000) else {
            return .failure(CLIError("Timed out: the change is queued and is applied after the reload under way.\n\n"))
        }
        return p.answer.withLock { $0 } ?? .failure(CLIError("The change was not applied.\n\n"))
    }

    /// The main thread: answers every waiting change.
    func serve(_ apply: (ServerChange) -> Result<String, CLIError>) {
        for p in queue.withLock({ q in
            let all = q
            q.removeAll()
            return all
        }) {
            let r = apply(p.change)
            p.answer.withLock { $0 = r }
            p.done.signal()
        }
    }
}

extension Runtime {
    /// Applies one server change to the running service, as HAProxy's CLI would answer it. The
    /// change joins `serverChanges`, which every later load (reload, restart through the state
    /// file) lays over the file while the service's text stays the same.
    /// The running service `name` and the file's version of it (what changes are recorded
    /// against); nil when there is no such service.
    private func running(_ name: String) -> (Service, ServiceConfig)? {
        guard let svc = table.services.first(where: { $0.name == name }),
            let base = fileConfig.services.first(where: { $0.name == name })
        else { return nil }
        return (svc, base)
    }

    func apply(_ change: ServerChange) -> Result<String, CLIError> {
        switch change {
        case .add(let name, let added):
            guard let (svc, base) = running(name) else { return .failure(CLIError("No such backend.\n")) }
            if svc.servers.contains(where: { $0.name == added.name }) {
                return .failure(CLIError("Already exists a server with the same name in backend.\n\n"))
            }
            if let why = Runtime.refusal(added, in: svc.config, config: config) {
                return .failure(CLIError(why + "\n\n"))
            }
            var changes = serverChanges
            changes.add(added, to: base)
            install(changes)
            // As HAProxy: a new server starts in maintenance; `enable server` puts it in service.
            table.services.first { $0.name == name }?.servers.first { $0.name == added.name }?.setAdmin(
                .maint, now: monotonicMillis())
            adminContext?.saveState()
            logger.notice(
                "service \(name): server \(added.name) added at \(added.address) (in maintenance until enabled)")
            return .success("New server registered.\n\n")
        case .delete(let name, let srv):
            guard let (svc, base) = running(name) else { return .failure(CLIError("No such backend.\n")) }
            guard let s = svc.servers.first(where: { $0.name == srv }) else {
                return .failure(CLIError("No such server.\n"))
            }
            guard s.adminState == .maint else {
                return .failure(CLIError("Only servers in maintenance mode can be deleted.\n"))
            }
            guard s.active.load(ordering: .relaxed) == 0 else {
                return .failure(CLIError("Server still has connections attached to it, cannot remove it.\n"))
            }
            guard svc.servers.count > 1 else {
                return .failure(CLIError("Cannot delete the last server of a backend.\n"))
            }
            var changes = serverChanges
            changes.delete(srv, from: base)
            install(changes)
            logger.notice("service \(name): server \(srv) deleted")
            return .success("Server deleted.\n")
        case .move(let name, let srv, let addrText, let portText):
            guard let (svc, base) = running(name) else { return .failure(CLIError("No such backend.\n")) }
            guard let s = svc.servers.first(where: { $0.name == srv }) else {
                return .failure(CLIError("No such server.\n\n"))
            }
            let old = s.address
            let text = addrText.contains(":") ? "[\(addrText)]:\(old.port)" : "\(addrText):\(old.port)"
            guard var new = try? SocketAddress(parsing: text) else {
                return .failure(CLIError("Invalid addr '\(addrText)' by 'stats socket command'\n\n"))
            }
            if let portText {
                guard let p = UInt16(portText) else {
                    // HAProxy's words; nothing is changed (HAProxy would have applied the address).
                    let same = new.hostText == old.hostText ? "no need to change the addr, " : ""
                    return .failure(
                        CLIError("\(same)problem converting port '\(portText)' to an int by 'stats socket command'\n\n")
                    )
                }
                guard p != 0 else {
                    return .failure(CLIError("port 0 cannot be connected to; the server keeps \(old).\n\n"))
                }
                new.port = p
            }
            if let kind = new.notUnicast {
                return .failure(CLIError("\(new.hostText) is \(kind); a server needs a unicast address.\n\n"))
            }
            if svc.config.mode.isKernel, let fam = svc.config.binds.first?.address.family, new.family != fam {
                return .failure(
                    CLIError(
                        "\(new.hostText) is not the family of the \(svc.config.mode.rawValue) service's address; the server keeps \(old).\n\n"
                    ))
            }
            if svc.config.mode == .dsr, let port = svc.config.binds.first?.address.port, new.port != port {
                return .failure(
                    CLIError(
                        "dsr cannot translate ports: the server must listen on the service's port \(port); the server keeps \(old).\n\n"
                    ))
            }
            var what: [String] = []
            let had = s.hasAddress.load(ordering: .relaxed)
            what.append(
                had && new.hostText == old.hostText
                    ? "no need to change the addr"
                    : "IP changed from '\(had ? old.hostText : "(none)")' to '\(new.hostText)'")
            if portText != nil {
                what.append(
                    new.port == old.port
                        ? "no need to change the port" : "port changed from '\(old.port)' to '\(new.port)'")
            }
            if new != old || !had {
                s.setAddress(new)
                // A name keeps being resolved: the address it gives next wins again, as in
                // HAProxy. A numeric server keeps this address over reloads and restarts.
                if s.hostname == nil {
                    var changes = serverChanges
                    changes.move(srv, to: new, in: base)
                    serverChanges = changes
                }
                logger.notice("service \(name): server \(srv) moved from \(old) to \(new) (runtime API)")
                adminContext?.saveState()
            }
            return .success(what.joined(separator: ", ") + " by 'stats socket command'\n\n")
        }
    }

    /// Why a server cannot join `svc` (nil: it can).
    static func refusal(_ a: AddedServer, in svc: ServiceConfig, config: Config) -> String? {
        guard !a.name.isEmpty, a.name.count <= ConfigLoader.maxNameLength,
            a.name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }),
            a.name != "BACKEND", a.name != "FRONTEND"
        else {
            return
                "Invalid server name '\(a.name)': letters, digits, '-', '_' and '.', at most \(ConfigLoader.maxNameLength)."
        }
        if a.address.port == 0 { return "'server' expects <name> and <addr>:<port>; port 0 cannot be connected to." }
        if let kind = a.address.notUnicast {
            return "\(a.address.hostText) is \(kind); a server needs a unicast address."
        }
        for other in config.services {
            for b in other.binds
            where b.address == a.address
                || b.address.port == a.address.port && b.address.isUnspecified && a.address.isLoopback
            {
                return
                    "\(a.address) is where service '\(other.name)' listens; a server there would loop back into Ballast."
            }
        }
        if svc.mode.isKernel {
            let mode = svc.mode.rawValue
            if let fam = svc.binds.first?.address.family, a.address.family != fam {
                return "\(a.address.hostText) is not the family of the \(mode) service's address."
            }
            if a.maxconn > 0 {
                return "maxconn is not possible in \(mode) mode (the kernel does not count connections per server)."
            }
            if svc.servers.count >= 4095 { return "\(mode) mode takes at most 4095 servers per service." }
        }
        if svc.mode == .dsr, let port = svc.binds.first?.address.port, a.address.port != port {
            return "dsr cannot translate ports: the server must listen on the service's port \(port)."
        }
        if svc.balance == .source, svc.hashTableSize < 10 * (svc.servers.count + 1) {
            return
                "hash_table_size \(svc.hashTableSize) is too small for \(svc.servers.count + 1) servers (Maglev needs at least 10 slots per server)."
        }
        return nil
    }

    /// Makes `changes` the running set: the config with them laid over it becomes the table,
    /// published to every thread as a reload's table is.
    func install(_ changes: RuntimeServers) {
        var changes = changes
        let (next, _) = changes.apply(to: fileConfig)
        serverChanges = changes
        config = next
        generation += 1
        nat?.holdSync()
        table = ServiceTable.build(
            config: next, generation: generation, previous: table, now: monotonicMillis(), states: states)
        publish()
        checker?.update(table)
        if let nat {
            do { try nat.apply(table) } catch { logger.error("nat: could not program the server change: \(error)") }
        }
        if let ctx = adminContext {
            ctx.table = table
            ctx.saveState()
        }
    }
}
