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

/// The backend (HAProxy's backend.c): the server choice, the connect and its retries, the PROXY
/// header read from clients and written to servers.
extension Worker {
    // MARK: - Server choice and connect

    /// Chooses a server and starts connecting, or queues, or closes the client when no server can
    /// ever take it.
    /// `failedErr`: the errno of the failed connect to `exclude` this is a retry of (logged
    /// with the server actually tried next).
    func assign(_ i: Int32, exclude: Int32, failedErr: Int32 = 0) {
        let c = table[i]
        guard let svc = c.pointee.service else { return finish(i, .noServer) }
        let hash = svc.balance == .source ? clientHash(c, svc) : 0
        var attempts = svc.service.servers.count + 1
        while attempts > 0 {
            attempts -= 1
            guard let s = svc.pick(exclude: exclude, tried: c.pointee.tried, hash: hash, now: now) else { break }
            let server = svc.service.servers[Int(s)]
            // Another worker may have taken the last slot since the pick: pick again.
            guard server.tryAcquire() else { continue }
            if exclude >= 0 && s != exclude {
                c.pointee.serviceSlot?.pointee.redispatches &+= 1
                c.pointee.serverSlot?.pointee.redispatches &+= 1
            }
            if exclude >= 0 && settings.logConnections {
                logger.info(
                    "\(svc.name): connect to \(svc.service.servers[Int(exclude)].name) failed (\(String(cString: strerror(failedErr)))), retrying on \(s == exclude ? "the same server (no other is usable)" : server.name)"
                )
            }
            attach(i, server, s, svc)
            startConnect(i)
            return
        }
        if svc.anyUsable {
            if svc.queueCount >= svc.maxqueue { return finish(i, .queueFull) }
            c.pointee.state = .queued
            // A client that goes away while waiting leaves the queue (as with epoll).
            if let ring, c.pointee.hangupOp == 0 { armHangup(ring, i) }
            c.pointee.phaseDeadline = now + svc.queueMs
            enqueue(i, into: svc)
            wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
        } else {
            finish(i, c.pointee.serverIndex >= 0 ? .connectFailed : .noServer)
        }
    }

    /// Gives the connection the server whose slot it just reserved, and counts the pick.
    @inline(__always)
    func attach(_ i: Int32, _ server: Server, _ s: Int32, _ svc: WorkerService) {
        let c = table[i]
        c.pointee.server = server
        c.pointee.serverIndex = s
        let slot = server.counters.slot(id)
        c.pointee.serverSlot = slot
        slot.pointee.picks &+= 1
        c.pointee.serviceSlot?.pointee.picks &+= 1
        raiseMax(server.activeMax, to: server.active.load(ordering: .relaxed))
        let stats = svc.service.stats
        raiseMax(stats.assignedMax, to: stats.assigned.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    /// Peeks at what the client sent; once a whole PROXY header is there, consumes exactly it,
    /// takes the client address it names, and goes on to pick a server.
    func readProxyHeader(_ i: Int32) {
        let c = table[i]
        var peek = (
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0),
            UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0)
        )  // 240 bytes
        let fd = c.pointee.clientFd
        let outcome: ProxyProtocol.Parsed? = withUnsafeMutableBytes(of: &peek) { buf -> ProxyProtocol.Parsed? in
            let r: IOResult<Int>
            do { r = try Sys.peek(fd, buf.baseAddress!, ProxyProtocol.maxHeader) } catch { return nil }
            guard case .done(let n) = r else { return .incomplete }
            if n == 0 { return .invalid("connection closed before a complete header") }
            let parsed = ProxyProtocol.parse(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            if parsed == .incomplete && n >= ProxyProtocol.maxHeader {
                return .invalid("header over \(ProxyProtocol.maxHeader) bytes")
            }
            if case .header(let length, _) = parsed {
                // Consume exactly the header; the bytes after it belong to the relay.
                _ = try? Sys.recv(fd, buf.baseAddress!, length)
            }
            return parsed
        }
        switch outcome {
        case .none:
            finish(i, .clientReset)
        case .incomplete?:
            if c.pointee.clientRdHup { rejectProxy(i, "connection closed before a complete header") }
        case .invalid(let reason)?:
            rejectProxy(i, reason)
        case .header(_, let source)?:
            if let source { withUnsafeMutablePointer(to: &c.pointee.clientAddr) { source.store(into: $0) } }
            guard admit(i) else { return }
            wheel.disarm(i, in: table)
            c.pointee.state = .connecting
            c.pointee.lastClientIO = now
            assign(i, exclude: -1)
        }
    }

    func rejectProxy(_ i: Int32, _ reason: String) {
        let c = table[i]
        let client = SocketAddress(storage: c.pointee.clientAddr)?.description ?? "?"
        logger.warning("\(c.pointee.service?.name ?? "?"): PROXY header from \(client) rejected: \(reason)")
        finish(i, .badProxyHeader)
    }

    /// Puts the PROXY header for this connection in the client→server buffer, so it goes out
    /// before the first relayed byte.
    func queueProxyHeader(_ i: Int32, _ version: ProxyProtocol.Version) {
        let c = table[i]
        guard let b = acquireBuffer(c, true) else { return }
        var local = Socket.localStorage(c.pointee.clientFd) ?? sockaddr_storage()
        let n = withUnsafePointer(to: &c.pointee.clientAddr) { src in
            withUnsafePointer(to: &local) { dst in
                ProxyProtocol.encode(version, src: src, dst: dst, into: buffers.memory[Int(b)])
            }
        }
        c.pointee.up.bufStart = 0
        c.pointee.up.bufEnd = Int32(n)
    }

    @inline(__always)
    func clientHash(_ c: UnsafeMutablePointer<Conn>, _ svc: WorkerService) -> UInt32 {
        withUnsafePointer(to: &c.pointee.clientAddr) { SourceHash.hash($0, withPort: svc.hashWithPort) }
    }

    func startConnect(_ i: Int32) {
        let c = table[i]
        let server = c.pointee.server!
        c.pointee.state = .connecting
        c.pointee.serverReadable = false
        c.pointee.serverWritable = false
        c.pointee.serverRdHup = false
        let result: Socket.ConnectResult
        do {
            result = try Socket.connect(server.address)
        } catch {
            if error.errno == EMFILE || error.errno == ENFILE {
                pauseForResources("connect to \(server.address)", error)
            }
            return connectFailed(i, error.errno)
        }
        let fd: Int32
        switch result {
        case .connected(let f), .inProgress(let f): fd = f
        }
        c.pointee.serverFd = fd
        Socket.setNoDelay(fd)
        if ring == nil {
            do {
                try loop.add(
                    fd, Epoll.in | Epoll.out | Epoll.rdhup | Epoll.edgeTriggered, token(i, .server, c.pointee.gen))
            } catch {
                return connectFailed(i, error.errno)
            }
        }
        c.pointee.phaseDeadline = now + c.pointee.service!.connectMs
        wheel.arm(i, at: c.pointee.phaseDeadline, in: table)
        guard forwardEarly(i) else { return }
        // Still connecting: epoll reports EPOLLOUT on the registered socket; the ring polls it.
        if let ring { armConnect(ring, i) }
    }

    /// The client's first bytes, sent before the connect is reported (HAProxy's speculative
    /// I/O): a client that speaks first has usually sent its request with the handshake, and on
    /// a near server (loopback, one LAN hop) the connect is done by the time `connect` returns
    /// EINPROGRESS. A send that succeeds is the proof the connect completed; EAGAIN means it is
    /// still under way (the EPOLLOUT path goes on as before); an error is the connect's own
    /// failure, handled as one (retries, redispatch: the bytes stay in the buffer for the next
    /// server). Not with a PROXY header to send (it must go first), nor when the client has
    /// nothing yet (a server that speaks first: one `recv` of EAGAIN is the cost). Both engines:
    /// with io_uring these are two plain calls in place of a connect poll and a first receive
    /// through the ring, and what the send left is flushed by `ringStart`.
    /// Returns true while the connect is still to be waited for; false once this call has
    /// completed it, failed it (a retry is under way) or closed the connection.
    func forwardEarly(_ i: Int32) -> Bool {
        let c = table[i]
        if let server = c.pointee.server, server.sendProxy.load(ordering: .relaxed) != 0 { return true }
        if c.pointee.up.bufEnd == c.pointee.up.bufStart && !c.pointee.up.eof {
            // Read whether or not an event said so yet; the read decides what comes next.
            c.pointee.clientReadable = true
            switch copyRead(c, true, from: c.pointee.clientFd) {
            case .failed:
                finish(i, .clientReset)
                return false
            case .eof:
                // A FIN before any byte: passed on once the connect is reported.
                c.pointee.clientReadable = false
                return true
            case .noBuffer, .empty:
                return true
            case .data:
                break
            }
        }
        guard c.pointee.up.bufEnd > c.pointee.up.bufStart else { return true }
        let (b, start, end) = (c.pointee.up.buffer, c.pointee.up.bufStart, c.pointee.up.bufEnd)
        let r: IOResult<Int>
        do {
            r = try Sys.send(c.pointee.serverFd, buffers.memory[Int(b)] + Int(start), Int(end - start))
        } catch {
            connectFailed(i, error.errno)
            return false
        }
        guard case .done(let n) = r else { return true }
        touch(c, dstIsClient: false)
        c.pointee.up.bufStart += Int32(n)
        if c.pointee.up.bufStart == c.pointee.up.bufEnd {
            c.pointee.up.bufStart = 0
            c.pointee.up.bufEnd = 0
            releaseBuffer(c, true)
        }
        connectCompleted(i, failed: false)
        return false
    }

    /// The server socket became writable (`failed`: with EPOLLERR or EPOLLHUP). Linux reports a
    /// failed connect with EPOLLERR, so only then is SO_ERROR asked (one system call fewer per
    /// connection, as HAProxy).
    func connectCompleted(_ i: Int32, failed: Bool) {
        let c = table[i]
        if failed {
            let err = Socket.pendingError(c.pointee.serverFd)
            return connectFailed(i, err != 0 ? err : ECONNRESET)
        }
        c.pointee.state = .established
        c.pointee.serverWritable = true
        c.pointee.serverSlot?.pointee.sessions &+= 1
        c.pointee.serviceSlot?.pointee.sessions &+= 1
        if let server = c.pointee.server { server.lastSession.store(now, ordering: .relaxed) }
        c.pointee.service?.service.stats.lastSession.store(now, ordering: .relaxed)
        if let server = c.pointee.server,
            let v = ProxyProtocol.Version(rawValue: server.sendProxy.load(ordering: .relaxed))
        {
            queueProxyHeader(i, v)
        }
        if let server = c.pointee.server, server.connectFailures.load(ordering: .relaxed) != 0 {
            server.connectFailures.store(0, ordering: .relaxed)
        }
        c.pointee.lastClientIO = now
        c.pointee.lastServerIO = now
        armIdle(i)
        if let ring { return ringStart(ring, i) }
        pump(i)
    }

    func connectFailed(_ i: Int32, _ err: Int32) {
        let c = table[i]
        if c.pointee.serverFd >= 0 {
            closeSockets(i, client: -1, server: c.pointee.serverFd)
            c.pointee.serverFd = -1
        }
        let failed = c.pointee.serverIndex
        c.pointee.serverSlot?.pointee.connectErrors &+= 1
        c.pointee.serviceSlot?.pointee.connectErrors &+= 1
        if c.pointee.retriesLeft > 0 {
            c.pointee.serverSlot?.pointee.retries &+= 1
            c.pointee.serviceSlot?.pointee.retries &+= 1
        }
        if let svc = c.pointee.service, svc.observeFails > 0, let server = c.pointee.server {
            observeFailure(server, svc, err)
        }
        releaseServer(i)
        if failed >= 0 && failed < 64 { c.pointee.tried |= 1 << UInt64(failed) }
        if c.pointee.retriesLeft > 0 {
            c.pointee.retriesLeft -= 1
            return assign(i, exclude: failed, failedErr: err)
        }
        finish(i, err == ETIMEDOUT ? .connectTimeout : .connectFailed)
    }

    /// Passive observation: enough consecutive failed connects mark the server DOWN at once;
    /// the active check brings it back after `rise` successes.
    func observeFailure(_ server: Server, _ svc: WorkerService, _ err: Int32) {
        let n = server.connectFailures.wrappingAdd(1, ordering: .relaxed).newValue
        guard n >= svc.observeFails else { return }
        guard server.setUp(false, now: now) else { return }
        logger.warning(
            "Server \(svc.name)/\(server.name) is DOWN, reason: passive observation, info: \"\(n) consecutive failed connects, last: \(String(cString: strerror(err)))\"."
        )
    }

    func releaseServer(_ i: Int32) {
        let c = table[i]
        guard let server = c.pointee.server else { return }
        c.pointee.server = nil
        c.pointee.service?.service.stats.assigned.wrappingSubtract(1, ordering: .relaxed)
        returnSlot(server, c.pointee.service)
    }

    /// Gives a server's connection slot back and hands it to the oldest waiting connection.
    func returnSlot(_ server: Server, _ svc: WorkerService?) {
        server.release()
        if let svc, svc.queueCount > 0 { serveQueue(svc) }
    }
}
