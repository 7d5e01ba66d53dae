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

/// A connection's life around the data path: its timers, its end and what is counted then, and
/// the runtime API's views of and actions on live connections.
extension Worker {
    // MARK: - Timers

    func armIdle(_ i: Int32) {
        let c = table[i]
        let svc = c.pointee.service!
        let due = min(c.pointee.lastClientIO + svc.clientMs, c.pointee.lastServerIO + svc.serverMs)
        wheel.arm(i, at: due, in: table)
    }

    func onTimer(_ i: Int32) {
        let c = table[i]
        switch c.pointee.state {
        case .free:
            return
        case .proxyHeader:
            rejectProxy(i, "no complete header within the client timeout")
        case .queued:
            finish(i, .queueTimeout)
        case .connecting:
            if c.pointee.phaseDeadline <= now {
                connectFailed(i, ETIMEDOUT)
            } else {
                wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
            }
        case .established:
            // Activity only updates timestamps; the deadline is checked here, when the timer fires.
            let svc = c.pointee.service!
            if c.pointee.lastClientIO + svc.clientMs <= now {
                finish(i, .clientTimeout)
            } else if c.pointee.lastServerIO + svc.serverMs <= now {
                finish(i, .serverTimeout)
            } else {
                armIdle(i)
            }
        }
    }

    // MARK: - Close

    /// Ends a connection: both sockets closed (with a RST towards a peer whose partner reset),
    /// pools and server slot returned, slot freed.
    func finish(_ i: Int32, _ reason: EndReason) {
        let c = table[i]
        guard c.pointee.state != .free else { return }
        if c.pointee.sourceCounted, let svc = c.pointee.service {
            svc.service.stats.access.tracker.release(c.pointee.clientAddr)
        }
        wheel.disarm(i, in: table)
        if c.pointee.state == .queued, let svc = c.pointee.service { dequeue(i, from: svc) }
        if ring != nil {
            // Ring buffers in flight belong to their send; its completion gives them back.
            let established = c.pointee.state == .established
            if c.pointee.up.buffer >= 0 && established && !c.pointee.up.polled { c.pointee.up.buffer = -1 }
            if c.pointee.down.buffer >= 0 && established && !c.pointee.down.polled { c.pointee.down.buffer = -1 }
        }
        releasePipe(c, true)
        releasePipe(c, false)
        releaseBuffer(c, true)
        releaseBuffer(c, false)
        if c.pointee.clientFd >= 0 && (reason == .serverReset || reason == .refused) {
            Socket.setLingerZero(c.pointee.clientFd)
        }
        if c.pointee.serverFd >= 0 && reason == .clientReset { Socket.setLingerZero(c.pointee.serverFd) }
        closeSockets(i, client: c.pointee.clientFd, server: c.pointee.serverFd)
        if settings.logConnections { logClose(c, reason) }
        let server = c.pointee.server
        let svc = c.pointee.service
        switch reason {
        case .clientReset:
            c.pointee.serviceSlot?.pointee.clientAborts &+= 1
            if server != nil { c.pointee.serverSlot?.pointee.clientAborts &+= 1 }
        case .serverReset:
            c.pointee.serviceSlot?.pointee.serverAborts &+= 1
            c.pointee.serviceSlot?.pointee.responseErrors &+= 1
            if server != nil {
                c.pointee.serverSlot?.pointee.serverAborts &+= 1
                c.pointee.serverSlot?.pointee.responseErrors &+= 1
            }
        case .badProxyHeader:
            c.pointee.serviceSlot?.pointee.requestErrors &+= 1
        default:
            break
        }
        if let stats = svc?.service.stats, c.pointee.serviceSlot != nil {
            stats.clients.wrappingSubtract(1, ordering: .relaxed)
            if server != nil { stats.assigned.wrappingSubtract(1, ordering: .relaxed) }
        }
        c.pointee.server = nil
        table.free(i)
        shared.connections.wrappingSubtract(1, ordering: .relaxed)
        // After the slot is free: serving the queue may start (or end) other connections.
        if let server { returnSlot(server, svc) }
        if pausedForMaxconn { maybeResumeListeners() }
    }

    func logClose(_ c: UnsafeMutablePointer<Conn>, _ reason: EndReason) {
        let client = SocketAddress(storage: c.pointee.clientAddr)?.description ?? "?"
        let svcName = c.pointee.service?.name ?? "?"
        var serverName = "-"
        if let svc = c.pointee.service, c.pointee.serverIndex >= 0 {
            serverName = svc.service.servers[Int(c.pointee.serverIndex)].name
        }
        logger.info(
            "connection closed",
            metadata: [
                "service": "\(svcName)", "server": "\(serverName)", "client": "\(client)",
                "bytes_in": "\(c.pointee.up.bytes)", "bytes_out": "\(c.pointee.down.bytes)",
                "duration_ms": "\(now - c.pointee.acceptedAt)", "end": "\(reason)",
            ])
    }

    /// One `show sess` line per open connection, HAProxy's `key=value` style.
    func describeSessions() -> [String] {
        var out: [String] = []
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            let c = table[i]
            guard c.pointee.state != .free else { continue }
            let client = SocketAddress(storage: c.pointee.clientAddr)
            let proto = client.map { $0.family == AF_INET6 ? "tcpv6" : "tcpv4" } ?? "tcpv4"
            let svc = c.pointee.service?.name ?? "<NONE>"
            let srv = c.pointee.server?.name ?? "<none>"
            let state: String
            switch c.pointee.state {
            case .free: state = "free"
            case .proxyHeader: state = "proxy-header"
            case .queued: state = "queued"
            case .connecting: state = "connecting"
            case .established: state = "established"
            }
            let age = (now - c.pointee.acceptedAt) / 1000
            let id = SessionID.make(worker: self.id, index: i, generation: c.pointee.gen)
            out.append(
                "\(SessionID.text(id)): proto=\(proto) src=\(client?.description ?? "?") fe=\(svc) be=\(svc) srv=\(srv) ts=00 age=\(age)s state=\(state) thr=\(self.id) bin=\(c.pointee.up.bytes) bout=\(c.pointee.down.bytes) scf=[fd=\(c.pointee.clientFd)] scb=[fd=\(c.pointee.serverFd)]"
            )
        }
        return out
    }

    /// Closes the established or connecting connections that `matches` selects.
    func closeConnections(reason: EndReason, _ matches: (Conn) -> Bool) {
        var closed = 0
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            let c = table[i]
            guard c.pointee.state == .established || c.pointee.state == .connecting, matches(c.pointee) else {
                continue
            }
            finish(i, reason)
            closed += 1
        }
        if closed > 0 { logger.info("worker \(id): closed \(closed) connections (\(reason))") }
    }

    func closeEverything() {
        for k in 0..<Int(table.highWater) {
            let i = Int32(k)
            if table[i].pointee.state != .free { finish(i, .shutdown) }
        }
        for k in listeners.indices {
            if let l = listeners[k] {
                Sys.close(l.fd)
                listeners[k] = nil
            }
        }
        pipes.closeAll()
        // Run the queued closes; releasing the ring cancels whatever is still in flight.
        ring?.submit()
        ring = nil
    }
}
