import BallastCore
import BallastIO
import Logging
import Synchronization
import Testing

@testable import BallastProxy

#if canImport(Glibc)
    import Glibc
#endif

/// A worker with one established connection whose two sockets are socketpair ends: the test holds
/// the client's and the server's other ends and turns the worker's loop by hand. No listener, no
/// connect, no service: only the relay state machine (Worker+Relay.swift) and the loop under it.
final class RelayLab {
    let worker: Worker
    /// The test's ends: what the client and the server would hold.
    let client: Int32
    let server: Int32
    let index: Int32
    private var closed: Set<Int32> = []

    init(copyBuffer: Int = 16 << 10, pipe: Int = 64 << 10) throws {
        worker = try Worker(
            id: 0, shared: ProxyShared(maxconn: 16),
            settings: WorkerSettings(
                pipeSize: pipe, copyBufferSize: copyBuffer, tableCapacity: 16, logConnections: false),
            logger: Logger(label: "relay-test"))
        var a: [Int32] = [-1, -1]
        var b: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &a) == 0,
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &b) == 0
        else { throw SysError("socketpair", errno) }
        client = a[0]
        server = b[1]
        for fd in [a[1], b[0]] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        for fd in [client, server] { Socket.setReceiveTimeout(fd, seconds: 5) }
        index = worker.table.allocate()!
        let c = worker.table[index]
        c.pointee.state = .established
        c.pointee.clientFd = a[1]
        c.pointee.serverFd = b[0]
        c.pointee.clientWritable = true
        c.pointee.serverWritable = true
        worker.shared.connections.wrappingAdd(1, ordering: .relaxed)
        let interest = Epoll.in | Epoll.out | Epoll.rdhup | Epoll.edgeTriggered
        try worker.loop.add(a[1], interest, worker.token(index, .client, c.pointee.gen))
        try worker.loop.add(b[0], interest, worker.token(index, .server, c.pointee.gen))
    }

    deinit {
        worker.closeEverything()  // the connection, if still open, and the pooled pipes
        for fd in [client, server] where !closed.contains(fd) { close(fd) }
    }

    var conn: Conn { worker.table[index].pointee }
    var isOpen: Bool { worker.table.live == 1 }

    func closeEnd(_ fd: Int32) {
        close(fd)
        closed.insert(fd)
    }

    /// Turns the loop until `done` or 3 s; true when `done` became true.
    @discardableResult
    func turn(until done: () -> Bool = { false }, ms: Int64 = 3000) -> Bool {
        let deadline = monotonicMillis() + ms
        while monotonicMillis() < deadline {
            if done() { return true }
            _ = worker.turn(maxWaitMs: 10)
        }
        return done()
    }

    static func write(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    /// Reads exactly `count` bytes (or until EOF, an error or the 5 s receive timeout).
    static func read(_ fd: Int32, _ count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while out.count < count {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, min($0.count, count - out.count)) }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    /// What a read returns next: 0 for EOF, -1 for an error or the receive timeout.
    static func nextRead(_ fd: Int32) -> Int {
        var b: UInt8 = 0
        return Glibc.read(fd, &b, 1)
    }
}

/// Bytes with a pattern that a reordering, a loss or a duplicate would break.
func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 12) &+ Int(seed)) }
}

struct RelayStateTests {
    @Test("small messages cross both ways through a copy buffer; an idle connection holds no buffer or pipe")
    func smallMessages() throws {
        let lab = try RelayLab()
        for round in 0..<3 {
            let ask = Array("GET key:\(round)\r\n".utf8)
            #expect(RelayLab.write(lab.client, ask))
            lab.turn(until: { lab.conn.up.bytes >= UInt64(ask.count * (round + 1)) })
            #expect(RelayLab.read(lab.server, ask.count) == ask)
            let answer = Array("$5\r\nvalue\r\n".utf8)
            #expect(RelayLab.write(lab.server, answer))
            lab.turn(until: { lab.conn.down.bytes >= UInt64(answer.count * (round + 1)) })
            #expect(RelayLab.read(lab.client, answer.count) == answer)
            #expect(lab.conn.up.buffer == -1 && lab.conn.down.buffer == -1)
            #expect(lab.conn.up.pipe == -1 && lab.conn.down.pipe == -1)
            #expect(!lab.conn.up.splicing && !lab.conn.down.splicing)
        }
        #expect(lab.isOpen)
    }

    @Test("bulk: a full copy buffer switches the direction to splice; 4 MiB arrive intact and in order")
    func bulkSplices() throws {
        let lab = try RelayLab()
        let data = pattern(4 << 20, seed: 7)
        let received = Mutex<[UInt8]>([])
        let writer = NamedThread.start("relay-writer") { _ = RelayLab.write(lab.server, data) }
        let reader = NamedThread.start("relay-reader") {
            let got = RelayLab.read(lab.client, data.count)
            received.withLock { $0 = got }
        }
        var sawSplice = false
        lab.turn(until: {
            sawSplice = sawSplice || lab.conn.down.splicing
            return lab.conn.down.bytes >= UInt64(data.count) && lab.conn.down.inPipe == 0
                && lab.conn.down.buffer == -1
        })
        pthread_join(writer, nil)
        pthread_join(reader, nil)
        #expect(received.withLock { $0 } == data)
        #expect(sawSplice)
        #expect(lab.worker.pipesTotal.load(ordering: .relaxed) >= 1)
        #expect(lab.conn.up.bytes == 0)
    }

    @Test("a half-close passes the FIN on while the other direction goes on; both closed ends the connection")
    func halfClose() throws {
        let lab = try RelayLab()
        #expect(RelayLab.write(lab.client, Array("last words".utf8)))
        #expect(shutdown(lab.client, Int32(SHUT_WR)) == 0)
        lab.turn(until: { lab.conn.up.shut })
        #expect(RelayLab.read(lab.server, 10) == Array("last words".utf8))
        #expect(RelayLab.nextRead(lab.server) == 0)  // the FIN, passed on
        #expect(lab.isOpen)
        // The server still answers after the client's FIN (HTTP/1.0, redis-cli with a pipe).
        #expect(RelayLab.write(lab.server, Array("the answer".utf8)))
        lab.turn(until: { lab.conn.down.bytes >= 10 })
        #expect(RelayLab.read(lab.client, 10) == Array("the answer".utf8))
        #expect(shutdown(lab.server, Int32(SHUT_WR)) == 0)
        #expect(lab.turn(until: { !lab.isOpen }))
        #expect(RelayLab.nextRead(lab.client) == 0)
    }

    @Test("backpressure: a server that does not read stops the reads from the client; nothing is lost")
    func backpressure() throws {
        let lab = try RelayLab()
        let data = pattern(8 << 20, seed: 3)
        let writer = NamedThread.start("relay-writer") { _ = RelayLab.write(lab.client, data) }
        // The server reads nothing for a while: the relay fills what the sockets and one pipe
        // hold, then waits for EPOLLOUT instead of reading on.
        lab.turn(ms: 300)
        let held = lab.conn.up.bytes
        #expect(held < UInt64(data.count))
        lab.turn(ms: 200)
        #expect(lab.conn.up.bytes == held)
        #expect(lab.conn.up.buffer != -1 || lab.conn.up.inPipe > 0)
        let received = Mutex<[UInt8]>([])
        let reader = NamedThread.start("relay-reader") {
            let got = RelayLab.read(lab.server, data.count)
            received.withLock { $0 = got }
        }
        lab.turn(until: { lab.conn.up.bytes >= UInt64(data.count) && !lab.conn.up.hasPending })
        pthread_join(writer, nil)
        pthread_join(reader, nil)
        #expect(received.withLock { $0 } == data)
    }

    @Test("a server that is gone costs the client a clean close, not a hang")
    func serverGone() throws {
        let lab = try RelayLab()
        lab.closeEnd(lab.server)
        _ = RelayLab.write(lab.client, Array("anyone there?".utf8))
        #expect(lab.turn(until: { !lab.isOpen }))
        let t0 = monotonicMillis()
        #expect(RelayLab.nextRead(lab.client) == 0)
        #expect(monotonicMillis() - t0 < 1000)
        #expect(lab.worker.shared.connections.load(ordering: .relaxed) == 0)
    }

    @Test("an event for a closed connection's slot, now reused, does not reach the new connection")
    func staleEventMisses() throws {
        let lab = try RelayLab()
        let old = lab.worker.token(lab.index, .client, lab.conn.gen)
        lab.worker.finish(lab.index, .done)
        let again = try #require(lab.worker.table.allocate())
        #expect(again == lab.index)
        var sv: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &sv) == 0)
        let c = lab.worker.table[again]
        c.pointee.state = .established
        c.pointee.clientFd = sv[0]
        c.pointee.serverFd = sv[1]
        lab.worker.shared.connections.wrappingAdd(1, ordering: .relaxed)
        // The old token's event (the closed socket's last EPOLLOUT) must not mark the new
        // connection's client writable; the new token's does.
        #expect(old != lab.worker.token(again, .client, c.pointee.gen))
        lab.worker.dispatch(old, Epoll.out)
        #expect(!c.pointee.clientWritable)
        lab.worker.dispatch(lab.worker.token(again, .client, c.pointee.gen), Epoll.out)
        #expect(c.pointee.clientWritable)
    }
}
