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

/// The relay (HAProxy's stream.c data path): both directions of a connection, copied through a
/// buffer or spliced through a pipe, and the per-direction state that moves them.
extension Worker {
    // MARK: - Relay

    enum Step {
        case blocked
        case progressed
        case failed(EndReason)
    }

    /// Moves what can be moved in both directions, then closes the connection if both are done.
    func pump(_ i: Int32) {
        let c = table[i]
        var more = false
        for k in 0..<2 {
            switch pumpDirection(i, up: k == 0) {
            case .failed(let r): return finish(i, r)
            case .progressed: more = true
            case .blocked: break
            }
        }
        if c.pointee.up.shut && c.pointee.down.shut { return finish(i, .done) }
        if more, !c.pointee.deferred {
            c.pointee.deferred = true
            deferredList.append(i)
        }
    }

    func runDeferred() {
        guard !deferredList.isEmpty else { return }
        let n = deferredList.count
        for k in 0..<n {
            let i = deferredList[k]
            let c = table[i]
            guard c.pointee.deferred else { continue }
            c.pointee.deferred = false
            if c.pointee.state == .established { pump(i) }
        }
        deferredList.removeFirst(n)
    }

    /// One direction: flush what is in flight, pass on EOF, read more. Returns `.progressed`
    /// only when it stopped because of the fairness budget (more to do right away).
    func pumpDirection(_ i: Int32, up: Bool) -> Step {
        let c = table[i]
        let src = up ? c.pointee.clientFd : c.pointee.serverFd
        let dst = up ? c.pointee.serverFd : c.pointee.clientFd
        var moved = 0
        while true {
            // 1. Flush what is in flight.
            if withDir(c, up, { $0.bufEnd > $0.bufStart }) {
                guard dstWritable(c, up) else { return .blocked }
                let (b, start, end) = withDir(c, up) { ($0.buffer, $0.bufStart, $0.bufEnd) }
                let r: IOResult<Int>
                do {
                    r = try Sys.send(dst, buffers.memory[Int(b)] + Int(start), Int(end - start))
                } catch {
                    return .failed(up ? .serverReset : .clientReset)
                }
                guard case .done(let n) = r else {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                touch(c, dstIsClient: !up)
                withDir(c, up) { $0.bufStart += Int32(n) }
                if start + Int32(n) < end {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                withDir(c, up) {
                    $0.bufStart = 0
                    $0.bufEnd = 0
                }
                releaseBuffer(c, up)
            }
            if withDir(c, up, { $0.inPipe > 0 }) {
                guard dstWritable(c, up) else { return .blocked }
                let (p, inPipe) = withDir(c, up) { ($0.pipe, $0.inPipe) }
                let r: IOResult<Int>
                do {
                    r = try Sys.splice(from: pipes.readEnd[Int(p)], to: dst, inPipe)
                } catch {
                    return .failed(up ? .serverReset : .clientReset)
                }
                guard case .done(let n) = r else {
                    setDstWritable(c, up, false)
                    return .blocked
                }
                touch(c, dstIsClient: !up)
                withDir(c, up) { $0.inPipe -= n }
                if n < inPipe {
                    // The socket took what fitted. Its buffer drains as ACKs arrive, often before
                    // the next call: with room in the pipe and more to read, read on and flush
                    // again (as HAProxy does); only EAGAIN, a full pipe or nothing to read means
                    // waiting for EPOLLOUT (the short write armed it).
                    let room = pipes.capacity - (inPipe - n)
                    if room < Worker.minRoom || !srcReadable(c, up) || withDir(c, up, { $0.eof })
                        || moved >= Worker.budget
                    {
                        setDstWritable(c, up, false)
                        return .blocked
                    }
                }
            }
            // 2. Source finished and everything delivered: pass the FIN on.
            if withDir(c, up, { $0.eof }) {
                releasePipe(c, up)
                if !withDir(c, up, { $0.shut }) {
                    // The other way already ended: both sockets are closed right after this
                    // (pump), and the close sends this FIN; a shutdown first would be a call more.
                    if !withDir(c, !up, { $0.shut }) { Sys.shutdownWrite(dst) }
                    withDir(c, up) { $0.shut = true }
                }
                return .blocked
            }
            // 3. Read more.
            guard srcReadable(c, up) else {
                releasePipe(c, up)
                return .blocked
            }
            if moved >= Worker.budget { return .progressed }
            if withDir(c, up, { $0.splicing }), let p = acquirePipe(c, up) {
                let room = pipes.capacity - withDir(c, up) { $0.inPipe }
                let r: IOResult<Int>
                do {
                    r = try Sys.splice(from: src, to: pipes.writeEnd[Int(p)], room)
                } catch {
                    return .failed(up ? .clientReset : .serverReset)
                }
                switch r {
                case .done(0):
                    withDir(c, up) { $0.eof = true }
                case .done(let n):
                    moved += n
                    withDir(c, up) {
                        $0.inPipe += n
                        $0.bytes &+= UInt64(n)
                    }
                    count(c, up, n, spliced: true)
                    touch(c, dstIsClient: up)
                case .wouldBlock:
                    // Ambiguous: the socket is empty or the pipe is full. With data in the pipe,
                    // flush and retry; with an empty pipe the socket is drained: back to copying.
                    if withDir(c, up, { $0.inPipe }) == 0 {
                        setSrcReadable(c, up, false)
                        releasePipe(c, up)
                        withDir(c, up) { $0.splicing = false }
                        return .blocked
                    }
                }
            } else {
                switch copyRead(c, up, from: src) {
                case .noBuffer, .empty: return .blocked
                case .failed: return .failed(up ? .clientReset : .serverReset)
                case .eof: break
                case .data(let n): moved += n
                }
            }
        }
    }

    enum CopyRead { case data(Int), eof, empty, failed, noBuffer }

    /// One `recv` from a direction's source into its buffer (taken from the pool), for the relay
    /// and for the early first send. A full buffer means bulk: the direction splices from then
    /// on. A short read means the socket is empty (edge-triggered epoll reports new data), unless
    /// the peer already hung up: the event that said so has been handled, none will follow, and
    /// the FIN must still be read, so the source stays readable.
    @inline(__always)
    func copyRead(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, from src: Int32) -> CopyRead {
        guard let b = acquireBuffer(c, up) else { return .noBuffer }
        let size = settings.copyBufferSize
        let r: IOResult<Int>
        do {
            r = try Sys.recv(src, buffers.memory[Int(b)], size)
        } catch {
            releaseBuffer(c, up)
            return .failed
        }
        switch r {
        case .done(0):
            releaseBuffer(c, up)
            withDir(c, up) { $0.eof = true }
            return .eof
        case .done(let n):
            withDir(c, up) {
                $0.bufStart = 0
                $0.bufEnd = Int32(n)
                $0.bytes &+= UInt64(n)
                if n == size { $0.splicing = true }
            }
            count(c, up, n, spliced: false)
            if n < size && !srcRdHup(c, up) { setSrcReadable(c, up, false) }
            touch(c, dstIsClient: up)
            return .data(n)
        case .wouldBlock:
            releaseBuffer(c, up)
            setSrcReadable(c, up, false)
            return .empty
        }
    }

    /// Adds relayed bytes to this worker's slots of the service and the server.
    @inline(__always)
    func count(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ n: Int, spliced: Bool) {
        let v = UInt64(n)
        if up {
            c.pointee.serviceSlot?.pointee.bytesIn &+= v
            c.pointee.serverSlot?.pointee.bytesIn &+= v
        } else {
            c.pointee.serviceSlot?.pointee.bytesOut &+= v
            c.pointee.serverSlot?.pointee.bytesOut &+= v
            if spliced { c.pointee.serviceSlot?.pointee.splicedOut &+= v }
        }
    }

    @inline(__always)
    func withDir<R>(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ body: (inout Direction) -> R) -> R {
        up ? body(&c.pointee.up) : body(&c.pointee.down)
    }

    @inline(__always)
    func dstWritable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.serverWritable : c.pointee.clientWritable
    }

    @inline(__always)
    func setDstWritable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ v: Bool) {
        if up { c.pointee.serverWritable = v } else { c.pointee.clientWritable = v }
    }

    @inline(__always)
    func srcReadable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.clientReadable : c.pointee.serverReadable
    }

    @inline(__always)
    func setSrcReadable(_ c: UnsafeMutablePointer<Conn>, _ up: Bool, _ v: Bool) {
        if up { c.pointee.clientReadable = v } else { c.pointee.serverReadable = v }
    }

    @inline(__always)
    func srcRdHup(_ c: UnsafeMutablePointer<Conn>, _ up: Bool) -> Bool {
        up ? c.pointee.clientRdHup : c.pointee.serverRdHup
    }

    @inline(__always)
    func touch(_ c: UnsafeMutablePointer<Conn>, dstIsClient: Bool) {
        // Reading from one side and writing to the other are both activity on that side.
        if dstIsClient { c.pointee.lastClientIO = now } else { c.pointee.lastServerIO = now }
    }
}
