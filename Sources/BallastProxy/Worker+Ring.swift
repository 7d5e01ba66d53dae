import BallastCore
import BallastIO
import CLinux
import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The io_uring engine. The same connections, timers, queues and counters as the epoll engine;
/// what differs is how an established connection's bytes move: instead of waiting for readiness
/// and then calling `recv`/`send`/`splice`, each direction keeps one operation in the ring — a
/// receive into a buffer the kernel picks when data arrives (an idle connection holds none), then
/// a send of what came — and every operation queued during a turn is submitted together with
/// the wait for the next completions, in one `io_uring_enter`.
///
/// Listeners, the wake-up eventfd and PROXY-header reads stay on the epoll instance, whose
/// descriptor the ring polls (multishot): a new connection costs what it costs with epoll minus
/// the `epoll_ctl` calls, and the established path makes no system call of its own.
///
/// A closed connection's descriptors are cancelled and closed through the ring (linked, in
/// that order). Completions of operations that outlived their connection still arrive; their
/// generation no longer matches and they only give back the buffer they hold.
extension Worker {
    /// What an operation was for (4 bits of its word).
    enum RingOp: UInt64 {
        case recvUp = 1
        case recvDown = 2
        case sendUp = 3
        case sendDown = 4
        /// A connect in progress: the server socket becomes writable (or fails).
        case connect = 5
        /// A queued client's hang-up.
        case queuedHangup = 6
        /// The epoll instance has events (listeners, wake-up, PROXY headers).
        case epoll = 7
        /// Cancel-and-close, shutdown: completions only on failure, nothing to do.
        case housekeeping = 8
        /// A bulk direction's source is readable, or its destination writable.
        case srcReadyUp = 9
        case srcReadyDown = 10
        case dstReadyUp = 11
        case dstReadyDown = 12
    }

    /// An operation's word: connection index (24 bits) | generation (20) | op (4) | buffer (16).
    @inline(__always)
    func ringWord(_ i: Int32, _ op: RingOp, buffer: Int32 = 0) -> UInt64 {
        let gen = UInt64(table[i].pointee.gen & 0xF_FFFF)
        return UInt64(UInt32(bitPattern: i) & 0xFF_FFFF) | gen << 24 | op.rawValue << 44
            | UInt64(UInt16(truncatingIfNeeded: buffer)) << 48
    }

    static let ringEntries = 4096
    /// Buffers are added 64 at a time as receives find none free, up to this many per worker.
    static let ringMaxBuffers = 8192

    /// Makes this worker's ring (on its own thread); nil, with one log line, when the kernel
    /// refuses (the worker then runs the epoll engine).
    func makeRing() -> Ring? {
        do {
            let r = try Ring(
                entries: Worker.ringEntries, bufferSize: settings.copyBufferSize, maxBuffers: Worker.ringMaxBuffers,
                sqpoll: settings.engine == .ioUringSQPoll)
            _ = r.grow(64)
            r.poll(loop.descriptor, Epoll.in, multishot: true, UInt64(RingOp.epoll.rawValue) << 44)
            return r
        } catch {
            logger.warning("worker \(id): io_uring refused (\(error)); this worker uses epoll")
            return nil
        }
    }

    /// One turn of the io_uring engine (see `turn`).
    func ringTurn(_ ring: Ring, maxWaitMs: Int32) -> Bool {
        var timeout = waitTimeout(maxWaitMs)
        // Receives waiting for a buffer are retried every millisecond.
        if !starved.isEmpty { timeout = timeout < 0 ? 1 : min(timeout, 1) }
        do {
            try ring.submitAndWait(timeoutMs: timeout)
        } catch {
            logger.critical("worker \(id): \(error)")
            return false
        }
        now = monotonicMillis()
        ring.tick(now)
        var epollReady = false
        while true {
            let n = ring.reap()
            if n == 0 { break }
            for k in 0..<n {
                let (data, res, buffer, more) = ring.completion(at: k)
                if data >> 44 & 0xF == RingOp.epoll.rawValue {
                    epollReady = true
                    if !more { ring.poll(loop.descriptor, Epoll.in, multishot: true, data) }
                    continue
                }
                complete(ring, data, res, buffer)
            }
        }
        if epollReady {
            while true {
                let n: Int
                do { n = try loop.wait(timeoutMs: 0) } catch { break }
                dispatchEvents(n)
                if n < Int(loop.capacity) { break }
            }
        }
        if !starved.isEmpty { feedStarved(ring) }
        afterEvents()
        return true
    }

    /// One completion: find its connection (if it is still the same one) and move on.
    func complete(_ ring: Ring, _ data: UInt64, _ res: Int32, _ buffer: Int32) {
        guard let op = RingOp(rawValue: data >> 44 & 0xF) else { return }
        let i = Int32(truncatingIfNeeded: data & 0xFF_FFFF)
        let gen = UInt32(truncatingIfNeeded: data >> 24) & 0xF_FFFF
        let live = i < table.highWater && table[i].pointee.state != .free && table[i].pointee.gen & 0xF_FFFF == gen
        switch op {
        case .recvUp, .recvDown:
            guard live, table[i].pointee.state == .established else {
                if buffer >= 0 { ring.recycle(buffer) }
                return
            }
            received(ring, i, up: op == .recvUp, res, buffer)
        case .sendUp, .sendDown:
            let b = Int32(truncatingIfNeeded: data >> 48)
            guard live, table[i].pointee.state == .established else { return ring.recycle(b) }
            sent(ring, i, up: op == .sendUp, res)
        case .connect:
            let attempt = UInt16(truncatingIfNeeded: data >> 48)
            guard live, table[i].pointee.state == .connecting, table[i].pointee.connectAttempt == attempt else {
                return
            }
            table[i].pointee.connectOp = 0
            let failed = res < 0 || UInt32(res) & (Epoll.err | Epoll.hup) != 0
            connectCompleted(i, failed: failed)
        case .queuedHangup:
            guard live else { return }
            table[i].pointee.hangupOp = 0
            if table[i].pointee.state == .queued && res >= 0 { finish(i, .clientReset) }
        case .srcReadyUp, .srcReadyDown, .dstReadyUp, .dstReadyDown:
            guard live, table[i].pointee.state == .established else { return }
            let up = op == .srcReadyUp || op == .dstReadyUp
            let c = table[i]
            let ev = res < 0 ? Epoll.err : UInt32(res)
            if op == .srcReadyUp || op == .srcReadyDown {
                setSrcReadable(c, up, true)
                if ev & (Epoll.rdhup | Epoll.hup | Epoll.err) != 0 {
                    if up { c.pointee.clientRdHup = true } else { c.pointee.serverRdHup = true }
                }
            } else {
                setDstWritable(c, up, true)
            }
            pumpPolled(ring, i, up: up)
        case .epoll, .housekeeping:
            return
        }
    }

    /// A bulk direction: move what readiness allows (splice through a pipe: `pumpDirection`, the
    /// epoll engine's code), then wait for what it blocked on — or, once the source is drained
    /// and nothing is held, go back to ring receives.
    func pumpPolled(_ ring: Ring, _ i: Int32, up: Bool) {
        let c = table[i]
        withDir(c, up) { $0.ringOp = 0 }
        let step = pumpDirection(i, up: up)
        if case .failed(let reason) = step { return finish(i, reason) }
        if withDir(c, up, { $0.shut }) {
            if c.pointee.up.shut && c.pointee.down.shut { finish(i, .done) }
            return
        }
        if withDir(c, up, { $0.hasPending }) && !dstWritable(c, up) {
            armPoll(ring, i, up: up, source: false)
        } else if withDir(c, up, { $0.splicing || $0.hasPending || $0.buffer >= 0 }) || srcReadable(c, up) {
            // Blocked on the source, or stopped by the fairness budget (the poll fires at once).
            armPoll(ring, i, up: up, source: true)
        } else {
            withDir(c, up) { $0.polled = false }
            armRecv(ring, i, up: up)
        }
    }

    /// Starts moving bytes both ways on a connection that just became established.
    func ringStart(_ ring: Ring, _ i: Int32) {
        let c = table[i]
        if c.pointee.clientOnEpoll {
            // Its header was read through epoll; from now on the ring has it.
            loop.remove(c.pointee.clientFd)
        }
        // Bytes held before the connect (a PROXY header, what `forwardEarly` read and could not
        // yet send) are in a plain buffer: flushed the polled way (`pumpDirection`, a poll for
        // room if the socket takes only part), then the direction goes on with ring receives.
        if c.pointee.up.bufEnd > c.pointee.up.bufStart, c.pointee.up.buffer >= 0 {
            c.pointee.up.polled = true
            setDstWritable(c, true, true)
            setSrcReadable(c, true, false)
            pumpPolled(ring, i, up: true)
            guard c.pointee.state == .established else { return }
        } else {
            armRecv(ring, i, up: true)
        }
        armRecv(ring, i, up: false)
    }

    /// A receive finished: send what came, or pass the end on.
    func received(_ ring: Ring, _ i: Int32, up: Bool, _ res: Int32, _ buffer: Int32) {
        let c = table[i]
        if res > 0 && buffer >= 0 {
            let n = Int(res)
            withDir(c, up) {
                $0.buffer = buffer
                $0.bufStart = 0
                $0.bufEnd = res
                $0.bytes &+= UInt64(n)
            }
            count(c, up, n, spliced: false)
            touch(c, dstIsClient: up)
            armSend(ring, i, up: up, buffer, from: 0, to: res)
            return
        }
        if buffer >= 0 { ring.recycle(buffer) }
        withDir(c, up) { $0.ringOp = 0 }
        switch -res {
        case 0:
            withDir(c, up) { $0.eof = true }
            passEnd(i, up: up)
        case ENOBUFS:
            // Every buffer is in flight: add more, or wait for one to come back.
            if ring.replenish(64) {
                armRecv(ring, i, up: up)
            } else {
                starved.append((i, c.pointee.gen, up))
            }
        case EINTR, EAGAIN:
            armRecv(ring, i, up: up)
        default:
            finish(i, up ? .clientReset : .serverReset)
        }
    }

    /// A send finished: send the rest, or receive again (or pass the end on).
    func sent(_ ring: Ring, _ i: Int32, up: Bool, _ res: Int32) {
        let c = table[i]
        let b = withDir(c, up) { $0.buffer }
        if res < 0 {
            if -res == EINTR || -res == EAGAIN {
                let (s, e) = withDir(c, up) { ($0.bufStart, $0.bufEnd) }
                armSend(ring, i, up: up, b, from: s, to: e)
                return
            }
            withDir(c, up) {
                $0.buffer = -1
                $0.ringOp = 0
            }
            ring.recycle(b)
            return finish(i, up ? .serverReset : .clientReset)
        }
        touch(c, dstIsClient: !up)
        let (s, e) = withDir(c, up) {
            $0.bufStart += res
            return ($0.bufStart, $0.bufEnd)
        }
        if s < e { return armSend(ring, i, up: up, b, from: s, to: e) }
        let full = e == Int32(ring.bufferSize)
        withDir(c, up) {
            $0.buffer = -1
            $0.bufStart = 0
            $0.bufEnd = 0
            $0.ringOp = 0
        }
        ring.recycle(b)
        if full {
            // A full buffer means bulk: from now on this direction splices, as with epoll.
            withDir(c, up) {
                $0.polled = true
                $0.splicing = true
            }
            setSrcReadable(c, up, true)
            setDstWritable(c, up, true)
            return pumpPolled(ring, i, up: up)
        }
        armRecv(ring, i, up: up)
    }

    /// The source of a direction sent FIN and everything before it was delivered: shut the
    /// destination's write side; both directions done closes the connection.
    func passEnd(_ i: Int32, up: Bool) {
        let c = table[i]
        if !withDir(c, up, { $0.shut }) {
            // A plain call, not IORING_OP_SHUTDOWN: the kernel runs that one on a worker thread
            // that looks the descriptor up later, when it may already name another connection.
            // The other way already ended: the close just below sends this FIN.
            if !withDir(c, !up, { $0.shut }) { Sys.shutdownWrite(up ? c.pointee.serverFd : c.pointee.clientFd) }
            withDir(c, up) { $0.shut = true }
        }
        if c.pointee.up.shut && c.pointee.down.shut { finish(i, .done) }
    }

    /// Receives that found no buffer, retried once buffers came back.
    func feedStarved(_ ring: Ring) {
        let waiting = starved
        starved.removeAll(keepingCapacity: true)
        for (i, gen, up) in waiting {
            let c = table[i]
            guard c.pointee.state == .established, c.pointee.gen == gen else { continue }
            armRecv(ring, i, up: up)
        }
    }

    // MARK: - Operations in flight
    // Every operation queued for a connection is queued here, which records its word (one per
    // direction, plus the connect and queued-hangup polls): closing cancels exactly those.

    @inline(__always)
    func armRecv(_ ring: Ring, _ i: Int32, up: Bool) {
        let c = table[i]
        let w = ringWord(i, up ? .recvUp : .recvDown)
        withDir(c, up) { $0.ringOp = w }
        ring.recv(up ? c.pointee.clientFd : c.pointee.serverFd, w)
    }

    @inline(__always)
    func armSend(_ ring: Ring, _ i: Int32, up: Bool, _ buffer: Int32, from start: Int32, to end: Int32) {
        let c = table[i]
        let w = ringWord(i, up ? .sendUp : .sendDown, buffer: buffer)
        withDir(c, up) { $0.ringOp = w }
        ring.send(up ? c.pointee.serverFd : c.pointee.clientFd, ring.buffer(buffer) + Int(start), Int(end - start), w)
    }

    /// The server socket's connect: a poll whose word names this attempt (a completion of an
    /// earlier attempt's poll, cancelled with its socket, then misses).
    @inline(__always)
    func armConnect(_ ring: Ring, _ i: Int32) {
        let c = table[i]
        c.pointee.connectAttempt &+= 1
        c.pointee.connectOp = ringWord(i, .connect, buffer: Int32(c.pointee.connectAttempt))
        ring.poll(c.pointee.serverFd, Epoll.out | Epoll.err | Epoll.hup, c.pointee.connectOp)
    }

    /// A queued client's hang-up.
    @inline(__always)
    func armHangup(_ ring: Ring, _ i: Int32) {
        let c = table[i]
        c.pointee.hangupOp = ringWord(i, .queuedHangup)
        ring.poll(c.pointee.clientFd, Epoll.hup | Epoll.err, c.pointee.hangupOp)
    }

    /// A bulk direction waits for its source (`source`) or its destination.
    @inline(__always)
    func armPoll(_ ring: Ring, _ i: Int32, up: Bool, source: Bool) {
        let c = table[i]
        let op: RingOp = source ? (up ? .srcReadyUp : .srcReadyDown) : (up ? .dstReadyUp : .dstReadyDown)
        let w = ringWord(i, op)
        withDir(c, up) { $0.ringOp = w }
        let fd = (up == source) ? c.pointee.clientFd : c.pointee.serverFd
        ring.poll(fd, source ? Epoll.in | Epoll.rdhup : Epoll.out, w)
    }

    static let housekeepingWord = UInt64(RingOp.housekeeping.rawValue) << 44

    /// Closes the connection's sockets (-1: keep that one) after cancelling what the ring has
    /// in flight for it; with epoll, plain closes.
    func closeSockets(_ i: Int32, client: Int32, server: Int32) {
        let c = table[i]
        guard let ring else {
            if client >= 0 { Sys.close(client) }
            if server >= 0 { Sys.close(server) }
            return
        }
        if client >= 0 {
            ring.cancelAndClose(
                c.pointee.up.ringOp, c.pointee.down.ringOp, c.pointee.connectOp, c.pointee.hangupOp,
                fds: client, server, Worker.housekeepingWord)
        } else {
            // Only the server socket of a failed connect: its connect poll.
            ring.cancelAndClose(c.pointee.connectOp, 0, 0, 0, fds: server, -1, Worker.housekeepingWord)
        }
        c.pointee.up.ringOp = 0
        c.pointee.down.ringOp = 0
        c.pointee.connectOp = 0
        if client >= 0 { c.pointee.hangupOp = 0 }
    }
}
